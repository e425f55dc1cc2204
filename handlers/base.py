"""What every robustserve handler does for TorchServe: build a runtime service from the unpacked archive, turn
TorchServe's batch into runtime requests, and give each request its own status, so one bad item answers its own
4xx JSON error while its batch-mates are answered normally.

TorchServe's ``BaseHandler`` is not used: its ``initialize`` loads a single serialized file into its own
session and its ``handle`` fails a whole batch on any exception, which are the two things done differently here.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Optional

from serving.runtime.probing.runner import PROBE_DIR_ENV, PROBE_KEY_ENV
from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import ModelService, RawRequest, Reply, internal_error, load_service
from serving.runtime.v2binary import HEADER_LENGTH

log = logging.getLogger(__name__)

# Keys under which TorchServe passes a request's payload: the raw body, or the multipart form field.
PAYLOAD_KEYS = ("body", "data")
# TorchServe 0.12 does not hand query parameters of /predictions to the handler; options of a raw-image request
# come as multipart form fields or as these headers.
HEADER_OPTIONS = {"x-top-k": "top_k", "x-k": "k", "x-output": "output"}
BATCH_HEADER = "X-Robustserve-Batch"
PROBE_KEY_HEADER = "x-probe-key"
BINARY_HEADER = HEADER_LENGTH.lower()


class TorchServeAdapter:
    # None: the service class of the archive's task (serving.runtime.tasks), read from its spec.json.
    service_class: ClassVar[Optional[type[ModelService]]] = None

    def __init__(self) -> None:
        self.service: Optional[ModelService] = None
        self.batch_metrics = BatchMetrics(0.0)
        self.initialized = False

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        settings = ServiceSettings.model_validate(yaml_cfg.get("handler") or {})
        gpu_id = props.get("gpu_id")
        manifest = getattr(context, "manifest", None) or {}
        self.service = (self.service_class or load_service)(
            props["model_dir"], settings, name=context.model_name,
            version=(manifest.get("model") or {}).get("modelVersion"),
            device="cpu" if gpu_id is None else "auto", gpu_id=gpu_id,
            workers=int(yaml_cfg.get("maxWorkers") or 1))
        self.batch_metrics = BatchMetrics(settings.metrics_interval_s)
        self._enable_probes(context)
        self.initialized = True
        log.info("%s ready: %s", context.model_name, self.service.describe())

    def _enable_probes(self, context: Any) -> None:
        from serving.runtime.probing.runner import key_digest

        key_file = os.environ.get(PROBE_KEY_ENV)
        digest = None
        if key_file:
            try:
                digest = key_digest(_read_key(Path(key_file)))
            except (OSError, ValueError) as e:
                log.warning("probe key file %s unreadable (%s): probes will be refused", key_file, e)
        state = os.environ.get(PROBE_DIR_ENV) or str(Path(context.system_properties["model_dir"]) / "probes")
        metrics = getattr(context, "metrics", None)
        self.service.enable_probes(state, digest, on_report=lambda rep: publish_probe(metrics, rep))

    def to_raw(self, item: Any, headers: Optional[dict] = None) -> RawRequest:
        params: dict[str, Any] = {}
        probe_key = ctype = length = None
        for name, value in (headers or {}).items():
            lname = str(name).lower()
            if lname in (PROBE_KEY_HEADER, "content-type", BINARY_HEADER):
                text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
                if lname == PROBE_KEY_HEADER:
                    probe_key = text
                elif lname == BINARY_HEADER:
                    length = text
                else:
                    ctype = text
                continue
            key = HEADER_OPTIONS.get(lname)
            if key and key in self.service.option_keys:
                params[key] = value
        if not isinstance(item, dict):
            return RawRequest(body=item, params=params, probe_key=probe_key, content_type=ctype, header_length=length)
        if "probe" in item and not any(k in item for k in PAYLOAD_KEYS):
            # A JSON body arrives already decoded: its own keys are the whole request; header options are an
            # inference request's business.
            return RawRequest(body=dict(item), params={}, probe_key=probe_key, content_type=ctype,
                              header_length=length)
        body = None
        for key, value in item.items():
            if key in PAYLOAD_KEYS and body is None:
                body = value
            else:
                params[key] = value
        return RawRequest(body=body, params=params, probe_key=probe_key, content_type=ctype, header_length=length)

    def handle(self, data: list, context: Any) -> list[bytes]:
        """One answer per item, always: an exception escaping here would make TorchServe fail the whole batch
        (503 for every item), so whatever goes wrong becomes the answer of the item it concerns."""
        assert self.service is not None, "initialize() was not called"
        t0 = time.perf_counter()
        raws: list[Optional[RawRequest]] = []
        early: dict[int, Reply] = {}
        for i, item in enumerate(data):
            try:
                raws.append(self.to_raw(item, _headers(context, i)))
            except Exception:  # noqa: BLE001
                raws.append(None)
                early[i] = internal_error(f"reading request {i} of {len(data)}")
        try:
            replies, good = self.service.decode_all([r if r is not None else RawRequest(b"") for r in raws])
            replies = [early.get(i, r) for i, r in enumerate(replies)]
            good = [(i, d) for i, d in good if i not in early]
            t1 = time.perf_counter()
            replies = self.service.complete(replies, good)
        except Exception:  # noqa: BLE001 - a bug outside any one request: each item says so with an id
            t1 = time.perf_counter()
            replies, good = [internal_error(f"handling a batch of {len(data)}")] * len(data), []
        t2 = time.perf_counter()
        out = []
        for i, reply in enumerate(replies):
            try:
                payload, content_type, headers = reply.payload()
            except Exception:  # noqa: BLE001 - an answer that cannot be encoded (non-finite number, odd type)
                reply = internal_error(f"encoding the answer of request {i}")
                payload, content_type, headers = reply.payload()
            try:
                if reply.status != 200:
                    context.set_response_status(reply.status, _phrase(reply.status), idx=i)
                context.set_response_content_type(i, content_type)
                for name, value in headers.items():
                    context.set_response_header(i, name, value)
                # How many requests shared this handler call: lets clients and tests see batching at work.
                context.set_response_header(i, BATCH_HEADER, str(len(data)))
            except Exception:  # noqa: BLE001 - headers are a courtesy; the answer still goes out
                log.warning("cannot set the response headers of request %d", i, exc_info=True)
            out.append(payload)
        try:
            bad = sum(r.status >= 400 for r in replies)
            self.batch_metrics.record(getattr(context, "metrics", None), bad, sum(len(d.x) for _, d in good),
                                      t1 - t0, t2 - t1)
        except Exception:  # noqa: BLE001 - metrics never cost an answer
            log.warning("cannot publish the batch metrics", exc_info=True)
        return out


class BatchMetrics:
    """The handler's per-batch metrics, published at most once per ``interval_s``: counters summed over the
    batches since the last publication, the two timing gauges at the latest batch's value. Each metric TorchServe
    publishes is a log line its frontend parses, so at one request per batch four lines per batch were a
    measurable part of a request's latency; Prometheus scrapes every few seconds and sees the same totals. A timer
    publishes what is pending when no further batch comes, so a count never waits for the next request."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._metrics: Any = None
        self._bad = self._images = 0
        self._gauges: Optional[tuple[float, float]] = None
        self._last = -float("inf")
        self._timer: Optional[threading.Timer] = None

    def record(self, metrics: Any, bad: int, images: int, decode_s: float, infer_s: float) -> None:
        if metrics is None:
            return
        with self._lock:
            self._metrics = metrics
            self._bad += bad
            self._images += images
            self._gauges = (round(decode_s * 1000, 3), round(infer_s * 1000, 3))
            if self.clock() - self._last >= self.interval_s:
                self._publish()
            elif self._timer is None:
                self._timer = threading.Timer(max(0.0, self._last + self.interval_s - self.clock()), self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Publishes whatever is pending now."""
        with self._lock:
            self._publish()

    def _publish(self) -> None:  # with the lock held
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gauges is None or self._metrics is None:
            return
        m, (decode_ms, infer_ms) = self._metrics, self._gauges
        bad, images = self._bad, self._images
        self._bad = self._images = 0
        self._gauges = None
        self._last = self.clock()
        try:
            # Fresh dimension lists: TorchServe's metric helpers append to the list they are given.
            m.add_counter("InvalidRequests", bad, dimensions=[])
            m.add_counter("InferredImages", images, dimensions=[])
            m.add_time("DecodeTime", decode_ms, dimensions=[])
            m.add_time("InferenceTime", infer_ms, dimensions=[])
        except Exception:  # noqa: BLE001 - metrics never cost an answer (and a timer thread has no caller)
            log.warning("cannot publish the batch metrics", exc_info=True)


def _read_key(path: Path) -> str:
    import json

    key = json.loads(path.read_text()).get("key")
    if not isinstance(key, str) or len(key) < 16:
        raise ValueError("no 'key' of 16 or more characters")
    return key


def publish_probe(metrics: Any, report: dict) -> None:
    """A finished probe's figures as TorchServe model metrics (declared in the server's metrics.yaml)."""
    if metrics is None or not hasattr(metrics, "add_metric"):
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    from serving.runtime.probing.metrics import probe_samples

    for name, kind, unit, labels, value in probe_samples(report):
        dims = [Dimension("ModelName", report.get("model") or ""), Dimension("Level", "Model")]
        dims += [Dimension(k, v) for k, v in labels.items()]
        metrics.add_metric(name, value, unit, dimensions=dims,
                           metric_type=MetricTypes.COUNTER if kind == "counter" else MetricTypes.GAUGE)


def _headers(context: Any, idx: int) -> dict:
    try:
        return context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
