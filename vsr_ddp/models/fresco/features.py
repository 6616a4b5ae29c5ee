"""FRESCO's feature optimization: decoder-block inputs pulled towards the input frames' flow
and self-similarity, through forward pre-hooks on ``unet.up_blocks``."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..flow import warp
from .attention import FrescoControl
from .guidance import Guidance


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
                (2 * ((c2 - warp(c1, bwd_flow, padding="zeros")).abs() * (1 - bwd_occ)
                      + (c1 - warp(c2, fwd_flow, padding="zeros")).abs() * (1 - fwd_occ)).mean()).backward()
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
