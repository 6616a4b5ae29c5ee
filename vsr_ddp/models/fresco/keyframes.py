"""FRESCO's working size and keyframes: which frames are translated, in which batches."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def work_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """FRESCO's ``resize_image``: short side to ``short_side``, both sides rounded to multiples of 64."""
    k = short_side / min(width, height)
    return max(64, int(round(width * k / 64)) * 64), max(64, int(round(height * k / 64)) * 64)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """# (T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with (w, h) = size; Lanczos up, area down (as FRESCO)."""
    import cv2

    w, h = size
    if frames.shape[1:3] == (h, w):
        return frames
    interp = cv2.INTER_LANCZOS4 if w * h > frames.shape[1] * frames.shape[2] else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def frame_differences(frames: Iterable[np.ndarray]) -> np.ndarray:
    """FRESCO's keyframe cue: MSE between consecutive frames after a 9x9 Gaussian blur, on a
    [-1, 1] scale. T frames (H, W, 3) uint8, an array or a stream holding one frame at a time
    -> (T,) float64, d[i] between frames i-1 and i, d[0] = 0."""
    import cv2

    out: list[float] = []
    prev = None
    for f in frames:
        cur = cv2.GaussianBlur(f, (9, 9), 0).astype(np.float32) / 127.5 - 1
        out.append(0.0 if prev is None else float(np.mean((cur - prev) ** 2)))
        prev = cur
    return np.array(out, dtype=np.float64)


def select_keyframes(frames: int, min_interval: int, max_interval: int,
                     differences: np.ndarray | None = None) -> list[int]:
    """FRESCO's ``get_keyframe_ind``. Equal intervals: every ``min_interval``-th frame from 0.
    Otherwise frames 0 and T-1, then, while two neighbouring keys are more than ``max_interval``
    apart, the frame with the largest difference to its predecessor that is at least
    ``min_interval`` from the ends and from every key chosen so far (``differences`` from
    :func:`frame_differences`)."""
    if min_interval < 1 or max_interval < min_interval:
        raise ValueError(f"keyframe intervals need 1 <= min ({min_interval}) <= max ({max_interval})")
    if min_interval == max_interval:
        return list(range(0, frames, min_interval))
    if frames <= 1:
        return [0]
    if differences is None or len(differences) != frames:
        raise ValueError("select_keyframes: min_interval < max_interval needs one difference per frame")
    err = np.array(differences, dtype=np.float64)
    err[:min_interval] = -1
    err[-min_interval:] = -1
    keys = [0, frames - 1]
    while max(b - a for a, b in zip(keys, keys[1:])) > max_interval:
        i = int(np.argmax(err))
        if err[i] == -1:
            break
        err[max(0, i - min_interval):i + min_interval] = -1
        keys = sorted(keys + [i])
    return keys


def keyframe_batches(keys: list[int], batch_size: int) -> list[list[int]]:
    """FRESCO's batches: the first holds ``batch_size`` keys, each later one ``batch_size - 2``
    (it is run after key 0 and the previous batch's last key); a last batch of fewer than three
    borrows from the one before."""
    if batch_size < 3:
        raise ValueError(f"job.batch_size must be >= 3 (two reference keys + one new), not {batch_size}")
    keys = list(keys)
    step = batch_size - 2
    batches = [keys[i:i + step] for i in range(2, len(keys), step)] or [[]]
    batches[0][:0] = keys[:2]
    if len(batches) > 1 and len(batches[-1]) < 3:
        add = 3 - len(batches[-1])
        batches[-1] = batches[-2][-add:] + batches[-1]
        batches[-2] = batches[-2][:-add]
    return [b for b in batches if b]  # FRESCO's borrowing can empty a batch when batch_size < 5
