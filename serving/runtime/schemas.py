"""Request and response schemas: the native JSON API, the KServe v2 inference protocol, and handler settings.

Native requests (one image each; a server batches requests together):
  classification  {"image": "<base64 PNG/JPEG>"} or {"tensor": {"shape": [C, H, W], "data": [...]}}, "top_k": 3
  retrieval       the same input, "k": 10, "output": "neighbors" | "embedding" | "both"
Raw PNG/JPEG bytes are accepted as the whole body too. ``top_k``/``k``/``output`` may also come as headers
(``X-Top-K``, ``X-K``, ``X-Output``) or multipart form fields (a host's parameters), beside raw bytes or a JSON body.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.runtime.probing.params import ProbeSettings
from serving.runtime.spec import Frozen


class _Request(BaseModel):
    # Requests are not frozen (they are built once and read), but unknown keys are refused so a typo such as
    # "topk" fails loudly instead of being ignored.
    model_config = ConfigDict(extra="forbid")


class TensorInput(_Request):
    """One image as numbers: shape [C, H, W] (or [H, W] for one channel, or [1, C, H, W]); ``data`` flat or
    nested, row-major. float32 values lie in [0, 1]; uint8 values in 0..255."""

    shape: list[int] = Field(min_length=2, max_length=4)
    data: list[Any]
    dtype: Literal["float32", "uint8"] = "float32"


class _ImageRequest(_Request):
    image: Optional[str] = Field(None, description="base64 PNG or JPEG, optionally as a data: URL")
    tensor: Optional[TensorInput] = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.image is None) == (self.tensor is None):
            raise ValueError("give exactly one of 'image' (base64 PNG/JPEG) or 'tensor' ({shape, data})")
        return self


class ClassifyOptions(_Request):
    """Options of a classification request: in the JSON body, as v2 ``parameters``, or as headers/form fields
    beside raw image bytes."""

    top_k: Optional[int] = Field(None, ge=1)


class RetrieveOptions(_Request):
    k: Optional[int] = Field(None, ge=1)
    output: Literal["neighbors", "embedding", "both"] = "neighbors"


class ClassifyRequest(ClassifyOptions, _ImageRequest):
    pass


class RetrieveRequest(RetrieveOptions, _ImageRequest):
    pass


class Prediction(Frozen):
    index: int
    label: str
    probability: float


class ClassificationResponse(Frozen):
    """One image's answer. ``probabilities`` (every class's, in class order) is filled only when asked for
    (the v2 ``probabilities`` output)."""

    model: str
    predictions: list[Prediction]
    probabilities: Optional[list[float]] = None


class Neighbor(Frozen):
    id: str
    label: int
    label_name: Optional[str] = None
    distance: float  # cosine distance, 1 - <q, g> on unit vectors: 0 identical, 2 opposite


class RetrievalResponse(Frozen):
    """One image's answer: the nearest gallery items, the embedding, or both, as asked."""

    model: str
    neighbors: Optional[list[Neighbor]] = None
    embedding: Optional[list[float]] = None


# --- KServe v2 (open inference protocol) ----------------------------------------------------------------------

V2Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                     "FP16", "FP32", "FP64", "BYTES"]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: V2Datatype
    parameters: Optional[dict[str, Any]] = None
    # Absent when the tensor travels as binary data after the JSON header (parameters.binary_data_size).
    data: Optional[list[Any]] = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Optional[dict[str, Any]] = None


class V2Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: Optional[list[V2RequestedOutput]] = None


class V2Response(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    outputs: list[V2Tensor]


# --- Settings ---------------------------------------------------------------------------------------------------


class ServiceSettings(Frozen):
    """How a served model answers; read from the ``handler:`` section of an archive's ``model-config.yaml``."""

    engine: Literal["onnx", "torchscript"] = "onnx"
    fallback_to_torchscript: bool = True  # when ONNX Runtime is unusable here, serve the TorchScript twin
    # Intra-op threads per worker (ONNX Runtime, TorchScript, exact gallery search). 0: the cores this process may
    # use divided by the model's workers, so one worker owns the machine and N workers share it without
    # oversubscription (serving.runtime.session.auto_threads).
    threads: int = Field(0, ge=0)
    top_k: int = Field(5, ge=1)
    k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_image_bytes: int = Field(4 << 20, ge=1)
    # Decode budgets, checked from each image's header before it is decoded. None: derived from the model's
    # input size (see serving.runtime.preprocess.pixel_budgets): 16 x the input area, at least 1024 x 1024,
    # per image; 4 such images per request.
    max_image_pixels: Optional[int] = Field(None, ge=1)
    max_request_pixels: Optional[int] = Field(None, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    # The handler's own metrics (InvalidRequests, InferredImages, DecodeTime, InferenceTime) go out at most once per
    # this many seconds, counters summed and gauges at their latest value (0: after every batch). Each metric is a
    # log line the frontend parses; four per batch cost a one-request batch about 0.5 ms of latency.
    metrics_interval_s: float = Field(1.0, ge=0, le=60)
    self_test: bool = True  # run the probe set at start-up and refuse to serve on a mismatch
    self_test_tolerance: float = Field(1e-4, gt=0)
    probe: ProbeSettings = ProbeSettings()  # on-demand robustness probes: limits

    @model_validator(mode="after")
    def _check(self):
        if self.k > self.max_k:
            raise ValueError(f"k ({self.k}) exceeds max_k ({self.max_k})")
        return self
