"""RIFE HDv3's IFNet (ECCV 2022 "Real-Time Intermediate Flow Estimation", model v3.x): the
published midpoint interpolator that ``python -m vsr_ddp.models fetch rife-hdv3`` brings.

Three IFBlocks refine a bidirectional flow and a blend mask coarse to fine (1/4, 1/2, 1/1 of
the frame, times ``scale``); each block runs on the pair both ways and averages the two
estimates. The module and attribute names are the published state dict's (``block0.conv0.0.0``,
...), so the weights load strictly; ``block_tea`` is the training-time teacher, loaded, unused.
The package's ``load_rife`` builds it for a checkpoint with exactly these keys and shapes.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import resize, warp


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.PReLU(cout))


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
        x = resize(x, 1 / scale)
        flow = resize(flow, 1 / scale) / scale
        feat = self.conv0(torch.cat((x, flow), 1))
        for block in (self.convblock0, self.convblock1, self.convblock2, self.convblock3):
            feat = block(feat) + feat
        return resize(self.conv1(feat), scale) * scale, resize(self.conv2(feat), scale)


class IFNet(nn.Module):
    takes_time = False  # the midpoint only
    variant = "hdv3"  # what the package's identify names it
    description = "RIFE HDv3"

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
