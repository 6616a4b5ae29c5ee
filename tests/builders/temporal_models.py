"""A tiny temporal model of the streaming protocol (vsr_ddp.models.temporal), for tests: seeded
random conv weights, a window of ±1 frame and a recurrent state.

    h_t = decay * tanh(conv(x_{t-1}, x_t, x_{t+1}, h_{t-1}))     out_t = up2(x_t + h_t)

``recurrent=False``: h_{t-1} is always 0 (a window model). At a read range's start x_{-1} is
x_0 and h_{-1} is 0; at its end x_{t+1} is x_t. ``decay`` < 1
makes a state's past fade, so a warm-up of W frames brings a segment's state close to a
whole-video run's.

StubWindow: a batch-joint model of the window protocol, out_t = up2(0.75 x_t + 0.25 mean(window)),
so two windows never make the same output for a frame they share.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vsr_ddp.models.temporal import Reach

__all__ = ["StubTemporal", "StubWindow"]


class StubTemporal:
    scale = 2
    reach = Reach(before=1, after=1, recurrent=True, exact=True)

    def __init__(self, seed: int = 0, decay: float = 0.7, recurrent: bool = True):
        """``recurrent=False``: h_{t-1} is always 0, a window model of ±1 frame (exact)."""
        self.recurrent = recurrent
        if not recurrent:
            self.reach = Reach(before=1, after=1, recurrent=False, exact=True)
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, 12, 3, 3, generator=g) * 0.3  # (x_{t-1}, x_t, x_{t+1}, h) -> h
        self.decay = decay
        self.calls = []  # frames fed per call, for tests
        self.start()

    def to(self, device, dtype):
        return self

    def start(self) -> None:
        self.prev = None  # x_{t-1} of the next output (None: the first frame of the range)
        self.pending = []  # fed frames whose outputs are still owed, (3, H, W) float
        self.state = None

    def _step(self, cur, nxt):
        prev = cur if self.prev is None else self.prev
        state = torch.zeros_like(cur) if self.state is None or not self.recurrent else self.state
        x = torch.cat([prev, cur, nxt, state])[None]
        self.state = self.decay * torch.tanh(F.conv2d(x, self.weight, padding=1))[0]
        self.prev = cur
        y = F.interpolate((cur + self.state)[None], scale_factor=2, mode="nearest")[0]
        return (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def feed(self, frames: np.ndarray, last: bool) -> np.ndarray:
        self.calls.append(len(frames))
        self.pending += [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames]
        outs = []
        while len(self.pending) >= 2:
            outs.append(self._step(self.pending[0], self.pending[1]))
            self.pending.pop(0)
        if last and self.pending:
            outs.append(self._step(self.pending[0], self.pending[0]))
            self.pending.pop(0)
        if not outs:
            h, w = frames.shape[1:3]
            return np.empty((0, h * 2, w * 2, 3), np.uint8)
        return np.stack(outs)


class StubWindow:
    """A batch-joint stub (the window protocol): each output is its nearest-upsampled frame plus a
    term from the mean of the whole window, rounded; deterministic."""

    scale = 2

    def __init__(self, window: int = 5, crossfade: int = 2):
        self.reach = Reach(before=0, after=0, recurrent=False, exact=False, window=window,
                           crossfade=crossfade)
        self.calls = []  # frames per window run, for tests

    def to(self, device, dtype):
        return self

    def run(self, frames: np.ndarray) -> np.ndarray:
        assert 1 <= len(frames) <= self.reach.window, len(frames)
        self.calls.append(len(frames))
        x = frames.astype(np.float32)
        y = np.clip(np.rint(0.75 * x + 0.25 * x.mean(axis=0)), 0, 255).astype(np.uint8)
        return y.repeat(2, axis=1).repeat(2, axis=2)
