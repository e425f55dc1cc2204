from __future__ import annotations

import pytest
import torch

from training.data import augment_batch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Slow oracle: content moved down by dy and right by dx, zeros filled in. img: [C, H, W]."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                out[:, r, c] = img[:, r - dy, c - dx]
    return out


@pytest.mark.parametrize(("padding", "hflip"), [(0, False), (2, False), (0, True), (4, True)])
def test_shape_range_and_no_mutation(padding, hflip):
    x = torch.rand(16, 3, 8, 8, generator=_gen(0))
    before = x.clone()
    out = augment_batch(x, padding, hflip, _gen(1))
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.data_ptr() != x.data_ptr()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_identity_when_disabled():
    x = torch.rand(4, 1, 5, 5)
    out = augment_batch(x, 0, False, None)
    assert torch.equal(out, x)
    out[0] = 0
    assert not torch.equal(out, x)


def test_crop_is_a_zero_filled_shift_within_padding():
    p = 2
    x = torch.rand(24, 2, 7, 9, generator=_gen(2)) * 0.9 + 0.1
    out = augment_batch(x, p, False, _gen(3))
    moved = 0
    for i in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if torch.equal(out[i], shift(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not a single shift of its input"
        moved += matches[0] != (0, 0)
    assert moved > 0


def test_crop_offsets_cover_the_full_range():
    p = 3
    n = 1000
    x = torch.zeros(n, 1, 11, 11)
    x[:, 0, 5, 5] = 1.0
    out = augment_batch(x, p, False, _gen(4))
    flat = out.reshape(n, -1)
    assert torch.all(flat.sum(1) == 1.0)
    pos = flat.argmax(1)
    shifts = set(zip((pos // 11 - 5).tolist(), (pos % 11 - 5).tolist()))
    assert shifts == {(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)}


def test_flip_is_a_true_mirror_about_half_the_time():
    x = torch.rand(200, 3, 4, 6, generator=_gen(5))
    out = augment_batch(x, 0, True, _gen(6))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x[:, :, :, torch.arange(5, -1, -1)]).flatten(1).all(1)
    assert bool((same ^ mirrored).all())
    assert 60 <= int(mirrored.sum()) <= 140


def test_generator_makes_it_reproducible():
    x = torch.rand(32, 1, 8, 8, generator=_gen(7))
    a = augment_batch(x, 2, True, _gen(8))
    b = augment_batch(x, 2, True, _gen(8))
    c = augment_batch(x, 2, True, _gen(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        augment_batch(torch.rand(3, 8, 8), 2, True)
    with pytest.raises(ValueError):
        augment_batch(torch.rand(1, 3, 8, 8), -1, True)
