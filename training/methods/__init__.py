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
from training.methods import pgd_at, trades, agkd_bml  # noqa: F401,E402  (register)
from training.methods import triplet, est, act, hm  # noqa: F401,E401  (register the embedder methods)
