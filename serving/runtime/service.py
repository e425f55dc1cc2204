"""Engine-agnostic model services: decode a request, run a batch, encode the answers.

A host (the TorchServe handler, the benchmark, a test) hands over :class:`RawRequest` objects and gets one
:class:`Reply` per request. A request that cannot be decoded gets its own 4xx reply; the others in the batch are
answered normally. Three request shapes are understood, told apart by the body:

- raw PNG/JPEG bytes (options as query parameters),
- the native JSON API (:mod:`serving.runtime.schemas`),
- the KServe v2 inference protocol (a JSON object with ``inputs``), answered in v2 form.
"""
from __future__ import annotations

import io
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import numpy as np
from pydantic import ValidationError

from serving.runtime.artifacts import ExportManifest, load_manifest, verify_artifact
from serving.runtime import jsonsafe
from serving.runtime.errors import ArtifactError, InvalidInput, RequestError, UnsupportedMediaType
from serving.runtime.index import RetrievalIndex
from serving.runtime.preprocess import (
    decode_image,
    image_from_base64,
    sniff_image,
    tensor_input_to_array,
    tensor_to_array,
)
from serving.runtime.probes import ProbeSet, clean_score
from serving.runtime.schemas import (
    ClassifyOptions,
    ClassifyRequest,
    RetrieveOptions,
    RetrieveRequest,
    ServiceSettings,
    V2Request,
    V2Response,
    V2Tensor,
)
from serving.runtime.session import InferenceSession, open_session

log = logging.getLogger(__name__)

Protocol_ = Literal["native", "v2"]
FORM = "application/x-www-form-urlencoded"
_V2_FLOAT = {"FP16", "FP32", "FP64"}


@dataclass
class RawRequest:
    """One request as a host received it: the body (bytes, text, or JSON already parsed) and string options
    (query parameters or form fields)."""

    body: Any
    params: Mapping[str, Any] = field(default_factory=dict)
    probe_key: Optional[str] = None  # the X-Probe-Key a probe request came with
    content_type: Optional[str] = None  # as the client declared it; only used to explain a mismatch


@dataclass
class Decoded:
    x: np.ndarray  # float32 [n, C, H, W] in [0, 1]
    protocol: Protocol_
    options: dict[str, Any]


@dataclass
class Reply:
    status: int
    body: dict[str, Any]

    def json(self) -> str:
        """Standard JSON only: a non-finite number in an answer is an error on our side, not 'NaN' on the wire."""
        return json.dumps(self.body, allow_nan=False)


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class ModelService:
    """Common loading and request handling; subclasses define the task's options, forward pass and answers."""

    task: str = ""

    def __init__(self, root: str | Path, settings: ServiceSettings = ServiceSettings(), *, name: Optional[str] = None,
                 version: Optional[str] = None, device: str = "auto", gpu_id: Optional[int] = None,
                 manifest: Optional[ExportManifest] = None):
        self.root = Path(root)
        self.settings = settings
        self.manifest = manifest or load_manifest(self.root)
        self.spec = self.manifest.model
        if self.spec.task != self.task:
            raise ArtifactError(f"{self.root} holds a {self.spec.task} model, not a {self.task} model")
        self.name = name or self.manifest.name
        self.version = version
        self.gpu_id = gpu_id
        self.session: InferenceSession = open_session(
            self.root, self.manifest, engine=settings.engine, fallback=settings.fallback_to_torchscript,
            threads=settings.threads, device=device, gpu_id=gpu_id)
        self.probe_runner = None  # set by enable_probes()
        self.probes: Optional[ProbeSet] = None
        if "probes" in self.manifest.artifacts:
            self.probes = ProbeSet.load(verify_artifact(self.root, self.manifest, "probes"))
        if settings.self_test:
            self.self_test()

    def enable_probes(self, state_dir: str | Path, key_sha256: Optional[str], on_report=None):
        """Accepts probe requests from now on. state_dir: the gate and history folder shared by this model's
        workers; key_sha256: SHA-256 of the probe key (None: every probe is refused with 403)."""
        from serving.runtime.probing.runner import ProbeRunner

        self.probe_runner = ProbeRunner(self, self.settings.probe, state_dir, key_sha256, on_report)
        return self.probe_runner

    def gradient_module(self):
        """The differentiable twin of the served artifact (TorchScript, eval mode), for probes: on the GPU the
        serving session runs on, else on the CPU."""
        import warnings

        import torch

        path = verify_artifact(self.root, self.manifest, "torchscript")
        dev = "cpu"
        if self.session.device == "cuda" and torch.cuda.is_available():
            dev = f"cuda:{int(self.gpu_id or 0)}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location=dev).eval()

    @property
    def option_keys(self) -> tuple[str, ...]:
        return tuple(self.options_model.model_fields)

    @property
    def engine(self) -> str:
        return self.session.engine

    def self_test(self) -> float:
        """The start-up self-check. (1) This engine on this machine reproduces the outputs recorded at export
        within the tolerance. (2) The probe images, encoded as PNG and decoded the way requests are, score at or
        above the spec's bar (``probe_check``): catches wrong weights and preprocessing that does not match
        training. Raises ArtifactError, so the model fails to load, saying which check failed."""
        if self.probes is None:
            log.warning("%s: no probe set; skipping the start-up self-test", self.name)
            return 0.0
        dev = self.probes.max_deviation(self.session.run)
        if not dev <= self.settings.self_test_tolerance:
            raise ArtifactError(f"{self.name}: the {self.engine} engine gives outputs {dev:.3g} away from those "
                                f"recorded at export (tolerance {self.settings.self_test_tolerance:g})")
        check = self.manifest.probe_check
        if check is not None:
            score = clean_score(self.forward(self._decoded_probe_images()), self.probes.y, self.spec.task)
            if score < check.min_value:
                raise ArtifactError(
                    f"{self.name}: start-up self-check failed: clean {check.metric} {score:.3f} on the "
                    f"{len(self.probes)} probe images is below the spec's threshold {check.min_value:.3f} "
                    f"(the model is known to score {check.reference:.3f}, from {check.reference_source}); "
                    f"the weights or the preprocessing do not match the model that was trained")
            log.info("%s: self-check: clean %s %.3f on %d probes (threshold %.3f)", self.name, check.metric,
                     score, len(self.probes), check.min_value)
        log.info("%s: self-test passed on %d probes with %s (max deviation %.2g)", self.name, len(self.probes),
                 self.engine, dev)
        return dev

    def _decoded_probe_images(self) -> np.ndarray:
        """The probe images as requests bring them: PNG bytes through :func:`decode_image`. float32 [N, C, H, W].
        Images with other than 1 or 3 channels travel as tensors, so they are taken as they are."""
        assert self.probes is not None
        if self.spec.channels not in (1, 3):
            return self.probes.images()
        from PIL import Image

        out = []
        for img in self.probes.x:
            buf = io.BytesIO()
            Image.fromarray(img[0] if self.spec.channels == 1 else img.transpose(1, 2, 0)).save(buf, "PNG")
            out.append(decode_image(buf.getvalue(), self.spec, max_bytes=self.settings.max_image_bytes,
                                    max_pixels=self.settings.max_image_pixels))
        return np.stack(out)

    # --- decoding ------------------------------------------------------------------------------------------------

    def decode(self, raw: RawRequest) -> Decoded:
        body = raw.body
        ctype = (raw.content_type or "").split(";")[0].strip().lower()
        if ctype == FORM and (body is None or raw.params):
            # curl -d/--data-binary without -H sends this type, and the host then parses the bytes as form fields.
            raise UnsupportedMediaType(
                "the body was sent as an HTML form (Content-Type: application/x-www-form-urlencoded, what curl "
                "--data-binary sends when no Content-Type is given), so it did not arrive as an image: send it "
                "again with -H 'Content-Type: image/png' (or image/jpeg; application/json for JSON)")
        if body is None:
            raise InvalidInput("empty request: send PNG/JPEG bytes (Content-Type: image/png or image/jpeg) or JSON "
                               "(Content-Type: application/json)")
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = bytes(body)
            if sniff_image(body):
                opts = self._options_from_params(raw.params)
                x = decode_image(body, self.spec, max_bytes=self.settings.max_image_bytes,
                                 max_pixels=self.settings.max_image_pixels)
                return Decoded(x[None], "native", opts)
            if body.lstrip()[:1] in (b"{", b"["):
                body = self._parse_json(body)
            elif not body.strip():
                raise InvalidInput("empty request body: send PNG/JPEG bytes or JSON")
            elif ctype.startswith("image/"):
                raise UnsupportedMediaType(f"the Content-Type says {ctype}, but the body is not a PNG or JPEG "
                                           f"(its first bytes are {body[:8]!r}); send the file's bytes unchanged")
            else:
                raise UnsupportedMediaType("send PNG or JPEG bytes, or JSON ({\"image\": <base64>} or "
                                           "{\"tensor\": {...}}, or a KServe v2 request)")
        elif isinstance(body, str):
            body = self._parse_json(body.encode("utf-8"))
        if not isinstance(body, dict):
            raise InvalidInput(f"the JSON body must be an object, got {type(body).__name__}")
        if "inputs" in body:
            return self._decode_v2(body)
        return self._decode_native(body, raw.params)

    def _parse_json(self, data: bytes) -> Any:
        # A JSON body carries at most max_images_per_request images as numbers; anything beyond that plus room
        # for the options is refused before parsing, so a request's parse cost is bounded by what it may ask.
        c, h, w = self.spec.channels, *self.spec.input_size
        return jsonsafe.loads(data, max_bytes=4 * self.settings.max_image_bytes,
                              max_values=self.settings.max_images_per_request * c * h * w + 4096)

    def _options_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._options({k: _text(v) for k, v in params.items()})

    def _options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(self.options_model.model_fields))
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {unknown}; this model takes "
                               f"{list(self.options_model.model_fields)}")
        try:
            opts = self.options_model.model_validate(dict(values)).model_dump(exclude_none=True)
        except ValidationError as e:
            raise InvalidInput(_validation_message(e)) from None
        return self._check_options(opts)

    def _decode_native(self, body: dict, params: Mapping[str, Any]) -> Decoded:
        try:
            req = self.request_model.model_validate(body)
        except ValidationError as e:
            raise InvalidInput(_validation_message(e)) from None
        if req.image is not None:
            x = image_from_base64(req.image, self.spec, max_bytes=self.settings.max_image_bytes,
                                  max_pixels=self.settings.max_image_pixels)[None]
        else:
            x = tensor_input_to_array(req.tensor, self.spec, max_images=1)
        opts = self._check_options(req.model_dump(exclude={"image", "tensor"}, exclude_none=True))
        return Decoded(x, "native", opts)

    def _decode_v2(self, body: dict) -> Decoded:
        try:
            req = V2Request.model_validate(body)
        except ValidationError as e:
            raise InvalidInput(_validation_message(e)) from None
        if len(req.inputs) != 1:
            raise InvalidInput(f"this model takes one input tensor, got {len(req.inputs)}")
        t = req.inputs[0]
        limit = self.settings.max_images_per_request
        if t.datatype == "BYTES":
            if len(t.data) > limit:
                raise RequestError(f"{len(t.data)} images in one request; the limit is {limit}", status=413,
                                   code="payload_too_large")
            if not t.data or any(not isinstance(d, str) for d in t.data):
                raise InvalidInput(f"input {t.name!r}: BYTES data must be base64-encoded PNG/JPEG strings")
            if int(np.prod(t.shape)) != len(t.data):
                raise InvalidInput(f"input {t.name!r}: shape {t.shape} does not match {len(t.data)} elements")
            x = np.stack([image_from_base64(d, self.spec, max_bytes=self.settings.max_image_bytes,
                                            max_pixels=self.settings.max_image_pixels) for d in t.data])
        elif t.datatype in _V2_FLOAT or t.datatype == "UINT8":
            x = tensor_to_array(t.data, t.shape, "uint8" if t.datatype == "UINT8" else "float32", self.spec,
                                max_images=limit, what=f"input {t.name!r}")
        else:
            raise InvalidInput(f"input {t.name!r}: datatype {t.datatype} is not accepted; use FP32 (values in "
                               f"[0, 1]), UINT8 (0..255) or BYTES (base64 PNG/JPEG)")
        opts = self._options(req.parameters or {})
        names = [o.name for o in req.outputs] if req.outputs else list(self.v2_default_outputs)
        bad = sorted(set(names) - set(self.v2_outputs))
        if bad:
            raise InvalidInput(f"unknown output(s) {bad}; this model offers {list(self.v2_outputs)}")
        opts.update(v2_outputs=names, v2_id=req.id)
        return Decoded(x, "v2", opts)

    # --- task hooks --------------------------------------------------------------------------------------------

    request_model: type = ClassifyRequest
    options_model: type = ClassifyOptions
    v2_outputs: tuple[str, ...] = ()
    v2_default_outputs: tuple[str, ...] = ()

    def _check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        return opts

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] -> model outputs [N, ...], in chunks of at most 256."""
        if len(x) <= 256:
            return self.session.run(x)
        return np.concatenate([self.session.run(x[s:s + 256]) for s in range(0, len(x), 256)])

    def answer(self, items: list[Decoded], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        raise NotImplementedError

    # --- batches -------------------------------------------------------------------------------------------------

    def infer(self, items: list[Decoded]) -> list[dict[str, Any]]:
        """One forward pass over every image of every item; one answer body per item."""
        if not items:
            return []
        sizes = [len(it.x) for it in items]
        out = self.forward(np.concatenate([it.x for it in items]))
        splits = np.split(out, np.cumsum(sizes)[:-1])
        return self.answer(items, splits)

    def decode_all(self, raws: list[RawRequest]) -> tuple[list[Optional[Reply]], list[tuple[int, Decoded]]]:
        """Decodes each request on its own: (replies with the 4xx errors filled in, [(position, decoded)])."""
        replies: list[Optional[Reply]] = [None] * len(raws)
        good: list[tuple[int, Decoded]] = []
        for i, raw in enumerate(raws):
            try:
                raw = self._parsed(raw)
                if isinstance(raw.body, dict) and "probe" in raw.body:
                    replies[i] = self.probe_reply(raw)
                else:
                    good.append((i, self.decode(raw)))
            except RequestError as e:
                replies[i] = self.error_reply(e, v2=_looks_v2_safe(raw.body))
            except Exception:  # noqa: BLE001 - whatever one request triggers stays that request's answer
                replies[i] = internal_error(f"decoding request {i} of {len(raws)}", v2=_looks_v2_safe(raw.body))
        return replies, good

    def _parsed(self, raw: RawRequest) -> RawRequest:
        """A JSON text body parsed once, so probe requests can be told from inference requests. A body the host
        already parsed gets the same depth and number checks."""
        body = raw.body
        if isinstance(body, (dict, list)):
            jsonsafe.check(body)
            return raw
        if isinstance(body, (bytes, bytearray, memoryview)) and not sniff_image(body) \
                and bytes(body[:64]).lstrip()[:1] == b"{":
            return RawRequest(self._parse_json(bytes(body)), raw.params, raw.probe_key, raw.content_type)
        if isinstance(body, str) and body.lstrip()[:1] == "{":
            return RawRequest(self._parse_json(body.encode("utf-8")), raw.params, raw.probe_key, raw.content_type)
        return raw

    def probe_reply(self, raw: RawRequest) -> Reply:
        """``{"probe": {...}}``: see :mod:`serving.runtime.probing.runner`."""
        extra = sorted(set(raw.body) - {"probe"})
        if extra:
            raise InvalidInput(f"a probe request holds only 'probe'; unexpected key(s) {extra}")
        if self.probe_runner is None:
            raise RequestError("probes are not enabled for this model on this host", status=403,
                               code="probes_disabled")
        status, body = self.probe_runner.handle(raw.body["probe"], raw.probe_key)
        return Reply(status, body)

    def complete(self, replies: list[Optional[Reply]], good: list[tuple[int, Decoded]]) -> list[Reply]:
        """Runs the decoded requests as one batch and fills in their replies. When the batch fails as a whole,
        each request is run alone, so a failure stays with the request that causes it (500 with an error id)."""
        try:
            bodies = self.infer([d for _, d in good])
            for (i, _), body in zip(good, bodies):
                replies[i] = Reply(200, body)
        except Exception:  # noqa: BLE001
            log.warning("a batch of %d failed; answering its requests one by one", len(good), exc_info=True)
            for i, d in good:
                try:
                    replies[i] = Reply(200, self.infer([d])[0])
                except RequestError as e:
                    replies[i] = self.error_reply(e, v2=d.protocol == "v2")
                except Exception:  # noqa: BLE001
                    replies[i] = internal_error(f"running request {i}", v2=d.protocol == "v2")
        return [r if r is not None else internal_error("no answer was produced") for r in replies]

    def handle(self, raws: list[RawRequest]) -> list[Reply]:
        return self.complete(*self.decode_all(raws))

    def error_reply(self, e: RequestError, v2: bool = False) -> Reply:
        # The v2 protocol's error body is {"error": "<message>"}.
        return Reply(e.status, {"error": e.message} if v2 else e.to_dict())

    def _v2(self, item: Decoded, outputs: list[V2Tensor]) -> dict[str, Any]:
        return V2Response(model_name=self.name, model_version=self.version, id=item.options.get("v2_id"),
                          outputs=outputs).model_dump(exclude_none=True)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.name, "task": self.task, "engine": self.engine, "device": self.session.device,
                "arch": m.model.arch, "method": m.model.method,
                "threat_model": m.model.threat_model.model_dump() if m.model.threat_model else None,
                "input": m.input.model_dump(), "probes": len(self.probes) if self.probes is not None else 0}


def internal_error(what: str, v2: bool = False) -> Reply:
    """A 500 for a failure on our side: the client gets an error id, the log gets the id and the traceback.
    Call from an ``except`` block."""
    error_id = uuid.uuid4().hex[:16]
    log.exception("internal error %s while %s", error_id, what)
    message = f"internal error {error_id}: the server failed on this request; report the id to the operator"
    if v2:
        return Reply(500, {"error": message})
    return Reply(500, {"error": {"status": 500, "code": "internal_error", "message": message, "id": error_id}})


def _looks_v2_safe(body: Any) -> bool:
    try:
        return looks_v2(body)
    except Exception:  # noqa: BLE001 - only chooses the error's form
        return False


def looks_v2(body: Any) -> bool:
    """Whether an error for this body should be answered in v2 form."""
    if isinstance(body, dict):
        return "inputs" in body
    if isinstance(body, (bytes, bytearray, str)):
        head = body[:4096] if not isinstance(body, str) else body[:4096].encode("utf-8", "replace")
        return b'"inputs"' in head
    return False


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(p: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of the k largest values per row, largest first; ties keep the lower index first."""
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


class ClassifierService(ModelService):
    task = "classification"
    request_model = ClassifyRequest
    options_model = ClassifyOptions
    v2_outputs = ("top_k_labels", "top_k_indices", "top_k_probabilities", "probabilities")
    v2_default_outputs = ("top_k_labels", "top_k_indices", "top_k_probabilities")

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.class_names or tuple(str(i) for i in range(self.spec.num_classes or 0))

    def _check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        k = opts.get("top_k", self.settings.top_k)
        if k > self.spec.num_classes:
            raise InvalidInput(f"top_k must be at most {self.spec.num_classes} (the number of classes), got {k}")
        return {**opts, "top_k": k}

    def answer(self, items: list[Decoded], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        labels = self.labels
        bodies = []
        for item, logits in zip(items, outputs):
            p = softmax(logits)
            k = min(item.options["top_k"], p.shape[1])
            idx = top_k(p, k)
            if item.protocol == "native":
                bodies.append({"model": self.name, "predictions": [
                    {"index": int(j), "label": labels[j], "probability": float(p[0, j])} for j in idx[0]]})
                continue
            n = len(p)
            tensors = {
                "top_k_labels": lambda: V2Tensor(name="top_k_labels", shape=[n, k], datatype="BYTES",
                                                 data=[labels[j] for j in idx.ravel()]),
                "top_k_indices": lambda: V2Tensor(name="top_k_indices", shape=[n, k], datatype="INT64",
                                                  data=idx.ravel().tolist()),
                "top_k_probabilities": lambda: V2Tensor(
                    name="top_k_probabilities", shape=[n, k], datatype="FP32",
                    data=np.take_along_axis(p, idx, 1).astype(np.float32).ravel().tolist()),
                "probabilities": lambda: V2Tensor(name="probabilities", shape=list(p.shape), datatype="FP32",
                                                  data=p.astype(np.float32).ravel().tolist()),
            }
            bodies.append(self._v2(item, [tensors[name]() for name in item.options["v2_outputs"]]))
        return bodies


class RetrievalService(ModelService):
    task = "embedding"
    request_model = RetrieveRequest
    options_model = RetrieveOptions
    v2_outputs = ("neighbor_ids", "neighbor_labels", "neighbor_distances", "embedding")
    v2_default_outputs = ("neighbor_ids", "neighbor_labels", "neighbor_distances")

    def __init__(self, root: str | Path, settings: ServiceSettings = ServiceSettings(), **kwargs: Any):
        super().__init__(root, settings, **kwargs)
        self.index = RetrievalIndex.load(self.root)
        if self.index.dim != self.spec.embedding_dim:
            raise ArtifactError(f"the gallery index holds {self.index.dim}-d vectors; the model gives "
                                f"{self.spec.embedding_dim}-d embeddings")
        built_with = self.index.model_sha256
        if built_with and "onnx" in self.manifest.artifacts and built_with != self.manifest.artifacts["onnx"].sha256:
            raise ArtifactError("the gallery index was built with a different embedder than the one shipped "
                                "beside it; rebuild the archive")

    def _check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        k = opts.get("k", self.settings.k)
        if k > self.settings.max_k:
            raise InvalidInput(f"k must be at most {self.settings.max_k}, got {k}")
        return {**opts, "k": k, "output": opts.get("output", "neighbors")}

    def answer(self, items: list[Decoded], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
        want = [it.protocol == "v2" and any(o.startswith("neighbor") for o in it.options["v2_outputs"])
                or it.protocol == "native" and it.options["output"] in ("neighbors", "both") for it in items]
        kmax = max([it.options["k"] for it, w in zip(items, want) if w], default=0)
        dist = pos = None
        if kmax:
            dist, pos = self.index.search(np.concatenate(outputs), kmax)
        names = self.index.class_names
        bodies, row = [], 0
        for item, emb, w in zip(items, outputs, want):
            n = len(emb)
            k = min(item.options["k"], len(self.index))
            d = dist[row:row + n, :k] if w else None
            p = pos[row:row + n, :k] if w else None
            row += n
            if item.protocol == "native":
                body: dict[str, Any] = {"model": self.name}
                if w:
                    body["neighbors"] = [self._neighbor(int(j), float(dd), names) for j, dd in zip(p[0], d[0])]
                if item.options["output"] in ("embedding", "both"):
                    body["embedding"] = emb[0].astype(np.float32).tolist()
                bodies.append(body)
                continue
            tensors = []
            for name in item.options["v2_outputs"]:
                if name == "neighbor_ids":
                    tensors.append(V2Tensor(name=name, shape=[n, k], datatype="BYTES",
                                            data=[self.index.ids[j] for j in p.ravel()]))
                elif name == "neighbor_labels":
                    tensors.append(V2Tensor(name=name, shape=[n, k], datatype="INT64",
                                            data=self.index.labels[p.ravel()].tolist()))
                elif name == "neighbor_distances":
                    tensors.append(V2Tensor(name=name, shape=[n, k], datatype="FP32", data=d.ravel().tolist()))
                else:
                    tensors.append(V2Tensor(name=name, shape=list(emb.shape), datatype="FP32",
                                            data=emb.astype(np.float32).ravel().tolist()))
            bodies.append(self._v2(item, tensors))
        return bodies

    def _neighbor(self, j: int, distance: float, names) -> dict[str, Any]:
        label = int(self.index.labels[j])
        return {"id": self.index.ids[j], "label": label,
                "label_name": names[label] if names and 0 <= label < len(names) else None,
                "distance": distance}


def load_service(root: str | Path, settings: ServiceSettings = ServiceSettings(), **kwargs: Any) -> ModelService:
    """The service for the model exported in ``root`` (a classifier or a retrieval model)."""
    manifest = load_manifest(root)
    cls = ClassifierService if manifest.model.task == "classification" else RetrievalService
    return cls(root, settings, manifest=manifest, **kwargs)
