"""The libspng fast path for the common PNG gives the pixels, limits, budget charges and errors of the PIL path,
and leaves every other image to PIL."""
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.runtime import preprocess
from serving.runtime.errors import InvalidInput, PayloadTooLarge
from serving.runtime.preprocess import DecodeBudget, decode_image_u8
from serving.runtime.spec import ModelSpec

GRAY = ModelSpec(arch="t", task="classification", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,),
                 num_classes=10)
RGB = ModelSpec(arch="t", task="classification", channels=3, input_size=(32, 32), mean=(0.5,) * 3,
                std=(0.5,) * 3, num_classes=10)
LIMITS = dict(max_bytes=1 << 22, max_pixels=1 << 20)
rng = np.random.default_rng(0)


def png(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", **kw)
    return buf.getvalue()


def with_pil_only(monkeypatch, data, spec, **limits):
    monkeypatch.setattr(preprocess, "pyspng", None)
    try:
        return decode_image_u8(data, spec, **limits)
    finally:
        monkeypatch.undo()


def fashion_pngs(n: int) -> list[tuple[np.ndarray, bytes]]:
    from training.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")
    return [(a, png(a)) for a in ds.images[:n, 0].numpy()]


CASES = {
    "gray": (GRAY, lambda: png(rng.integers(0, 256, (28, 28), dtype=np.uint8))),
    "gray, optimised (other filters and compression)": (
        GRAY, lambda: png(rng.integers(0, 256, (28, 28), dtype=np.uint8), optimize=True)),
    "gray with tRNS": (GRAY, lambda: png(rng.integers(0, 256, (28, 28), dtype=np.uint8), transparency=7)),
    "gray, larger: resized": (GRAY, lambda: png(rng.integers(0, 256, (61, 45), dtype=np.uint8))),
    "rgb": (RGB, lambda: png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))),
    "rgb, smaller: resized": (RGB, lambda: png(rng.integers(0, 256, (20, 17, 3), dtype=np.uint8))),
    # Not the fast path's: conversions and other sample depths go through PIL either way.
    "rgb to a gray model": (GRAY, lambda: png(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))),
    "gray to an rgb model": (RGB, lambda: png(rng.integers(0, 256, (32, 32), dtype=np.uint8))),
    "16-bit gray": (GRAY, lambda: png(rng.integers(0, 65536, (28, 28), dtype=np.uint16))),
    "rgba": (RGB, lambda: png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8))),
    "palette": (GRAY, lambda: (lambda b: (b.seek(0), b.getvalue())[1])(
        _save(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("P")))),
}


def _save(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf


@pytest.mark.parametrize("case", list(CASES))
def test_same_pixels_as_pil(case, monkeypatch):
    spec, make = CASES[case]
    data = make()
    fast = decode_image_u8(data, spec, **LIMITS)
    slow = with_pil_only(monkeypatch, data, spec, **LIMITS)
    assert fast.dtype == slow.dtype == np.uint8 and fast.shape == slow.shape == (spec.channels, *spec.input_size)
    np.testing.assert_array_equal(fast, slow)


def test_real_images_decode_exactly_through_the_fast_path(monkeypatch):
    calls = []
    real = preprocess.pyspng.load
    monkeypatch.setattr(preprocess.pyspng, "load", lambda *a, **k: calls.append(1) or real(*a, **k))
    pairs = fashion_pngs(200)
    for a, data in pairs:
        np.testing.assert_array_equal(decode_image_u8(data, GRAY, **LIMITS)[0], a)
    assert len(calls) == len(pairs)  # every one took the fast path


def test_images_pil_must_see_skip_the_fast_path(monkeypatch):
    monkeypatch.setattr(preprocess.pyspng, "load", lambda *a, **k: pytest.fail("took the fast path"))
    a = np.zeros((28, 28), np.uint8)
    a[:, :14] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: PIL turns it upright
    rotated = decode_image_u8(png(a, exif=exif.tobytes()), GRAY, **LIMITS)[0]
    assert rotated[:, 20:].mean() > 200 and rotated[:, :8].mean() < 50
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("Comment", "hello")
    decode_image_u8(png(a, pnginfo=info), GRAY, **LIMITS)
    frames = [Image.fromarray(a), Image.fromarray(255 - a)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidInput, match="frames"):
        decode_image_u8(buf.getvalue(), GRAY, **LIMITS)


def test_limits_and_budget_charged_before_decoding(monkeypatch):
    monkeypatch.setattr(preprocess.pyspng, "load", lambda *a, **k: pytest.fail("decoded past a limit"))
    data = png(np.zeros((300, 300), np.uint8))
    with pytest.raises(PayloadTooLarge, match="300x300 = 90000 pixels; the limit is 40000"):
        decode_image_u8(data, GRAY, max_bytes=1 << 20, max_pixels=200 * 200)
    budget = DecodeBudget(100_000)
    budget.charge(20_000)
    with pytest.raises(PayloadTooLarge, match="decode budget"):
        decode_image_u8(data, GRAY, max_bytes=1 << 20, max_pixels=1 << 20, budget=budget)
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image_u8(data, GRAY, max_bytes=10, max_pixels=1 << 20)


def test_budget_charged_once_per_image():
    budget = DecodeBudget(10 * 28 * 28)
    data = png(np.zeros((28, 28), np.uint8))
    for _ in range(10):
        decode_image_u8(data, GRAY, **LIMITS, budget=budget)
    assert budget.left == 0
    with pytest.raises(PayloadTooLarge):
        decode_image_u8(data, GRAY, **LIMITS, budget=budget)


@pytest.mark.parametrize("damage", ["truncated", "corrupt stream", "bad IDAT CRC", "bad IHDR CRC"])
def test_damaged_pngs_answer_as_pil_does(damage, monkeypatch):
    """A damaged PNG is InvalidInput on both paths, or (a CRC neither decoder checks) the same pixels."""
    data = bytearray(png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    idat = data.index(b"IDAT")
    n = int.from_bytes(data[idat - 4:idat], "big")
    if damage == "truncated":
        data = data[:idat + 4 + n // 2]
    elif damage == "corrupt stream":
        data[idat + 4:idat + 4 + n] = bytes(n)
        data[idat + 4 + n:idat + 8 + n] = zlib.crc32(bytes(data[idat:idat + 4 + n])).to_bytes(4, "big")
    elif damage == "bad IDAT CRC":
        data[idat + 4 + n] ^= 0xFF
    else:
        data[29] ^= 0xFF
    outcomes = []
    for decode in (lambda: decode_image_u8(bytes(data), GRAY, **LIMITS),
                   lambda: with_pil_only(monkeypatch, bytes(data), GRAY, **LIMITS)):
        try:
            outcomes.append(decode())
        except InvalidInput as e:
            assert "cannot decode" in str(e) or "broken" in str(e)
            outcomes.append(None)
    fast, slow = outcomes
    assert (fast is None) == (slow is None), (damage, fast is None, slow is None)
    if fast is not None:
        np.testing.assert_array_equal(fast, slow)
    if damage in ("truncated", "corrupt stream"):
        assert fast is None
