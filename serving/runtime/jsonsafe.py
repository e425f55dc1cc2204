"""JSON from untrusted clients: parsed with bounded cost and checked before anything trusts it.

CPython's ``json`` accepts ``NaN``/``Infinity``, turns ``1e999`` into ``inf``, parses integers of thousands of
digits (which later raise ``OverflowError`` in numpy or ``int()``), and raises ``RecursionError`` (not a
``ValueError``) on deep nesting. Every one of those becomes an :class:`InvalidInput` here, so a hostile body is
answered with its own 400 and never escapes a handler. The same checks apply to a body a host already decoded
(TorchServe decodes ``application/json`` bodies itself unless told not to).
"""
from __future__ import annotations

import json
import math
from typing import Any

from serving.runtime.errors import InvalidInput, PayloadTooLarge

# Deep enough for every request shape the services take (a v2 tensor nested [N][C][H][W] sits at depth ~7);
# shallow enough that walking a body costs nothing and no recursion limit is ever near.
MAX_DEPTH = 16
# Integers a request can meaningfully carry (shapes, counts, seeds, uint8 pixels) fit in int64; larger ones are
# mistakes or attacks, and would overflow numpy and C extensions later.
MAX_INT = 2**63 - 1


def _no_constant(name: str) -> Any:
    raise InvalidInput(f"the JSON body holds {name}: only finite numbers are accepted")


def count_values_bound(data: bytes) -> int:
    """An upper bound on the number of values in a JSON text, counted without parsing it: every value but the
    first is preceded by a comma or a colon."""
    return data.count(b",") + data.count(b":") + 1


def loads(data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_values: int | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parses a JSON text from a client. Refuses, before parsing, a text over ``max_bytes`` (413) or with more
    than ``max_values`` values (413); after parsing, nesting deeper than ``max_depth``, non-finite numbers and
    integers beyond int64 (400)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"JSON body is {len(data)} bytes; the limit is {max_bytes}")
    if max_values is not None and count_values_bound(data) > max_values:
        raise PayloadTooLarge(f"JSON body holds more than {max_values} values, more than any request to this "
                              f"model needs")
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidInput(f"the JSON body is nested too deeply (the limit is {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints past Python's digit limit
        raise InvalidInput(f"the body is not valid JSON: {e}") from None
    check(obj, max_depth=max_depth)
    return obj


def check(obj: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Raises InvalidInput when ``obj`` (parsed JSON) nests deeper than ``max_depth`` or holds a non-finite
    number or an integer beyond int64. Iterative, so no depth can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            _check_scalar(node)
            continue
        if depth > max_depth:
            raise InvalidInput(f"the JSON body is nested too deeply (the limit is {max_depth} levels)")
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            else:
                _check_scalar(child)


def _check_scalar(v: Any) -> None:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InvalidInput("the JSON body holds a number out of range (NaN, infinite or beyond float64)")
    elif isinstance(v, int) and not isinstance(v, bool):
        if not -MAX_INT - 1 <= v <= MAX_INT:
            raise InvalidInput("the JSON body holds an integer beyond the 64-bit range")
