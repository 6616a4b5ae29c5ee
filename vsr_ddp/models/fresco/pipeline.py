"""The FRESCO pipeline: SD 1.5 + ControlNet, DDPM with SDEdit, FRESCO's attention and feature
optimization, batches that share an anchor (see the package's docstring for the steps)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ... import preempt
from ..ebsynth import typed_config
from .attention import FrescoControl, fresco_levels, install_fresco_processors
from .checks import _check_filled, _single_file, check_model_paths
from .control import ControlMaps
from .features import DecoderHooks, gram
from .guidance import guidance_for
from .keyframes import keyframe_batches

log = logging.getLogger(__name__)


@dataclass
class FrescoSettings:
    """One video's translation settings: job=sim2real's ``job.fresco`` plus its per-video keys
    (conf/job/sim2real.yaml: run_fresco.py's values, config_carturn.yaml); :meth:`shipped` for
    those values outside a job."""

    steps: int
    strength: float  # SDEdit: 0.75 of 20 steps skips the first 5 (num_warmup_steps=5)
    guidance_scale: float
    cond_scale: float
    seed: int
    batch_size: int
    shared_noise: bool  # one initial noise for every frame (FRESCO's repeat_noise)
    cross_frame_attn: bool
    spatial_attn: bool
    spatial_attn_steps: int
    temporal_attn: bool
    temporal_attn_min_t: int  # temporal attention while t >= this (FRESCO's step_interattn_end)
    feature_opt: bool
    opt_temporal: bool
    opt_spatial: bool
    opt_until: float  # optimize while step index < opt_until * steps (FRESCO: end_opt_step 15 of 20)
    opt_iters: int
    opt_lr: float
    opt_spatial_weight: float
    opt_layers: tuple

    def to_dict(self) -> dict:
        d = asdict(self)
        d["opt_layers"] = list(self.opt_layers)
        return d

    @classmethod
    def from_config(cls, values: Mapping) -> "FrescoSettings":
        """From a ``job.fresco`` subtree plus the per-video settings (every key of them)."""
        return typed_config(cls, values)

    @classmethod
    def shipped(cls, **overrides) -> "FrescoSettings":
        """conf/job/sim2real.yaml's values, ``overrides`` replacing some."""
        from ...config import shipped

        job = shipped("job/sim2real")
        run = {k: job[k] for k in ("steps", "strength", "guidance_scale", "cond_scale", "seed", "batch_size")}
        return typed_config(cls, {**job["fresco"], **run, **overrides})


def sdedit_start(steps: int, strength: float) -> int:
    """Index of the first timestep run (diffusers' img2img rule; FRESCO's num_warmup_steps)."""
    return steps - min(int(steps * strength), steps)


class FrescoPipeline:
    """SD 1.5 + ControlNet with FRESCO's attention and feature optimization, DDPM sampling."""

    def __init__(self, unet, controlnet, vae, text_encoder, tokenizer, scheduler,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        for m in (unet, controlnet, vae, text_encoder):  # no text encoder: prompt embeddings come given
            if m is not None:  # one move: no float32 copy of the weights on the GPU on the way
                m.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.control = FrescoControl()
        self.fresco_processors = install_fresco_processors(unet, self.control)
        self.hooks = DecoderHooks(unet, self.control)

    @classmethod
    def from_local(cls, base_model, controlnet, *, base_model_config=None, controlnet_config=None, vae=None,
                   device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> "FrescoPipeline":
        """Load from local paths only (see :func:`check_model_paths`); never from the Hub."""
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

        check_model_paths(base_model, controlnet, base_model_config, controlnet_config, vae)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # a bar per component and rank is noise in a batch log
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        base = Path(str(base_model)).expanduser()
        # job.vae replaces the base model's VAE, which is then never loaded
        own_vae = (AutoencoderKL.from_pretrained(Path(str(vae)).expanduser(), local_files_only=True)
                   if vae else None)
        if base.is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer

            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
            vae_model = own_vae or AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                         local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
            scheduler_config = DDPMScheduler.load_config(base, subfolder="scheduler", local_files_only=True)
        else:
            from diffusers import StableDiffusionPipeline

            given = {"vae": own_vae} if own_vae is not None else {}
            with _single_file("job.base_model", base, "SD 1.5"):
                pipe = StableDiffusionPipeline.from_single_file(
                    str(base), config=str(Path(str(base_model_config)).expanduser()), local_files_only=True,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False, **given)
            unet, vae_model, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
            scheduler_config = pipe.scheduler.config
            _check_filled("job.base_model", base, unet=unet, vae=vae_model, text_encoder=text_encoder)
        cn = Path(str(controlnet)).expanduser()
        if cn.is_dir():
            control = ControlNetModel.from_pretrained(cn, local_files_only=True)
        else:
            cn_config = str(Path(str(controlnet_config)).expanduser())
            with _single_file("job.controlnet", cn, "ControlNet"):
                control = ControlNetModel.from_single_file(str(cn), config=cn_config, local_files_only=True)
            _check_filled("job.controlnet", cn, controlnet=control)
        # FRESCO samples with DDPM whatever the checkpoint's own scheduler (PNDM for SD 1.5).
        scheduler = DDPMScheduler.from_config(scheduler_config)
        return cls(unet, control, vae_model, text_encoder, tokenizer, scheduler, device=device, dtype=dtype)

    def _vae_in_float32(self, what: str) -> None:
        log.warning("the VAE overflowed in %s while it %s (inf/NaN, which would be black pixels): "
                    "it runs in float32 from now on", str(self.vae.dtype).replace("torch.", ""), what)
        self.vae.to(torch.float32)

    def vae_encode(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """# (N, 3, H, W) in [-1, 1] -> scaled latents in the model dtype. A half-precision VAE
        that overflows (known for SD 1.5's at large sizes and some fine-tunes) is redone in float32."""
        state = gen.get_state()
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(gen)
        if self.vae.dtype != torch.float32 and not torch.isfinite(z).all():
            self._vae_in_float32("encoded")
            gen.set_state(state)
            z = self.vae.encode(x.float()).latent_dist.sample(gen)
        return (z * self.vae.config.scaling_factor).to(self.dtype)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> # (N, 3, H, W) images in about [-1, 1], as :meth:`vae_encode` guards."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        if self.vae.dtype != torch.float32 and not torch.isfinite(images).all():
            self._vae_in_float32("decoded")
            images = self.vae.decode(z.float()).sample
        return images

    def set_memory_options(self, vae_tiling: bool = False, vae_slicing: bool = False) -> None:
        (self.vae.enable_tiling if vae_tiling else self.vae.disable_tiling)()
        (self.vae.enable_slicing if vae_slicing else self.vae.disable_slicing)()

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> torch.Tensor:
        """# -> (2, 77, D): [negative, positive] CLIP embeddings, on the device in the model dtype."""
        tok = self.tokenizer([negative_prompt, prompt], padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        emb = self.text_encoder(tok.input_ids.to(self.device))[0]
        return emb.to(self.dtype)

    def token_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grids of the FRESCO levels for frames of height x width pixels."""
        h, w = height // self.vae_factor, width // self.vae_factor
        n = len(self.unet.up_blocks)
        return [(h >> (n - 1 - i), w >> (n - 1 - i)) for i in fresco_levels(self.unet)]

    @torch.no_grad()
    def translate(self, frames: np.ndarray | Mapping[int, np.ndarray], keys: list[int],
                  prompt_embeds: torch.Tensor, settings: FrescoSettings,
                  control_maps: Callable | None = None,
                  on_step: Callable | None = None) -> dict[int, np.ndarray]:
        """Translate the keyframes of one video.

        frames: # (T, H, W, 3) uint8 at the working size (H, W multiples of 64), or just the
        keyframes as {index: (H, W, 3) uint8}; keys: frame indices; prompt_embeds: (2, 77, D)
        from :meth:`encode_prompt`; control_maps: frame -> (H, W, 3) uint8 condition image
        (:class:`ControlMaps`). ``on_step(batch, step, t, latents)`` is called before every UNet
        call. Returns {key: (H, W, 3) uint8}.
        """
        # 1. Check inputs
        s = settings
        height, width = frames[keys[0]].shape[:2]
        if height % 64 or width % 64:
            raise ValueError(f"frames must be multiples of 64 on each side, not {width}x{height}")
        control_maps = control_maps or ControlMaps("canny")
        c = self.control

        # 2. Timesteps: SDEdit starts part-way into DDPM's schedule
        self.scheduler.set_timesteps(s.steps, device=self.device)
        timesteps = self.scheduler.timesteps
        start = sdedit_start(s.steps, s.strength)
        if start >= len(timesteps):
            raise ValueError(f"strength {s.strength} with {s.steps} steps leaves no step to run")
        opt_end = s.opt_until * s.steps
        c.opt_layers = tuple(s.opt_layers)
        c.opt = {"temporal": s.opt_temporal, "spatial_weight": s.opt_spatial_weight if s.opt_spatial else 0.0,
                 "iters": s.opt_iters, "lr": s.opt_lr}
        sizes = self.token_sizes(height, width)

        # 3. Keyframe batches; later ones run after key 0 and the previous batch's last key
        batches = keyframe_batches(keys, s.batch_size)
        maps: dict[int, np.ndarray] = {}
        record: list[torch.Tensor] = []  # per step: latents of the batch's first and last frame
        out: dict[int, np.ndarray] = {}
        for bi, batch in enumerate(batches):
            t0 = time.monotonic()
            refs = [] if bi == 0 else [batches[0][0], batches[bi - 1][-1]]
            idx = refs + batch
            n = len(idx)
            c.reset()
            c.frames = n

            # 4. Inputs: images, condition maps, prompt embeddings for CFG (negatives first)
            imgs = np.stack([frames[k] for k in idx])  # (N, H, W, 3) uint8
            for k in idx:
                if k not in maps:
                    maps[k] = control_maps(frames[k])
            x = torch.from_numpy(imgs).to(self.device).permute(0, 3, 1, 2)
            x = x.to(self.dtype) / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
            cond = torch.from_numpy(np.stack([maps[k] for k in idx])).to(self.device).permute(0, 3, 1, 2)
            cond = torch.cat([cond.to(self.dtype) / 255] * 2)  # (2N, 3, H, W) in [0, 1]
            embeds = torch.cat([prompt_embeds[:1].expand(n, -1, -1), prompt_embeds[1:2].expand(n, -1, -1)])

            # 5. FRESCO guidance from the input frames: flows, occlusions, masks, trajectories
            guide = guidance_for(imgs, sizes, self.device, temporal=s.temporal_attn)

            # 6. Initial latents: shared noise, SDEdit from the input
            gen = torch.Generator("cpu").manual_seed(int(s.seed))
            shape = (1 if s.shared_noise else n, self.unet.config.in_channels, height // self.vae_factor,
                     width // self.vae_factor)
            noise = torch.randn(shape, generator=gen).expand(n, -1, -1, -1).to(self.device, self.dtype)
            x0 = self.vae_encode(x, gen)
            latents = self.scheduler.add_noise(x0, noise, timesteps[start:start + 1])

            # 7. Reference pass at the last timestep: attention inputs and decoder-input Gram matrices
            if s.spatial_attn or (s.feature_opt and s.opt_spatial):
                t_ref = timesteps[-1:]
                ref = self.scheduler.add_noise(x0, noise, t_ref)
                c.store, c.capture = True, {}
                self.unet(torch.cat([ref] * 2), t_ref, encoder_hidden_states=embeds)
                if s.feature_opt and s.opt_spatial:
                    c.correlations = {i: gram(f) for i, f in c.capture.items() if i in c.opt_layers}
                c.store, c.capture = False, None
                del ref
            c.guidance = guide
            c.cross_frame = s.cross_frame_attn

            # 8. Denoising loop
            for i, t in enumerate(timesteps[start:]):
                preempt.check()
                c.spatial = s.spatial_attn and i < s.spatial_attn_steps
                c.temporal = s.temporal_attn and int(t) >= s.temporal_attn_min_t
                c.optimize = s.feature_opt and start + i < opt_end
                if bi > 0:  # the references' latents are exactly the previous batch's
                    latents[0:2] = record[i]
                    record[i] = latents[[0, n - 1]].clone()
                else:
                    record.append(latents[[0, n - 1]].clone())
                if on_step is not None:
                    on_step(bi, i, t, latents)
                model_in = torch.cat([latents] * 2)
                down, mid = self.controlnet(model_in, t, encoder_hidden_states=embeds, controlnet_cond=cond,
                                            conditioning_scale=s.cond_scale, guess_mode=False,
                                            return_dict=False)
                noise_pred = self.unet(model_in, t, encoder_hidden_states=embeds,
                                       down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid).sample
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + s.guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, generator=gen).prev_sample

            # 9. Decode the batch's own keys (not the references)
            images = self.vae_decode(latents[len(refs):])
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            for k, img in zip(batch, images):
                out[k] = img
            log.info("FRESCO batch %d/%d: keys %s (+%d references), %.1f s, %s", bi + 1, len(batches), batch,
                     len(refs), time.monotonic() - t0, dict(c.calls))
        c.reset()
        return out
