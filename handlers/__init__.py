"""TorchServe adapters: thin handlers over the engine-agnostic ``serving.runtime``. Nothing here imports
``training``; everything TorchServe-specific lives here and in the archiving code."""
