"""Served tasks (:class:`ServedTask`), one module each, registered with :func:`register_task`: the registry is
the only list of task names. A new task is one module here plus its import below."""
from serving.runtime.tasks.base import (GateCheck, MetricSample, ServedTask, TaskName, UnknownTask, get_task,
                                        register_task, task_names)
from serving.runtime.tasks import classification, embedding  # noqa: F401, E402  (registers them)

__all__ = ["GateCheck", "MetricSample", "ServedTask", "TaskName", "UnknownTask", "get_task", "register_task", "task_names"]
