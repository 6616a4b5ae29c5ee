"""AnimeSR (TencentARC, NeurIPS 2022; v1 and v2 share one network): x4 anime video super-resolution
with a unidirectional recurrent cell over a sliding window of three frames, run as a stream.

The network is MSRSWVSR (multi-scale, recurrent, sliding window), written here from the published
architecture with the module and parameter names of the published checkpoints (AnimeSR_v1-PaperModel.pth,
AnimeSR_v2.pth: ``params`` / ``params_ema`` or a raw state dict), so that they load strictly.
Each output frame t is ``cell(frame t-1, frame t, frame t+1, output t-1, hidden state t-1)``; the
first frame of a read range stands in for its own previous neighbour (output and state start at
zero) and the last for its own next one: AnimeSR's edge rule.

Frames whose height or width is not a multiple of 4 are padded on the bottom and right by
replicating the edge pixels (the padding ccrestoration's MSRSWVSR uses; reflect would need the
pad to be smaller than the frame, and the net's stride-2 convolutions see the same edge either
way), and the x4 output is cropped back to exactly 4H x 4W: no pixel of the input is dropped
(AnimeSR's own inference script crops each frame to a multiple of 4 instead).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_FEAT = 64
NUM_BLOCK = (5, 3, 2)
SCALE = 4
MULTIPLE = 4  # the cell downsamples twice by 2: frames are padded to a multiple of 4

# keys that only an AnimeSR (MSRSWVSR) state dict has, all of them: what looks_like_animesr checks
_SIGNATURE = ("recurrent_cell.conv_s1_first.0.weight", "recurrent_cell.conv_s2_first.0.weight",
              "recurrent_cell.conv_s4_first.0.weight", "recurrent_cell.body_s4_first.0.conv1.weight",
              "recurrent_cell.fusion.0.weight", "recurrent_cell.fusion.2.weight")


class ResidualBlockNoBN(nn.Module):
    def __init__(self, num_feat: int = NUM_FEAT):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _conv_lrelu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.LeakyReLU(0.1, inplace=True))


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class RightAlignMSConvResidualBlocks(nn.Module):
    """Residual blocks at scales 1, 1/2 and 1/4, right-aligned: the coarser scales start later and
    each feeds its upsampled features into the finer ones; the three are fused at the end."""

    def __init__(self, num_in_ch: int, num_state_ch: int = NUM_FEAT, num_out_ch: int = NUM_FEAT,
                 num_block: tuple[int, int, int] = NUM_BLOCK):
        super().__init__()
        if not (len(num_block) == 3 and num_block[0] >= num_block[1] >= num_block[2]):
            raise ValueError(f"num_block must be 3 non-increasing counts, not {num_block}")
        self.num_block = tuple(num_block)
        self.conv_s1_first = _conv_lrelu(num_in_ch, num_state_ch, 1)
        self.conv_s2_first = _conv_lrelu(num_state_ch, num_state_ch, 2)
        self.conv_s4_first = _conv_lrelu(num_state_ch, num_state_ch, 2)
        self.body_s1_first = nn.ModuleList(ResidualBlockNoBN(num_state_ch) for _ in range(num_block[0]))
        self.body_s2_first = nn.ModuleList(ResidualBlockNoBN(num_state_ch) for _ in range(num_block[1]))
        self.body_s4_first = nn.ModuleList(ResidualBlockNoBN(num_state_ch) for _ in range(num_block[2]))
        self.fusion = nn.Sequential(
            nn.Conv2d(3 * num_state_ch, 2 * num_out_ch, 3, 1, 1, bias=True),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(2 * num_out_ch, num_out_ch, 3, 1, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv_s1_first(x)
        x2 = self.conv_s2_first(x1)
        x4 = self.conv_s4_first(x2)
        n1, n2, n4 = self.num_block
        s2_on = s4_on = False
        for i in range(n1):
            inp = x1
            if s2_on:
                inp = inp + _up(x2, 2)
            if s4_on:
                inp = inp + _up(x4, 4)
            x1 = self.body_s1_first[i](inp)
            if i >= n1 - n2:
                x2 = self.body_s2_first[i - n1 + n2](x2 + _up(x4, 2) if s4_on else x2)
                s2_on = True
            if i >= n1 - n4:
                x4 = self.body_s4_first[i - n1 + n4](x4)
                s4_on = True
        return self.fusion(torch.cat((x1, _up(x2, 2), _up(x4, 4)), dim=1))


class MSRSWVSR(nn.Module):
    """AnimeSR's network: one step of the recurrence is :meth:`cell`."""

    def __init__(self, num_feat: int = NUM_FEAT, num_block: tuple[int, int, int] = NUM_BLOCK,
                 netscale: int = SCALE):
        super().__init__()
        self.num_feat = num_feat
        self.netscale = netscale
        # previous, current and next frame; the previous output, unshuffled to LR size; hidden state
        hr = 3 * netscale * netscale  # an RGB frame at s*h x s*w, unshuffled to h x w
        self.recurrent_cell = RightAlignMSConvResidualBlocks(3 * 3 + hr + num_feat, num_feat, num_feat + hr,
                                                             num_block)

    def cell(self, x: torch.Tensor, fb: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 9, h, w) previous, current, next frame; fb: (B, 3, s*h, s*w) the previous output;
        state: (B, num_feat, h, w). Returns this frame's output and the next state."""
        s = self.netscale
        out = self.recurrent_cell(torch.cat((x, F.pixel_unshuffle(fb, s), state), dim=1))
        img = F.pixel_shuffle(out[:, : 3 * s * s], s) + _up(x[:, 3:6], s)
        return img, F.leaky_relu(out[:, 3 * s * s:], 0.1)


class _LazyReach:
    """AnimeSR.reach, made on first use: vsr_ddp.models.temporal (Reach) is imported only then."""

    def __get__(self, obj, owner=None):
        from .temporal import Reach

        return Reach(before=1, after=1, recurrent=True, exact=True, align=1)


class AnimeSR:
    """The streaming wrapper: :meth:`start` a read range, then :meth:`feed` its frames in order,
    in pieces of any size; the outputs equal one call over the whole range, bit for bit."""

    scale = SCALE  # per instance: the network's netscale (4 published, 2 for a reduced model)
    deep_frames = True  # feed takes uint16 frames too (a 10-bit video stays 10-bit)
    reach = _LazyReach()  # Reach(before=1, after=1, recurrent=True, exact=True, align=1)

    def __init__(self, net: MSRSWVSR, preroll: int = 0):
        self.net = net.eval().requires_grad_(False)
        # frames the recurrence runs on a range's first frame held still before that frame's own
        # output (outputs dropped): the edge rule (the first frame stands in for the missing past)
        # applied to the state, which then starts settled instead of from zeros. 0 = AnimeSR's own
        # cold start (the published checkpoints); the shipped default-temporal model says 8.
        self.preroll = int(preroll)
        self.scale = net.netscale  # 4 for the published checkpoints
        self.device = next(net.parameters()).device
        self.dtype = next(net.parameters()).dtype
        self.start()

    def to(self, device, dtype: torch.dtype = torch.float32) -> "AnimeSR":
        self.device, self.dtype = torch.device(device), dtype
        self.net.to(device=self.device, dtype=dtype)
        self.start()
        return self

    def start(self) -> None:
        """Forget all state: the next frame fed is the first of a read range."""
        self._prev = None     # (1, 3, Hp, Wp) the frame before the pending one
        self._pending = None  # (1, 3, Hp, Wp) the frame whose next neighbour is not fed yet
        self._out = None      # (1, 3, sHp, sWp) the previous output, uncropped
        self._state = None    # (1, num_feat, Hp, Wp)
        self._shape = None    # (H, W, numpy dtype) of the range's frames

    @torch.inference_mode()
    def feed(self, frames: np.ndarray, last: bool) -> np.ndarray:
        """frames: (B, H, W, 3) uint8 or uint16, the next frames of the read range. Returns
        (n, sH, sW, 3) of the same dtype (s = :attr:`scale`): the outputs of every frame whose next
        neighbour has now
        been fed (with ``last``, of all frames still owed); then, after ``last``, the range is over."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"AnimeSR.feed takes (B, H, W, 3) uint8 or uint16 frames, not "
                             f"{frames.shape} {frames.dtype}")
        h, w = frames.shape[1:3]
        if self._shape is None:
            self._shape = (h, w, frames.dtype)
        elif len(frames) and self._shape != (h, w, frames.dtype):
            raise ValueError(f"AnimeSR.feed: {h}x{w} {frames.dtype} frames after "
                             f"{self._shape[0]}x{self._shape[1]} {self._shape[2]} ones in one read range; "
                             "call start() first")
        h, w, dtype = self._shape
        peak = 65535 if dtype == np.uint16 else 255
        outs = []
        if len(frames):
            x = torch.from_numpy(np.ascontiguousarray(frames))
            if dtype == np.uint16:
                x = x.to(torch.int32)  # torch's uint16 lacks most kernels
            x = x.to(self.device).permute(0, 3, 1, 2).to(self.dtype).div_(peak)  # (B, 3, H, W)
            ph, pw = -h % MULTIPLE, -w % MULTIPLE
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            for i in range(len(x)):
                frame = x[i:i + 1]
                if self._pending is not None:
                    outs.append(self._step(frame))
                else:  # the first frame of the range: its own previous neighbour
                    self._prev = self._pending = frame
                    for _ in range(self.preroll):  # held still: window (frame, frame, frame)
                        self._step(frame)
                self._pending = frame
        if last:
            if self._pending is not None:
                outs.append(self._step(self._pending))  # the last frame: its own next neighbour
            self.start()
        if not outs:
            return np.zeros((0, h * self.scale, w * self.scale, 3), dtype=dtype)
        y = torch.cat(outs)[..., : h * self.scale, : w * self.scale]
        # rounded once, in float32 (as sr.Upscaler does)
        y = y.float().clamp_(0, 1).mul_(peak).round_()
        y = y.to(torch.uint8 if peak == 255 else torch.int32).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return y.astype(np.uint16) if peak != 255 else y

    def _step(self, nxt: torch.Tensor) -> torch.Tensor:
        """The output of the pending frame given its next neighbour; advances the window."""
        cur = self._pending
        if self._out is None:
            _, _, hp, wp = cur.shape
            self._out = cur.new_zeros(1, 3, hp * self.scale, wp * self.scale)
            self._state = cur.new_zeros(1, self.net.num_feat, hp, wp)
        window = torch.cat((self._prev, cur, nxt), dim=1)  # (1, 9, Hp, Wp)
        self._out, self._state = self.net.cell(window, self._out, self._state)
        self._prev = cur
        return self._out


def _unwrap(state):
    if isinstance(state, dict):
        for key in ("params_ema", "params"):
            if isinstance(state.get(key), dict):
                return state[key]
    return state


def looks_like_animesr(state) -> bool:
    """Whether a checkpoint (raw state dict, or one under ``params_ema`` / ``params``) is AnimeSR's."""
    state = _unwrap(state)
    return isinstance(state, dict) and all(k in state for k in _SIGNATURE)


def _shape_of(state: dict) -> dict:
    """MSRSWVSR's num_feat, num_block and netscale as read from a state dict's shapes (the published
    64 / (5, 3, 2) / 4 where they cannot be read); load_animesr then still checks every key and shape."""
    try:
        num_feat = int(state["recurrent_cell.conv_s1_first.0.weight"].shape[0])
        hr = int(state["recurrent_cell.fusion.2.weight"].shape[0]) - num_feat  # 3 * netscale^2
        netscale = round((hr / 3) ** 0.5)
        blocks = tuple(len({k.split(".")[2] for k in state
                            if k.startswith(f"recurrent_cell.body_s{s}_first.")}) for s in (1, 2, 4))
        if num_feat < 1 or netscale < 1 or 3 * netscale * netscale != hr \
                or not (blocks[0] >= blocks[1] >= blocks[2]):
            raise ValueError
        return {"num_feat": num_feat, "num_block": blocks, "netscale": netscale}
    except (KeyError, IndexError, ValueError, AttributeError):
        return {}


def load_animesr(path, device="cpu", state: dict | None = None) -> AnimeSR:
    """AnimeSR from a checkpoint file (read without unpickling code), strictly, on ``device`` in fp32;
    a file that does not fit raises a one-line ModelError (a ValueError) naming it. ``state``: the
    file's contents when the caller has read them already (not read again). A safetensors file may
    name its :attr:`AnimeSR.preroll` in its header's metadata (``"preroll"``; 0 where absent)."""
    from .sr import ModelError, load_state_dict, shapes_of, state_mismatch

    path = Path(path)
    state = _unwrap(load_state_dict(path) if state is None else state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"job.model: {path} is not an AnimeSR checkpoint (not a state dict of tensors)")
    net = MSRSWVSR(**_shape_of(state))
    why = state_mismatch(shapes_of(net), shapes_of(state))
    if why:
        raise ModelError(f"job.model: {path} does not fit AnimeSR's network ({why})")
    net.load_state_dict(state, strict=True)
    return AnimeSR(net, preroll=_preroll(path)).to(device, torch.float32)


def _preroll(path: Path) -> int:
    """The ``preroll`` a safetensors checkpoint's metadata names (vsr_ddp's trained models), else 0."""
    if path.suffix != ".safetensors":
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return max(0, int(meta.get("preroll", 0)))
    except ValueError:
        return 0
