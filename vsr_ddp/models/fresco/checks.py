"""Model paths checked before anything loads: every problem is one line naming what to put where."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _check_dir(path: Path, what: str, parts: tuple, hint: str, weights: tuple = ()) -> None:
    """``parts`` exist under ``path``, and each folder in ``weights`` holds a weights file."""
    missing = [p for p in parts if not (path / p).exists()]
    missing += [f"{w}/*.safetensors" for w in weights
                if not any((path / w).glob("*.safetensors")) and not any((path / w).glob("*.bin"))]
    if missing:
        raise ValueError(f"{what}={path} lacks {', '.join(missing)}: {hint}")


SD15_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD15_HINT = ("a diffusers folder of Stable Diffusion 1.5 (unet/ vae/ text_encoder/ tokenizer/ scheduler/, "
             "e.g. https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5)")
CONTROLNET_HINT = ("a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
                   "https://huggingface.co/lllyasviel/sd-controlnet-canny, -hed or -depth)")


def single_file_keys(path: Path) -> list[str] | None:
    """Tensor names of a .safetensors file, read from its header alone; None for other formats."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # a truncated or foreign file: safetensors' own words
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None


# What an original-format (CompVis/LDM) SD 1.5 checkpoint holds, by key prefix.
SD15_FILE_PARTS = {"model.diffusion_model.": "the UNet", "cond_stage_model.transformer.": "the CLIP text "
                   "encoder", "first_stage_model.": "the VAE"}


def _check_sd15_file(path: Path, has_vae: bool) -> None:
    keys = single_file_keys(path)
    if keys is None:
        return
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"job.base_model={path} is an SDXL checkpoint; job=sim2real runs SD 1.5 (FRESCO)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(f"job.base_model={path} is an SD 2.x checkpoint (OpenCLIP text encoder); "
                         f"job=sim2real runs SD 1.5 (FRESCO)")
    missing = [f"{what} ({prefix}*)" for prefix, what in SD15_FILE_PARTS.items()
               if not any(k.startswith(prefix) for k in keys)
               and not (has_vae and prefix == "first_stage_model.")]
    if missing:
        hint = "; set job.vae to a diffusers AutoencoderKL folder" if missing == [
            "the VAE (first_stage_model.*)"] else f"; give a full SD 1.5 checkpoint or {SD15_HINT}"
        raise ValueError(f"job.base_model={path} lacks {', '.join(missing)}{hint}")


def check_model_paths(base_model, controlnet, base_model_config=None, controlnet_config=None,
                      vae=None) -> None:
    """Everything the pipeline will load is on disk, or a one-line ValueError saying what to put where."""
    base = Path(str(base_model)).expanduser()
    if not base_model or not base.exists():
        raise ValueError(f"job.base_model={base_model}: not found; give {SD15_HINT}, or a single "
                         f".safetensors checkpoint together with job.base_model_config")
    if base.is_dir():
        _check_dir(base, "job.base_model", SD15_PARTS, SD15_HINT, weights=("unet", "vae", "text_encoder"))
    else:
        if base.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"job.base_model={base}: a single-file checkpoint must be .safetensors or .ckpt")
        cfg = Path(str(base_model_config or "")).expanduser()
        if not base_model_config or not cfg.is_dir():
            raise ValueError(f"job.base_model={base} is a single file: set job.base_model_config to a local "
                             f"diffusers folder of SD 1.5 (its configs and tokenizer are enough: "
                             f"model_index.json, unet/ vae/ text_encoder/ scheduler/ configs, tokenizer/)")
        _check_dir(cfg, "job.base_model_config", ("model_index.json", *SD15_PARTS), SD15_HINT)
        _check_sd15_file(base, has_vae=bool(vae))
    cn = Path(str(controlnet)).expanduser()
    if not controlnet or not cn.exists():
        raise ValueError(f"job.controlnet={controlnet}: not found; give {CONTROLNET_HINT}, or a single "
                         f".safetensors file together with job.controlnet_config")
    if cn.is_dir():
        _check_dir(cn, "job.controlnet", ("config.json",), CONTROLNET_HINT, weights=(".",))
    else:
        cfg = Path(str(controlnet_config or "")).expanduser()
        if not controlnet_config or not (cfg / "config.json").is_file():
            raise ValueError(f"job.controlnet={cn} is a single file: set job.controlnet_config to a local "
                             f"folder holding the ControlNet's config.json (from {CONTROLNET_HINT})")
        keys = single_file_keys(cn)
        if keys is not None and not any(".input_hint_block." in f".{k}" for k in keys):
            raise ValueError(f"job.controlnet={cn}: not a ControlNet checkpoint (no input_hint_block.* "
                             f"weights); give {CONTROLNET_HINT}, or its original .pth/.safetensors file")
    if vae:
        _check_dir(Path(str(vae)).expanduser(), "job.vae", ("config.json",),
                   "a diffusers AutoencoderKL folder, e.g. https://huggingface.co/stabilityai/sd-vae-ft-mse",
                   weights=(".",))


@contextlib.contextmanager
def _single_file(key: str, path: Path, what: str):
    """diffusers' conversion of a file whose tensors do not fit the configs fails deep inside (a key, a
    shape, a meta tensor never filled): say which file, in one line, as a configuration error."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, ValueError, RuntimeError, NotImplementedError, OSError) as e:
        cause = " ".join(str(e).split())[:300]
        if "meta tensor" in cause:  # accelerate left a parameter the file did not fill
            cause = "tensors its configs call for are missing from the file"
        raise ValueError(f"{key}={path}: could not load it as an original-format {what} "
                         f"checkpoint with the given configs ({type(e).__name__}: {cause})") from e


def _check_filled(key: str, path: Path, **models) -> None:
    """Every parameter came from the file: diffusers builds single-file models on the meta device
    (with accelerate) and fills what the file has, so a tensor it lacks stays meta."""
    missing = [f"{part}.{name}" for part, m in models.items()
               for name, p in m.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{key}={path} lacks {len(missing)} tensor(s) its configs call for "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): a damaged file, "
                         f"or configs of another model")
