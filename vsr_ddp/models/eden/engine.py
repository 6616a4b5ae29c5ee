"""EDEN's published checkpoint and its sampler: ``load_eden`` and ``Eden.midpoint``.

The sampler is the original inference.py's: ``create_transport("Linear", "velocity")`` (x_t =
t * data + (1 - t) * noise; the network predicts the velocity data - noise) and
``Sampler.sample_ode(sampling_method="euler", num_steps=2)``, whose ODE grid is hard-coded in
``src/transport/integrators.py`` as ``[0.00, 0.75, 1.00]`` (num_steps is not used): two Euler
steps forward in time from the noise at t=0, x <- x + 0.75 v(x, 0), then x <- x + 0.25 v(x, 0.75);
the sample is the state at t=1.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..sr import ModelError, read_weights, state_mismatch
from .model import Eden, EdenConfig, config_from_shapes

# configs/eval_eden.yaml of the original (the statistics the published model was trained with)
COS_SIM_MEAN = 0.990539
COS_SIM_STD = 0.0608093
VAE_SCALER = 0.179437
VAE_SHIFT = 0.770202
# the Euler grid of the original's ODE sampler (src/transport/integrators.py)
ODE_TIMES = (0.0, 0.75, 1.0)

WRAPPER = "eden"  # the published eden.pt is {"eden": state_dict}
SIGNATURE = ("proj_in.weight", "patch_cond_dit.weight", "patch_cond_dec.weight", "difference_embedder.weight",
             "denoise_timestep_embedder.mlp.0.weight", "adaLN_modulation.1.weight", "unpatchify.1.weight",
             "dit_blocks.0.temp_attn.qkv.weight", "decoder_blocks.0.temp_attn.qkv.weight")


def unwrap(state: dict) -> dict:
    """The network's state dict inside a checkpoint's contents: ``state["eden"]`` when present (the
    published file), else ``state`` itself; DataParallel's ``module.`` prefix removed."""
    if isinstance(state, dict) and isinstance(state.get(WRAPPER), dict):
        state = state[WRAPPER]
    return {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else state


def is_eden_state(state: dict) -> bool:
    """Whether a checkpoint's contents (the ``{"eden": ...}`` wrapper or a bare state dict) hold an
    EDEN network: its characteristic keys are all there."""
    state = unwrap(state)
    return isinstance(state, dict) and all(k in state for k in SIGNATURE)


def pad_amounts(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) replicate padding up to multiples of ``multiple``, split as the
    original's InputPadder (the smaller half first)."""
    ph, pw = -h % multiple, -w % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def difference_of(frames0: torch.Tensor, frames1: torch.Tensor) -> torch.Tensor:
    """(B, 1): the pairs' mean per-pixel cosine similarity (over channels), standardised with the
    published statistics: the start-end "difference" EDEN is conditioned on."""
    cos = F.cosine_similarity(frames0, frames1, dim=1).mean(dim=(1, 2))
    return ((cos - COS_SIM_MEAN) / COS_SIM_STD).unsqueeze(1)


def noise_for(seeds, tokens: int, latent_dim: int) -> torch.Tensor:
    """(B, tokens, latent_dim) standard normal noise, one seeded CPU generator per item (the same
    numbers on any device)."""
    out = []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        out.append(torch.randn((1, tokens, latent_dim), generator=g))
    return torch.cat(out)


def _autocast(precision: str, device: torch.device):
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def sample(model: Eden, noise: torch.Tensor, cond, difference: torch.Tensor) -> torch.Tensor:
    """Euler integration of the velocity ODE over ``ODE_TIMES`` from ``noise`` (t=0) to t=1."""
    x = noise
    for t0, t1 in zip(ODE_TIMES[:-1], ODE_TIMES[1:]):
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * model.denoise(x, t, cond, difference).to(x.dtype)
    return x


@torch.inference_mode()
def midpoints(model: Eden, frames0: torch.Tensor, frames1: torch.Tensor, seeds, precision: str = "fp32"):
    """(B, 3, H, W) frames in [0, 1] of each pair's midpoint, clamped to [0, 1]. frames0/frames1:
    float (B, 3, H, W) in [0, 1] on the model's device; ``seeds``: one int per pair."""
    if frames0.shape != frames1.shape or frames0.dim() != 4:
        raise ValueError(f"two (B, 3, H, W) batches of the same shape, not {tuple(frames0.shape)} and "
                         f"{tuple(frames1.shape)}")
    seeds = list(seeds)
    if len(seeds) != frames0.shape[0]:
        raise ValueError(f"{frames0.shape[0]} pairs but {len(seeds)} seeds")
    frames0, frames1 = frames0.float(), frames1.float()
    h, w = frames0.shape[-2:]
    left, right, top, bottom = pad = pad_amounts(h, w, model.config.multiple)
    difference = difference_of(frames0, frames1)
    cond_frames = F.pad(torch.cat((frames0, frames1)), pad, mode="replicate")
    hp, wp = cond_frames.shape[-2:]
    tokens = (hp // model.config.multiple) * (wp // model.config.multiple)
    noise = noise_for(seeds, tokens, model.config.latent_dim).to(frames0.device)
    with _autocast(precision, frames0.device):
        cond = model.condition(cond_frames)
        latents = sample(model, noise, cond, difference)
        out = model.decode(latents / VAE_SCALER + VAE_SHIFT, cond)
    return out.float()[..., top:hp - bottom, left:wp - right].clamp(0.0, 1.0)


def midpoint(model: Eden, frame0: torch.Tensor, frame1: torch.Tensor, seed: int, precision: str = "fp32"):
    """(1, 3, H, W) in [0, 1]: the frame halfway between float frames (1, 3, H, W) in [0, 1]."""
    return midpoints(model, frame0, frame1, [seed], precision)


Eden.midpoints = midpoints
Eden.midpoint = midpoint


def load_eden(path, device=torch.device("cpu"), num_heads: int | None = None,
              what: str = "job.model") -> Eden:
    """The EDEN network of a checkpoint (the published ``eden.pt``: ``{"eden": state_dict}``, a bare
    state dict, or safetensors), read weights-only, loaded strictly, fp32, eval mode, on ``device``.
    Its configuration comes from the shapes (num_heads: hidden_dim // 64 unless given). ModelError
    (one line naming ``what`` and the file) for a file that is unreadable or no EDEN checkpoint."""
    return _from_state(unwrap(read_weights(Path(path), what)), Path(path), device, num_heads, what)


def load_eden_if(path, device=torch.device("cpu"), what: str = "job.model") -> Eden | None:
    """:func:`load_eden` for a file that is an EDEN checkpoint by its keys, reading it once; None
    for any other file (unreadable ones too: the caller's other loaders say what they are)."""
    try:
        state = unwrap(read_weights(Path(path), what))
    except ModelError:
        return None
    if not isinstance(state, dict) or not is_eden_state(state):
        return None
    return _from_state(state, Path(path), device, None, what)


def _from_state(state, path: Path, device, num_heads: int | None, what: str) -> Eden:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{what}: {path} is not an EDEN checkpoint (not a state dict of tensors)")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = config_from_shapes(shapes, num_heads)
    except (KeyError, ValueError, IndexError) as e:
        raise ModelError(f"{what}: {path} is not an EDEN checkpoint (no {e})") from None
    if config.hidden_dim % config.num_heads:
        raise ModelError(f"{what}: {path}: {config.num_heads} heads do not divide hidden size "
                         f"{config.hidden_dim}")
    with torch.device("meta"):
        model = Eden(config)
    mismatch = state_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if mismatch:
        raise ModelError(f"{what}: {path} is not an EDEN checkpoint of the layout its shapes say "
                         f"({_describe(config)}): {mismatch}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval().to(device)


def _describe(c: EdenConfig) -> str:
    return (f"hidden {c.hidden_dim}, latent {c.latent_dim}, patch {c.patch_size}, {c.dit_depth} DiT and "
            f"{c.decoder_depth} decoder blocks")


def random_eden(hidden_dim: int = 64, latent_dim: int = 8, dit_depth: int = 2, decoder_depth: int = 1,
                seed: int = 0, patch_size: int = 16, num_heads: int | None = None) -> Eden:
    """An EDEN of the published layout (at any size) with seeded random weights, in eval mode: for
    tests. The adaLN and output layers are random too (not zero as at the start of training), so every
    part of the network shows in its output."""
    config = EdenConfig(hidden_dim=hidden_dim, latent_dim=latent_dim, patch_size=patch_size,
                        dit_depth=dit_depth, decoder_depth=decoder_depth,
                        num_heads=num_heads or max(1, hidden_dim // 64))
    g = torch.Generator().manual_seed(seed)
    model = Eden(config)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("weight") and prm.dim() == 1:  # LayerNorm gains around 1
                prm.copy_(1 + 0.1 * torch.randn(prm.shape, generator=g))
            elif prm.dim() == 1:
                prm.copy_(0.02 * torch.randn(prm.shape, generator=g))
            else:
                fan_in = prm[0].numel()
                prm.copy_(torch.randn(prm.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def save_eden(model: Eden, path, wrapper: bool = True) -> Path:
    """Write ``model`` as the published ``eden.pt`` is (``{"eden": state_dict}``, tensors only), or
    the bare state dict (``wrapper=False``); a ``.safetensors`` path gets a safetensors file."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({WRAPPER: state} if wrapper else state, str(path))
    return path
