"""The native protocol: raw PNG/JPEG bytes (options as query parameters, form fields or headers), or a JSON object
with one image as base64 (``image``) or as numbers (``tensor``), options beside it (:mod:`serving.runtime.schemas`).
Answers are the task's response model as JSON; errors ``{"error": {"status", "code", "message"}}``."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serving.runtime.codecs.base import Codec, CodecTarget, RawRequest, TaskInput, validate
from serving.runtime.errors import InvalidInput, RequestError
from serving.runtime.preprocess import decode_image_u8, image_from_base64_u8, pixel_budgets, tensor_input_to_array


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _merge(in_body: dict[str, Any], beside: dict[str, Any], given: Any) -> dict[str, Any]:
    """The JSON body's options with those given beside it (``beside``: validated and completed; ``given``: the
    keys actually sent). The same key with two different values is an error, not a silent choice."""
    out = dict(in_body)
    for key in given:
        if key in out and out[key] != beside[key]:
            raise InvalidInput(f"{key} is given twice with different values: {out[key]!r} in the JSON body and "
                               f"{beside[key]!r} beside it (header or parameter); give it once")
        out[key] = beside[key]
    return out


class NativeCodec(Codec):
    name = "native"

    def decode(self, raw: RawRequest, target: CodecTarget) -> TaskInput:
        s = target.settings
        max_pixels = pixel_budgets(target.spec, s.max_image_pixels, s.max_request_pixels)[0]
        if isinstance(raw.body, bytes):  # an image: read_body lets only PNG/JPEG bytes through
            opts = target.options({k: _text(v) for k, v in raw.params.items()})
            x = decode_image_u8(raw.body, target.spec, max_bytes=s.max_image_bytes,
                                max_pixels=max_pixels)[None]
        else:
            if not isinstance(raw.body, dict):
                raise InvalidInput(f"the JSON body must be an object, got {type(raw.body).__name__}")
            req = validate(target.request_model, raw.body)
            if req.image is not None:
                x = image_from_base64_u8(req.image, target.spec, max_bytes=s.max_image_bytes,
                                      max_pixels=max_pixels)[None]
            else:
                x = tensor_input_to_array(req.tensor, target.spec, max_images=1)
            opts = req.model_dump(exclude={"image", "tensor"}, exclude_unset=True, exclude_none=True)
            if raw.params:  # options sent beside a JSON body (headers, a host's parameters) count as well
                opts = _merge(opts, target.options({k: _text(v) for k, v in raw.params.items()}), raw.params)
            opts = target.check_options(opts)
        return TaskInput(x, opts, target.native_fields(opts), self)

    def encode(self, item: TaskInput, responses: list[BaseModel], target: CodecTarget) -> dict[str, Any]:
        # One image per native request. exclude_unset: fields the task did not fill (not asked for) are left
        # out, while a field set to None (a neighbour without a class name) stays.
        return responses[0].model_dump(exclude_unset=True)

    def error(self, e: RequestError) -> dict[str, Any]:
        return e.to_dict()
