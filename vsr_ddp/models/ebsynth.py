"""Guided patch-based synthesis as EbSynth does it, in PyTorch (CPU and CUDA), plus the
Rerender-style guides and the frame-by-frame pass that propagates one stylized keyframe.

What EbSynth does (jamriska/ebsynth, ``ebsynth_cpu.cpp``), and what is kept here:

* a pyramid from the coarsest level whose short side still holds ``2 * patch + 1`` pixels up to
  full size; the NNF (nearest-neighbour field: for every target pixel, the centre of its source
  patch) starts random at the coarsest level and is upsampled to the next;
* per level: vote once, then ``search_vote_iters`` times { PatchMatch for ``patchmatch_iters``
  iterations; vote };
* patch cost = weighted SSD over the style channels (target side: the current vote) and the guide
  channels, on a 0..255 scale, each style channel weighted ``style_weight / C`` and each guide
  channel ``weight / C`` of its guide; plus EbSynth's uniformity term
  ``uniformity * (sum of the coverage count over the patch / p^2) / omega_best`` that makes source
  patches used too often expensive;
* plain voting: every target pixel is the mean of the overlapping source patches' pixels.

What changes for a GPU: EbSynth's PatchMatch scans pixels in order, each one seeing its
neighbours' fresh matches. Here every step updates all pixels at once: propagation is jump-flood
style (candidates from the neighbours at offsets k, k/2, ..., 1 along both axes), random search
draws one candidate per pixel per radius, and the coverage map is rebuilt after every step.
A patch's features are the unfolded ``p * p * C`` vector of its pixels, so a candidate costs one
row gather and one reduction per pixel; the gathers run in chunks to bound memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import preempt


# annotations are strings here (from __future__ import annotations)
PLAIN_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}


def typed_config(cls, values: Mapping):
    """``cls(**values)`` for a dataclass of int/float/bool/str/tuple fields, each value cast to its
    annotated type: a config's ``3500`` and ``3500.0`` are one setting (settings hashes stay put),
    and an unknown key is a TypeError naming it."""
    known = {f.name: PLAIN_TYPES[str(f.type)] for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)} "
                        f"(known: {', '.join(known)})")
    return cls(**{k: known[k](v) for k, v in values.items()})


def shipped_config(cls, file: str, key: str | None = None, **overrides):
    """``cls`` with the values the shipped YAML gives a job (``conf/<file>.yaml``, at ``key``),
    ``overrides`` replacing some: for callers outside a job (benchmarks, tests, notebooks). The
    dataclasses below have no defaults of their own for what the YAML sets: it is their one home."""
    from ..config import shipped

    return typed_config(cls, {**shipped(file, key), **overrides})


@dataclass(frozen=True)
class SynthParams:
    """EbSynth's knobs: a job's ``job.ebsynth`` (conf/ebsynth/default.yaml: as FRESCO/Rerender run
    it); :meth:`shipped` for those values outside a job."""

    patch_size: int
    uniformity: float
    pyramid_levels: int          # -1: every level whose short side is >= 2 * patch_size + 1
    search_vote_iters: int
    patchmatch_iters: int
    max_jump: int                # propagation offsets max_jump, max_jump/2, ..., 1 (a power of two)
    style_weight: float
    seed: int
    # Not a config key (a memory bound, not a result setting), so its default lives here:
    chunk_mb: float = 0          # memory per candidate gather; 0: 512 MB on CUDA, 8 MB on CPU

    def __post_init__(self):
        if self.patch_size < 3 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd number >= 3, not {self.patch_size}")
        if self.max_jump < 1:
            raise ValueError(f"max_jump must be >= 1, not {self.max_jump}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, values: Mapping) -> "SynthParams":
        """From a ``job.ebsynth`` subtree (every key of it)."""
        return typed_config(cls, values)

    @classmethod
    def shipped(cls, **overrides) -> "SynthParams":
        """conf/ebsynth/default.yaml's values, ``overrides`` replacing some."""
        return shipped_config(cls, "ebsynth/default", **overrides)


class Guide(NamedTuple):
    """One guide channel group: the same quantity on the source (keyframe) and the target frame."""

    source: torch.Tensor  # (C, Hs, Ws) float, 0..255
    target: torch.Tensor  # (C, Ht, Wt) float, 0..255
    weight: float


class SynthResult(NamedTuple):
    image: torch.Tensor   # (Cs, Ht, Wt) float32, 0..255
    error: torch.Tensor   # (Ht, Wt) float32: guide SSD of each pixel's patch at the finest level, per pixel
    nnf: torch.Tensor     # (2, Ht, Wt) int64: (y, x) of each target pixel's source patch centre


def level_sizes(size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(H, W) of every pyramid level, coarsest first, as EbSynth sizes them."""
    h, w = size
    return [(max(1, int(h * 2.0 ** -(levels - 1 - i))), max(1, int(w * 2.0 ** -(levels - 1 - i))))
            for i in range(levels)]


def max_levels(size: tuple[int, int], patch_size: int) -> int:
    """How many levels fit: the coarsest short side must hold 2 * patch + 1 pixels."""
    short = min(size)
    levels = 1
    while int(short * 2.0 ** -levels) >= 2 * patch_size + 1:
        levels += 1
    return levels


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """# (C, H, W) float -> (C, h, w), area-filtered when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _box_sum(x: torch.Tensor, p: int, full: bool) -> torch.Tensor:
    """Sum over p x p windows of # (H, W): 'valid' (H-p+1, W-p+1) or 'full' (H+p-1, W+p-1).
    Summed-area table: on CPU several times faster than a pooling kernel of the same size."""
    if full:
        x = F.pad(x, (p - 1, p - 1, p - 1, p - 1))
    c = F.pad(x.double(), (1, 0, 1, 0)).cumsum_(0).cumsum_(1)
    return (c[p:, p:] - c[:-p, p:] - c[p:, :-p] + c[:-p, :-p]).to(x.dtype)


class Workspace:
    """Buffers reused from level to level and frame to frame. On the host a fresh 300 MB tensor
    costs more in page faults than filling it (measured 7x at 512 x 512); CUDA's caching
    allocator makes this a no-op there."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        need = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < need or buf.device != like.device or buf.dtype != like.dtype:
            buf = self.buffers[name] = torch.empty(need, device=like.device, dtype=like.dtype)
        return buf[:need].view(shape)


def unfold_patches(feat: torch.Tensor, p: int, pad: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every p x p patch of # (C, H, W) as one row, in (ky, kx, c) order: (N, p*p*C).

    ``pad=False``: one row per patch lying fully inside (N = (H-p+1) (W-p+1), row-major);
    ``pad=True``: one per pixel, edges replicated. Built from a channels-last strided view in
    one copy - F.unfold's (C*p*p, N) layout would need a transpose that costs more than the copy.
    """
    if pad:
        feat = F.pad(feat[None], (p // 2,) * 4, mode="replicate")[0]
    x = feat.permute(1, 2, 0).contiguous()                                 # (Hp, Wp, C)
    hp, wp, c = x.shape
    s0, s1, s2 = x.stride()
    shape = (hp - p + 1, wp - p + 1, p, p, c)
    view = x.as_strided(shape, (s0, s1, s0, s1, s2))
    if out is None:
        return view.reshape(-1, p * p * c)
    out = out.view(shape)
    out.copy_(view)
    return out.view(-1, p * p * c)


class _Level:
    """One pyramid level: unfolded source patches, target guides, the NNF and its coverage."""

    def __init__(self, style: torch.Tensor, src_guide: torch.Tensor, tgt_guide: torch.Tensor,
                 style_scale: float, params: SynthParams, ws: Workspace):
        p = params.patch_size
        self.p, self.r = p, p // 2
        self.params = params
        self.style = style                          # (Cs, Hs, Ws) 0..255
        self.style_scale = style_scale              # sqrt of the per-channel style weight
        self.hs, self.ws = style.shape[-2:]
        self.ht, self.wt = tgt_guide.shape[-2:]
        self.hv, self.wv = self.hs - 2 * self.r, self.ws - 2 * self.r   # valid patch centres
        self.tgt_guide = tgt_guide                  # (Cg, Ht, Wt), already scaled by sqrt(weights)
        src = torch.cat([style * style_scale, src_guide])              # (Cf, Hs, Ws)
        # (Nv, p*p*Cf): row i is the patch centred at valid centre i (row-major over hv x wv)
        self.work = ws
        nv, d = self.hv * self.wv, p * p * src.shape[0]
        self.src_patches = unfold_patches(src, p, False, ws.get("src", (nv, d), src))
        self.src_style_patches = unfold_patches(style, p, False,
                                                ws.get("src_style", (nv, p * p * style.shape[0]), src))
        self.n_style, self.n_feat = style.shape[0], src.shape[0]
        self.cover = F.fold(torch.ones(1, p * p, self.ht * self.wt, device=style.device, dtype=style.dtype),
                            (self.ht, self.wt), p, padding=self.r)[0]          # (1, Ht, Wt)
        # omega_best: the coverage every source pixel would have if all were used equally
        self.omega_norm = (p * p) * ((self.ht * self.wt) / (self.hs * self.ws)) * (p * p)
        # CPU: chunks of a few MB stay in cache (at 512 x 512, 8 MB ran 3x faster than 128 MB)
        mb = params.chunk_mb or (512 if style.device.type == "cuda" else 8)
        self.chunk = max(64, int(mb * 2 ** 20 / (4 * self.src_patches.shape[1])))

    # -- the target side ------------------------------------------------------------------------
    def set_target_style(self, style: torch.Tensor) -> None:
        """Unfold the target's features (current vote + guides), edges replicated as EbSynth's
        clamped reads do: # (Nt, Cf*p*p)."""
        feat = torch.cat([style * self.style_scale, self.tgt_guide])
        shape = (self.ht * self.wt, self.p * self.p * feat.shape[0])
        self.tgt_patches = unfold_patches(feat, self.p, True, self.work.get("tgt", shape, feat))

    # -- costs ----------------------------------------------------------------------------------
    def ssd(self, cand: torch.Tensor, rows: torch.Tensor | None = None,
            guide_only: bool = False) -> torch.Tensor:
        """Weighted patch SSD of target pixels against their candidates. cand: # (Nt,) source
        centres of every target pixel, or of the target pixels ``rows`` only -> same shape."""
        out = torch.empty(cand.shape[0], device=cand.device, dtype=self.tgt_patches.dtype)
        d_all = self.work.get("chunk", (self.chunk, self.src_patches.shape[1]), self.src_patches)
        t_all = self.work.get("chunk_t", (self.chunk, self.src_patches.shape[1]), self.src_patches)
        for s in range(0, cand.shape[0], self.chunk):
            e = min(s + self.chunk, cand.shape[0])
            d = torch.index_select(self.src_patches, 0, cand[s:e], out=d_all[:e - s])
            if rows is None:
                d.sub_(self.tgt_patches[s:e])
            else:
                d.sub_(torch.index_select(self.tgt_patches, 0, rows[s:e], out=t_all[:e - s]))
            if guide_only:   # rows are (ky, kx, c) with the style channels first in c
                d = d.view(e - s, self.p * self.p, self.n_feat)[:, :, self.n_style:]
                torch.linalg.vector_norm(d, dim=(1, 2), out=out[s:e])
            else:
                torch.linalg.vector_norm(d, dim=1, out=out[s:e])
        return out.square_()

    def patch_omega(self, nnf: torch.Tensor) -> torch.Tensor:
        """Coverage of the source by the current NNF, summed over every candidate patch: # (Nv,)."""
        count = torch.zeros(self.hv * self.wv, device=nnf.device, dtype=torch.float32)
        count.index_add_(0, nnf, torch.ones_like(nnf, dtype=torch.float32))
        omega = _box_sum(count.view(self.hv, self.wv), self.p, full=True)    # (Hs, Ws): patches per pixel
        return _box_sum(omega, self.p, full=False).reshape(-1) / self.omega_norm

    # -- search ---------------------------------------------------------------------------------
    def patchmatch(self, nnf: torch.Tensor, iters: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``iters`` PatchMatch iterations on # (Nt,) int64 linear source-centre indices."""
        lam = self.params.uniformity
        err = self.ssd(nnf)
        dev = nnf.device
        ty = torch.arange(self.ht, device=dev)[:, None].expand(self.ht, self.wt).reshape(-1)
        tx = torch.arange(self.wt, device=dev)[None, :].expand(self.ht, self.wt).reshape(-1)
        jumps = []
        k = 1 << int(math.log2(min(self.params.max_jump, max(self.ht, self.wt))))
        while k >= 1:
            jumps.append(k)
            k //= 2
        radii = []
        rad = max(self.hv, self.wv)
        while rad >= 1:
            radii.append(rad)
            rad //= 2

        def step(cands: list[torch.Tensor]) -> None:
            """Every pixel keeps the best of its match and its candidates, all drawn from the NNF
            as it was before this step; the coverage (uniformity) is that of the same NNF."""
            nonlocal nnf, err
            occ = self.patch_omega(nnf) if lam else None
            best, best_err = nnf, err
            best_cost = err + lam * occ.index_select(0, nnf) if lam else err
            for cand in cands:
                # Only pixels whose candidate differs from their best need a cost: in coherent
                # regions a propagated candidate is the current match itself.
                rows = (cand != best).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                if rows.numel() > 0.7 * cand.numel():   # gathering target rows would cost more than it saves
                    rows, c, new = torch.arange(cand.numel(), device=dev), cand, self.ssd(cand)
                else:
                    c = cand.index_select(0, rows)
                    new = self.ssd(c, rows)
                cost = new + lam * occ.index_select(0, c) if lam else new
                better = cost < best_cost.index_select(0, rows)
                rows = rows[better]
                best = best.index_copy(0, rows, c[better])
                best_err = best_err.index_copy(0, rows, new[better])
                best_cost = best_cost.index_copy(0, rows, cost[better])
            nnf, err = best, best_err

        for _ in range(iters):
            # 1. Propagation, jump-flood style: the neighbours at offsets k along both axes each
            #    suggest their own match shifted back by the offset (the patch next to theirs).
            for k in jumps:
                cands = []
                for oy, ox in ((0, -k), (0, k), (-k, 0), (k, 0)):
                    ny = (ty + oy).clamp(0, self.ht - 1)
                    nx = (tx + ox).clamp(0, self.wt - 1)
                    m = nnf.index_select(0, ny * self.wt + nx)
                    sy = (m // self.wv - (ny - ty)).clamp(0, self.hv - 1)
                    sx = (m % self.wv - (nx - tx)).clamp(0, self.wv - 1)
                    cands.append(sy * self.wv + sx)
                step(cands)
            # 2. Random search in windows of halving radius around the current match.
            cy, cx = nnf // self.wv, nnf % self.wv
            cands = []
            for rad in radii:
                y0, y1 = (cy - rad).clamp(min=0), (cy + rad).clamp(max=self.hv - 1)
                x0, x1 = (cx - rad).clamp(min=0), (cx + rad).clamp(max=self.wv - 1)
                u = torch.rand(2, nnf.shape[0], device=dev, generator=gen)
                sy = torch.minimum(y0 + (u[0] * (y1 - y0 + 1)).long(), y1)
                sx = torch.minimum(x0 + (u[1] * (x1 - x0 + 1)).long(), x1)
                cands.append(sy * self.wv + sx)
            step(cands)
        return nnf, err

    # -- voting ---------------------------------------------------------------------------------
    def vote(self, nnf: torch.Tensor) -> torch.Tensor:
        """Every target pixel = mean of the source pixels the overlapping patches put there."""
        n, pp, cs = nnf.shape[0], self.p * self.p, self.n_style
        rows = torch.index_select(self.src_style_patches, 0, nnf,
                                  out=self.work.get("vote_rows", (n, pp * cs), self.src_style_patches))
        cols = self.work.get("vote_cols", (1, cs * pp, n), rows)     # F.fold's (C*p*p, N) layout
        cols.view(cs, pp, n).copy_(rows.view(n, pp, cs).permute(2, 1, 0))
        out = F.fold(cols, (self.ht, self.wt), self.p, padding=self.r)[0]
        return out / self.cover                                        # (Cs, Ht, Wt)

    # -- NNF initialisation -----------------------------------------------------------------------
    def random_nnf(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.hv * self.wv, (self.ht * self.wt,), device=self.style.device,
                             generator=gen)

    def upsample_nnf(self, coarse: torch.Tensor, coarse_level: "_Level") -> torch.Tensor:
        """EbSynth's nnfUpscale for arbitrary size ratios: the coarse match, scaled, plus the
        pixel's offset inside its coarse cell; clamped to valid centres."""
        c, dev = coarse_level, coarse.device
        fy = torch.arange(self.ht, device=dev)
        fx = torch.arange(self.wt, device=dev)
        sy_t, sx_t = c.ht / self.ht, c.wt / self.wt
        cy = (fy * sy_t).long().clamp(max=c.ht - 1)                        # coarse target cell
        cx = (fx * sx_t).long().clamp(max=c.wt - 1)
        m = coarse.view(c.ht, c.wt)[cy][:, cx]                             # (Ht, Wt) coarse matches
        my = (m // c.wv + c.r).double() * (self.hs / c.hs)                 # source centre, fine scale
        mx = (m % c.wv + c.r).double() * (self.ws / c.ws)
        oy = fy.double() - cy.double() / sy_t                              # offset inside the cell
        ox = fx.double() - cx.double() / sx_t
        y = (my + oy[:, None]).round().long() - self.r
        x = (mx + ox[None, :]).round().long() - self.r
        y = y.clamp(0, self.hv - 1)
        x = x.clamp(0, self.wv - 1)
        return (y * self.wv + x).reshape(-1)


@torch.no_grad()
def synthesize(style: torch.Tensor, guides: list[Guide], params: SynthParams,
               generator: torch.Generator | None = None, workspace: Workspace | None = None) -> SynthResult:
    """EbSynth: make the target look like ``style`` where the target's guides look like the source's.

    style: # (Cs, Hs, Ws) float, 0..255, on the device the work runs on; every guide's source is
    Hs x Ws and every target Ht x Wt, on the same device. Pass one ``workspace`` to a sequence
    of calls to reuse its buffers.
    """
    if not guides:
        raise ValueError("synthesize needs at least one guide")
    dev = style.device
    style = style.float()
    hs, ws = style.shape[-2:]
    ht, wt = guides[0].target.shape[-2:]
    p = params.patch_size
    fit = min(max_levels((hs, ws), p), max_levels((ht, wt), p))
    if min(hs, ws, ht, wt) < p:
        raise ValueError(f"images of {ws}x{hs} / {wt}x{ht} are smaller than the patch ({p})")
    levels = fit if params.pyramid_levels < 1 else min(params.pyramid_levels, fit)
    gen = generator or torch.Generator(device=dev).manual_seed(params.seed)
    s_sizes = level_sizes((hs, ws), levels)
    t_sizes = level_sizes((ht, wt), levels)
    # EbSynth divides a style or guide weight evenly over its channels; scaling the features by
    # the square root of those weights turns the weighted SSD into a plain one.
    style_scale = math.sqrt(params.style_weight / style.shape[0])
    g_scale = [math.sqrt(g.weight / g.source.shape[0]) for g in guides]

    ws = workspace or Workspace()
    nnf, prev = None, None
    for li in range(levels):
        src_g = torch.cat([resize(g.source.float(), s_sizes[li]) * s for g, s in zip(guides, g_scale)])
        tgt_g = torch.cat([resize(g.target.float(), t_sizes[li]) * s for g, s in zip(guides, g_scale)])
        lvl = _Level(resize(style, s_sizes[li]), src_g, tgt_g, style_scale, params, ws)
        nnf = lvl.random_nnf(gen) if prev is None else lvl.upsample_nnf(nnf, prev)
        target = lvl.vote(nnf)
        for _ in range(params.search_vote_iters):
            preempt.check()
            lvl.set_target_style(target)
            nnf, _ = lvl.patchmatch(nnf, params.patchmatch_iters, gen)
            target = lvl.vote(nnf)
        prev = lvl
    lvl.set_target_style(target)
    error = lvl.ssd(nnf, guide_only=True).view(ht, wt) / (p * p)
    nnf2 = torch.stack([nnf // lvl.wv + lvl.r, nnf % lvl.wv + lvl.r]).view(2, ht, wt)
    return SynthResult(target.clamp(0, 255), error, nnf2)


# --- Rerender-style guides -------------------------------------------------------------------------

@dataclass(frozen=True)
class GuideWeights:
    """The weights of Rerender's guides: job=propagate's ``job.guides`` (conf/job/propagate.yaml,
    Rerender's blender's values); :meth:`shipped` for those values outside that job."""

    color: float
    edge: float
    temporal: float
    position: float

    @classmethod
    def from_config(cls, values: Mapping) -> "GuideWeights":
        """From a ``job.guides`` subtree (every key of it)."""
        return typed_config(cls, values)

    @classmethod
    def shipped(cls, **overrides) -> "GuideWeights":
        """conf/job/propagate.yaml's ``guides``, ``overrides`` replacing some."""
        return shipped_config(cls, "job/propagate", "guides", **overrides)


def to_chw(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    """# (H, W, 3) uint8 RGB -> (3, H, W) float32 0..255 on device."""
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1).float()


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """# (3, H, W) float 0..255 -> (H, W, 3) uint8 RGB on the host."""
    return image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def edge_guide(frame: torch.Tensor) -> torch.Tensor:
    """Laplacian edges of the blurred luma: # (3, H, W) 0..255 -> (1, H, W), 128 = flat."""
    gray = (0.299 * frame[0] + 0.587 * frame[1] + 0.114 * frame[2])[None, None]
    g = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=frame.device) / 16
    gray = F.conv2d(F.pad(gray, (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5))
    gray = F.conv2d(F.pad(gray, (0, 0, 2, 2), mode="replicate"), g.view(1, 1, 5, 1))
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=frame.device)
    edges = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), lap.view(1, 1, 3, 3))
    return (128 - 4 * edges[0]).clamp(0, 255)


def position_guide(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Every pixel's own (x, y), scaled to 0..255: # (2, H, W)."""
    y = torch.linspace(0, 255, h, device=device)[:, None].expand(h, w)
    x = torch.linspace(0, 255, w, device=device)[None, :].expand(h, w)
    return torch.stack([x, y])


FlowFn = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]


def propagate(key_style: np.ndarray, key_frame: np.ndarray, frames: list[np.ndarray], flow_to_prev: FlowFn,
              params: SynthParams, weights: GuideWeights,
              device: torch.device = torch.device("cpu")) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Carry one stylized keyframe along ``frames`` (in the order of propagation), as Rerender's
    blender runs EbSynth: every frame is synthesized from the key with the colour, edge,
    temporal (the previous output warped here, holes filled) and positional (the key's pixel
    coordinates carried along by the flow, cumulatively) guides.

    key_style, key_frame, frames[i]: (H, W, 3) uint8 RGB. ``flow_to_prev(i)`` returns, for
    frames[i], the flow to the frame before it in this order (frames[i - 1], or the key for i = 0)
    as # (2, H, W) float32 on ``device`` and the pixels where it is reliable as # (H, W) bool.
    Yields (output (H, W, 3) uint8, error (H, W) float32) per frame.
    """
    from .flow import fill_holes, warp

    style = to_chw(key_style, device)
    src_frame = to_chw(key_frame, device)
    h, w = src_frame.shape[-2:]
    pos0 = position_guide(h, w, device)
    src_edge = edge_guide(src_frame)
    prev, pos = style, pos0
    gen = torch.Generator(device=device).manual_seed(params.seed)
    ws = Workspace()
    for i, frame in enumerate(frames):
        tgt = to_chw(frame, device)
        flow, valid = flow_to_prev(i)
        pos = warp(pos, flow)
        temporal = fill_holes(warp(prev, flow), valid)
        guides = []
        if weights.color:
            guides.append(Guide(src_frame, tgt, weights.color))
        if weights.edge:
            guides.append(Guide(src_edge, edge_guide(tgt), weights.edge))
        if weights.temporal:
            guides.append(Guide(style, temporal, weights.temporal))
        if weights.position:
            guides.append(Guide(pos0, pos, weights.position))
        res = synthesize(style, guides, params, generator=gen, workspace=ws)
        prev = res.image
        yield to_hwc(res.image), res.error.cpu().numpy()
