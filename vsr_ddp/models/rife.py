"""RIFE HDv3's IFNet (ECCV 2022 "Real-Time Intermediate Flow Estimation", model v3.x): the
published midpoint interpolator that ``python -m vsr_ddp.models fetch rife-hdv3`` brings.

Three IFBlocks refine a bidirectional flow and a blend mask coarse to fine (1/4, 1/2, 1/1 of
the frame, times ``scale``); each block runs on the pair both ways and averages the two
estimates. The module and attribute names are the published state dict's (``block0.conv0.0.0``,
...), so the weights load strictly; ``block_tea`` is the training-time teacher, loaded, unused.

``load_rife`` reads any RIFE checkpoint this project runs: this IFNet, or one of Practical-RIFE's
4.x IFNets (models/rife4.py, which take t as an input), told apart by keys and shapes.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .flow import warp


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.PReLU(cout))


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class IFBlock(nn.Module):
    def __init__(self, cin: int, c: int = 90):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, c // 2, 2), _conv(c // 2, c, 2))  # to 1/4 of its input
        self.convblock0 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock1 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock2 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock3 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.conv1 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.PReLU(c // 2),
                                   nn.ConvTranspose2d(c // 2, 4, 4, 2, 1))  # flow, both ways
        self.conv2 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.PReLU(c // 2),
                                   nn.ConvTranspose2d(c // 2, 1, 4, 2, 1))  # blend mask logit

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x # (B, 7, H, W): two images and the mask; flow # (B, 4, H, W) in pixels, at full size."""
        x = _resize(x, 1 / scale)
        flow = _resize(flow, 1 / scale) / scale
        feat = self.conv0(torch.cat((x, flow), 1))
        for block in (self.convblock0, self.convblock1, self.convblock2, self.convblock3):
            feat = block(feat) + feat
        return _resize(self.conv1(feat), scale) * scale, _resize(self.conv2(feat), scale)


class IFNet(nn.Module):
    takes_time = False  # the midpoint only

    def __init__(self):
        super().__init__()
        self.block0 = IFBlock(7 + 4)
        self.block1 = IFBlock(7 + 4)
        self.block2 = IFBlock(7 + 4)
        self.block_tea = IFBlock(10 + 4)

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """# (B, 3, H, W) float in [0, 1], H and W multiples of 32 / scale -> the midpoint frame
        (B, 3, H, W). ``scale`` < 1 estimates flow on a smaller picture (RIFE's --scale 0.5 for 4K)."""
        flow = img0.new_zeros(img0.shape[0], 4, *img0.shape[2:])  # (B, 4, H, W): 0 -> t, 1 -> t
        mask = img0.new_zeros(img0.shape[0], 1, *img0.shape[2:])
        warped0, warped1 = img0, img1
        for block, s in zip((self.block0, self.block1, self.block2), (4 / scale, 2 / scale, 1 / scale)):
            f0, m0 = block(torch.cat((warped0, warped1, mask), 1), flow, s)
            back = torch.cat((flow[:, 2:4], flow[:, :2]), 1)  # the same flow, seen from the other frame
            f1, m1 = block(torch.cat((warped1, warped0, -mask), 1), back, s)
            flow = flow + (f0 + torch.cat((f1[:, 2:4], f1[:, :2]), 1)) / 2
            mask = mask + (m0 - m1) / 2
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)

    def multiple(self, scale: float = 1.0) -> int:
        """H and W must be multiples of this (frames are padded to it): RIFE's own 32."""
        return max(32, int(32 / scale))


def read_state(path: Path) -> dict:
    """{key: tensor} of a RIFE checkpoint: safetensors, or RIFE's own ``flownet.pkl`` read
    weights-only; DataParallel's ``module.`` prefix removed. ValueError (one line) if unreadable."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, which would run code from the file
        raise ValueError(f"{path}: cannot read it as a weights-only PyTorch or safetensors file (not "
                         f"tensors only: a damaged file, or one that stores Python objects)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing problem
        raise ValueError(f"{path}: cannot read it as a weights-only PyTorch or safetensors file "
                         f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fits(net: nn.Module, shapes: dict) -> bool:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes


def identify(state: dict):
    """(variant, the network for it on the meta device, the state to load into it), or (None,
    None, None): ``state``'s keys and shapes are exactly those of this IFNet (``hdv3``) or of a
    Practical-RIFE 4.x layout (its family's name; training-only keys dropped)."""
    from .rife4 import TRAINING_ONLY, IFNet4, layout_of

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    with torch.device("meta"):
        if "block_tea.conv0.0.0.weight" in shapes:
            net = IFNet()
            return ("hdv3", net, state) if _fits(net, shapes) else (None, None, None)
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
        shapes = {k: shapes[k] for k in state}
        layout = layout_of(shapes)
        net = IFNet4(layout) if layout is not None else None
        if net is not None and _fits(net, shapes):
            return layout.name, net, state
    return None, None, None


def rife_variant(path: Path) -> str:
    """What a RIFE checkpoint is, from its keys and shapes alone: ``hdv3`` (this module's IFNet:
    three 11-channel IFBlocks of 90 features and a teacher), the Practical-RIFE 4.x family it
    belongs to (``4.6``, ``4.13-4.19/4.24``, ``4.25/4.26`` ...: models/rife4.py's table), else
    ``unknown``. Either of the first two loads strictly with ``load_rife``."""
    return identify(read_state(path))[0] or "unknown"


def load_rife(path: Path, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The network of a RIFE checkpoint (``rife_variant``): this module's IFNet (midpoint only)
    or a Practical-RIFE 4.x IFNet4 (``takes_time``), weights loaded strictly. A file that is
    neither: ValueError, one line naming it."""
    path = Path(path)
    state = read_state(path)
    variant, net, state = identify(state)
    if variant is None:
        raise ValueError(f"{path}: not a RIFE IFNet this version knows (RIFE HDv3, or Practical-RIFE "
                         f"4.0 - 4.26: its keys and shapes fit none of their layouts)")
    net.load_state_dict(state, strict=True, assign=True)  # the meta network takes the loaded tensors
    return net.float().eval().to(device)


def load_ifnet(path: Path, device: torch.device = torch.device("cpu")) -> IFNet:
    """IFNet with the weights of ``path``: safetensors (a fetched ``rife-hdv3``) or RIFE's own
    ``flownet.pkl`` (read weights-only), with or without DataParallel's ``module.`` prefix."""
    net = IFNet()
    net.load_state_dict(read_state(path), strict=True)
    return net.eval().to(device)
