"""The KServe v2 (open inference) protocol: one input tensor (FP16/32/64 values in [0, 1], UINT8 0..255, or BYTES
holding PNG/JPEG, base64 in JSON), options as request ``parameters``, the task's response fields as named output
tensors (the task's ``v2_outputs``); errors ``{"error": "<message>"}``.

The binary tensor data extension (:mod:`serving.runtime.v2binary`), which the standard client uses by default:
:func:`serving.runtime.codecs.read_body` splits such a body into its JSON header and binary inputs, which
:meth:`KServeV2Codec.read_request` takes in place of ``data``; outputs asked for in binary (``binary_data_output``
on the request, ``binary_data`` on an output) are answered as binary data after the JSON header."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel

from serving.runtime import v2binary
from serving.runtime.codecs.base import Codec, CodecTarget, RawRequest, Reply, TaskInput, validate
from serving.runtime.errors import InvalidInput, RequestError, UnsupportedMediaType
from serving.runtime.preprocess import (
    DecodeBudget,
    decode_image_u8,
    image_from_base64_u8,
    pixel_budgets,
    sniff_image,
    tensor_to_array,
)
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

    def read_request(self, raw: RawRequest) -> tuple[V2Request, dict[int, v2binary.BinaryTensor]]:
        """The request's v2 header, validated, and its binary inputs by position (empty for a JSON-only body)."""
        if raw.binary is None and isinstance(raw.body, dict) and isinstance(raw.body.get("inputs"), list):
            for i, t in enumerate(raw.body["inputs"]):  # JSON-only: the inputs' parameters are checked here
                what = f"input {t.get('name', i)!r}" if isinstance(t, dict) else f"input {i}"
                if isinstance(t, dict) and v2binary.binary_size(t, what) is not None:
                    raise InvalidInput(f"{what} says binary_data_size but the request has no "
                                       f"{v2binary.HEADER_LENGTH} header")
        return validate(V2Request, raw.body), raw.binary or {}

    def decode(self, raw: RawRequest, target: CodecTarget) -> TaskInput:
        req, binary = self.read_request(raw)
        if len(req.inputs) != 1:
            raise InvalidInput(f"this model takes one input tensor, got {len(req.inputs)}")
        x = self._images(req.inputs[0], binary.get(0), target)
        params = dict(req.parameters or {})
        binary_default = params.pop("binary_data_output", False)
        if not isinstance(binary_default, bool):
            raise InvalidInput(f"binary_data_output must be true or false, got {binary_default!r}")
        unknown = sorted(set(params) - set(target.options_model.model_fields))
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {unknown}; this model takes "
                               f"{list(target.options_model.model_fields) + list(v2binary.REQUEST_PARAMETERS)}")
        opts = target.options(params)
        offered = {o.name: o for o in target.v2_outputs}
        if req.outputs:
            names = [o.name for o in req.outputs]
            binary_out = tuple(o.name for o in req.outputs if v2binary.output_wants_binary(
                o.parameters, binary_default, f"output {o.name!r}"))
        else:
            names = list(target.v2_default_outputs)
            binary_out = tuple(names) if binary_default else ()
        bad = sorted(set(names) - set(offered))
        if bad:
            raise InvalidInput(f"unknown output(s) {bad}; this model offers {list(offered)}")
        return TaskInput(x, opts, frozenset(offered[n].field for n in names), self,
                         meta={"outputs": names, "id": req.id, "binary": binary_out})

    @staticmethod
    def _images(t: V2Tensor, binary: "v2binary.BinaryTensor | None", target: CodecTarget) -> np.ndarray:
        s = target.settings
        limit = s.max_images_per_request
        data = t.data if binary is None else binary
        if data is None:
            raise InvalidInput(f"input {t.name!r}: no 'data' and no parameters.binary_data_size")
        if t.datatype == "BYTES":
            if len(data) > limit:
                raise RequestError(f"{len(data)} images in one request; the limit is {limit}", status=413,
                                   code="payload_too_large")
            kind = str if binary is None else bytes
            if not len(data) or any(not isinstance(d, kind) for d in data):
                raise InvalidInput(f"input {t.name!r}: BYTES data must be base64-encoded PNG/JPEG strings "
                                   f"(as binary data: the PNG/JPEG bytes)")
            # math.prod on Python ints: numpy's product of a hostile shape wraps around (and -1 x -1 is 1).
            if any(d < 0 for d in t.shape) or math.prod(t.shape) != len(data):
                raise InvalidInput(f"input {t.name!r}: shape {t.shape} does not match {len(data)} elements")
            per_image, per_request = pixel_budgets(target.spec, s.max_image_pixels, s.max_request_pixels)
            # The images of one request share one decode budget.
            limits = dict(max_bytes=s.max_image_bytes, max_pixels=per_image, budget=DecodeBudget(per_request))
            if binary is None:
                return np.stack([image_from_base64_u8(d, target.spec, **limits) for d in data])
            if any(sniff_image(d) is None for d in data):
                raise UnsupportedMediaType(f"input {t.name!r}: a BYTES element does not hold a PNG or JPEG")
            return np.stack([decode_image_u8(d, target.spec, **limits) for d in data])
        if t.datatype in _FLOAT or t.datatype == "UINT8":
            return tensor_to_array(data, t.shape, "uint8" if t.datatype == "UINT8" else "float32", target.spec,
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

    def reply(self, item: TaskInput, body: dict[str, Any]) -> Reply:
        return Reply(200, body, item.meta.get("binary", ()))

    def error(self, e: RequestError) -> dict[str, Any]:
        return {"error": e.message}
