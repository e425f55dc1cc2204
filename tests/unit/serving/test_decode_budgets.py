"""Cost budgets, checked before the work they bound: pixels from the header, values before conversion."""
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from serving.runtime.errors import InvalidInput, PayloadTooLarge
from serving.runtime.preprocess import DecodeBudget, decode_image, pixel_budgets, tensor_to_array
from serving.runtime.spec import ModelSpec

GRAY = ModelSpec(arch="t", task="classification", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,),
                 num_classes=10)
BIG = ModelSpec(arch="t", task="classification", channels=3, input_size=(512, 512), mean=(0.5,) * 3,
                std=(0.5,) * 3, num_classes=10)


def png(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", **kw)
    return buf.getvalue()


def test_budgets_derive_from_the_input_size_unless_configured():
    assert pixel_budgets(GRAY) == (1024 * 1024, 4 * 1024 * 1024)
    assert pixel_budgets(BIG) == (16 * 512 * 512, 64 * 512 * 512)
    assert pixel_budgets(GRAY, 5000, None) == (5000, 20000)
    assert pixel_budgets(GRAY, 5000, 7000) == (5000, 7000)


def test_an_image_over_the_budget_is_refused_from_its_header():
    # A 4096 x 4096 PNG of zeros is a few KB; decoding it would cost 16 M pixels.
    data = png(np.zeros((4096, 4096), np.uint8))
    assert len(data) < 100_000
    per_image, _ = pixel_budgets(GRAY)
    with pytest.raises(PayloadTooLarge, match="4096x4096"):
        decode_image(data, GRAY, max_bytes=1 << 20, max_pixels=per_image)


def test_the_request_budget_spans_its_images():
    budget = DecodeBudget(3 * 600 * 600)
    img = png(np.full((600, 600), 7, np.uint8))
    for _ in range(3):
        decode_image(img, GRAY, max_bytes=1 << 20, max_pixels=1 << 20, budget=budget)
    with pytest.raises(PayloadTooLarge, match="decode budget"):
        decode_image(img, GRAY, max_bytes=1 << 20, max_pixels=1 << 20, budget=budget)


def test_16bit_is_scaled_exactly_without_float64():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (1024, 1024), dtype=np.uint16)
    data = png(a)
    ref = np.round(a.astype(np.float64) / 65535 * 255)
    small = ModelSpec(arch="t", task="classification", channels=1, input_size=(1024, 1024), mean=(0.5,),
                      std=(0.5,), num_classes=10)
    tracemalloc.start()
    try:
        x = decode_image(data, small, max_bytes=4 << 20, max_pixels=1 << 21)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.round(x[0] * 255), ref)
    # One float64 copy alone would take 8 bytes a pixel (the old path made several); the output takes 4.
    assert peak < 8 * a.size, peak


def test_large_jpeg_is_decoded_in_draft_mode(monkeypatch):
    rng = np.random.default_rng(1)
    a = (rng.random((64, 64)) * 255).astype(np.uint8).repeat(32, 0).repeat(32, 1)  # 2048 x 2048, smooth
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    sizes = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real(self, mode, size)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    x = decode_image(buf.getvalue(), GRAY, max_bytes=4 << 20, max_pixels=1 << 23)
    assert sizes and max(sizes[0]) <= 2048 // 8 * 2  # decoded at 1/8 (or 1/4) scale, not 2048 x 2048
    ref = np.asarray(Image.fromarray(a).resize((28, 28), Image.BILINEAR), np.float32) / 255
    assert np.abs(x[0] - ref).mean() < 0.05


class Untouchable(list):
    def __iter__(self):
        raise AssertionError("the data was read before the shape was checked")

    def __array__(self, *a, **k):
        raise AssertionError("the data was converted before the shape was checked")


@pytest.mark.parametrize("shape, match", [([3, 28, 28], "does not match"), ([1, 28, -28], "negative"),
                                          ([100, 1, 28, 28], "limit"), ([0, 1, 28, 28], "empty")])
def test_tensor_shape_checked_before_its_data(shape, match):
    with pytest.raises((InvalidInput, PayloadTooLarge), match=match):
        tensor_to_array(Untouchable([0.0] * 4), shape, "float32", GRAY, max_images=64)


def test_animated_png_refused():
    a = np.zeros((28, 28), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", save_all=True, append_images=[Image.fromarray(a + 1)])
    with pytest.raises(InvalidInput, match="frames"):
        decode_image(buf.getvalue(), GRAY, max_bytes=1 << 20, max_pixels=1 << 20)
