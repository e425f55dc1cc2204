"""Engine-agnostic serving runtime. Imports neither TorchServe nor ``training``."""
