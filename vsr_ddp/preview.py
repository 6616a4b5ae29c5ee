"""Side-by-side previews of an upscale: input crop | bicubic | model, one PNG.

    from vsr_ddp.preview import write_preview
    write_preview(lr_frame, model_frame, "preview.png")            # central crop of the input
    write_preview(lr_frame, model_frame, "preview.png", crop=(x, y, w, h))

The three panels show the same region at output size: the input crop nearest-upscaled (its pixels
as they are), the bicubic upscale of that crop, and the model output over that crop. A label bar of
LABEL_H px sits above the panels and GAP px of white separate them, so a crop of (w, h) input pixels
at scale s gives a PNG of (LABEL_H + h*s) x (3*w*s + 2*GAP).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write_bytes

LABEL_H = 22  # px of label bar above the panels
GAP = 4  # px of white between panels
MAX_CROP = 160  # default crop side limit, in input pixels
LABELS = ("input (nearest)", "bicubic", "model")


def default_crop(width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h): the central half of the input in each direction, at most MAX_CROP px a side."""
    w = max(1, min(MAX_CROP, width // 2 or width))
    h = max(1, min(MAX_CROP, height // 2 or height))
    return (width - w) // 2, (height - h) // 2, w, h


def _to_8bit(frame: np.ndarray) -> np.ndarray:
    """uint16 (a 10-bit video's frames, full 16-bit scale) -> uint8; uint8 as it is."""
    if frame.dtype == np.uint16:
        return ((frame.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return frame


def write_preview(lr_frame: np.ndarray, model_frame: np.ndarray, path, crop=None,
                  labels=LABELS, sar=1) -> Path:
    """Write the PNG preview and return its path.

    lr_frame: # (H, W, 3) uint8 RGB, the model's input. model_frame: # (H', W', 3) uint8 RGB, its
    output (any scale, integer or not). crop: (x, y, w, h) in input pixels; default: default_crop.
    sar: the video's pixel aspect (64/45 for a 16:9 PAL DVD): panels are widened by it so the
    PNG (square pixels) shows the picture as a player does.
    """
    lr_frame, model_frame = _to_8bit(np.asarray(lr_frame)), _to_8bit(np.asarray(model_frame))
    if lr_frame.ndim != 3 or lr_frame.shape[2] != 3 or model_frame.ndim != 3 or model_frame.shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) RGB; got {lr_frame.shape} and {model_frame.shape}")
    H, W = lr_frame.shape[:2]
    x, y, w, h = crop if crop is not None else default_crop(W, H)
    x, y = max(0, min(int(x), W - 1)), max(0, min(int(y), H - 1))
    w, h = max(1, min(int(w), W - x)), max(1, min(int(h), H - y))
    sy, sx = model_frame.shape[0] / H, model_frame.shape[1] / W
    ox0, oy0 = int(round(x * sx)), int(round(y * sy))
    ox1, oy1 = int(round((x + w) * sx)), int(round((y + h) * sy))
    size = (ox1 - ox0, oy1 - oy0)  # cv2 order: (width, height)

    piece = np.ascontiguousarray(lr_frame[y:y + h, x:x + w])
    panels = [cv2.resize(piece, size, interpolation=cv2.INTER_NEAREST),
              cv2.resize(piece, size, interpolation=cv2.INTER_CUBIC),
              np.ascontiguousarray(model_frame[oy0:oy1, ox0:ox1])]

    if sar != 1:
        size = (max(1, round(size[0] * float(sar))), size[1])
        panels = [cv2.resize(p, size, interpolation=cv2.INTER_NEAREST if i == 0 else cv2.INTER_CUBIC)
                  for i, p in enumerate(panels)]
    pw, ph = size
    canvas = np.full((LABEL_H + ph, 3 * pw + 2 * GAP, 3), 255, np.uint8)  # (H, W, 3) RGB
    canvas[:LABEL_H] = 40
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x0 = i * (pw + GAP)
        canvas[LABEL_H:, x0:x0 + pw] = panel
        cv2.putText(canvas, str(label), (x0 + 4, LABEL_H - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", canvas[:, :, ::-1])
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write_bytes(path, png.tobytes())
    return path
