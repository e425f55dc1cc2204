"""Inference sessions over an exported artifact: ONNX Runtime (CUDA provider where present, else CPU) or the
TorchScript twin. Both take float32 [N, C, H, W] numpy arrays in [0, 1] and return float32 [N, K] or [N, D]."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from serving.runtime.artifacts import ExportManifest, verify_artifact
from serving.runtime.errors import ArtifactError

log = logging.getLogger(__name__)


class InferenceSession(Protocol):
    engine: str
    device: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [N, C, H, W] in [0, 1] -> float32 [N, K] (logits) or [N, D] (embeddings)."""
        ...


def auto_threads(workers: int = 1) -> int:
    """Intra-op threads for one of ``workers`` worker processes: the cores this process may run on, shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(workers)))


class OnnxSession:
    engine = "onnx"

    def __init__(self, path: str | Path, *, threads: int = 1, device: str = "auto", gpu_id: Optional[int] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 1:
            # Idle pool threads sleep instead of spinning: a spinning pool burns its cores between batches, which
            # on a small machine are the cores TorchServe's frontend needs to read the next requests.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers: list = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id or 0)}))
        elif device == "cuda":
            raise ArtifactError("device 'cuda' asked for, but ONNX Runtime here has no CUDA provider "
                                f"(available: {available}); install onnxruntime-gpu")
        self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self._input = self._sess.get_inputs()[0].name
        self._output = self._sess.get_outputs()[0].name
        self.device = "cuda" if self._sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run([self._output], {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]


def load_torchscript(path: str | Path, device="cpu"):
    """The TorchScript artifact as a module in eval mode on ``device``: what the TorchScript session serves, the
    probes differentiate and the export's parity check runs."""
    import torch

    with warnings.catch_warnings():
        # Deprecated in torch 2.13 but still the differentiable twin of the ONNX artifact.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


class TorchScriptSession:
    engine = "torchscript"

    def __init__(self, path: str | Path, *, threads: int = 1, device: str = "auto", gpu_id: Optional[int] = None):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{int(gpu_id or 0)}"
        self._torch = torch
        self._device = torch.device(device)
        if self._device.type == "cpu":
            torch.set_num_threads(threads)
        self.module = load_torchscript(path, self._device)
        self.device = self._device.type

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._device))
        return out.float().cpu().numpy()


def open_session(root: str | Path, manifest: ExportManifest, *, engine: str = "onnx", fallback: bool = True,
                 threads: int = 1, device: str = "auto", gpu_id: Optional[int] = None) -> InferenceSession:
    """A session over the verified artifact of ``engine``; with ``fallback``, the TorchScript twin when ONNX
    Runtime cannot load the ONNX artifact here."""
    if engine == "onnx":
        # A hash mismatch is never papered over by the fallback: a changed file is a broken export.
        path = verify_artifact(root, manifest, "onnx")
        try:
            return OnnxSession(path, threads=threads, device=device, gpu_id=gpu_id)
        except Exception as e:  # ONNX Runtime's own errors derive from Exception only
            if not fallback or "torchscript" not in manifest.artifacts:
                raise
            log.warning("ONNX Runtime session unavailable (%s); serving the TorchScript artifact instead", e)
    elif engine != "torchscript":
        raise ValueError(f"unknown engine {engine!r}; choose onnx or torchscript")
    return TorchScriptSession(verify_artifact(root, manifest, "torchscript"), threads=threads, device=device,
                              gpu_id=gpu_id)
