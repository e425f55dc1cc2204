"""The KServe v2 *binary tensor data extension*, as the standard clients (``tritonclient.http``) speak it.

A request body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw bytes of every
input whose ``parameters.binary_data_size`` is set, in the order of ``inputs``. Fixed-size datatypes are packed
little-endian, row-major; a BYTES tensor is each element as a 4-byte little-endian length and its bytes. An answer
uses the same form for the outputs asked for in binary (``parameters.binary_data_output`` on the request, or
``parameters.binary_data`` on a requested output, which wins), and says its header length in the same HTTP header.

Everything here is host- and model-agnostic: :func:`split_request` turns a body into the JSON header's bytes and
the binary inputs; :func:`encode_response` turns an answer's JSON document into a body. Every malformed length
raises :class:`~serving.runtime.errors.InvalidInput` saying which input and what was expected.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from serving.runtime.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"

# Little-endian numpy dtypes of the fixed-size v2 datatypes (BF16 has no numpy dtype and is not served).
DTYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.items()}

# The parameters of the extension at each level of a request (other levels' keys are the model's business).
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)
REQUEST_PARAMETERS = ("binary_data_output",)

BinaryTensor = Union[np.ndarray, list]  # numbers [*shape] of the datatype's dtype, or a BYTES tensor's elements


def header_length(value: Any) -> Optional[int]:
    """The ``Inference-Header-Content-Length`` header's value as a byte count (None when absent)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    try:
        n = int(text.strip())
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be a byte count, got {text[:40]!r}") from None
    if n < 0:
        raise InvalidInput(f"{HEADER_LENGTH} must not be negative, got {n}")
    return n


def split_request(body: bytes, length: int) -> tuple[bytes, memoryview]:
    """(the JSON header's bytes, the binary data after it) of a request whose header is ``length`` bytes."""
    if length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
    if length == 0:
        raise InvalidInput(f"{HEADER_LENGTH} is 0: the body must start with the JSON inference header")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def binary_size(t: Mapping[str, Any], what: str) -> Optional[int]:
    """An input's ``parameters.binary_data_size`` (None when it travels in JSON); rejects unknown parameters."""
    params = t.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise InvalidInput(f"{what}: 'parameters' must be an object")
    unknown = sorted(set(params) - set(INPUT_PARAMETERS))
    if unknown:
        raise InvalidInput(f"{what}: unknown parameter(s) {unknown}; an input takes {list(INPUT_PARAMETERS)}")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidInput(f"{what}: binary_data_size must be an integer byte count, got {size!r}")
    if size < 0:
        raise InvalidInput(f"{what}: binary_data_size must not be negative, got {size}")
    return size


def binary_inputs(inputs: Sequence[Mapping[str, Any]], data: memoryview) -> dict[int, BinaryTensor]:
    """The binary inputs of a parsed header, by position in ``inputs``: numbers as arrays of the datatype's
    dtype shaped as declared, BYTES as a list of ``bytes``. Every byte of ``data`` must belong to an input."""
    out: dict[int, BinaryTensor] = {}
    offset = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, Mapping):
            continue  # the schema check that follows says what is wrong with it
        what = f"input {t.get('name', i)!r}"
        size = binary_size(t, what)
        if size is None:
            continue
        if "data" in t:
            raise InvalidInput(f"{what}: give either 'data' or parameters.binary_data_size, not both")
        if offset + size > len(data):
            raise InvalidInput(f"{what}: binary_data_size {size} runs past the end of the body "
                               f"({len(data) - offset} binary bytes left)")
        chunk = data[offset:offset + size]
        offset += size
        out[i] = _tensor(chunk, t.get("datatype"), t.get("shape"), what)
    if offset != len(data):
        raise InvalidInput(f"the body holds {len(data) - offset} bytes after the binary inputs that "
                           f"binary_data_size accounts for")
    return out


def _tensor(chunk: memoryview, datatype: Any, shape: Any, what: str) -> BinaryTensor:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InvalidInput(f"{what}: 'shape' must be a list of integers")
    if any(s < 0 for s in shape):
        raise InvalidInput(f"{what}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    if datatype == "BYTES":
        items = deserialize_bytes(chunk, what)
        if len(items) != count:
            raise InvalidInput(f"{what}: {len(items)} BYTES elements in binary_data_size {len(chunk)} for "
                               f"shape {shape} ({count} expected)")
        return items
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"{what}: datatype {datatype!r} cannot travel as binary data here; use one of "
                           f"{sorted(DTYPES) + ['BYTES']}")
    want = count * dtype.itemsize
    if len(chunk) != want:
        raise InvalidInput(f"{what}: binary_data_size {len(chunk)} does not match shape {shape} of {datatype} "
                           f"({want} bytes expected)")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def deserialize_bytes(chunk: memoryview, what: str = "tensor") -> list[bytes]:
    """A BYTES tensor's binary form -> its elements."""
    items = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"{what}: a BYTES element's 4-byte length is cut off at byte {pos}")
        (n,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"{what}: a BYTES element of {n} bytes runs past its binary_data_size")
        items.append(bytes(chunk[pos:pos + n]))
        pos += n
    return items


def serialize_bytes(items: Sequence[Union[str, bytes]]) -> bytes:
    """BYTES elements -> their binary form (str elements as UTF-8)."""
    parts = []
    for x in items:
        b = x.encode("utf-8") if isinstance(x, str) else bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def binary_request(images: Sequence[bytes], name: str = "images") -> tuple[bytes, int]:
    """A v2 request of N encoded images (one BYTES input of shape [N]) in the binary tensor data extension, as the
    standard client builds it: (body, the value of Inference-Header-Content-Length). For load generators and
    tests; the server reads it with :func:`split_request` and :func:`binary_inputs`."""
    blob = serialize_bytes(images)
    header = json.dumps({"inputs": [{"name": name, "shape": [len(images)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, len(header)


def output_wants_binary(params: Optional[Mapping[str, Any]], default: bool, what: str) -> bool:
    """Whether a requested output is answered in binary: its ``binary_data`` parameter, else ``default``."""
    params = params or {}
    unknown = sorted(set(params) - set(OUTPUT_PARAMETERS))
    if unknown:
        raise InvalidInput(f"{what}: unknown parameter(s) {unknown}; an output takes {list(OUTPUT_PARAMETERS)}")
    value = params.get("binary_data", default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{what}: binary_data must be true or false, got {value!r}")
    return value


def encode_response(doc: dict[str, Any], binary: Sequence[str], dumps) -> tuple[bytes, Optional[int]]:
    """(body, header length or None) of a v2 answer. ``doc["outputs"]`` are dicts with ``name``, ``datatype``,
    ``shape`` and ``data`` (a list or an array); those named in ``binary`` lose ``data`` and gain
    ``parameters.binary_data_size``, their bytes following the JSON header in order. ``dumps``: the JSON encoder
    (object -> bytes)."""
    if not binary:
        return dumps(doc), None
    tails = []
    outputs = []
    for out in doc["outputs"]:
        if out["name"] not in binary:
            outputs.append(out)
            continue
        data = out["data"]
        if out["datatype"] == "BYTES":
            raw = serialize_bytes(data.ravel().tolist() if isinstance(data, np.ndarray) else data)
        else:
            raw = np.ascontiguousarray(data, dtype=DTYPES[out["datatype"]]).tobytes()
        tails.append(raw)
        out = {k: v for k, v in out.items() if k != "data"}
        out["parameters"] = {**(out.get("parameters") or {}), "binary_data_size": len(raw)}
        outputs.append(out)
    head = dumps({**doc, "outputs": outputs})
    return b"".join([head, *tails]), len(head)
