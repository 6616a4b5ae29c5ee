"""Joining the two propagations of a key interval, as Rerender's blender does.

Between keys a < b every frame has two syntheses: one carried forward from a, one carried
backward from b, each with its per-pixel patch error. Per frame, in time order:

1. the selection mask says which side to take: the side with the lower (patch-smoothed) error;
   once a pixel has switched to the right key it stays switched for the rest of the interval,
   so a region does not flicker between the two sources;
2. the min-error image takes every pixel from its selected side;
3. a histogram-preserving blend (Heitz & Neyret 2018) mixes the two sides in Lab: the detail
   around each side's local mean is mixed and divided by sqrt(w^2 + (1-w)^2), so the contrast
   that plain averaging of unaligned texture washes out comes back;
4. with ``poisson=True``: Poisson fusion, the gradients of the min-error image (sharp, one
   source per pixel) on the colours of the blend with distance weights (no seams), solved
   in closed form with a DCT (FFT of the mirrored image: Neumann borders).
   Without it, the blend of step 3 uses the softened selection mask as its weights.

All host-side numpy (float32); one frame at a time.
"""
from __future__ import annotations

import cv2
import numpy as np

# Rerender's Poisson weights: gradients of L count 2.5 against the colour term, those of a and b 0.5
GRAD_WEIGHTS = (2.5, 0.5, 0.5)


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """# (H, W, 3) uint8 RGB -> (H, W, 3) float32 Lab (L 0..100, a/b about -128..127)."""
    return cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """# (H, W, 3) float32 Lab -> (H, W, 3) uint8 RGB."""
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def histogram_preserving_blend(a: np.ndarray, b: np.ndarray, w_a, sigma: float = 6.0) -> np.ndarray:
    """Mix two Lab images with weight ``w_a`` (scalar or (H, W)) for ``a`` without losing contrast:
    # (H, W, 3) float32 each -> (H, W, 3) float32.

    Heitz & Neyret's operator, mu + sum_i w_i (x_i - mu) / sqrt(sum_i w_i^2), keeps the spread of
    the inputs where a plain average of two unaligned textures would halve it. Here mu is each
    side's local mean (Gaussian, ``sigma`` px), mixed linearly: where one side has all the
    weight the result is that side exactly, and colour never shifts between regions.
    """
    w = np.asarray(w_a, np.float32)
    if w.ndim == 2:
        w = w[..., None]
    la = cv2.GaussianBlur(a, (0, 0), sigma)
    lb = cv2.GaussianBlur(b, (0, 0), sigma)
    detail = (w * (a - la) + (1 - w) * (b - lb)) / np.sqrt(w * w + (1 - w) ** 2)
    return (w * la + (1 - w) * lb + detail).astype(np.float32)


def poisson_fuse(grad_src: np.ndarray, color: np.ndarray, grad_weights=GRAD_WEIGHTS) -> np.ndarray:
    """argmin_O  sum_c  g_c |grad O_c - grad S_c|^2 + |O_c - X_c|^2  for S = ``grad_src`` and
    X = ``color`` (H, W, C) float32, with Neumann borders. In the DCT basis the Laplacian is
    diagonal, so O = IDCT[(g L S^ + X^) / (g L + 1)]: high frequencies from S, low from X.
    The DCT is the FFT of the image mirrored to (2H, 2W)."""
    h, w, c = color.shape
    ky = 2 - 2 * np.cos(np.pi * np.arange(2 * h) / h)
    kx = 2 - 2 * np.cos(np.pi * np.arange(w + 1) / w)     # rfft keeps w + 1 of 2w columns
    lap = (ky[:, None] + kx[None, :]).astype(np.float32)   # (2H, W+1) eigenvalues of -Laplacian

    def mirror(x):  # (H, W) -> (2H, 2W), half-sample symmetric: the DCT-II extension
        x = np.concatenate([x, x[::-1]], 0)
        return np.concatenate([x, x[:, ::-1]], 1)

    out = np.empty_like(color, dtype=np.float32)
    for ch in range(c):
        g = float(grad_weights[min(ch, len(grad_weights) - 1)])
        s_hat = np.fft.rfft2(mirror(grad_src[..., ch]))
        x_hat = np.fft.rfft2(mirror(color[..., ch]))
        o_hat = (g * lap * s_hat + x_hat) / (g * lap + 1)
        out[..., ch] = np.fft.irfft2(o_hat, s=(2 * h, 2 * w))[:h, :w]
    return out


class IntervalBlender:
    """Blends the in-between frames of one interval of ``n`` frames, fed in time order (the
    selection mask of a frame depends on the masks before it)."""

    def __init__(self, n: int, poisson: bool = False, patch: int = 5, soften: float = 2.0):
        self.n, self.poisson, self.patch, self.soften = n, poisson, patch, soften
        self.i = 0
        self.mask = None  # (H, W) bool: pixels switched to the right key so far

    def __call__(self, fwd: np.ndarray, bwd: np.ndarray, err_fwd: np.ndarray,
                 err_bwd: np.ndarray) -> np.ndarray:
        """fwd, bwd: (H, W, 3) uint8 RGB from the left and the right key; err_*: (H, W) float.
        Returns the frame, (H, W, 3) uint8 RGB."""
        ef = cv2.blur(err_fwd.astype(np.float32), (self.patch, self.patch))
        eb = cv2.blur(err_bwd.astype(np.float32), (self.patch, self.patch))
        self.mask = (eb < ef) if self.mask is None else (self.mask | (eb < ef))
        a, b = rgb_to_lab(fwd), rgb_to_lab(bwd)
        min_err = np.where(self.mask[..., None], b, a)
        if self.poisson:
            w_a = (self.n - self.i) / (self.n + 1)     # the left key's share by distance
            lab = poisson_fuse(min_err, histogram_preserving_blend(a, b, w_a))
        else:
            soft = self.mask.astype(np.float32)
            if self.soften > 0:
                soft = cv2.GaussianBlur(soft, (0, 0), self.soften)
            lab = histogram_preserving_blend(a, b, 1 - soft)
        self.i += 1
        return lab_to_rgb(lab)


def blend_interval(fwd: list[np.ndarray], bwd: list[np.ndarray], err_fwd: list[np.ndarray],
                   err_bwd: list[np.ndarray], poisson: bool = False, patch: int = 5) -> list[np.ndarray]:
    """All in-between frames of one interval at once (lists in time order); see IntervalBlender."""
    blender = IntervalBlender(len(fwd), poisson=poisson, patch=patch)
    return [blender(*args) for args in zip(fwd, bwd, err_fwd, err_bwd)]
