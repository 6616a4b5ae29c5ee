"""FRESCO's correspondences from one batch's input frames: flows and occlusions
(:mod:`vsr_ddp.models.flow`), the cross-frame attention masks and the token trajectories of
temporal attention."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..flow import consistency_occlusions, cyclic_flows


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
    fwd, bwd = cyclic_flows(frames, device=device)
    images = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
    fwd_occ, bwd_occ = consistency_occlusions(fwd, bwd, images)
    masks = {h * w: cross_frame_mask(bwd_occ, (h, w)) for h, w in token_sizes}
    paths = {}
    if temporal:
        signed = images / 127.5 - 1
        paths = {h * w: trajectories(bwd, bwd_occ, signed, (h, w)) for h, w in token_sizes}
    return Guidance(fwd, bwd, fwd_occ, bwd_occ, masks, paths)
