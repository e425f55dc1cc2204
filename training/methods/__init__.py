"""Training methods: one per file, registered by name. Importing this package registers the built-in ones."""
from training.methods.base import (  # noqa: F401
    TrainingMethod,
    NoOptions,
    build_method,
    method_class,
    list_methods,
    register_method,
)
from training.methods import standard  # noqa: F401  (registers)
