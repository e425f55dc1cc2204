"""Turning request payloads into model inputs, driven by the model spec only.

Every function returns float32 arrays [C, H, W] in [0, 1] with C, H, W from the spec, or raises a
:class:`~serving.runtime.errors.RequestError` that says what was wrong. Limits are checked before work is done:
the byte size before decoding, the pixel count from the image header before the pixels are decompressed.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
import warnings
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libspng: decodes a small PNG ~10x faster than PIL, whose per-image cost is mostly Python around the codec
    import pyspng
except ImportError:  # pragma: no cover - a base requirement; without it every PNG goes through PIL
    pyspng = None

from serving.runtime.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serving.runtime.schemas import TensorInput
from serving.runtime.spec import ModelSpec

ACCEPTED_FORMATS = ("PNG", "JPEG")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}

# Default budgets, from the model's input size: an image may be this many times the model's input area (so a
# photo larger than the input is resized, not refused), but never less than MIN_IMAGE_PIXELS; one request may
# decode REQUEST_IMAGES such images in all. Decode time grows with pixels, so these bound one request's cost.
INPUT_AREA_FACTOR = 16
MIN_IMAGE_PIXELS = 1024 * 1024
REQUEST_IMAGES = 4


def pixel_budgets(spec: ModelSpec, max_image_pixels: int | None = None,
                  max_request_pixels: int | None = None) -> tuple[int, int]:
    """(pixels per image, pixels per request): the configured values, else derived from the spec's input size."""
    h, w = spec.input_size
    per_image = max_image_pixels or max(MIN_IMAGE_PIXELS, INPUT_AREA_FACTOR * h * w)
    return per_image, max_request_pixels or REQUEST_IMAGES * per_image


class DecodeBudget:
    """Pixels one request may still decode; each image's header is charged before its pixels are decoded."""

    def __init__(self, pixels: int):
        self.total = pixels
        self.left = pixels

    def charge(self, pixels: int) -> None:
        if pixels > self.left:
            raise PayloadTooLarge(f"the images of this request hold more than {self.total} pixels in all (the "
                                  f"request's decode budget); send fewer or smaller images")
        self.left -= pixels


def sniff_image(data: bytes | bytearray | memoryview) -> str | None:
    """'PNG' or 'JPEG' when ``data`` starts with that format's signature, else None."""
    head = bytes(data[:8])
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return fmt
    return None


# The common PNG that :func:`_fast_png` decodes with libspng: 8-bit samples, grayscale (colour type 0) for a
# 1-channel model or RGB (colour type 2) for a 3-channel one, i.e. no mode conversion. Anything else, and any PNG
# that may carry metadata PIL would act on (EXIF orientation in eXIf or a text chunk) or more than one frame
# (APNG's acTL), goes through PIL; a chunk name found inside compressed data only sends the image to PIL.
_FAST_PNG = {1: (0, "L"), 3: (2, "RGB")}
_PIL_ONLY_CHUNKS = re.compile(b"eXIf|tEXt|zTXt|iTXt|acTL")  # one pass over the bytes
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Where PIL's getexif() finds an orientation; an image with none of these is upright as stored.
_ORIENTATION_INFO = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})


def to_unit(a: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 in [0, 1]; float arrays are returned as they are."""
    return a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a


def decode_image(data: bytes | bytearray, spec: ModelSpec, *, max_bytes: int, max_pixels: int,
                 budget: DecodeBudget | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> float32 [C, H, W] in [0, 1]: converted to the spec's channels (grayscale or RGB),
    EXIF orientation applied, resized to the spec's input size when it differs (bilinear). The pixel count read
    from the header is held against ``max_pixels`` and charged to ``budget`` before anything is decompressed;
    a large JPEG is decoded at a reduced scale (DCT scaling, "draft" mode) no smaller than the model's input."""
    return to_unit(decode_image_u8(data, spec, max_bytes=max_bytes, max_pixels=max_pixels, budget=budget))


def decode_image_u8(data: bytes | bytearray, spec: ModelSpec, *, max_bytes: int, max_pixels: int,
                    budget: DecodeBudget | None = None) -> np.ndarray:
    """:func:`decode_image` before the scaling to [0, 1]: uint8 [C, H, W], so a batch is scaled in one operation
    (:func:`to_unit`)."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) == 0:
        raise InvalidInput("empty image")
    fast = _fast_png(data, spec, max_pixels=max_pixels, budget=budget)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its limit, raises) on decompression bombs; the pixel limit below is
            # tighter, so the warning is turned into an error here only, never switched off globally.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            if img.format not in ACCEPTED_FORMATS:
                raise UnsupportedMediaType(f"image format {img.format} is not accepted; send PNG or JPEG")
            w, h = img.size
            if w < 1 or h < 1:
                raise InvalidInput(f"image has no pixels ({w}x{h})")
            _charge_pixels(w, h, max_pixels, budget)
            if getattr(img, "n_frames", 1) > 1:
                raise InvalidInput(f"the image holds {img.n_frames} frames (animated or multi-page); send one")
            if img.format == "JPEG" and spec.channels in (1, 3):
                # At least the input size on both sides whatever the EXIF rotation: the resize below does the rest.
                side = max(spec.input_size)
                img.draft("L" if spec.channels == 1 else "RGB", (side, side))
            img.load()
            if not _ORIENTATION_INFO.isdisjoint(img.info):  # exif_transpose copies even an upright image
                img = ImageOps.exif_transpose(img)
            return _to_array(img, spec)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image too large: {e}") from None
    except UnidentifiedImageError as e:
        raise InvalidInput(f"cannot decode the image: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise InvalidInput(f"cannot decode the image: {e}") from None


def _fast_png(data: bytes | bytearray, spec: ModelSpec, *, max_pixels: int,
              budget: DecodeBudget | None) -> np.ndarray | None:
    """The common PNG (see ``_FAST_PNG``) -> uint8 [C, H, W] through libspng, with the same limits, budget charge
    and resize as the PIL path and the same pixels; None (nothing charged) for any other image."""
    if pyspng is None or spec.channels not in _FAST_PNG or len(data) < 33 or data[:8] != _PNG_MAGIC \
            or data[12:16] != b"IHDR":
        return None
    w, h, depth, colour = struct.unpack(">IIBB", bytes(data[16:26]))
    ctype, mode = _FAST_PNG[spec.channels]
    if depth != 8 or colour != ctype or w < 1 or h < 1 or _PIL_ONLY_CHUNKS.search(data) \
            or zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):  # libspng skips this check, PIL not
        return None
    _charge_pixels(w, h, max_pixels, budget)
    try:
        a = pyspng.load(bytes(data), format=mode)
    except Exception as e:  # libspng's errors (truncated, bad CRC, corrupt stream) are one RuntimeError type
        raise InvalidInput(f"cannot decode the image: {e}") from None
    eh, ew = spec.input_size
    return _chw(a) if (w, h) == (ew, eh) else _resized(Image.fromarray(a, mode=mode), spec)


def _charge_pixels(w: int, h: int, max_pixels: int, budget: DecodeBudget | None) -> None:
    """An image's pixel count from its header, held against the per-image limit and charged to the request."""
    if w * h > max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if budget is not None:
        budget.charge(w * h)


def _resized(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    """An image in the spec's mode -> uint8 [C, H, W] at the spec's input size (bilinear when it differs)."""
    h, w = spec.input_size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return _chw(np.asarray(img, dtype=np.uint8))


def _chw(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _to_array(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    if img.mode.startswith("I;16"):
        # 16-bit grayscale: PIL's convert("L") clips instead of scaling. Integer arithmetic (round(v * 255 /
        # 65535)) in uint32: 4 bytes a pixel, not float64's 8, and no float pass over the image.
        a = np.asarray(img).astype(np.uint32)
        a *= 255
        a += 32767
        a //= 65535
        img = Image.fromarray(a.astype(np.uint8), mode="L")
        del a
    elif img.mode == "I":
        # 32-bit grayscale (rare in PNG): scaled by its own maximum, in float32.
        a = np.asarray(img, dtype=np.float32)
        top = max(1.0, float(a.max()))
        img = Image.fromarray(np.clip(a * np.float32(255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if spec.channels in (1, 3):
        mode = "L" if spec.channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
    else:
        raise InvalidInput(f"this model takes {spec.channels}-channel inputs: send a tensor, not an image")
    return _resized(img, spec)


def decode_base64(s: str, max_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, optionally a ``data:...;base64,`` URL) -> bytes."""
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidInput("a data: URL must be base64-encoded ('data:image/png;base64,...')")
    # 4 base64 characters carry 3 bytes; refuse before decoding anything too large.
    if len(s) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(f"image is about {len(s) * 3 // 4} bytes; the limit is {max_bytes}")
    s = "".join(s.split())
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("'image' is not valid base64") from None


def image_from_base64(s: str, spec: ModelSpec, *, max_bytes: int, max_pixels: int,
                      budget: DecodeBudget | None = None) -> np.ndarray:
    """Base64 PNG/JPEG -> float32 [C, H, W] in [0, 1] (see :func:`decode_image`)."""
    return to_unit(image_from_base64_u8(s, spec, max_bytes=max_bytes, max_pixels=max_pixels, budget=budget))


def image_from_base64_u8(s: str, spec: ModelSpec, *, max_bytes: int, max_pixels: int,
                         budget: DecodeBudget | None = None) -> np.ndarray:
    """Base64 PNG/JPEG -> uint8 [C, H, W] (see :func:`decode_image_u8`)."""
    data = decode_base64(s, max_bytes)
    if sniff_image(data) is None:
        raise UnsupportedMediaType("'image' does not hold a PNG or JPEG")
    return decode_image_u8(data, spec, max_bytes=max_bytes, max_pixels=max_pixels, budget=budget)


def expected_shape(spec: ModelSpec) -> tuple[int, int, int]:
    return (spec.channels, spec.input_size[0], spec.input_size[1])


def tensor_to_array(values: Any, shape: Sequence[int], dtype: str, spec: ModelSpec, *, max_images: int,
                    what: str = "tensor") -> np.ndarray:
    """Numbers with a declared shape -> float32 [N, C, H, W] in [0, 1].

    ``shape`` is [C, H, W], [H, W] (one channel) or [N, C, H, W]; C, H, W must equal the spec's (a tensor is never
    resized: the caller chose those numbers). float values must lie in [0, 1]; uint8 values in 0..255."""
    c, h, w = expected_shape(spec)
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise InvalidInput(f"{what}: shape {shape} has a negative dimension")
    if len(shape) == 2 and c == 1:
        shape = [1, 1, *shape]
    elif len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != (c, h, w):
        raise InvalidInput(f"{what}: shape {list(shape)} does not match the model's input [N, {c}, {h}, {w}]")
    n = shape[0]
    if n < 1:
        raise InvalidInput(f"{what}: the batch is empty")
    if n > max_images:
        raise PayloadTooLarge(f"{what}: {n} images in one request; the limit is {max_images}")
    want = math.prod(shape)
    try:
        a = np.asarray(values, dtype=np.float32 if dtype == "float32" else np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{what}: data must be numbers in range (a flat or nested list)") from None
    if a.size != want:
        raise InvalidInput(f"{what}: {a.size} values for shape {shape} ({want} expected)")
    a = a.reshape(shape)
    if not np.isfinite(a).all():
        raise InvalidInput(f"{what}: data holds NaN or infinite values")
    if dtype == "uint8":
        if a.min() < 0 or a.max() > 255 or not np.array_equal(a, np.round(a)):
            raise InvalidInput(f"{what}: uint8 data must be integers in 0..255")
        a = a / 255.0
    elif a.min() < 0.0 or a.max() > 1.0:
        raise InvalidInput(f"{what}: float data must lie in [0, 1] (pixel intensities), got "
                           f"[{a.min():.4g}, {a.max():.4g}]")
    return a.astype(np.float32)


def tensor_input_to_array(t: TensorInput, spec: ModelSpec, *, max_images: int) -> np.ndarray:
    return tensor_to_array(t.data, t.shape, t.dtype, spec, max_images=max_images)
