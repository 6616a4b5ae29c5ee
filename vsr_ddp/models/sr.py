"""Super-resolution models: any checkpoint spandrel loads, or classical lanczos/bicubic.

An upscaler maps a batch of frames # (B, H, W, 3) uint8 on the host to # (B, H*s, W*s, 3) uint8
on the host. Tiling, precision, outscale and CUDA out-of-memory recovery live here.
"""
from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CLASSICAL = ("lanczos", "bicubic")
# job.model=default: the small x2 model shipped in the package (vsr_ddp/train_default.py made it);
# job.model=default-temporal: its recurrent sibling (AnimeSR's network, vsr_ddp/train_temporal.py).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "compact_x2.safetensors"
DEFAULT_TEMPORAL = DEFAULT_MODEL.with_name("temporal_x2.safetensors")


WEIGHTS_HELP = ("Real-ESRGAN's weights by name: `python -m vsr_ddp.models fetch realesrgan-x4plus` "
                "(also realesrgan-x4plus-anime, realesr-animevideov3), then job.model=realesrgan-x4plus; by "
                "path, any checkpoint spandrel supports (Real-ESRGAN's .pth files: "
                "https://github.com/xinntao/Real-ESRGAN/releases)")


class ModelError(ValueError):
    """A model that cannot be used; raised before any work starts."""


def model_path(model: str, models_dir: str | Path | None = None) -> Path:
    """The checkpoint file ``job.model`` names: ``default`` or ``default-temporal`` (the shipped
    models), a published model's name (from the model folder, never downloaded here), or a path."""
    from . import published

    if model == "default":
        return DEFAULT_MODEL
    if model == "default-temporal":
        return DEFAULT_TEMPORAL
    if model in published.MODELS:
        if not published.MODELS[model].scale:
            raise ModelError(f"job.model={model} is a frame interpolation model (job=interpolate), "
                             f"not an upscaler")
        try:
            return published.weights_path(model, published.models_dir(models_dir))
        except FileNotFoundError as e:
            raise ModelError(f"job.model: {e}") from None
    return Path(model).expanduser()


def read_weights(path: Path, what: str, help: str = "") -> dict:
    """A checkpoint file's contents without unpickling code: safetensors, or
    torch.load(weights_only=True). A missing or unreadable file: ModelError, one line naming
    ``what`` (e.g. "job.model"), the file and the cause, then ``help``."""
    tail = f" {help}" if help else ""
    if not path.is_file():
        raise ModelError(f"{what}: {path} does not exist.{tail}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, which would run code from the file
        raise ModelError(f"{what}: cannot read {path} (not a tensors-only PyTorch checkpoint: a damaged "
                         f"file, or one that stores Python objects).{tail}") from None
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise ModelError(f"{what}: cannot read {path} ({first}).{tail}") from None


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def state_mismatch(expected: dict, got: dict) -> str:
    """How a checkpoint's {key: shape} ``got`` misses a network's {key: shape} ``expected``, in one
    line ("" when they fit): the first missing, unexpected and mis-shaped keys, sorted, a mis-shaped
    one with its shape in the file and the network's, e.g. "wrong shape a.bias (4,) for (3,)"."""
    expected = {k: tuple(v) for k, v in expected.items()}
    got = {k: tuple(v) for k, v in got.items()}
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    wrong = sorted(k for k in set(expected) & set(got) if got[k] != expected[k])
    shapes = [f"{k} {got[k]} for {expected[k]}" for k in wrong[:3]]
    more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
    return "; ".join(p for p in (
        f"missing {_first(missing)}" if missing else "",
        f"unexpected {_first(extra)}" if extra else "",
        f"wrong shape {', '.join(shapes)}{more}" if wrong else "") if p)


def shapes_of(module_or_state) -> dict:
    """{key: shape} of a module's state dict, or of a state dict of tensors."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: tuple(v.shape) for k, v in state.items()}


def load_state_dict(path: Path) -> dict:
    """``job.model``'s weights (:func:`read_weights`; the error says where to get weights)."""
    return read_weights(path, "job.model", WEIGHTS_HELP)


def load_descriptor(path: Path):
    """The spandrel ImageModelDescriptor of a checkpoint file, on the CPU."""
    import spandrel

    state = load_state_dict(path)
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except Exception as e:  # noqa: BLE001 - spandrel raises several types for unknown layouts
        raise ModelError(f"job.model: {path} is not a super-resolution checkpoint spandrel knows ({e}). "
                         f"{WEIGHTS_HELP}") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise ModelError(f"job.model: {path} is a {desc.architecture.name} model, "
                         f"not an image-to-image model")
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise ModelError(f"job.model: {path} takes {desc.input_channels} and gives {desc.output_channels} "
                         "channels; only RGB models are supported")
    return desc


def pick_dtype(precision: str, device: torch.device, supports_half: bool, supports_bf16: bool) -> torch.dtype:
    if precision == "fp32" or device.type != "cuda":
        if precision in ("fp16", "bf16") and device.type != "cuda":
            log.warning("job.precision=%s needs CUDA; using fp32 on %s", precision, device)
        return torch.float32
    if precision == "fp16" or (precision == "auto" and supports_half):
        if not supports_half:
            log.warning("this model does not support fp16; using it anyway as asked")
        return torch.float16
    if precision == "bf16" or (precision == "auto" and supports_bf16):
        return torch.bfloat16
    return torch.float32


def final_size(width: int, height: int, scale: float, outscale: float | None) -> tuple[int, int]:
    """Output size for a model of ``scale`` and an optional different final ``outscale``."""
    s = outscale or scale
    return int(round(width * s)), int(round(height * s))


class Upscaler:
    """A loaded model with its device, precision and tiling settings."""

    # Library defaults for direct callers (benchmarks, tests, notebooks): Real-ESRGAN's video script's
    # own. job=upscale passes every one of them from its job.* keys (conf/job/upscale.yaml).
    def __init__(self, model: str, *, device: torch.device, scale: float | None = None,
                 outscale: float | None = None, tile: int = 0, tile_pad: int = 10,
                 precision: str = "auto", batch_size: int = 4, compile: bool = False,
                 models_dir: str | Path | None = None):
        self.device = device
        self.tile = int(tile or 0)
        self.tile_pad = int(tile_pad)
        self.batch_size = max(1, int(batch_size))
        self.model_name = model
        if model in CLASSICAL:
            if not scale or scale <= 0:
                raise ModelError(f"job.model={model} needs job.scale (e.g. job.scale=2)")
            self.net = None
            self.path = None
            self.scale = float(scale)
            self.dtype = None
        else:
            self.path = model_path(model, models_dir)
            desc = load_descriptor(self.path)
            if scale and float(scale) != desc.scale:
                raise ModelError(f"job.scale={scale} but {model} is a x{desc.scale} model; "
                                 f"use job.outscale={scale} to resize its output")
            self.scale = float(desc.scale)
            self.dtype = pick_dtype(precision, device, desc.supports_half, desc.supports_bfloat16)
            self.size_req = desc.size_requirements
            self.net = desc.model.eval().to(device=device, dtype=self.dtype)
            # spandrel's own call for the architecture (IPT scales its input, MMRealSR returns a
            # tuple); works on the compiled module too
            self.call = getattr(desc, "_call_fn", None) or (lambda net, x: net(x))
            if device.type == "cuda":
                self.net = self.net.to(memory_format=torch.channels_last)
            if compile:
                # Shapes repeat (same frame size, same batch) so one compile serves the whole run;
                # the last, shorter batch of a segment costs one recompile.
                self.net = torch.compile(self.net)
            log.info("loaded %s: %s x%d, %s on %s", model, desc.architecture.name, desc.scale,
                     str(self.dtype).replace("torch.", ""), device)
        self.outscale = float(outscale) if outscale and float(outscale) != self.scale else None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return final_size(width, height, self.scale, self.outscale)

    # -- the per-batch work ---------------------------------------------------------------------
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """# (B, H, W, 3) uint8 -> (B, H', W', 3) uint8, H', W' = output_size."""
        if self.net is None:
            return self._classical(frames)
        outs = [self._run_with_oom_fallback(frames[i:i + self.batch_size])
                for i in range(0, len(frames), self.batch_size)]
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _classical(self, frames: np.ndarray) -> np.ndarray:
        import cv2

        interp = cv2.INTER_LANCZOS4 if self.model_name == "lanczos" else cv2.INTER_CUBIC
        _, h, w, _ = frames.shape
        size = self.output_size(w, h)
        return np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])

    def _run_with_oom_fallback(self, frames: np.ndarray) -> np.ndarray:
        """On CUDA out-of-memory: halve the batch, then tile with shrinking tiles. Every frame
        still comes out exactly once; only when a 32-px tile does not fit is it an error."""
        try:
            return self._infer(frames, self.tile)
        except torch.cuda.OutOfMemoryError:
            pass  # the failed attempt's tensors live until the handler ends: free the cache after it
        torch.cuda.empty_cache()
        if len(frames) > 1:
            half = len(frames) // 2
            self.batch_size = max(1, half)
            log.warning("CUDA out of memory: batch size now %d", self.batch_size)
            return np.concatenate([self._run_with_oom_fallback(frames[:half]),
                                   self._run_with_oom_fallback(frames[half:])])
        tile = self.tile // 2 if self.tile else 512
        while tile >= 32:
            log.warning("CUDA out of memory at batch 1: tiling with %d-px tiles", tile)
            try:
                out = self._infer(frames, tile)
            except torch.cuda.OutOfMemoryError:
                pass  # as above: free the cache once the handler has let go of the failed attempt
            else:
                self.tile = tile
                return out
            torch.cuda.empty_cache()
            tile //= 2
        raise RuntimeError("CUDA out of memory even with batch 1 and 32-px tiles")

    @torch.inference_mode()
    def _infer(self, frames: np.ndarray, tile: int) -> np.ndarray:
        peak = 65535 if frames.dtype == np.uint16 else 255  # 16-bit frames of a 10-bit video
        x = torch.from_numpy(frames)  # (B, H, W, 3) uint8 or uint16, host
        if self.device.type == "cuda":
            # pinned (page-locked) memory: an async copy, and a quarter of the bytes of float
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.dtype).div_(peak)  # (B, 3, H, W) float in [0, 1]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = self._tiled(x, tile) if tile else self._forward(x)  # (B, 3, H*s, W*s)
        if self.outscale:
            h, w = frames.shape[1:3]
            ow, oh = self.output_size(w, h)
            y = F.interpolate(y.float(), size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)
        # uint8 on the device (1/4 of the copy back), rounded once, in float32: fp16/bf16 would
        # round x255 to their own grid first and leave some pixels a level off
        y = y.float().clamp_(0, 1).mul_(peak).round_()
        if peak == 255:
            y = y.to(torch.uint8)
            return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H', W', 3) uint8
        y = y.to(torch.int32)  # torch's uint16 lacks most kernels: int32 on the device, uint16 on the host
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.uint16)  # (B, H', W', 3) uint16

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the net, padding to the architecture's size multiple (SwinIR, HAT) and back."""
        h, w = x.shape[-2:]
        req = self.size_req
        ph = max(req.minimum, math.ceil(h / req.multiple_of) * req.multiple_of) - h if req else 0
        pw = max(req.minimum, math.ceil(w / req.multiple_of) * req.multiple_of) - w if req else 0
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        y = self.call(self.net, x)
        s = int(self.scale)
        return y[..., : h * s, : w * s]

    def _tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """Real-ESRGAN's tiling: each tile is run with ``tile_pad`` pixels of real context on
        every side and only its own area is kept, so seams vanish once the pad covers the
        model's receptive field."""
        b, c, h, w = x.shape
        s, pad = int(self.scale), self.tile_pad
        out = x.new_empty((b, c, h * s, w * s))
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
                py1, px1 = min(y1 + pad, h), min(x1 + pad, w)
                piece = self._forward(x[..., py0:py1, px0:px1])
                out[..., y0 * s:y1 * s, x0 * s:x1 * s] = piece[
                    ..., (y0 - py0) * s:(y1 - py0) * s, (x0 - px0) * s:(x1 - px0) * s]
        return out
