"""TorchServe handler for a model of any registered served task: the service is the one of the task its
``spec.json`` names (:mod:`serving.runtime.tasks`), so a new task needs no handler file of its own."""
from handlers.base import TorchServeAdapter


class ServedTaskHandler(TorchServeAdapter):
    service_class = None
