"""Frame interpolation: the exact retiming rule, scene cuts, and three engines (RIFE, flow, blend).

The rule (job=interpolate): output frame n is shown at n / fps_out on the input's timeline. It
shows source position s = n * fps_in / fps_out (exact rationals, never accumulated floats): frame
i = floor(s) when s is whole, else the frame made at t = s - i between source frames i and i + 1.
The output has floor(frames_in * fps_out / fps_in) frames, so it lasts as long as the input
(within one output frame) and the audio stays in sync; positions past the last source frame
(the last source frame's own duration) show the last frame, held.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from .flow import FlowEstimator, occlusion_mask, warp


class InterpolationError(ValueError):
    """Settings or a model that cannot make the frames asked for; raised before any work."""


def parse_rational(value) -> Fraction:
    """``2``, ``5/2``, ``2.5``, ``60000/1001`` -> an exact positive Fraction."""
    try:
        r = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise InterpolationError(f"{value!r} is not a number or a fraction like 60000/1001") from None
    if r <= 0:
        raise InterpolationError(f"{value!r} must be positive")
    return r


def output_count(frames_in: int, fps_in: Fraction, fps_out: Fraction) -> int:
    return max(1, math.floor(frames_in * fps_out / fps_in))


def source_of(n: int, frames_in: int, fps_in: Fraction, fps_out: Fraction) -> tuple[int, Fraction]:
    """(i, t) of output frame n: between source frames i and i + 1 at t in [0, 1); t = 0 is frame i."""
    s = n * fps_in / fps_out
    i = math.floor(s)
    if i >= frames_in - 1:
        return frames_in - 1, Fraction(0)  # the last frame, and its own duration: held
    return i, s - i


def first_output_at_or_after(i: int, fps_in: Fraction, fps_out: Fraction) -> int:
    """The first output frame whose source position is >= source frame i."""
    return math.ceil(i * fps_out / fps_in)


def dyadic_depth(t: Fraction) -> int | None:
    """m where t = k / 2**m (0 for t = 0), or None when t is not dyadic."""
    d = t.denominator
    return d.bit_length() - 1 if d & (d - 1) == 0 else None


# -- scene cuts ---------------------------------------------------------------------------------

THUMB = 64


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """# (H, W, 3) uint8 -> (64, 64) float32 luma in [0, 1], area-averaged."""
    import cv2

    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Gaussian window, sigma 1.5; Wang et al. 2004) of two thumbnails: 1 for the same
    picture, near 0 across a scene cut. RIFE's own video script cuts below 0.2 on 32 px
    thumbnails; job.scene_threshold uses the same scale."""
    import cv2

    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    ssim = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(ssim.mean())


# -- engines ------------------------------------------------------------------------------------

class Blend:
    """Cross-fade: (1 - t) a + t b. The floor every other engine should beat."""

    name = "blend"
    midpoint_only = False

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[Fraction]) -> np.ndarray:
        """# (B, H, W, 3) uint8 pairs, one t each -> (B, H, W, 3) uint8."""
        t = np.array([float(x) for x in ts], np.float32)[:, None, None, None]
        return np.clip(np.rint(a * (1 - t) + b * t), 0, 255).astype(np.uint8)


class FlowInterp:
    """Classical: bidirectional flow (models/flow.py: DIS, or RAFT given weights), both frames
    warped to t under linear motion (Jiang et al. 2018, Super SloMo's flow approximation), and a
    blend weighted by time and by where each frame's pixels are visible (forward-backward check)."""

    name = "flow"
    midpoint_only = False

    def __init__(self, device: torch.device, weights: str | None, preset: str):
        self.device = device
        self.flow = FlowEstimator(weights, device=device, dis_preset=preset)
        self.flow.setup()

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[Fraction]) -> np.ndarray:
        out = []
        for fa, fb, t in zip(a, b, ts):
            t = float(t)
            ab, ba = self.flow.pair(fa, fb)                        # (2, H, W) each, on a's / b's grid
            va = occlusion_mask(ab, ba).float()[None]              # (1, H, W): a's pixels seen in b
            vb = occlusion_mask(ba, ab).float()[None]
            ft0 = -(1 - t) * t * ab + t * t * ba                   # flow from t's grid to a
            ft1 = (1 - t) * (1 - t) * ab - t * (1 - t) * ba        # ... and to b
            ia = torch.from_numpy(fa).to(self.device).permute(2, 0, 1).float()  # (3, H, W)
            ib = torch.from_numpy(fb).to(self.device).permute(2, 0, 1).float()
            wa = (1 - t) * warp(va, ft0)                           # (1, H, W)
            wb = t * warp(vb, ft1)
            mix = (wa * warp(ia, ft0) + wb * warp(ib, ft1)) / (wa + wb).clamp_min(1e-6)
            plain = (1 - t) * warp(ia, ft0) + t * warp(ib, ft1)    # where neither is visible
            frame = torch.where((wa + wb) > 1e-6, mix, plain)
            out.append(frame.round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())
        return np.stack(out)


class Rife:
    """A RIFE IFNet (models/rife's ``load_rife``; ``net.description`` says which). RIFE HDv3
    (``rife-hdv3``) predicts the midpoint of a pair, so other times come from bisecting again
    (t = 1/4: the midpoint of the first frame and the midpoint), which reaches exactly the times
    k / 2**m (power-of-two factors): ``midpoint_only``. Practical-RIFE 4.x takes t as an input: any
    t, all pairs of a batch in one call. ``scale``: RIFE's flow scale (0.5 for 4K). Frames are padded
    to the network's multiple. A file that is no RIFE checkpoint: models/rife's CheckpointError."""

    name = "rife"

    def __init__(self, path, device: torch.device, scale: float = 1.0, dtype: torch.dtype = torch.float32):
        from .rife import load_rife

        self.net = load_rife(path, device).to(dtype)
        self.description = self.net.description
        self.device, self.scale, self.dtype = device, float(scale), dtype
        self.midpoint_only = not self.net.takes_time
        self.pad = self.net.multiple(self.scale)

    @torch.no_grad()
    def _mid(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.net(x0, x1, self.scale).clamp(0, 1)

    def _at(self, x0: torch.Tensor, x1: torch.Tensor, t: Fraction) -> torch.Tensor:
        if t == 0:
            return x0
        if t == 1:
            return x1
        mid = self._mid(x0, x1)
        if t == Fraction(1, 2):
            return mid
        return self._at(x0, mid, t * 2) if t < Fraction(1, 2) else self._at(mid, x1, t * 2 - 1)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[Fraction]) -> np.ndarray:
        _, h, w, _ = a.shape
        ph, pw = (-h) % self.pad, (-w) % self.pad

        def tensor(x):  # (B, H, W, 3) uint8 -> (B, 3, H', W') in [0, 1], padded to the flow grid
            x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 255
            return torch.nn.functional.pad(x, (0, pw, 0, ph))

        x0, x1 = tensor(a), tensor(b)
        if self.midpoint_only:
            out = torch.empty_like(x0)
            # pairs that share a t go through the network together (one batch per distinct t)
            for t in sorted(set(ts)):
                idx = [k for k, s in enumerate(ts) if s == t]
                out[idx] = self._at(x0[idx], x1[idx], t)
        else:
            t = torch.tensor([float(s) for s in ts], dtype=self.dtype, device=self.device)
            out = self.net(x0, x1, t, self.scale).clamp(0, 1)
        y = out[:, :, :h, :w].float().mul(255).round().clamp(0, 255).byte()
        return y.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) uint8


def pair_seed(seed: int, key: int, lo: Fraction, hi: Fraction) -> int:
    """The noise seed of the frame between positions ``key + lo`` and ``key + hi`` of a video
    (``key``: the pair's first source index): a function of where the frame is, so a rerun, a
    resumed run and any number of ranks draw the same noise for it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{key}:{lo}:{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Eden:
    """EDEN (models/eden): a diffusion transformer that samples the midpoint of a pair (two Euler
    steps from noise), so other times come from bisecting, as rife-hdv3 (``midpoint_only``). Each
    midpoint's noise is seeded by :func:`pair_seed` (``seeded``: the job passes each pair's source
    index). ``load`` returns None for a file that is not an EDEN checkpoint (by its keys)."""

    name = "eden"
    midpoint_only = True
    seeded = True
    description = "EDEN (diffusion transformer, midpoints)"

    def __init__(self, model, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.model, self.device, self.dtype, self.seed = model, device, dtype, int(seed)
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    @classmethod
    def load(cls, path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> "Eden | None":
        from . import eden

        model = eden.load_eden_if(path, device)
        return None if model is None else cls(model, device, dtype, seed)

    def _at(self, x0: torch.Tensor, x1: torch.Tensor, t: Fraction, key: int, lo: Fraction,
            hi: Fraction) -> torch.Tensor:
        """The frame at ``t`` between x0 (at ``lo``) and x1 (at ``hi``), by bisection."""
        from . import eden

        if t == 0:
            return x0
        if t == 1:
            return x1
        mid_pos = (lo + hi) / 2
        mid = eden.midpoint(self.model, x0, x1, pair_seed(self.seed, key, lo, hi), precision=self.precision)
        if t == Fraction(1, 2):
            return mid
        if t < Fraction(1, 2):
            return self._at(x0, mid, t * 2, key, lo, mid_pos)
        return self._at(mid, x1, t * 2 - 1, key, mid_pos, hi)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[Fraction], keys: list[int]) -> np.ndarray:
        out = []
        for k in range(len(a)):
            x0, x1 = (torch.from_numpy(x[k]).to(self.device).permute(2, 0, 1)[None].float() / 255
                      for x in (a, b))
            y = self._at(x0, x1, Fraction(ts[k]), int(keys[k]), Fraction(0), Fraction(1))
            out.append(y[0].float().mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())
        return np.stack(out)
