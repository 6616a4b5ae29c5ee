"""job=upscale: Real-ESRGAN-family super-resolution (any checkpoint spandrel loads) or
classical lanczos/bicubic, frame by frame."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..models.sr import CLASSICAL, Upscaler


class UpscaleJob:
    name = "upscale"
    uses_context = False  # single-image SR: each frame stands alone

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.upscaler: Upscaler | None = None

    def setup(self) -> None:
        c = self.cfg
        self.upscaler = Upscaler(str(c.model), device=self.device, scale=c.scale, outscale=c.outscale,
                                 tile=c.tile, tile_pad=c.tile_pad, precision=c.precision,
                                 batch_size=c.batch_size)

    def tag(self) -> str:
        s = self.upscaler.outscale or self.upscaler.scale
        return f"{s:g}x"

    def settings(self) -> dict:
        c, up = self.cfg, self.upscaler
        model = str(c.model)
        if model not in CLASSICAL:
            st = os.stat(Path(model).expanduser())
            model = f"{Path(model).expanduser().resolve()}:{st.st_size}:{int(st.st_mtime)}"
        return {"job": self.name, "model": model, "scale": up.scale, "outscale": up.outscale,
                # tiling and precision change pixels only at noise level, but they do change them
                "tile": c.tile, "tile_pad": c.tile_pad, "dtype": str(up.dtype)}

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return self.upscaler.output_size(width, height)

    def process(self, frames: np.ndarray) -> np.ndarray:
        return self.upscaler(frames)  # (B, H, W, 3) -> (B, H*s, W*s, 3) uint8
