"""FRESCO keyframe translation with Stable Diffusion 1.5 + ControlNet, through diffusers' own hooks.

FRESCO (Yang et al., CVPR 2024, "FRESCO: Spatial-Temporal Correspondence for Zero-Shot Video
Translation", github.com/williamyang1991/FRESCO) as its ``run_fresco.py`` runs it, per video:

1. frames resized to short side ``short_side`` in multiples of 64; keyframes by FRESCO's rule
   (:func:`select_keyframes`), cut into batches of ``batch_size`` (:func:`keyframe_batches`);
2. per batch: optical flow between consecutive keys (OpenCV DIS here; GMFlow there), occlusions
   from the forward-backward check plus a colour check, and from them the cross-frame masks and
   the flow trajectories (:func:`guidance_for`);
3. a reference UNet pass at the last timestep on the noised inputs records each FRESCO layer's
   self-attention input (spatial-guided attention) and each decoder block's input (whose
   normalized Gram matrices the spatial loss matches);
4. SDEdit: the input latents noised to ``timesteps[steps - int(steps * strength)]`` with one
   noise shared by every frame, then DDPM with classifier-free guidance and the ControlNet. On
   the way:

   * attention (:class:`FrescoAttnProcessor`, installed with ``unet.set_attn_processor`` on the
     self-attention of the last two decoder levels): cross-frame attention to frame 0 plus the
     tokens newly visible in each later frame; spatial-guided attention at the first step;
     flow-guided temporal attention along trajectories while ``t >= 350``;
   * feature optimization (:func:`optimize_feature`, a forward pre-hook on each decoder block):
     Adam (lr 0.2, 20 iterations) on a temporal warp loss plus a spatial self-similarity loss
     for the early steps, then AdaIN back to the block input's statistics;
5. after the first batch, every batch starts with key 0 and the previous batch's last key, whose
   latents at every step are those recorded in the previous batch: the batches share an anchor.

Not implemented: FRESCO's background smoothing (``use_salinecy``: it warps the background with
a saliency mask from EGNet, a model this project does not ship) and GMFlow (DIS needs no weights).

Per-step state lives on one :class:`FrescoControl` that the processors and hooks hold as an
attribute; nothing replaces a module's ``forward``.

Modules, in the order a batch uses them: :mod:`.keyframes` (sizes, keyframes, batches),
:mod:`.control` (condition maps), :mod:`.guidance` (correspondences; flow and occlusions come from
:mod:`vsr_ddp.models.flow`), :mod:`.attention` (processors), :mod:`.features` (feature
optimization), :mod:`.checks` (model paths and single files), :mod:`.pipeline` (the sampler).

GPU memory, 512x512, batch 8 (8 frames, the two references of later batches included; 16 with
CFG), fp16, SDPA: an estimate, not measured (no GPU was at hand): weights ~2.9 GB (UNet 1.7,
ControlNet 0.7, CLIP 0.25, VAE 0.17); UNet + ControlNet activations ~4-6 GB; feature optimization
~0.3 GB (one 4096 x 4096 float32 Gram matrix at a time, with its gradient); VAE decode of 8 frames
~2-3 GB without slicing. About 10-13 GB in all; activations grow with the working size's tokens
(896x512 for 16:9 is 1.75x of 512x512); ``job.vae_slicing`` trims the decode peak,
``job.batch_size`` scales the rest. :func:`vsr_ddp.bench.bench_sim2real` measures it.
"""
from .attention import (FrescoAttnProcessor, FrescoControl, fresco_levels, install_fresco_processors,
                        temporal_attention)
from .checks import CONTROLNET_HINT, SD15_HINT, check_model_paths, single_file_keys
from .control import ANNOTATOR_FILES, ANNOTATOR_SOURCE, ControlMaps
from .features import DecoderHooks, adain, gram, optimize_feature
from .guidance import Guidance, cross_frame_mask, guidance_for, link_next, trajectories
from .keyframes import frame_differences, keyframe_batches, resize_frames, select_keyframes, work_size
from .pipeline import FrescoPipeline, FrescoSettings, sdedit_start

__all__ = [
    "ANNOTATOR_FILES", "ANNOTATOR_SOURCE", "CONTROLNET_HINT", "SD15_HINT", "ControlMaps", "DecoderHooks",
    "FrescoAttnProcessor", "FrescoControl", "FrescoPipeline", "FrescoSettings", "Guidance", "adain",
    "check_model_paths", "cross_frame_mask", "fresco_levels", "frame_differences", "gram", "guidance_for",
    "install_fresco_processors", "keyframe_batches", "link_next", "optimize_feature", "resize_frames",
    "sdedit_start", "select_keyframes", "single_file_keys", "temporal_attention", "trajectories", "work_size",
]
