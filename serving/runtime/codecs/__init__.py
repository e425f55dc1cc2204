"""Wire protocols as codecs. A codec decodes a request into the task's typed input (:class:`TaskInput`) and encodes
the task's typed responses; services never look at the protocol. :func:`read_body` reads a host's raw body once and
:func:`codec_for` picks the codec that speaks it: the KServe v2 protocol for a JSON object with ``inputs``, the
native protocol for everything else."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from serving.runtime.codecs.base import Codec, CodecTarget, RawRequest, Reply, TaskInput, V2Output, validate
from serving.runtime.codecs.kserve_v2 import KServeV2Codec, looks_v2
from serving.runtime.codecs.native import NativeCodec
from serving.runtime import jsonsafe, v2binary
from serving.runtime.errors import InvalidInput, UnsupportedMediaType
from serving.runtime.preprocess import sniff_image

FORM = "application/x-www-form-urlencoded"
NATIVE = NativeCodec()
KSERVE_V2 = KServeV2Codec()

__all__ = ["Codec", "CodecTarget", "KSERVE_V2", "NATIVE", "RawRequest", "Reply", "TaskInput", "V2Output",
           "codec_for", "error_codec", "read_body", "validate"]


def read_body(raw: RawRequest, parse_json: Callable[[bytes], Any]) -> RawRequest:
    """The body as a codec takes it: PNG/JPEG bytes as bytes, JSON text parsed by ``parse_json`` (bytes -> value,
    with the host's limits), JSON a host parsed already (TorchServe does) checked like parsed text. Raises a
    RequestError for an empty body or one that is neither. A body read once is returned as it is."""
    body = raw.body
    if raw.read:
        return raw
    length = v2binary.header_length(raw.header_length)
    if length is not None:
        return _read_binary(raw, length, parse_json)
    if isinstance(body, (dict, list)):
        jsonsafe.check(body)
        return replace(raw, read=True)
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
            pass
        elif body.lstrip()[:1] in (b"{", b"["):
            body = parse_json(body)
        elif not body.strip():
            raise InvalidInput("empty request body: send PNG/JPEG bytes or JSON")
        elif ctype.startswith("image/"):
            raise UnsupportedMediaType(f"the Content-Type says {ctype}, but the body is not a PNG or JPEG "
                                       f"(its first bytes are {body[:8]!r}); send the file's bytes unchanged")
        else:
            raise UnsupportedMediaType("send PNG or JPEG bytes, or JSON ({\"image\": <base64>} or "
                                       "{\"tensor\": {...}}, or a KServe v2 request)")
    elif isinstance(body, str):
        body = parse_json(body.encode("utf-8"))
    return replace(raw, body=body, read=True)


def _read_binary(raw: RawRequest, length: int, parse_json: Callable[[bytes], Any]) -> RawRequest:
    """A v2 body with the binary tensor data extension: its JSON header parsed (with the host's limits), its binary
    inputs cut out and checked against the header."""
    body = raw.body.encode("utf-8") if isinstance(raw.body, str) else raw.body
    if not isinstance(body, (bytes, bytearray, memoryview)):
        what = "JSON" if isinstance(body, (dict, list)) else type(body).__name__
        raise InvalidInput(f"a request with {v2binary.HEADER_LENGTH} must carry the raw body, not {what} "
                           f"(send it as application/octet-stream)")
    head, rest = v2binary.split_request(bytes(body), length)
    doc = parse_json(head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput("the inference header must be a JSON object with 'inputs'")
    return replace(raw, body=doc, read=True, binary=v2binary.binary_inputs(doc["inputs"], rest))


def codec_for(body: Any) -> Codec:
    """The codec for a body read by :func:`read_body`."""
    return KSERVE_V2 if isinstance(body, dict) and "inputs" in body else NATIVE


def error_codec(body: Any) -> Codec:
    """The codec to answer an error in, for a request (or a body) that may not have been read (or not be readable
    at all)."""
    if isinstance(body, RawRequest):
        if body.header_length is not None:
            return KSERVE_V2
        body = body.body
    try:
        return KSERVE_V2 if looks_v2(body) else NATIVE
    except Exception:  # noqa: BLE001 - only chooses the error's form
        return NATIVE
