"""The KServe v2 (open inference) protocol: one input tensor (FP16/32/64 values in [0, 1], UINT8 0..255, or BYTES
holding base64 PNG/JPEG), options as request ``parameters``, the task's response fields as named output tensors
(the task's ``v2_outputs``); errors ``{"error": "<message>"}``.

:meth:`KServeV2Codec.read_request` is the one place a v2 body is read: today a JSON object (parsed by the host or by
:func:`serving.runtime.codecs.read_body`); the binary tensor data extension plugs in there."""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from serving.runtime.codecs.base import Codec, CodecTarget, RawRequest, TaskInput, validate
from serving.runtime.errors import InvalidInput, RequestError
from serving.runtime.preprocess import image_from_base64, tensor_to_array
from serving.runtime.schemas import V2Request, V2Response, V2Tensor

_FLOAT = {"FP16", "FP32", "FP64"}


def looks_v2(body: Any) -> bool:
    """Whether a body (parsed or not) is a v2 request, so an error for it is answered in v2 form."""
    if isinstance(body, dict):
        return "inputs" in body
    if isinstance(body, (bytes, bytearray, str)):
        head = body[:4096] if not isinstance(body, str) else body[:4096].encode("utf-8", "replace")
        return b'"inputs"' in head
    return False


class KServeV2Codec(Codec):
    name = "v2"

    def read_request(self, raw: RawRequest) -> V2Request:
        """The request's v2 header, validated. The raw body arrives here as read by the host."""
        return validate(V2Request, raw.body)

    def decode(self, raw: RawRequest, target: CodecTarget) -> TaskInput:
        req = self.read_request(raw)
        if len(req.inputs) != 1:
            raise InvalidInput(f"this model takes one input tensor, got {len(req.inputs)}")
        x = self._images(req.inputs[0], target)
        opts = target.options(req.parameters or {})
        offered = {o.name: o for o in target.v2_outputs}
        names = [o.name for o in req.outputs] if req.outputs else list(target.v2_default_outputs)
        bad = sorted(set(names) - set(offered))
        if bad:
            raise InvalidInput(f"unknown output(s) {bad}; this model offers {list(offered)}")
        return TaskInput(x, opts, frozenset(offered[n].field for n in names), self,
                         meta={"outputs": names, "id": req.id})

    @staticmethod
    def _images(t: V2Tensor, target: CodecTarget) -> np.ndarray:
        s = target.settings
        limit = s.max_images_per_request
        if t.datatype == "BYTES":
            if len(t.data) > limit:
                raise RequestError(f"{len(t.data)} images in one request; the limit is {limit}", status=413,
                                   code="payload_too_large")
            if not t.data or any(not isinstance(d, str) for d in t.data):
                raise InvalidInput(f"input {t.name!r}: BYTES data must be base64-encoded PNG/JPEG strings")
            if int(np.prod(t.shape)) != len(t.data):
                raise InvalidInput(f"input {t.name!r}: shape {t.shape} does not match {len(t.data)} elements")
            return np.stack([image_from_base64(d, target.spec, max_bytes=s.max_image_bytes,
                                               max_pixels=s.max_image_pixels) for d in t.data])
        if t.datatype in _FLOAT or t.datatype == "UINT8":
            return tensor_to_array(t.data, t.shape, "uint8" if t.datatype == "UINT8" else "float32", target.spec,
                                   max_images=limit, what=f"input {t.name!r}")
        raise InvalidInput(f"input {t.name!r}: datatype {t.datatype} is not accepted; use FP32 (values in "
                           f"[0, 1]), UINT8 (0..255) or BYTES (base64 PNG/JPEG)")

    def encode(self, item: TaskInput, responses: list[BaseModel], target: CodecTarget) -> dict[str, Any]:
        offered = {o.name: o for o in target.v2_outputs}
        tensors = []
        for name in item.meta["outputs"]:
            out = offered[name]
            rows = [out.values(r) for r in responses]
            data: list[Any] = [v for row in rows for v in row]
            if out.datatype == "FP32":
                data = np.asarray(data, dtype=np.float32).tolist()
            tensors.append(V2Tensor(name=name, shape=[len(rows), len(rows[0])], datatype=out.datatype, data=data))
        return V2Response(model_name=target.name, model_version=target.version, id=item.meta.get("id"),
                          outputs=tensors).model_dump(exclude_none=True)

    def error(self, e: RequestError) -> dict[str, Any]:
        return {"error": e.message}
