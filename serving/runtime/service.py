"""Engine-agnostic model services: run a batch of decoded requests, answer each in the task's typed response.

A host (the TorchServe handler, the benchmark, a test) hands over :class:`RawRequest` objects and gets one
:class:`Reply` per request. A request that cannot be decoded gets its own 4xx reply; the others in the batch are
answered normally. The wire protocols (raw PNG/JPEG bytes and the native JSON API, the KServe v2 protocol) are
codecs (:mod:`serving.runtime.codecs`): a service sees the task's typed input and returns typed responses, whichever
protocol the request came in.
"""
from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ValidationError

from serving.runtime import jsonsafe
from serving.runtime.artifacts import ExportManifest, load_manifest, verify_archive_files, verify_artifact
from serving.runtime.codecs import (
    NATIVE,
    Codec,
    RawRequest,
    Reply,
    TaskInput,
    V2Output,
    codec_for,
    error_codec,
    read_body,
)
from serving.runtime.codecs.base import validation_message
from serving.runtime.errors import ArtifactError, InternalError, InvalidInput, RequestError
from serving.runtime.index import RetrievalIndex
from serving.runtime.preprocess import decode_image, pixel_budgets, to_unit
from serving.runtime.probe_set import ProbeSet, clean_score
from serving.runtime.schemas import (
    ClassificationResponse,
    ClassifyOptions,
    ClassifyRequest,
    RetrievalResponse,
    RetrieveOptions,
    RetrieveRequest,
    ServiceSettings,
)
from serving.runtime.session import InferenceSession, auto_threads, open_session

log = logging.getLogger(__name__)

__all__ = ["ClassifierService", "ModelService", "RawRequest", "Reply", "RetrievalService", "TaskInput",
           "internal_error", "load_service", "softmax", "top_k"]


class ModelService:
    """Common loading and request handling; subclasses define the task's options, forward pass and answers."""

    task: str = ""

    def __init__(self, root: str | Path, settings: ServiceSettings = ServiceSettings(), *, name: Optional[str] = None,
                 version: Optional[str] = None, device: str = "auto", gpu_id: Optional[int] = None,
                 manifest: Optional[ExportManifest] = None, workers: int = 1):
        self.root = Path(root)
        if not settings.threads:  # auto: this worker's share of the cores (one of `workers` processes)
            settings = settings.model_copy(update={"threads": auto_threads(workers)})
        self.settings = settings
        # An unpacked archive is checked whole (gallery, labels, config, code) before any of it is used.
        if not verify_archive_files(self.root) and (self.root / "MAR-INF").is_dir():
            log.warning("%s: an archive without %s: only the artifacts spec.json lists are verified; rebuild it",
                        self.root, "archive-files.json")
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
        self._default_options: Optional[dict[str, Any]] = None  # options() of a request that gives none
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
        import torch

        from serving.runtime.session import load_torchscript

        path = verify_artifact(self.root, self.manifest, "torchscript")
        dev = "cpu"
        if self.session.device == "cuda" and torch.cuda.is_available():
            dev = f"cuda:{int(self.gpu_id or 0)}"
        return load_torchscript(path, dev)

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
                                    max_pixels=pixel_budgets(self.spec, self.settings.max_image_pixels)[0]))
        return np.stack(out)

    # --- decoding (the codecs call these) --------------------------------------------------------------------

    def decode(self, raw: RawRequest) -> TaskInput:
        raw = read_body(raw, self._parse_json)
        return codec_for(raw.body).decode(raw, self)

    def _parse_json(self, data: bytes) -> Any:
        # A JSON body carries at most max_images_per_request images as numbers; anything beyond that plus room
        # for the options is refused before parsing, so a request's parse cost is bounded by what it may ask.
        c, h, w = self.spec.channels, *self.spec.input_size
        return jsonsafe.loads(data, max_bytes=4 * self.settings.max_image_bytes,
                              max_values=self.settings.max_images_per_request * c * h * w + 4096)

    def options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Options given apart from a JSON body (query parameters, form fields, v2 ``parameters``), validated
        against the task's options model and completed with this service's defaults."""
        if not values:  # the common raw-image request: the defaults, validated once
            if self._default_options is None:
                self._default_options = self._validated_options({})
            return dict(self._default_options)
        return self._validated_options(values)

    def _validated_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(self.options_model.model_fields))
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {unknown}; this model takes "
                               f"{list(self.options_model.model_fields)}")
        try:
            opts = self.options_model.model_validate(dict(values)).model_dump(exclude_none=True)
        except ValidationError as e:
            raise InvalidInput(validation_message(e)) from None
        return self.check_options(opts)

    # --- task hooks --------------------------------------------------------------------------------------------

    request_model: type[BaseModel] = ClassifyRequest  # a native JSON request: the input and the options
    options_model: type[BaseModel] = ClassifyOptions  # the options alone
    v2_outputs: tuple[V2Output, ...] = ()  # the v2 output tensors, read from the typed response
    v2_default_outputs: tuple[str, ...] = ()  # the ones a v2 request gets when it names none

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        """Validated options -> the same completed with this service's defaults; raises InvalidInput for values
        this model cannot take."""
        return opts

    def native_fields(self, opts: Mapping[str, Any]) -> frozenset[str]:
        """The response fields a native request with these options asks for."""
        raise NotImplementedError

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] in [0, 1] (or uint8 0..255, scaled here) -> model outputs [N, ...], in chunks of at
        most 256."""
        x = to_unit(x)
        if len(x) <= 256:
            return self.session.run(x)
        return np.concatenate([self.session.run(x[s:s + 256]) for s in range(0, len(x), 256)])

    def answer(self, items: list[TaskInput], outputs: list[np.ndarray]) -> list[list[BaseModel]]:
        """Per item, its model outputs [N_i, ...] -> one typed response per image, holding ``item.fields``."""
        raise NotImplementedError

    # --- batches -------------------------------------------------------------------------------------------------

    def infer(self, items: list[TaskInput]) -> list[dict[str, Any]]:
        """One forward pass over every image of every item; one answer body per item, in its protocol."""
        if not items:
            return []
        sizes = [len(it.x) for it in items]
        out = self.forward(batch_input([it.x for it in items]))
        splits = np.split(out, np.cumsum(sizes)[:-1])
        return [it.codec.encode(it, responses, self) for it, responses in zip(items, self.answer(items, splits))]

    def decode_all(self, raws: list[RawRequest]) -> tuple[list[Optional[Reply]], list[tuple[int, TaskInput]]]:
        """Decodes each request on its own: (replies with the 4xx errors filled in, [(position, decoded)])."""
        replies: list[Optional[Reply]] = [None] * len(raws)
        good: list[tuple[int, TaskInput]] = []
        for i, raw in enumerate(raws):
            try:
                raw = read_body(raw, self._parse_json)  # parsed once, so probe requests can be told apart
                if isinstance(raw.body, dict) and "probe" in raw.body:
                    replies[i] = self.probe_reply(raw)
                else:
                    good.append((i, self.decode(raw)))
            except RequestError as e:
                replies[i] = self.error_reply(e, raw)
            except Exception:  # noqa: BLE001 - whatever one request triggers stays that request's answer
                replies[i] = internal_error(f"decoding request {i} of {len(raws)}", error_codec(raw))
        return replies, good

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

    def complete(self, replies: list[Optional[Reply]], good: list[tuple[int, TaskInput]]) -> list[Reply]:
        """Runs the decoded requests as one batch and fills in their replies. When the batch fails as a whole,
        each request is run alone, so a failure stays with the request that causes it (500 with an error id)."""
        try:
            bodies = self.infer([d for _, d in good])
            for (i, d), body in zip(good, bodies):
                replies[i] = d.codec.reply(d, body)
        except Exception:  # noqa: BLE001
            log.warning("a batch of %d failed; answering its requests one by one", len(good), exc_info=True)
            for i, d in good:
                try:
                    replies[i] = d.codec.reply(d, self.infer([d])[0])
                except RequestError as e:
                    replies[i] = Reply(e.status, d.codec.error(e))
                except Exception:  # noqa: BLE001
                    replies[i] = internal_error(f"running request {i}", d.codec)
        return [r if r is not None else internal_error("no answer was produced") for r in replies]

    def handle(self, raws: list[RawRequest]) -> list[Reply]:
        return self.complete(*self.decode_all(raws))

    @staticmethod
    def error_reply(e: RequestError, body: Any = None) -> Reply:
        """The error in the protocol ``body`` (a request, or a body parsed or not) was sent in."""
        return Reply(e.status, error_codec(body).error(e))

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.name, "task": self.task, "engine": self.engine, "device": self.session.device,
                "threads": self.settings.threads,
                "arch": m.model.arch, "method": m.model.method,
                "threat_model": m.model.threat_model.model_dump() if m.model.threat_model else None,
                "input": m.input.model_dump(), "probes": len(self.probes) if self.probes is not None else 0}


def internal_error(what: str, codec: Codec = NATIVE) -> Reply:
    """A 500 for a failure on our side: the client gets an error id, the log gets the id and the traceback.
    Call from an ``except`` block."""
    error_id = uuid.uuid4().hex[:16]
    log.exception("internal error %s while %s", error_id, what)
    e = InternalError(f"internal error {error_id}: the server failed on this request; report the id to the "
                      f"operator", error_id)
    return Reply(500, codec.error(e))


def batch_input(xs: list[np.ndarray]) -> np.ndarray:
    """The requests' images as one [N, C, H, W] batch: decoded images (uint8) stay uint8, so :meth:`forward` scales
    them in one operation over the batch, not one image at a time; a mix is scaled to float32 here."""
    if all(x.dtype == np.uint8 for x in xs):
        return np.concatenate(xs)
    return np.concatenate([to_unit(x) for x in xs])


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
    v2_outputs = (
        V2Output("top_k_labels", "BYTES", "predictions", lambda r: [q.label for q in r.predictions]),
        V2Output("top_k_indices", "INT64", "predictions", lambda r: [q.index for q in r.predictions]),
        V2Output("top_k_probabilities", "FP32", "predictions", lambda r: [q.probability for q in r.predictions]),
        V2Output("probabilities", "FP32", "probabilities", lambda r: r.probabilities),
    )
    v2_default_outputs = ("top_k_labels", "top_k_indices", "top_k_probabilities")

    @property
    def labels(self) -> tuple[str, ...]:
        from serving.runtime.tasks.classification import class_labels

        return class_labels(self.spec)

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        k = opts.get("top_k", self.settings.top_k)
        if k > self.spec.num_classes:
            raise InvalidInput(f"top_k must be at most {self.spec.num_classes} (the number of classes), got {k}")
        return {**opts, "top_k": k}

    def native_fields(self, opts: Mapping[str, Any]) -> frozenset[str]:
        return frozenset({"predictions"})

    def answer(self, items: list[TaskInput], outputs: list[np.ndarray]) -> list[list[ClassificationResponse]]:
        # Softmax and top-k once over the whole batch (row-wise, so each image gets what it would alone). Responses
        # are validated from plain dicts in one call each: faster than constructing the nested models one by one.
        labels = self.labels
        p = softmax(np.concatenate(outputs))
        kmax = min(max(it.options["top_k"] for it in items), p.shape[1])
        idx = top_k(p, kmax)
        picks, probs = idx.tolist(), np.take_along_axis(p, idx, 1).tolist()
        answers, row = [], 0
        for item, logits in zip(items, outputs):
            k = min(item.options["top_k"], p.shape[1])
            responses = []
            for r in range(row, row + len(logits)):
                doc: dict[str, Any] = {"model": self.name, "predictions": [
                    {"index": j, "label": labels[j], "probability": q} for j, q in zip(picks[r][:k], probs[r][:k])]}
                if "probabilities" in item.fields:
                    doc["probabilities"] = p[r].tolist()
                responses.append(ClassificationResponse.model_validate(doc))
            row += len(logits)
            answers.append(responses)
        return answers


class RetrievalService(ModelService):
    task = "embedding"
    request_model = RetrieveRequest
    options_model = RetrieveOptions
    v2_outputs = (
        V2Output("neighbor_ids", "BYTES", "neighbors", lambda r: [n.id for n in r.neighbors]),
        V2Output("neighbor_labels", "INT64", "neighbors", lambda r: [n.label for n in r.neighbors]),
        V2Output("neighbor_distances", "FP32", "neighbors", lambda r: [n.distance for n in r.neighbors]),
        V2Output("embedding", "FP32", "embedding", lambda r: r.embedding),
    )
    v2_default_outputs = ("neighbor_ids", "neighbor_labels", "neighbor_distances")

    def __init__(self, root: str | Path, settings: ServiceSettings = ServiceSettings(), **kwargs: Any):
        super().__init__(root, settings, **kwargs)
        self.index = RetrievalIndex.load(self.root, threads=self.settings.threads)
        if self.index.dim != self.spec.embedding_dim:
            raise ArtifactError(f"the gallery index holds {self.index.dim}-d vectors; the model gives "
                                f"{self.spec.embedding_dim}-d embeddings")
        built_with = self.index.model_sha256
        if built_with and "onnx" in self.manifest.artifacts and built_with != self.manifest.artifacts["onnx"].sha256:
            raise ArtifactError("the gallery index was built with a different embedder than the one shipped "
                                "beside it; rebuild the archive")
        if self.index.use_prefilter:
            self.index.prefilter()  # built at load, not by the first query

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        k = opts.get("k", self.settings.k)
        if k > self.settings.max_k:
            raise InvalidInput(f"k must be at most {self.settings.max_k}, got {k}")
        return {**opts, "k": k, "output": opts.get("output", "neighbors")}

    def native_fields(self, opts: Mapping[str, Any]) -> frozenset[str]:
        out = opts["output"]
        return frozenset(("neighbors", "embedding") if out == "both" else (out,))

    def answer(self, items: list[TaskInput], outputs: list[np.ndarray]) -> list[list[RetrievalResponse]]:
        want = ["neighbors" in it.fields for it in items]
        kmax = max([it.options["k"] for it, w in zip(items, want) if w], default=0)
        dist = pos = labels = None
        if kmax:
            d, p = self.index.search(np.concatenate(outputs), kmax)
            dist, pos, labels = d.tolist(), p.tolist(), self.index.labels[p].tolist()
        names = self.index.class_names
        answers, row = [], 0
        for item, emb, w in zip(items, outputs, want):
            k = min(item.options["k"], len(self.index))
            responses = []
            for i in range(len(emb)):
                doc: dict[str, Any] = {"model": self.name}
                if w:
                    r = row + i
                    doc["neighbors"] = [self._neighbor(j, lab, d, names)
                                        for j, lab, d in zip(pos[r][:k], labels[r][:k], dist[r][:k])]
                if "embedding" in item.fields:
                    doc["embedding"] = emb[i].astype(np.float32).tolist()
                # Validated from plain dicts in one call: faster than constructing the nested models one by one.
                responses.append(RetrievalResponse.model_validate(doc))
            row += len(emb)
            answers.append(responses)
        return answers

    def _neighbor(self, j: int, label: int, distance: float, names) -> dict[str, Any]:
        """A :class:`Neighbor` as a dict, for validation with its response."""
        return {"id": self.index.ids[j], "label": label, "distance": distance,
                "label_name": names[label] if names and 0 <= label < len(names) else None}


def load_service(root: str | Path, settings: ServiceSettings = ServiceSettings(), **kwargs: Any) -> ModelService:
    """The service for the model exported in ``root``, of its task's service class."""
    from serving.runtime.tasks import get_task

    manifest = load_manifest(root)
    return get_task(manifest.model.task).service_class()(root, settings, manifest=manifest, **kwargs)
