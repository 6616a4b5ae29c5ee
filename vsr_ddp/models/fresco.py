"""FRESCO keyframe translation with Stable Diffusion 1.5 + ControlNet, through diffusers' own hooks.

FRESCO (Yang et al., CVPR 2024, "FRESCO: Spatial-Temporal Correspondence for Zero-Shot Video
Translation", github.com/williamyang1991/FRESCO) as its ``run_fresco.py`` runs it, per video:

1. frames resized to short side ``short_side`` in multiples of 64; keyframes by FRESCO's rule
   (:func:`select_keyframes`), cut into batches of ``batch_size`` (:func:`keyframe_batches`);
2. per batch: optical flow between consecutive keys (OpenCV DIS here; GMFlow there), occlusions
   from the forward-backward check plus a colour check, and from them the cross-frame masks and
   the flow trajectories (:func:`guidance_for`);
3. a reference UNet pass at the last timestep on the noised inputs records each FRESCO layer's
   self-attention input (spatial-guided attention) and each decoder block's input (whose
   normalized Gram matrices the spatial loss matches);
4. SDEdit: the input latents noised to ``timesteps[steps - int(steps * strength)]`` with one
   noise shared by every frame, then DDPM with classifier-free guidance and the ControlNet. On
   the way:

   * attention (:class:`FrescoAttnProcessor`, installed with ``unet.set_attn_processor`` on the
     self-attention of the last two decoder levels): cross-frame attention to frame 0 plus the
     tokens newly visible in each later frame; spatial-guided attention at the first step;
     flow-guided temporal attention along trajectories while ``t >= 350``;
   * feature optimization (:func:`optimize_feature`, a forward pre-hook on each decoder block):
     Adam (lr 0.2, 20 iterations) on a temporal warp loss plus a spatial self-similarity loss
     for the early steps, then AdaIN back to the block input's statistics;
5. after the first batch, every batch starts with key 0 and the previous batch's last key, whose
   latents at every step are those recorded in the previous batch: the batches share an anchor.

Not implemented: FRESCO's background smoothing (``use_salinecy``: it warps the background with
a saliency mask from EGNet, a model this project does not ship) and GMFlow (DIS needs no weights).

Per-step state lives on one :class:`FrescoControl` that the processors and hooks hold as an
attribute; nothing replaces a module's ``forward``.

GPU memory, 512x512, batch 8 (8 frames, the two references of later batches included; 16 with
CFG), fp16, SDPA: an estimate, not measured (no GPU was at hand): weights ~2.9 GB (UNet 1.7,
ControlNet 0.7, CLIP 0.25, VAE 0.17); UNet + ControlNet activations ~4-6 GB; feature optimization
~0.3 GB (one 4096 x 4096 float32 Gram matrix at a time, with its gradient); VAE decode of 8 frames
~2-3 GB without slicing. About 10-13 GB in all; activations grow with the working size's tokens
(896x512 for 16:9 is 1.75x of 512x512); ``job.vae_slicing`` trims the decode peak,
``job.batch_size`` scales the rest. :func:`bench_sim2real` measures it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# run_fresco.py's prompt additions for a base model other than Realistic Vision
ADDED_PROMPT = ", best quality, extremely detailed"
NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing finger, extra digit, fewer digits, "
                   "cropped, worst quality, low quality")

# --- Sizes and keyframes -------------------------------------------------------------------------


def work_size(width: int, height: int, short_side: int = 512) -> tuple[int, int]:
    """FRESCO's ``resize_image``: short side to ``short_side``, both sides rounded to multiples of 64."""
    k = short_side / min(width, height)
    return max(64, int(round(width * k / 64)) * 64), max(64, int(round(height * k / 64)) * 64)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """# (T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with (w, h) = size; Lanczos up, area down (as FRESCO)."""
    import cv2

    w, h = size
    if frames.shape[1:3] == (h, w):
        return frames
    interp = cv2.INTER_LANCZOS4 if w * h > frames.shape[1] * frames.shape[2] else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def frame_differences(frames: Iterable[np.ndarray]) -> np.ndarray:
    """FRESCO's keyframe cue: MSE between consecutive frames after a 9x9 Gaussian blur, on a
    [-1, 1] scale. T frames (H, W, 3) uint8, an array or a stream holding one frame at a time
    -> (T,) float64, d[i] between frames i-1 and i, d[0] = 0."""
    import cv2

    out: list[float] = []
    prev = None
    for f in frames:
        cur = cv2.GaussianBlur(f, (9, 9), 0).astype(np.float32) / 127.5 - 1
        out.append(0.0 if prev is None else float(np.mean((cur - prev) ** 2)))
        prev = cur
    return np.array(out, dtype=np.float64)


def select_keyframes(frames: int, min_interval: int = 5, max_interval: int = 20,
                     differences: np.ndarray | None = None) -> list[int]:
    """FRESCO's ``get_keyframe_ind``. Equal intervals: every ``min_interval``-th frame from 0.
    Otherwise frames 0 and T-1, then, while two neighbouring keys are more than ``max_interval``
    apart, the frame with the largest difference to its predecessor that is at least
    ``min_interval`` from the ends and from every key chosen so far (``differences`` from
    :func:`frame_differences`)."""
    if min_interval < 1 or max_interval < min_interval:
        raise ValueError(f"keyframe intervals need 1 <= min ({min_interval}) <= max ({max_interval})")
    if min_interval == max_interval:
        return list(range(0, frames, min_interval))
    if frames <= 1:
        return [0]
    if differences is None or len(differences) != frames:
        raise ValueError("select_keyframes: min_interval < max_interval needs one difference per frame")
    err = np.array(differences, dtype=np.float64)
    err[:min_interval] = -1
    err[-min_interval:] = -1
    keys = [0, frames - 1]
    while max(b - a for a, b in zip(keys, keys[1:])) > max_interval:
        i = int(np.argmax(err))
        if err[i] == -1:
            break
        err[max(0, i - min_interval):i + min_interval] = -1
        keys = sorted(keys + [i])
    return keys


def keyframe_batches(keys: list[int], batch_size: int = 8) -> list[list[int]]:
    """FRESCO's batches: the first holds ``batch_size`` keys, each later one ``batch_size - 2``
    (it is run after key 0 and the previous batch's last key); a last batch of fewer than three
    borrows from the one before."""
    if batch_size < 3:
        raise ValueError(f"job.batch_size must be >= 3 (two reference keys + one new), not {batch_size}")
    keys = list(keys)
    step = batch_size - 2
    batches = [keys[i:i + step] for i in range(2, len(keys), step)] or [[]]
    batches[0][:0] = keys[:2]
    if len(batches) > 1 and len(batches[-1]) < 3:
        add = 3 - len(batches[-1])
        batches[-1] = batches[-2][-add:] + batches[-1]
        batches[-2] = batches[-2][:-add]
    return [b for b in batches if b]  # FRESCO's borrowing can empty a batch when batch_size < 5


# --- Control maps --------------------------------------------------------------------------------

ANNOTATOR_FILES = {"hed": "ControlNetHED.pth", "depth": "dpt_hybrid-midas-501f0c75.pt"}
ANNOTATOR_SOURCE = "https://huggingface.co/lllyasviel/Annotators"


class ControlMaps:
    """The ControlNet's condition image of a frame: ``canny`` (cv2.Canny, no weights), ``hed`` or
    ``depth`` (controlnet-aux, weights from the local folder ``annotator``)."""

    def __init__(self, kind: str, annotator: str | None = None, device: torch.device = torch.device("cpu"),
                 canny_low: int = 50, canny_high: int = 100):
        if kind not in ("canny", "hed", "depth"):
            raise ValueError(f"job.control must be canny, hed or depth, not {kind!r}")
        self.kind, self.low, self.high = kind, int(canny_low), int(canny_high)
        self.detector = None
        if kind != "canny":
            folder = Path(str(annotator or "")).expanduser()
            weights = folder / ANNOTATOR_FILES[kind]
            if not annotator or not weights.is_file():
                raise ValueError(f"job.control={kind} needs {ANNOTATOR_FILES[kind]} in job.annotator"
                                 f"{'=' + str(folder) if annotator else ' (not set)'}: download it from "
                                 f"{ANNOTATOR_SOURCE} into a local folder and pass that folder")
            if kind == "hed":
                from controlnet_aux.hed import HEDdetector

                self.detector = HEDdetector.from_pretrained(str(folder)).to(device)
            else:
                from controlnet_aux.midas import MidasDetector

                self.detector = MidasDetector.from_pretrained(str(folder)).to(device)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """# (H, W, 3) uint8 RGB -> (H, W, 3) uint8 condition image."""
        import cv2

        h, w = frame.shape[:2]
        if self.kind == "canny":
            edges = cv2.Canny(frame, self.low, self.high)
            return np.repeat(edges[:, :, None], 3, axis=2)
        out = self.detector(frame, detect_resolution=min(h, w), image_resolution=min(h, w), output_type="np")
        out = np.asarray(out[0] if isinstance(out, tuple) else out)
        if out.ndim == 2:
            out = np.repeat(out[:, :, None], 3, axis=2)
        return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR) if out.shape[:2] != (h, w) else out


# --- Flow, occlusion, warping --------------------------------------------------------------------


def flow_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out(p) = x(p + flow(p)), bilinear, zeros outside. # (B, C, H, W), (B, 2, H, W) dx,dy."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=flow.dtype),
                            torch.arange(w, device=x.device, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def batch_flows(frames: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV DIS flow between frame i and i+1 (the last with frame 0, as FRESCO pairs them).

    # (N, H, W, 3) uint8 -> fwd, bwd: (N, 2, H, W) float32 on device. fwd[i] lives on frame i's
    grid and points into frame i+1; bwd[i] lives on frame i+1's grid and points into frame i.
    """
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    nxt = gray[1:] + gray[:1]
    fwd = np.stack([dis.calc(a, b, None) for a, b in zip(gray, nxt)])  # (N, H, W, 2)
    bwd = np.stack([dis.calc(b, a, None) for a, b in zip(gray, nxt)])
    to = lambda f: torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().to(device)  # noqa: E731
    return to(fwd), to(bwd)


def occlusions(fwd: torch.Tensor, bwd: torch.Tensor, images: torch.Tensor,
               alpha: float = 0.01, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """GMFlow's forward-backward consistency check plus FRESCO's colour check (mean absolute
    difference above a quarter of the range). images: # (N, 3, H, W) float in [0, 255];
    returns fwd_occ (on frame i), bwd_occ (on frame i+1): (N, H, W) float {0, 1}."""
    mag = fwd.norm(dim=1) + bwd.norm(dim=1)
    fwd_occ = ((fwd + flow_warp(bwd, fwd)).norm(dim=1) > alpha * mag + beta).float()
    bwd_occ = ((bwd + flow_warp(fwd, bwd)).norm(dim=1) > alpha * mag + beta).float()
    nxt = images.roll(-1, dims=0)
    bwd_occ = torch.clamp(bwd_occ + ((nxt - flow_warp(images, bwd)).abs().mean(1) > 255 * 0.25).float(), 0, 1)
    fwd_occ = torch.clamp(fwd_occ + ((images - flow_warp(nxt, fwd)).abs().mean(1) > 255 * 0.25).float(), 0, 1)
    return fwd_occ, bwd_occ


# --- FRESCO's correspondences --------------------------------------------------------------------


def cross_frame_mask(bwd_occ: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Which tokens every frame attends to in cross-frame attention: all of frame 0, and in each
    later frame the tokens occluded in its predecessor (newly visible). # (N, H, W) -> (N, h*w) bool."""
    h, w = size
    n = bwd_occ.shape[0]
    first = torch.ones(1, h * w, dtype=torch.bool, device=bwd_occ.device)
    if n == 1:
        return first
    occ = F.interpolate(bwd_occ[:-1, None], size=(h, w), mode="bilinear", align_corners=False) > 0.5
    return torch.cat([first, occ.flatten(1)])


def link_next(bwd_flow: torch.Tensor, bwd_occ: torch.Tensor, images: torch.Tensor,
              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FRESCO's ``get_single_mapping_ind``, vectorized: which token of frame i+1 continues each
    token of frame i, on an h x w token grid.

    bwd_flow: # (2, H, W) on frame i+1's grid into frame i; bwd_occ: (H, W); images: (2, 3, H, W)
    frames i and i+1. Every unoccluded token of frame i+1 lands (rounded) on a token of frame i;
    where several land on the same one, the closest in colour wins (ties: the lowest index, as
    FRESCO's scan). Returns ``mapping`` (h*w,) long, a permutation: mapping[p] is the frame-(i+1)
    token after frame-i token p (tokens with no successor get the left-over ones, in order), and
    ``unlinked`` (h*w,) bool: p had no successor.
    """
    h, w = size
    H, W = bwd_flow.shape[-2:]
    flow = F.interpolate(bwd_flow[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    flow = flow * torch.tensor([w / W, h / H], device=flow.device, dtype=flow.dtype).view(2, 1, 1)
    occ = F.interpolate(bwd_occ[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    visible = ~(occ > 0.5)
    colours = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).flatten(2)  # (2,3,hw)
    dev = flow.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    ty = torch.round(ys + flow[1]).long()
    tx = torch.round(xs + flow[0]).long()
    ok = ((ty >= 0) & (ty < h) & (tx >= 0) & (tx < w) & visible).flatten()  # (hw,) over frame-(i+1) tokens
    src = torch.nonzero(ok).squeeze(1)  # frame-(i+1) tokens, ascending
    dst = (ty * w + tx).flatten()[src]  # the frame-i token each lands on
    err = ((colours[1][:, src] - colours[0][:, dst]) ** 2).mean(0)
    # Lowest error per destination, ties to the lowest source index: stable sorts, last key first.
    order = torch.sort(err, stable=True).indices
    order = order[torch.sort(dst[order], stable=True).indices]
    d_sorted = dst[order]
    first = torch.ones_like(d_sorted, dtype=torch.bool)
    first[1:] = d_sorted[1:] != d_sorted[:-1]
    winners = order[first]
    n = h * w
    mapping = torch.full((n,), -1, dtype=torch.long, device=flow.device)
    mapping[dst[winners]] = src[winners]
    linked = torch.zeros(n, dtype=torch.bool, device=flow.device)
    linked[src[winners]] = True
    unlinked = mapping == -1
    mapping[unlinked] = torch.nonzero(~linked).squeeze(1)
    return mapping, unlinked


def trajectories(bwd_flows: torch.Tensor, bwd_occs: torch.Tensor, images: torch.Tensor,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FRESCO's ``get_mapping_ind``: token trajectories through the batch for temporal attention.

    bwd_flows, bwd_occs: # (N, 2, H, W), (N, H, W) (pairs i -> i+1; the wrap-around pair unused);
    images: (N, 3, H, W). Returns fwd (N, 1, L) long: fwd[f, 0, p] is the token of frame f on
    trajectory p; bwd (N, 1, L): its inverse; mask (L, 1, N, N) bool: which frames of a
    trajectory may attend to each other (a trajectory broken between frames i and i+1 splits).
    """
    n = images.shape[0]
    L = size[0] * size[1]
    dev = images.device
    fwd = [torch.arange(L, device=dev)]
    mask = torch.ones(L, n, n, dtype=torch.bool, device=dev)
    for i in range(n - 1):
        mapping, unlinked = link_next(bwd_flows[i], bwd_occs[i], images[i:i + 2], size)
        split = torch.ones(n, n, dtype=torch.bool, device=dev)
        split[:i + 1, i + 1:] = False
        split[i + 1:, :i + 1] = False
        broken = unlinked[fwd[-1]]
        mask[broken] &= split
        fwd.append(mapping[fwd[-1]])
    fwd_t = torch.stack(fwd)[:, None]  # (N, 1, L)
    return fwd_t, torch.argsort(fwd_t, dim=2), mask[:, None]


@dataclass
class Guidance:
    """What FRESCO derives from one batch's input frames."""

    fwd_flows: torch.Tensor | None  # (N, 2, H, W) float32; None for a single frame
    bwd_flows: torch.Tensor | None
    fwd_occs: torch.Tensor | None  # (N, H, W) float32
    bwd_occs: torch.Tensor | None
    masks: dict  # tokens L -> (N, L) bool, cross-frame attention
    paths: dict  # tokens L -> (fwd (N, 1, L), bwd (N, 1, L), mask (L, 1, N, N)), temporal attention


def guidance_for(frames: np.ndarray, token_sizes: list[tuple[int, int]], device: torch.device,
                 temporal: bool = True) -> Guidance:
    """Flows, occlusions, cross-frame masks and trajectories of a batch. # (N, H, W, 3) uint8."""
    n = len(frames)
    if n < 2:
        masks = {h * w: torch.ones(1, h * w, dtype=torch.bool, device=device) for h, w in token_sizes}
        return Guidance(None, None, None, None, masks, {})
    fwd, bwd = batch_flows(frames, device)
    images = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
    fwd_occ, bwd_occ = occlusions(fwd, bwd, images)
    masks = {h * w: cross_frame_mask(bwd_occ, (h, w)) for h, w in token_sizes}
    paths = {}
    if temporal:
        signed = images / 127.5 - 1
        paths = {h * w: trajectories(bwd, bwd_occ, signed, (h, w)) for h, w in token_sizes}
    return Guidance(fwd, bwd, fwd_occ, bwd_occ, masks, paths)


# --- Attention -----------------------------------------------------------------------------------


class FrescoControl:
    """State shared by the FRESCO processors and decoder hooks of one UNet. The pipeline sets it
    before each UNet call; with everything off the processors are plain SDPA attention."""

    def __init__(self):
        self.frames = 1  # frames per CFG half: hidden states come as (chunk * frames, L, C)
        self.cross_frame = False
        self.spatial = False
        self.temporal = False
        self.store = False  # reference pass: keep each processor's self-attention input
        self.stored: dict[str, torch.Tensor] = {}
        self.guidance: Guidance | None = None
        self.spatial_scale = 0.2  # FRESCO's intraattn_scale_factor
        self.spatial_bias = 0.0  # FRESCO's intraattn_bias
        self.temporal_scale = 0.2  # FRESCO's interattn_scale_factor
        # decoder blocks
        self.capture: dict[int, torch.Tensor] | None = None  # block index -> input, on the reference pass
        self.optimize = False
        self.opt_layers: tuple = (0, 1, 2, 3)
        self.correlations: dict[int, torch.Tensor] = {}  # block index -> (B, L, L) float32
        self.opt: dict = {}  # optimize_feature keyword arguments
        self.calls: Counter = Counter()  # which parts ran, for logs and tests

    def reset(self) -> None:
        self.cross_frame = self.spatial = self.temporal = self.store = self.optimize = False
        self.stored, self.correlations, self.capture, self.guidance = {}, {}, None, None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # (B, L, h*d) -> (B, h, L, d)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _shared_tokens(x: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Cross-frame keys/values: the tokens ``mask`` selects across the whole batch, given to every
    frame. # (chunk * F, L, C), (F, L) bool -> (chunk * F, M, C)."""
    b, n, c = x.shape
    chunk = b // frames
    picked = x.view(chunk, frames * n, c)[:, mask.flatten()]  # (chunk, M, C)
    return picked[:, None].expand(chunk, frames, -1, c).reshape(b, -1, c)


def temporal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, path: tuple,
                       frames: int, heads: int, scale: float) -> torch.Tensor:
    """FRESCO's flow-guided attention (from FLATTEN): each token attends to the tokens on its
    trajectory in the other frames.

    query, key: # (chunk * F, L, C) projections of the self-attention input; value: (chunk * F,
    heads, L, d), the output of the spatial attention. Returns (chunk * F, heads, L, d).
    """
    fwd, bwd, mask = path  # (F, 1, L), (F, 1, L), (L, 1, F, F)
    b, n, c = query.shape
    chunk, d = b // frames, c // heads

    def along(x):  # (chunk * F, L, C) -> (chunk * L, heads, F, d), trajectory-major
        idx = fwd.view(1, frames, n, 1).expand(chunk, -1, -1, c)
        x = torch.gather(x.reshape(chunk, frames, n, c), 2, idx)
        return x.permute(0, 2, 1, 3).reshape(chunk * n, frames, heads, d).transpose(1, 2)

    v = value.transpose(1, 2).reshape(b, n, c)
    out = F.scaled_dot_product_attention(along(query), along(key) * scale, along(v),
                                         attn_mask=mask.repeat(chunk, 1, 1, 1))  # (chunk * L, heads, F, d)
    out = out.transpose(1, 2).reshape(chunk, n, frames, c).permute(0, 2, 1, 3)  # (chunk, F, L, C)
    out = torch.gather(out, 2, bwd.view(1, frames, n, 1).expand(chunk, -1, -1, c))  # back to token order
    return out.reshape(b, n, heads, d).transpose(1, 2)


class FrescoAttnProcessor:
    """Self-attention with FRESCO's guidance (``AttnProcessor2_0`` otherwise): install with
    ``unet.set_attn_processor({...})`` (:func:`install_fresco_processors`)."""

    def __init__(self, control: FrescoControl, name: str):
        self.control = control
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        c = self.control
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        b, n, _ = hidden_states.shape  # (B, L, C) with B = chunk * frames
        cross = encoder_hidden_states is not None
        if attention_mask is not None:
            src_len = encoder_hidden_states.shape[1] if cross else n
            attention_mask = attn.prepare_attention_mask(attention_mask, src_len, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else \
                encoder_hidden_states
        else:
            context = hidden_states
            if c.store:
                c.stored[self.name] = hidden_states.detach()
                c.calls["store"] += 1

        q_proj = attn.to_q(hidden_states)  # (B, L, C)
        k_proj = attn.to_k(context)
        v_proj = attn.to_v(context)
        heads = attn.heads
        frames = c.frames
        guide = c.guidance
        key, value = k_proj, v_proj
        if not cross and c.cross_frame and guide is not None and n in guide.masks and b % frames == 0:
            key = _shared_tokens(k_proj, guide.masks[n], frames)
            value = _shared_tokens(v_proj, guide.masks[n], frames)
            c.calls["cross_frame"] += 1
        query = _split_heads(q_proj, heads)
        key = _split_heads(key, heads)
        value = _split_heads(value, heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ref = c.stored.get(self.name)
        if not cross and c.spatial and ref is not None and ref.shape == hidden_states.shape:
            # Spatial-guided attention: re-express each query through the input frame's own
            # self-similarity, so the new frame keeps the input's layout.
            q_ref = _split_heads(attn.to_q(ref), heads)
            k_ref = _split_heads(attn.to_k(ref), heads)
            bias = None
            if c.spatial_bias:
                bias = torch.eye(n, dtype=query.dtype, device=query.device) * c.spatial_bias
            query = F.scaled_dot_product_attention(q_ref, k_ref * c.spatial_scale, query, attn_mask=bias)
            c.calls["spatial"] += 1

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)  # (B, heads, L, d)
        if not cross and c.temporal and guide is not None and n in guide.paths and b % frames == 0:
            out = temporal_attention(q_proj, k_proj, out, guide.paths[n], frames, heads, c.temporal_scale)
            c.calls["temporal"] += 1

        out = out.transpose(1, 2).reshape(b, n, -1).to(q_proj.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fresco_levels(unet) -> list[int]:
    """The last two decoder levels (``up_blocks``), where FRESCO guides the attention."""
    n = len(unet.up_blocks)
    levels = [i for i in (n - 2, n - 1) if i >= 0 and getattr(unet.up_blocks[i], "attentions", None)]
    if len(levels) != 2:
        raise ValueError("FRESCO needs a UNet whose last two decoder levels have attention "
                         "(CrossAttnUpBlock2D, as Stable Diffusion 1.5's)")
    return levels


def install_fresco_processors(unet, control: FrescoControl) -> list[str]:
    """``FrescoAttnProcessor`` on the self-attention (attn1) of the last two decoder levels,
    ``AttnProcessor2_0`` (SDPA) everywhere else. Returns the names given FRESCO processors."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    prefixes = tuple(f"up_blocks.{i}." for i in fresco_levels(unet))
    plain = AttnProcessor2_0()
    procs, fresco = {}, []
    for name in unet.attn_processors:
        if name.startswith(prefixes) and ".attn1." in name:
            procs[name] = FrescoAttnProcessor(control, name)
            fresco.append(name)
        else:
            procs[name] = plain
    unet.set_attn_processor(procs)
    return fresco


# --- Feature optimization ------------------------------------------------------------------------


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-channel mean and std of ``style`` on ``content``. # (B, C, H, W) both."""
    def stats(x):
        flat = x.flatten(2)
        var = flat.var(2, correction=1 if flat.shape[2] > 1 else 0)  # 1x1 blocks (tiny test UNets): no spread
        return flat.mean(2)[..., None, None], (var + eps).sqrt()[..., None, None]

    cm, cs = stats(content)
    sm, ss = stats(style)
    return (content - cm) / cs * ss + sm


def gram(x: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity of the tokens of each sample. # (B, C, H, W) -> (B, HW, HW) float32."""
    v = x.float().flatten(2).transpose(1, 2)  # (B, HW, C)
    v = v / v.norm(dim=2, keepdim=True).clamp_min(1e-6)
    return torch.bmm(v, v.transpose(1, 2))


def optimize_feature(sample: torch.Tensor, frames: int, guide: Guidance | None,
                     correlation: torch.Tensor | None = None, temporal: bool = True,
                     spatial_weight: float = 100.0, iters: int = 20, lr: float = 0.2) -> torch.Tensor:
    """FRESCO's ``optimize_feature`` on one decoder block's input. # (chunk * F, C, h, w).

    Temporal loss: each frame warped by the flow onto its successor (and back) should match it
    where nothing is occluded. Spatial loss: the tokens' cosine self-similarity should match the
    input frames' (``correlation``, from the reference pass). Adam on a float32 copy, then AdaIN
    back to the block input's per-channel statistics.
    """
    use_temporal = temporal and guide is not None and guide.fwd_flows is not None and frames > 1
    use_spatial = correlation is not None and spatial_weight > 0 and correlation.shape[0] == sample.shape[0]
    if not (use_temporal or use_spatial) or iters < 1:
        return sample
    b, c, h, w = sample.shape
    chunk = b // frames
    with torch.enable_grad():
        cs = sample.detach().float().view(chunk, frames, c, h, w).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([cs], lr=lr)
        if use_temporal:
            H, W = guide.fwd_flows.shape[-2:]
            to_grid = torch.tensor([w / W, h / H], device=sample.device).view(1, 2, 1, 1)

            def at_size(flow, occ):  # (F, 2, H, W), (F, H, W) -> per sample: (B, 2, h, w), (B, 1, h, w)
                f = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * to_grid
                o = F.adaptive_max_pool2d(occ[:, None], (h, w))
                return f.repeat(chunk, 1, 1, 1), o.repeat(chunk, 1, 1, 1)

            fwd_flow, fwd_occ = at_size(guide.fwd_flows, guide.fwd_occs)
            bwd_flow, bwd_occ = at_size(guide.bwd_flows, guide.bwd_occs)
            nxt = list(range(1, frames)) + [0]
        for _ in range(iters):
            optimizer.zero_grad()
            # One loss, its terms backpropagated one by one (gradients add up): a Gram matrix is
            # (h*w)^2 floats per sample, 64 MB at 512x512 and 200 MB at 896x512, so the spatial
            # term goes sample by sample instead of holding B of them and their gradients at once.
            if use_temporal:
                c1 = cs.flatten(0, 1)
                c2 = cs[:, nxt].flatten(0, 1)
                (2 * ((c2 - flow_warp(c1, bwd_flow)).abs() * (1 - bwd_occ)
                      + (c1 - flow_warp(c2, fwd_flow)).abs() * (1 - fwd_occ)).mean()).backward()
            if use_spatial:  # F.l1_loss over the batch = the mean of the per-sample means
                for i in range(b):
                    x = cs.flatten(0, 1)[i:i + 1]
                    (F.l1_loss(gram(x), correlation[i:i + 1]) * (spatial_weight / b)).backward()
            optimizer.step()
    return adain(cs.detach().flatten(0, 1), sample.float()).to(sample.dtype)


class DecoderHooks:
    """Forward pre-hooks on every decoder block (``unet.up_blocks``): record its input on the
    reference pass, and optimize it (:func:`optimize_feature`) when the control says so."""

    def __init__(self, unet, control: FrescoControl):
        self.control = control
        self.handles = [block.register_forward_pre_hook(partial(self._hook, i), with_kwargs=True)
                        for i, block in enumerate(unet.up_blocks)]

    def _hook(self, index: int, module, args, kwargs):
        c = self.control
        x = kwargs.get("hidden_states", args[0] if args else None)
        if c.capture is not None:
            c.capture[index] = x.detach()
        if not (c.optimize and index in c.opt_layers):
            return None
        x = optimize_feature(x, c.frames, c.guidance, c.correlations.get(index), **c.opt)
        c.calls["optimize"] += 1
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": x}
        return (x, *args[1:]), kwargs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --- Pipeline ------------------------------------------------------------------------------------


@dataclass
class FrescoSettings:
    """One video's translation settings. Defaults are run_fresco.py's (config_carturn.yaml)."""

    steps: int = 20
    strength: float = 0.75  # SDEdit: 0.75 of 20 steps skips the first 5 (num_warmup_steps=5)
    guidance_scale: float = 7.5
    cond_scale: float = 0.7
    seed: int = 0
    batch_size: int = 8
    shared_noise: bool = True  # one initial noise for every frame (FRESCO's repeat_noise)
    cross_frame_attn: bool = True
    spatial_attn: bool = True
    spatial_attn_steps: int = 1
    temporal_attn: bool = True
    temporal_attn_min_t: int = 350  # temporal attention while t >= this (FRESCO's step_interattn_end)
    feature_opt: bool = True
    opt_temporal: bool = True
    opt_spatial: bool = True
    opt_until: float = 0.75  # optimize while step index < opt_until * steps (FRESCO: end_opt_step 15 of 20)
    opt_iters: int = 20
    opt_lr: float = 0.2
    opt_spatial_weight: float = 100.0
    opt_layers: tuple = (0, 1, 2, 3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["opt_layers"] = list(self.opt_layers)
        return d


def sdedit_start(steps: int, strength: float) -> int:
    """Index of the first timestep run (diffusers' img2img rule; FRESCO's num_warmup_steps)."""
    return steps - min(int(steps * strength), steps)


def _check_dir(path: Path, what: str, parts: tuple, hint: str, weights: tuple = ()) -> None:
    """``parts`` exist under ``path``, and each folder in ``weights`` holds a weights file."""
    missing = [p for p in parts if not (path / p).exists()]
    missing += [f"{w}/*.safetensors" for w in weights
                if not any((path / w).glob("*.safetensors")) and not any((path / w).glob("*.bin"))]
    if missing:
        raise ValueError(f"{what}={path} lacks {', '.join(missing)}: {hint}")


SD15_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD15_HINT = ("a diffusers folder of Stable Diffusion 1.5 (unet/ vae/ text_encoder/ tokenizer/ scheduler/, "
             "e.g. https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5)")
CONTROLNET_HINT = ("a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
                   "https://huggingface.co/lllyasviel/sd-controlnet-canny, -hed or -depth)")


def single_file_keys(path: Path) -> list[str] | None:
    """Tensor names of a .safetensors file, read from its header alone; None for other formats."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # a truncated or foreign file: safetensors' own words
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None


# What an original-format (CompVis/LDM) SD 1.5 checkpoint holds, by key prefix.
SD15_FILE_PARTS = {"model.diffusion_model.": "the UNet", "cond_stage_model.transformer.": "the CLIP text "
                   "encoder", "first_stage_model.": "the VAE"}


def _check_sd15_file(path: Path, has_vae: bool) -> None:
    keys = single_file_keys(path)
    if keys is None:
        return
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"job.base_model={path} is an SDXL checkpoint; job=sim2real runs SD 1.5 (FRESCO)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(f"job.base_model={path} is an SD 2.x checkpoint (OpenCLIP text encoder); "
                         f"job=sim2real runs SD 1.5 (FRESCO)")
    missing = [f"{what} ({prefix}*)" for prefix, what in SD15_FILE_PARTS.items()
               if not any(k.startswith(prefix) for k in keys)
               and not (has_vae and prefix == "first_stage_model.")]
    if missing:
        hint = "; set job.vae to a diffusers AutoencoderKL folder" if missing == [
            "the VAE (first_stage_model.*)"] else f"; give a full SD 1.5 checkpoint or {SD15_HINT}"
        raise ValueError(f"job.base_model={path} lacks {', '.join(missing)}{hint}")


def check_model_paths(base_model, controlnet, base_model_config=None, controlnet_config=None,
                      vae=None) -> None:
    """Everything the pipeline will load is on disk, or a one-line ValueError saying what to put where."""
    base = Path(str(base_model)).expanduser()
    if not base_model or not base.exists():
        raise ValueError(f"job.base_model={base_model}: not found; give {SD15_HINT}, or a single "
                         f".safetensors checkpoint together with job.base_model_config")
    if base.is_dir():
        _check_dir(base, "job.base_model", SD15_PARTS, SD15_HINT, weights=("unet", "vae", "text_encoder"))
    else:
        if base.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"job.base_model={base}: a single-file checkpoint must be .safetensors or .ckpt")
        cfg = Path(str(base_model_config or "")).expanduser()
        if not base_model_config or not cfg.is_dir():
            raise ValueError(f"job.base_model={base} is a single file: set job.base_model_config to a local "
                             f"diffusers folder of SD 1.5 (its configs and tokenizer are enough: "
                             f"model_index.json, unet/ vae/ text_encoder/ scheduler/ configs, tokenizer/)")
        _check_dir(cfg, "job.base_model_config", ("model_index.json", *SD15_PARTS), SD15_HINT)
        _check_sd15_file(base, has_vae=bool(vae))
    cn = Path(str(controlnet)).expanduser()
    if not controlnet or not cn.exists():
        raise ValueError(f"job.controlnet={controlnet}: not found; give {CONTROLNET_HINT}, or a single "
                         f".safetensors file together with job.controlnet_config")
    if cn.is_dir():
        _check_dir(cn, "job.controlnet", ("config.json",), CONTROLNET_HINT, weights=(".",))
    else:
        cfg = Path(str(controlnet_config or "")).expanduser()
        if not controlnet_config or not (cfg / "config.json").is_file():
            raise ValueError(f"job.controlnet={cn} is a single file: set job.controlnet_config to a local "
                             f"folder holding the ControlNet's config.json (from {CONTROLNET_HINT})")
        keys = single_file_keys(cn)
        if keys is not None and not any(".input_hint_block." in f".{k}" for k in keys):
            raise ValueError(f"job.controlnet={cn}: not a ControlNet checkpoint (no input_hint_block.* "
                             f"weights); give {CONTROLNET_HINT}, or its original .pth/.safetensors file")
    if vae:
        _check_dir(Path(str(vae)).expanduser(), "job.vae", ("config.json",),
                   "a diffusers AutoencoderKL folder, e.g. https://huggingface.co/stabilityai/sd-vae-ft-mse",
                   weights=(".",))


@contextlib.contextmanager
def _single_file(key: str, path: Path, what: str):
    """diffusers' conversion of a file whose tensors do not fit the configs fails deep inside (a key, a
    shape, a meta tensor never filled): say which file, in one line, as a configuration error."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, ValueError, RuntimeError, NotImplementedError, OSError) as e:
        cause = " ".join(str(e).split())[:300]
        if "meta tensor" in cause:  # accelerate left a parameter the file did not fill
            cause = "tensors its configs call for are missing from the file"
        raise ValueError(f"{key}={path}: could not load it as an original-format {what} "
                         f"checkpoint with the given configs ({type(e).__name__}: {cause})") from e


def _check_filled(key: str, path: Path, **models) -> None:
    """Every parameter came from the file: diffusers builds single-file models on the meta device
    (with accelerate) and fills what the file has, so a tensor it lacks stays meta."""
    missing = [f"{part}.{name}" for part, m in models.items()
               for name, p in m.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{key}={path} lacks {len(missing)} tensor(s) its configs call for "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): a damaged file, "
                         f"or configs of another model")


class FrescoPipeline:
    """SD 1.5 + ControlNet with FRESCO's attention and feature optimization, DDPM sampling."""

    def __init__(self, unet, controlnet, vae, text_encoder, tokenizer, scheduler,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        for m in (unet, controlnet, vae, text_encoder):  # no text encoder: prompt embeddings come given
            if m is not None:  # one move: no float32 copy of the weights on the GPU on the way
                m.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.control = FrescoControl()
        self.fresco_processors = install_fresco_processors(unet, self.control)
        self.hooks = DecoderHooks(unet, self.control)

    @classmethod
    def from_local(cls, base_model, controlnet, *, base_model_config=None, controlnet_config=None, vae=None,
                   device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> "FrescoPipeline":
        """Load from local paths only (see :func:`check_model_paths`); never from the Hub."""
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

        check_model_paths(base_model, controlnet, base_model_config, controlnet_config, vae)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # a bar per component and rank is noise in a batch log
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        base = Path(str(base_model)).expanduser()
        # job.vae replaces the base model's VAE, which is then never loaded
        own_vae = (AutoencoderKL.from_pretrained(Path(str(vae)).expanduser(), local_files_only=True)
                   if vae else None)
        if base.is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer

            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
            vae_model = own_vae or AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                         local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
            scheduler_config = DDPMScheduler.load_config(base, subfolder="scheduler", local_files_only=True)
        else:
            from diffusers import StableDiffusionPipeline

            given = {"vae": own_vae} if own_vae is not None else {}
            with _single_file("job.base_model", base, "SD 1.5"):
                pipe = StableDiffusionPipeline.from_single_file(
                    str(base), config=str(Path(str(base_model_config)).expanduser()), local_files_only=True,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False, **given)
            unet, vae_model, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
            scheduler_config = pipe.scheduler.config
            _check_filled("job.base_model", base, unet=unet, vae=vae_model, text_encoder=text_encoder)
        cn = Path(str(controlnet)).expanduser()
        if cn.is_dir():
            control = ControlNetModel.from_pretrained(cn, local_files_only=True)
        else:
            cn_config = str(Path(str(controlnet_config)).expanduser())
            with _single_file("job.controlnet", cn, "ControlNet"):
                control = ControlNetModel.from_single_file(str(cn), config=cn_config, local_files_only=True)
            _check_filled("job.controlnet", cn, controlnet=control)
        # FRESCO samples with DDPM whatever the checkpoint's own scheduler (PNDM for SD 1.5).
        scheduler = DDPMScheduler.from_config(scheduler_config)
        return cls(unet, control, vae_model, text_encoder, tokenizer, scheduler, device=device, dtype=dtype)

    def _vae_in_float32(self, what: str) -> None:
        log.warning("the VAE overflowed in %s while it %s (inf/NaN, which would be black pixels): "
                    "it runs in float32 from now on", str(self.vae.dtype).replace("torch.", ""), what)
        self.vae.to(torch.float32)

    def vae_encode(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """# (N, 3, H, W) in [-1, 1] -> scaled latents in the model dtype. A half-precision VAE
        that overflows (known for SD 1.5's at large sizes and some fine-tunes) is redone in float32."""
        state = gen.get_state()
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(gen)
        if self.vae.dtype != torch.float32 and not torch.isfinite(z).all():
            self._vae_in_float32("encoded")
            gen.set_state(state)
            z = self.vae.encode(x.float()).latent_dist.sample(gen)
        return (z * self.vae.config.scaling_factor).to(self.dtype)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> # (N, 3, H, W) images in about [-1, 1], as :meth:`vae_encode` guards."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        if self.vae.dtype != torch.float32 and not torch.isfinite(images).all():
            self._vae_in_float32("decoded")
            images = self.vae.decode(z.float()).sample
        return images

    def set_memory_options(self, vae_tiling: bool = False, vae_slicing: bool = False) -> None:
        (self.vae.enable_tiling if vae_tiling else self.vae.disable_tiling)()
        (self.vae.enable_slicing if vae_slicing else self.vae.disable_slicing)()

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> torch.Tensor:
        """# -> (2, 77, D): [negative, positive] CLIP embeddings, on the device in the model dtype."""
        tok = self.tokenizer([negative_prompt, prompt], padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        emb = self.text_encoder(tok.input_ids.to(self.device))[0]
        return emb.to(self.dtype)

    def token_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grids of the FRESCO levels for frames of height x width pixels."""
        h, w = height // self.vae_factor, width // self.vae_factor
        n = len(self.unet.up_blocks)
        return [(h >> (n - 1 - i), w >> (n - 1 - i)) for i in fresco_levels(self.unet)]

    @torch.no_grad()
    def translate(self, frames: np.ndarray | Mapping[int, np.ndarray], keys: list[int],
                  prompt_embeds: torch.Tensor, settings: FrescoSettings = FrescoSettings(),
                  control_maps: Callable | None = None,
                  on_step: Callable | None = None) -> dict[int, np.ndarray]:
        """Translate the keyframes of one video.

        frames: # (T, H, W, 3) uint8 at the working size (H, W multiples of 64), or just the
        keyframes as {index: (H, W, 3) uint8}; keys: frame indices; prompt_embeds: (2, 77, D)
        from :meth:`encode_prompt`; control_maps: frame -> (H, W, 3) uint8 condition image
        (:class:`ControlMaps`). ``on_step(batch, step, t, latents)`` is called before every UNet
        call. Returns {key: (H, W, 3) uint8}.
        """
        # 1. Check inputs
        s = settings
        height, width = frames[keys[0]].shape[:2]
        if height % 64 or width % 64:
            raise ValueError(f"frames must be multiples of 64 on each side, not {width}x{height}")
        control_maps = control_maps or ControlMaps("canny")
        c = self.control

        # 2. Timesteps: SDEdit starts part-way into DDPM's schedule
        self.scheduler.set_timesteps(s.steps, device=self.device)
        timesteps = self.scheduler.timesteps
        start = sdedit_start(s.steps, s.strength)
        if start >= len(timesteps):
            raise ValueError(f"strength {s.strength} with {s.steps} steps leaves no step to run")
        opt_end = s.opt_until * s.steps
        c.opt_layers = tuple(s.opt_layers)
        c.opt = {"temporal": s.opt_temporal, "spatial_weight": s.opt_spatial_weight if s.opt_spatial else 0.0,
                 "iters": s.opt_iters, "lr": s.opt_lr}
        sizes = self.token_sizes(height, width)

        # 3. Keyframe batches; later ones run after key 0 and the previous batch's last key
        batches = keyframe_batches(keys, s.batch_size)
        maps: dict[int, np.ndarray] = {}
        record: list[torch.Tensor] = []  # per step: latents of the batch's first and last frame
        out: dict[int, np.ndarray] = {}
        for bi, batch in enumerate(batches):
            t0 = time.monotonic()
            refs = [] if bi == 0 else [batches[0][0], batches[bi - 1][-1]]
            idx = refs + batch
            n = len(idx)
            c.reset()
            c.frames = n

            # 4. Inputs: images, condition maps, prompt embeddings for CFG (negatives first)
            imgs = np.stack([frames[k] for k in idx])  # (N, H, W, 3) uint8
            for k in idx:
                if k not in maps:
                    maps[k] = control_maps(frames[k])
            x = torch.from_numpy(imgs).to(self.device).permute(0, 3, 1, 2)
            x = x.to(self.dtype) / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
            cond = torch.from_numpy(np.stack([maps[k] for k in idx])).to(self.device).permute(0, 3, 1, 2)
            cond = torch.cat([cond.to(self.dtype) / 255] * 2)  # (2N, 3, H, W) in [0, 1]
            embeds = torch.cat([prompt_embeds[:1].expand(n, -1, -1), prompt_embeds[1:2].expand(n, -1, -1)])

            # 5. FRESCO guidance from the input frames: flows, occlusions, masks, trajectories
            guide = guidance_for(imgs, sizes, self.device, temporal=s.temporal_attn)

            # 6. Initial latents: shared noise, SDEdit from the input
            gen = torch.Generator("cpu").manual_seed(int(s.seed))
            shape = (1 if s.shared_noise else n, self.unet.config.in_channels, height // self.vae_factor,
                     width // self.vae_factor)
            noise = torch.randn(shape, generator=gen).expand(n, -1, -1, -1).to(self.device, self.dtype)
            x0 = self.vae_encode(x, gen)
            latents = self.scheduler.add_noise(x0, noise, timesteps[start:start + 1])

            # 7. Reference pass at the last timestep: attention inputs and decoder-input Gram matrices
            if s.spatial_attn or (s.feature_opt and s.opt_spatial):
                t_ref = timesteps[-1:]
                ref = self.scheduler.add_noise(x0, noise, t_ref)
                c.store, c.capture = True, {}
                self.unet(torch.cat([ref] * 2), t_ref, encoder_hidden_states=embeds)
                if s.feature_opt and s.opt_spatial:
                    c.correlations = {i: gram(f) for i, f in c.capture.items() if i in c.opt_layers}
                c.store, c.capture = False, None
                del ref
            c.guidance = guide
            c.cross_frame = s.cross_frame_attn

            # 8. Denoising loop
            for i, t in enumerate(timesteps[start:]):
                c.spatial = s.spatial_attn and i < s.spatial_attn_steps
                c.temporal = s.temporal_attn and int(t) >= s.temporal_attn_min_t
                c.optimize = s.feature_opt and start + i < opt_end
                if bi > 0:  # the references' latents are exactly the previous batch's
                    latents[0:2] = record[i]
                    record[i] = latents[[0, n - 1]].clone()
                else:
                    record.append(latents[[0, n - 1]].clone())
                if on_step is not None:
                    on_step(bi, i, t, latents)
                model_in = torch.cat([latents] * 2)
                down, mid = self.controlnet(model_in, t, encoder_hidden_states=embeds, controlnet_cond=cond,
                                            conditioning_scale=s.cond_scale, guess_mode=False,
                                            return_dict=False)
                noise_pred = self.unet(model_in, t, encoder_hidden_states=embeds,
                                       down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid).sample
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + s.guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, generator=gen).prev_sample

            # 9. Decode the batch's own keys (not the references)
            images = self.vae_decode(latents[len(refs):])
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            for k, img in zip(batch, images):
                out[k] = img
            log.info("FRESCO batch %d/%d: keys %s (+%d references), %.1f s, %s", bi + 1, len(batches), batch,
                     len(refs), time.monotonic() - t0, dict(c.calls))
        c.reset()
        return out


# --- Benchmark -----------------------------------------------------------------------------------


def sd15_random_components(seed: int = 0):
    """Full-size SD 1.5-shaped UNet, ControlNet and VAE with random weights (same memory and speed
    as the real ones, nothing downloaded), a DDPM scheduler with SD 1.5's schedule."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, clip_sample=False)
    return unet, controlnet, vae, scheduler


def bench_sim2real(base_model: str | None = None, controlnet: str | None = None, size: int = 512,
                   frames: int = 8, steps: int = 20, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, vae_slicing: bool = False, vae_tiling: bool = False,
                   components: tuple | None = None, **settings) -> dict:
    """Time one batch of ``frames`` keyframes at ``size`` x ``size`` and report peak GPU memory.

    With no model paths, SD 1.5-shaped random components (:func:`sd15_random_components`) and
    random prompt embeddings: the speed and memory of the real thing. ``components`` (unet,
    controlnet, vae, scheduler) overrides both, e.g. tiny ones for a CPU smoke run. Other keyword
    arguments go to :class:`FrescoSettings`. Returns a dict of figures (the lead's ``make bench``).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if base_model:
        pipe = FrescoPipeline.from_local(base_model, controlnet, device=device, dtype=dtype)
        embeds = pipe.encode_prompt("a photo of a street" + ADDED_PROMPT, NEGATIVE_PROMPT)
    else:
        unet, cn, vae, scheduler = components or sd15_random_components()
        pipe = FrescoPipeline(unet, cn, vae, None, None, scheduler, device=device, dtype=dtype)
        g = torch.Generator("cpu").manual_seed(0)
        embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    pipe.set_memory_options(vae_tiling=vae_tiling, vae_slicing=vae_slicing)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size + 8 * frames, size + 8 * frames, 3), dtype=np.uint8)
    clip = np.stack([base[4 * i:4 * i + size, 4 * i:4 * i + size] for i in range(frames)])  # a slow pan
    s = FrescoSettings(steps=steps, batch_size=max(frames, 3), **settings)
    if device.type == "cuda":  # one short untimed pass: kernel loading, cuDNN/SDPA choices, allocator growth
        warm = FrescoSettings(**{**asdict(s), "steps": 1, "strength": 1.0, "batch_size": 3})
        pipe.translate(clip[:3], [0, 1, 2], embeds, warm)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipe.translate(clip, list(range(frames)), embeds, s)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "size": size, "frames": frames, "steps": steps,
              "strength": s.strength, "seconds": round(seconds, 3),
              "seconds_per_key": round(seconds / frames, 3),
              "models": "local" if base_model else ("given" if components else "random SD 1.5-shaped")}
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result
