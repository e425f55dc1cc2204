"""TorchServe handler for robust embedders: the k nearest gallery items or the embedding, native JSON or
KServe v2."""
from handlers.base import TorchServeAdapter
from serving.runtime.service import RetrievalService


class RetrievalHandler(TorchServeAdapter):
    service_class = RetrievalService
