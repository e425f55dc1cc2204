from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each side by ``padding`` and crop back to [H, W] at a random offset per sample.

    x: float [B, C, H, W]; returns a new tensor of the same shape. Offsets are uniform in
    [0, 2 * padding] on each axis, drawn as one [B, 2] tensor.
    """
    if padding <= 0:
        return x.clone()
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = (_uniform((b, 2), generator, x.device) * (2 * padding + 1)).long().clamp_max(2 * padding)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``. x: [B, C, H, W]; returns a new tensor."""
    flip = _uniform((x.shape[0],), generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment_batch(
    x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding, then random horizontal flip (p=0.5), independently per sample.

    x: float [B, C, H, W] in [0, 1]; returns a new tensor of the same shape and range (padding
    adds zeros only); ``x`` itself is left unchanged. ``generator`` (CPU or on ``x``'s device) makes
    the draws reproducible.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [B, C, H, W], got shape {tuple(x.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    out = random_crop(x, crop_padding, generator)
    if hflip:
        out = random_hflip(out, generator)
    return out
