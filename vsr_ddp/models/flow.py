"""Optical flow for keyframe propagation: OpenCV DIS (default, no weights) or torchvision's RAFT
(weights from a local file), the forward-backward occlusion check, backward warping and hole
filling; and the batched flows and occlusion check FRESCO's guidance uses
(:func:`cyclic_flows`, :func:`consistency_occlusions`).

Convention: ``flow(a, b)`` is # (2, H, W) float32 (dx, dy) in pixels, on a's grid: pixel x of
frame a shows up at x + flow(x) in frame b. ``warp(img_b, flow(a, b))`` brings b onto a's grid.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DIS_PRESETS = ("ultrafast", "fast", "medium")
RAFT_MIN_SIDE = 128
RAFT_MAX_SIDE = 1024  # long side RAFT runs at; the flow of larger frames is upsampled (1080p: x1.9)


def _raft_help() -> str:
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

        urls = f"{Raft_Large_Weights.DEFAULT.url} or {Raft_Small_Weights.DEFAULT.url}"
    except Exception:  # noqa: BLE001 - only for the message
        urls = "torchvision's RAFT release files"
    return (f"job.flow_weights takes a torchvision RAFT state dict (raft_large or raft_small), e.g. {urls}; "
            f"leave it empty for OpenCV DIS, which needs no weights")


class FlowError(ValueError):
    """Unusable flow settings or weights; raised before any work starts."""


class FlowEstimator:
    """Dense flow between two frames. DIS runs on the host (OpenCV); RAFT runs on ``device``."""

    # The defaults are for callers without flow settings of their own (job=sim2real's propagation,
    # benchmarks, tests): OpenCV's DIS preset and RAFT's iterations as the jobs ship them; job=propagate
    # and job=interpolate always pass their job.flow_preset / job.raft_iters.
    def __init__(self, weights: str | None = None, device: torch.device = torch.device("cpu"),
                 dis_preset: str = "medium", raft_iters: int = 12):
        self.weights = str(weights) if weights else None
        self.device = torch.device(device)
        if dis_preset not in DIS_PRESETS:
            raise FlowError(f"job.flow_preset must be one of {', '.join(DIS_PRESETS)}, not {dis_preset!r}")
        self.dis_preset = dis_preset
        self.raft_iters = int(raft_iters)
        self.raft = None
        self.dis = None
        self.kind = "dis"

    def setup(self) -> None:
        if self.weights:
            self.raft, self.kind = load_raft(Path(self.weights).expanduser(), self.device)
        else:
            import cv2

            preset = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                      "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                      "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[self.dis_preset]
            self.dis = cv2.DISOpticalFlow_create(preset)

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Flows a->b and b->a of two (H, W, 3) uint8 RGB frames: two # (2, H, W) float32 on device."""
        if self.raft is not None:
            return self._raft_pair(a, b)
        import cv2

        if self.dis is None:
            self.setup()
        ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        ab = self.dis.calc(ga, gb, None)     # (H, W, 2) float32
        ba = self.dis.calc(gb, ga, None)
        to = lambda f: torch.from_numpy(f).permute(2, 0, 1).contiguous().to(self.device)  # noqa: E731
        return to(ab), to(ba)

    @torch.no_grad()
    def _raft_pair(self, a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([a, b])).to(self.device).permute(0, 3, 1, 2)  # (2, 3, H, W) uint8
        x = x.float() / 127.5 - 1                                                   # RAFT takes -1..1
        h, w = x.shape[-2:]
        # RAFT's correlation pyramid needs feature maps of 16 x 16 at 1/8 scale: small frames
        # are enlarged to a short side of 128. Its all-pairs correlation volume grows with the
        # pixel count squared (about 130 GB for a 4K pair): large frames are reduced to a long side
        # of RAFT_MAX_SIDE. Either way the flow is scaled back to the frame.
        scale = max(1.0, RAFT_MIN_SIDE / min(h, w))
        if scale == 1 and max(h, w) > RAFT_MAX_SIDE:
            scale = max(RAFT_MAX_SIDE / max(h, w), RAFT_MIN_SIDE / min(h, w))
        if scale != 1:
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                              align_corners=False, antialias=scale < 1)
        sh, sw = x.shape[-2:]
        ph, pw = (-sh) % 8, (-sw) % 8            # and sides divisible by 8
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        # (a, b) and (b, a) as one batch of two: (2, 2, sH, sW)
        flows = self.raft(x, x.flip(0), num_flow_updates=self.raft_iters)[-1][..., :sh, :sw]
        if scale != 1:
            flows = F.interpolate(flows, size=(h, w), mode="bilinear", align_corners=False)
            flows = flows * torch.tensor([w / sw, h / sh], device=flows.device).view(1, 2, 1, 1)
        return flows[0].float().contiguous(), flows[1].float().contiguous()


def load_raft(path: Path, device: torch.device):
    """raft_large or raft_small with ``weights=None``, then the local state dict: whichever fits."""
    from torchvision.models.optical_flow import raft_large, raft_small

    if not path.is_file():
        raise FlowError(f"job.flow_weights: {path} does not exist. {_raft_help()}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, which would run code from the file
        raise FlowError(f"job.flow_weights: cannot read {path} (not a tensors-only PyTorch checkpoint: a "
                        f"damaged file, or one that stores Python objects). {_raft_help()}") from None
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise FlowError(f"job.flow_weights: {path} is not a readable state dict ({first}). "
                        f"{_raft_help()}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for name, build in (("raft_large", raft_large), ("raft_small", raft_small)):
        model = build(weights=None, progress=False)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            continue
        log.info("flow: %s from %s", name, path)
        return model.eval().to(device), name
    raise FlowError(f"job.flow_weights: {path} holds neither raft_large nor raft_small weights. "
                    f"{_raft_help()}")


def _grid(flow: torch.Tensor) -> torch.Tensor:
    """# (B, 2, H, W) pixel flow -> (B, H, W, 2) grid_sample coordinates of x + flow(x), float32
    (half precision cannot address pixels past 2048 exactly)."""
    _, _, h, w = flow.shape
    flow = flow.float()
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype)[:, None]
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype)[None, :]
    gx = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    return torch.stack([gx, gy], dim=-1)


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding: str = "border") -> torch.Tensor:
    """Backward warp: # (C, H, W) image of frame b, flow(a, b) (2, H, W) -> (C, H, W) float on a's
    grid; or batched, # (B, C, H, W) and (B, 2, H, W) -> (B, C, H, W) in the image's float dtype.
    Samples outside b take the nearest border pixel, or zeros with ``padding="zeros"`` (FRESCO's
    and GMFlow's warp, whose occlusion checks count on it)."""
    if image.dim() == 3:
        return warp(image[None].float(), flow[None], mode, padding)[0]
    x = image if image.is_floating_point() else image.float()
    out = F.grid_sample(x.float(), _grid(flow), mode=mode, padding_mode=padding, align_corners=True)
    return out.to(x.dtype)


def occlusion_mask(ab: torch.Tensor, ba: torch.Tensor) -> torch.Tensor:
    """Where flow(a, b) is trustworthy: # (H, W) bool on a's grid.

    Forward-backward check (Sundaram et al. 2010, as in Rerender and FRESCO): going a->b->a must
    come back near the start, |ab + ba(x + ab)|^2 < 0.01 (|ab|^2 + |ba(x + ab)|^2) + 0.5;
    pixels that leave the frame are occluded too.
    """
    back = warp(ba, ab)
    diff = (ab + back).pow(2).sum(0)
    bound = 0.01 * (ab.pow(2).sum(0) + back.pow(2).sum(0)) + 0.5
    _, h, w = ab.shape
    ys = torch.arange(h, device=ab.device)[:, None]
    xs = torch.arange(w, device=ab.device)[None, :]
    tx, ty = xs + ab[0], ys + ab[1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return (diff < bound) & inside


def cyclic_flows(frames: np.ndarray, estimator: FlowEstimator | None = None,
                 device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Flows between frame i and i+1 of a batch, the last with frame 0 (as FRESCO pairs them).

    # (N, H, W, 3) uint8 -> fwd, bwd: (N, 2, H, W) float32 on the estimator's device (DIS medium
    unless given). fwd[i] lives on frame i's grid and points into frame i+1; bwd[i] lives on frame
    i+1's grid and points into frame i.
    """
    est = estimator or FlowEstimator(device=device)
    pairs = [est.pair(a, b) for a, b in zip(frames, [*frames[1:], frames[0]])]
    return torch.stack([ab for ab, _ in pairs]), torch.stack([ba for _, ba in pairs])


def consistency_occlusions(fwd: torch.Tensor, bwd: torch.Tensor, images: torch.Tensor,
                           alpha: float = 0.01, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusions of a batch of flow pairs as FRESCO computes them: GMFlow's forward-backward check
    (|fwd + bwd(x + fwd)| > alpha (|fwd| + |bwd|) + beta, norms not squared, zeros outside the
    frame: unlike :func:`occlusion_mask`, which is Rerender's) plus FRESCO's colour check (mean
    absolute difference after warping above a quarter of the range).

    fwd, bwd: # (N, 2, H, W) from :func:`cyclic_flows`; images: (N, 3, H, W) float in [0, 255].
    Returns fwd_occ (on frame i), bwd_occ (on frame i+1): (N, H, W) float {0, 1}.
    """
    zeros = dict(padding="zeros")
    mag = fwd.norm(dim=1) + bwd.norm(dim=1)
    fwd_occ = ((fwd + warp(bwd, fwd, **zeros)).norm(dim=1) > alpha * mag + beta).float()
    bwd_occ = ((bwd + warp(fwd, bwd, **zeros)).norm(dim=1) > alpha * mag + beta).float()
    nxt = images.roll(-1, dims=0)
    colour = lambda a, b, f: ((a - warp(b, f, **zeros)).abs().mean(1) > 255 * 0.25).float()  # noqa: E731
    bwd_occ = torch.clamp(bwd_occ + colour(nxt, images, bwd), 0, 1)
    fwd_occ = torch.clamp(fwd_occ + colour(images, nxt, fwd), 0, 1)
    return fwd_occ, bwd_occ


def fill_holes(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fill the pixels where ``valid`` is False from their valid surroundings (push-pull: a masked
    mean pyramid, coarse levels fill the fine ones). # (C, H, W), (H, W) bool -> (C, H, W)."""
    if bool(valid.all()) or not bool(valid.any()):
        return image
    w = valid.to(image.dtype)[None]          # (1, H, W)
    x = image * w
    stack = [(x, w)]
    while min(x.shape[-2:]) > 1 and not bool((w > 0).all()):
        x = F.avg_pool2d(x[None], 2, ceil_mode=True)[0]
        w = F.avg_pool2d(w[None], 2, ceil_mode=True)[0]
        stack.append((x, w))
    x, w = stack[-1]
    out = x / w.clamp_min(1e-8)
    for x, w in reversed(stack[:-1]):
        up = F.interpolate(out[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        out = x + up * (1 - w)                # x is premultiplied by w: a soft mix at coarse levels
    return out
