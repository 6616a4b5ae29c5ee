"""The ControlNet's condition images: canny, HED or depth maps of the input frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ANNOTATOR_FILES = {"hed": "ControlNetHED.pth", "depth": "dpt_hybrid-midas-501f0c75.pt"}
ANNOTATOR_SOURCE = "https://huggingface.co/lllyasviel/Annotators"


class ControlMaps:
    """The ControlNet's condition image of a frame: ``canny`` (cv2.Canny, no weights), ``hed`` or
    ``depth`` (controlnet-aux, weights from the local folder ``annotator``)."""

    def __init__(self, kind: str, annotator: str | None = None, device: torch.device = torch.device("cpu"),
                 canny_low: int = 50, canny_high: int = 100):
        if kind not in ("canny", "hed", "depth"):
            raise ValueError(f"job.control must be canny, hed or depth, not {kind!r}")
        self.kind, self.low, self.high = kind, int(canny_low), int(canny_high)
        self.detector = None
        if kind != "canny":
            folder = Path(str(annotator or "")).expanduser()
            weights = folder / ANNOTATOR_FILES[kind]
            if not annotator or not weights.is_file():
                raise ValueError(f"job.control={kind} needs {ANNOTATOR_FILES[kind]} in job.annotator"
                                 f"{'=' + str(folder) if annotator else ' (not set)'}: download it from "
                                 f"{ANNOTATOR_SOURCE} into a local folder and pass that folder")
            if kind == "hed":
                from controlnet_aux.hed import HEDdetector

                self.detector = HEDdetector.from_pretrained(str(folder)).to(device)
            else:
                from controlnet_aux.midas import MidasDetector

                self.detector = MidasDetector.from_pretrained(str(folder)).to(device)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """# (H, W, 3) uint8 RGB -> (H, W, 3) uint8 condition image."""
        import cv2

        h, w = frame.shape[:2]
        if self.kind == "canny":
            edges = cv2.Canny(frame, self.low, self.high)
            return np.repeat(edges[:, :, None], 3, axis=2)
        out = self.detector(frame, detect_resolution=min(h, w), image_resolution=min(h, w), output_type="np")
        out = np.asarray(out[0] if isinstance(out, tuple) else out)
        if out.ndim == 2:
            out = np.repeat(out[:, :, None], 3, axis=2)
        return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR) if out.shape[:2] != (h, w) else out
