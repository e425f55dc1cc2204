import base64
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.runtime.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serving.runtime.preprocess import decode_base64, decode_image, image_from_base64, sniff_image, tensor_to_array
from serving.runtime.spec import ModelSpec
from tests.unit.serving.builders import encode

GRAY = ModelSpec(arch="t", task="classification", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,),
                 num_classes=10)
RGB = ModelSpec(arch="t", task="classification", channels=3, input_size=(32, 32), mean=(0.5,) * 3,
                std=(0.5,) * 3, num_classes=10)
LIMITS = dict(max_bytes=1 << 20, max_pixels=1 << 20)


def test_png_grayscale_is_exact():
    a = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    x = decode_image(encode(a), GRAY, **LIMITS)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], a.astype(np.float32) / 255)


def test_rgb_image_to_grayscale_model_and_gray_to_rgb_model():
    a = np.zeros((28, 28, 3), np.uint8)
    a[..., 0] = 255  # pure red
    x = decode_image(encode(a), GRAY, **LIMITS)
    assert x.shape == (1, 28, 28)
    assert abs(float(x.mean()) - 76 / 255) < 2 / 255  # ITU-R 601 luma of red, as PIL computes it
    g = np.full((32, 32), 100, np.uint8)
    y = decode_image(encode(g), RGB, **LIMITS)
    assert y.shape == (3, 32, 32)
    np.testing.assert_allclose(y, 100 / 255, atol=1e-6)


def test_resized_to_the_spec_and_jpeg_accepted():
    a = np.full((56, 40), 200, np.uint8)
    x = decode_image(encode(a, "JPEG", quality=95), GRAY, **LIMITS)
    assert x.shape == (1, 28, 28)
    assert np.abs(x - 200 / 255).max() < 4 / 255


def test_rgba_and_16bit_inputs():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 255
    assert decode_image(encode(rgba), RGB, **LIMITS).shape == (3, 32, 32)
    img16 = Image.fromarray(np.full((28, 28), 65535, np.uint16))
    buf = io.BytesIO()
    img16.save(buf, "PNG")
    x = decode_image(buf.getvalue(), GRAY, **LIMITS)
    assert float(x.min()) == pytest.approx(1.0)  # scaled, not clipped to a wrong value


def test_limits_checked_before_decoding():
    a = np.zeros((28, 28), np.uint8)
    with pytest.raises(PayloadTooLarge):
        decode_image(encode(a), GRAY, max_bytes=10, max_pixels=1 << 20)
    big = np.zeros((300, 300), np.uint8)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(encode(big), GRAY, max_bytes=1 << 20, max_pixels=200 * 200)


def test_decompression_bomb_refused_without_touching_pil_global_limit():
    before = Image.MAX_IMAGE_PIXELS
    # A PNG header claiming 100k x 100k pixels: refused from the header, nothing decompressed.
    big = Image.new("L", (1, 1))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid IHDR chunk
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(bytes(data), GRAY, max_bytes=1 << 20, max_pixels=1 << 24)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, encode(np.zeros((8, 8), np.uint8))[:40]])
def test_corrupt_images_are_invalid_input(data):
    with pytest.raises(InvalidInput):
        decode_image(data, GRAY, **LIMITS)


def test_other_formats_refused():
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, "BMP")
    with pytest.raises(UnsupportedMediaType):
        decode_image(buf.getvalue(), GRAY, **LIMITS)
    assert sniff_image(buf.getvalue()) is None
    assert sniff_image(encode(np.zeros((2, 2), np.uint8))) == "PNG"


def test_base64_forms():
    png = encode(np.zeros((28, 28), np.uint8))
    std = base64.b64encode(png).decode()
    assert decode_base64(std, 1 << 20) == png
    assert decode_base64("data:image/png;base64," + std, 1 << 20) == png
    assert decode_base64(base64.urlsafe_b64encode(png).decode().rstrip("="), 1 << 20) == png
    with pytest.raises(InvalidInput):
        decode_base64("not base64 !!", 1 << 20)
    with pytest.raises(PayloadTooLarge):
        decode_base64(std, 10)
    with pytest.raises(UnsupportedMediaType):
        image_from_base64(base64.b64encode(b"hello world").decode(), GRAY, **LIMITS)


def test_tensor_shapes_and_ranges():
    flat = [0.5] * 784
    for shape in ([28, 28], [1, 28, 28], [1, 1, 28, 28]):
        x = tensor_to_array(flat, shape, "float32", GRAY, max_images=4)
        assert x.shape == (1, 1, 28, 28)
    nested = np.full((2, 1, 28, 28), 255).tolist()
    x = tensor_to_array(nested, [2, 1, 28, 28], "uint8", GRAY, max_images=4)
    assert x.shape == (2, 1, 28, 28) and float(x.max()) == 1.0


@pytest.mark.parametrize("values,shape,dtype,match", [
    ([0.5] * 783, [1, 28, 28], "float32", "783 values"),
    ([0.5] * 784, [1, 27, 29], "float32", "does not match"),
    ([2.0] * 784, [1, 28, 28], "float32", r"\[0, 1\]"),
    ([float("nan")] * 784, [1, 28, 28], "float32", "NaN"),
    ([300] * 784, [1, 28, 28], "uint8", "0..255"),
    (["a"] * 784, [1, 28, 28], "float32", "numbers"),
    ([[0.5] * 28] * 27 + [[0.5] * 27], [1, 28, 28], "float32", "numbers"),
])
def test_bad_tensors(values, shape, dtype, match):
    with pytest.raises(InvalidInput, match=match):
        tensor_to_array(values, shape, dtype, GRAY, max_images=4)


def test_too_many_images_in_a_tensor():
    with pytest.raises(PayloadTooLarge):
        tensor_to_array([0.0] * 784 * 5, [5, 1, 28, 28], "float32", GRAY, max_images=4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied_and_upright_images_untouched(fmt):
    from serving.runtime.preprocess import decode_image_u8

    a = np.zeros((28, 28), np.uint8)
    a[:, :14] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotated 180 degrees
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    rotated = decode_image_u8(buf.getvalue(), GRAY, **LIMITS)[0]
    assert rotated[:, 20:].mean() > 200 and rotated[:, :8].mean() < 50  # the white half is now on the right
    plain = encode(a, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    upright = decode_image_u8(plain, GRAY, **LIMITS)[0]
    assert upright[:, :8].mean() > 200 and upright.dtype == np.uint8
    # The float form is the uint8 form scaled, nothing else.
    np.testing.assert_array_equal(decode_image(plain, GRAY, **LIMITS), upright[None] / np.float32(255))
