"""What every codec shares: the request as a host hands it over, the task's typed input a codec decodes it into,
the reply a codec encodes, and the :class:`Codec` interface itself.

A codec knows the wire format and nothing about the task; the task (the service) knows its options, its forward
pass and its typed responses and nothing about the wire. What a codec asks of the task is :class:`CodecTarget`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from serving.runtime import v2binary
from serving.runtime.errors import InvalidInput, RequestError
from serving.runtime.schemas import ServiceSettings
from serving.runtime.spec import ModelSpec


@dataclass
class RawRequest:
    """One request as a host received it: the body (bytes, text, or JSON already parsed) and string options
    (query parameters or form fields)."""

    body: Any
    params: Mapping[str, Any] = field(default_factory=dict)
    probe_key: Optional[str] = None  # the X-Probe-Key a probe request came with
    content_type: Optional[str] = None  # as the client declared it; only used to explain a mismatch
    # The Inference-Header-Content-Length header (v2 binary tensor data extension): the body is that many bytes of
    # JSON followed by binary tensors.
    header_length: Any = None
    read: bool = False  # set by serving.runtime.codecs.read_body once the body is in the form codecs take
    # Set by read_body for a binary v2 body: its binary inputs by position in the header's ``inputs``.
    binary: Optional[dict[int, v2binary.BinaryTensor]] = None


def dumps(doc: Any) -> bytes:
    """The JSON encoder of answers (UTF-8 bytes). Standard JSON only: a non-finite number in an answer is an error
    on our side (ValueError), not 'NaN' on the wire.

    orjson encodes ~20x faster than the standard library, but writes NaN and infinities as null: an answer with a
    null in it (or one orjson refuses) is encoded again by the standard encoder, which decides."""
    try:
        out = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        out = b"null"
    if b"null" in out:
        return json.dumps(doc, allow_nan=False).encode("utf-8")
    return out


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    binary_outputs: tuple[str, ...] = ()  # v2 outputs answered as binary data after the JSON header

    def payload(self) -> tuple[bytes, str, dict[str, str]]:
        """(the body's bytes, its content type, other HTTP headers to send with it)."""
        data, head = v2binary.encode_response(self.body, self.binary_outputs, dumps)
        if head is None:
            return data, "application/json", {}
        return data, "application/octet-stream", {v2binary.HEADER_LENGTH: str(head)}

    def json(self) -> str:
        return dumps(self.body).decode("utf-8")


@dataclass
class TaskInput:
    """A decoded request, whatever protocol it came in: the task's typed input.

    x: float32 [N, C, H, W] in [0, 1], or uint8 [N, C, H, W] 0..255 (decoded images, scaled with the whole batch)
       (N images of one request; the native protocol carries one);
    options: the task's options, validated and completed with the service's defaults;
    fields: the response fields the client asked for (names of the task's response model);
    codec: the codec that decoded the request and will encode its answer;
    meta: what that codec needs to keep for the answer (the v2 request id and output names)."""

    x: np.ndarray
    options: dict[str, Any]
    fields: frozenset[str]
    codec: "Codec"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class V2Output:
    """One named output tensor of the KServe v2 protocol, read from a task's typed response.

    field: the response field it is read from (asking for the output asks the task for that field);
    values: one image's response -> its flat values (the tensor is [N, len(values)])."""

    name: str
    datatype: str
    field: str
    values: Callable[[Any], Sequence[Any]]


class CodecTarget(Protocol):
    """What a codec needs from the service it decodes for."""

    name: str
    version: Optional[str]
    spec: ModelSpec
    settings: ServiceSettings
    request_model: type[BaseModel]
    options_model: type[BaseModel]
    v2_outputs: tuple[V2Output, ...]
    v2_default_outputs: tuple[str, ...]

    def options(self, values: Mapping[str, Any]) -> dict[str, Any]: ...

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]: ...

    def native_fields(self, opts: Mapping[str, Any]) -> frozenset[str]: ...


class Codec:
    """A wire protocol: decodes a request into the task's :class:`TaskInput` and encodes the task's typed
    responses (one pydantic model per image) into the protocol's body. Subclasses override every method."""

    name: str = ""

    def decode(self, raw: RawRequest, target: CodecTarget) -> TaskInput:
        raise NotImplementedError

    def encode(self, item: TaskInput, responses: list[BaseModel], target: CodecTarget) -> dict[str, Any]:
        raise NotImplementedError

    def reply(self, item: TaskInput, body: dict[str, Any]) -> Reply:
        """The 200 reply that carries an encoded answer (a protocol with a binary form says which parts)."""
        return Reply(200, body)

    def error(self, e: RequestError) -> dict[str, Any]:
        """The protocol's error body for a request that could not be answered."""
        raise NotImplementedError


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def validate(model: type[BaseModel], body: Any) -> Any:
    """``model.model_validate(body)``, a validation failure answered as a 400 that lists what was wrong (and,
    for a key the model does not take, the keys it does)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        msg = validation_message(e)
        if any(err["type"] == "extra_forbidden" and len(err["loc"]) == 1 for err in e.errors()):
            msg += f"; valid keys: {', '.join(model.model_fields)}"
        raise InvalidInput(msg) from None
