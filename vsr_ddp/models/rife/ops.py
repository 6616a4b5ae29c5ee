"""What RIFE HDv3 and Practical-RIFE 4.x both use: bilinear resizing of pictures and flow, and the
backward warp (models/flow.py's) that moves a frame along a flow."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..flow import warp

__all__ = ["resize", "warp"]


def resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    """# (B, C, H, W) -> (B, C, H * factor, W * factor), bilinear as RIFE's code (x itself at 1)."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
