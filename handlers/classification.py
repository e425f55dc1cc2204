"""TorchServe handler for robust classifiers: top-k labels and probabilities, native JSON or KServe v2."""
from handlers.base import TorchServeAdapter
from serving.runtime.service import ClassifierService


class ClassificationHandler(TorchServeAdapter):
    service_class = ClassifierService
