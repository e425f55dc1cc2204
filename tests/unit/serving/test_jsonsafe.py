import json

import pytest

from serving.runtime import jsonsafe
from serving.runtime.errors import InvalidInput, PayloadTooLarge


def loads(data, **kw):
    return jsonsafe.loads(data, max_bytes=1 << 20, **kw)


@pytest.mark.parametrize("body, match", [
    (b'{"a":' + b"[" * 1100, "nested too deeply|not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"[" * 40 + b"]" * 40, "nested too deeply"),
    (b'{"x": NaN}', "finite"),
    (b'{"x": -Infinity}', "finite"),
    (b'{"x": 1e999}', "out of range"),
    (b'{"tensor": {"shape": [28, 28], "data": [1' + b"0" * 400 + b"]}}", "64-bit"),
    (b'{"x": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'{"x": "\xff\xfe"}', "not valid JSON"),
    (b'{"x": ', "not valid JSON"),
])
def test_hostile_json_is_a_400(body, match):
    with pytest.raises(InvalidInput, match=match):
        loads(body)


def test_good_json_parses_unchanged():
    doc = {"tensor": {"shape": [2, 2], "data": [[0, 0.5], [1, 2**63 - 1]]}, "top_k": 3, "ok": True, "n": None}
    assert loads(json.dumps(doc).encode()) == doc


def test_limits_before_parsing():
    with pytest.raises(PayloadTooLarge):
        jsonsafe.loads(b"[" + b"0," * 100 + b"0]", max_bytes=50)
    with pytest.raises(PayloadTooLarge, match="more than 100 values"):
        loads(b"[" + b"0," * 100 + b"0]", max_values=100)
    assert len(loads(b"[" + b"0," * 98 + b"0]", max_values=100)) == 99


def test_check_covers_already_decoded_bodies():
    deep: list = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    with pytest.raises(InvalidInput, match="nested"):
        jsonsafe.check({"a": deep})
    with pytest.raises(InvalidInput):
        jsonsafe.check({"a": [float("nan")]})
    with pytest.raises(InvalidInput):
        jsonsafe.check({"a": {"b": 10**30}})
    jsonsafe.check({"a": [1.5, -3, True, None, "x"]})
