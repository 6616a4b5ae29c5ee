"""Tiny Stable Diffusion 1.5 and ControlNet folders (diffusers' save_pretrained) with a CLIP
tokenizer from a local vocabulary, and their original (LDM / CompVis) single-file forms."""
from __future__ import annotations

from pathlib import Path

import torch

# --- Tiny Stable Diffusion 1.5 + ControlNet (job=sim2real) ---
# SD 1.5's layout at toy sizes: four UNet levels (CrossAttn x3 + plain down, plain + CrossAttn x3
# up, so the last two decoder levels where FRESCO works have self-attention), an 8x VAE, a CLIP
# text encoder and tokenizer, DDPM with SD 1.5's schedule. Saved with save_pretrained and loaded
# by the job through the same code as the real weights. diffusers/transformers import lazily.


def _clip_byte_chars() -> list[str]:
    """CLIP's byte -> printable unicode table (GPT-2's bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def save_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """A CLIP tokenizer from a vocab.json and merges.txt written here: every byte, every byte at a
    word end, a few merges, the two special tokens (518 entries)."""
    import json

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _clip_byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["c a", "ca r</w>", "r e", "re d</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    return folder


def tiny_sd15_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)


def save_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers Stable Diffusion 1.5 folder with tiny random components (about 1 MB)."""
    import json

    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tok = save_tiny_clip_tokenizer(folder / "tokenizer")
    n_vocab = len(json.loads((tok / "vocab.json").read_text(encoding="utf-8")))
    tiny_sd15_unet(seed).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=64).save_pretrained(folder / "vae")
    torch.manual_seed(seed + 2)
    text = CLIPTextConfig(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=n_vocab - 2,
                          eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2), encoding="utf-8")
    return folder


def save_tiny_controlnet(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers ControlNet folder made with ControlNetModel.from_unet of the tiny UNet; its
    condition embedding downsamples 8x like SD 1.5's."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 3)
    cn = ControlNetModel.from_unet(tiny_sd15_unet(seed), conditioning_embedding_out_channels=(4, 8, 8, 16))
    cn.save_pretrained(folder)
    return Path(folder)


# --- Original (LDM / CompVis) single-file checkpoints ---
# Written from the diffusers folders above by renaming keys the way the original training code names
# them (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*, control_model.*),
# so that diffusers' from_single_file has a real original-format file to convert back.

_LDM_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_LDM_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_parts(name: str, table) -> str:
    import re

    for new, old in table:
        name = re.sub(rf"(^|\.){re.escape(new)}\.", rf"\g<1>{old}.", name)
    return name


def unet_to_ldm(state: dict, config: dict, controlnet: bool = False) -> dict:
    """A diffusers UNet2DConditionModel (or ControlNetModel) state dict in LDM's names: input_blocks,
    middle_block, output_blocks; for a ControlNet also zero_convs, middle_block_out, input_hint_block."""
    import re

    per = config["layers_per_block"] + 1  # LDM entries per level: the resnets, then the resampler
    up_attn = [t.startswith("CrossAttn") for t in config.get("up_block_types", ())]
    out = {}
    for key, value in state.items():
        block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
                         r"(.*)", key)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        top = next((t for t in _LDM_UNET_TOP if key.startswith(t + ".")), None)
        if top:
            new = _LDM_UNET_TOP[top] + key[len(top):]
        elif block:
            side, b, part, j, rest = block[1], int(block[2]), block[3], int(block[4]), block[5]
            if side == "down" and part == "downsamplers":
                new = f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
            elif side == "down":
                new = f"input_blocks.{1 + b * per + j}.{0 if part == 'resnets' else 1}.{rest}"
            elif part == "upsamplers":  # after the level's attention, if it has one
                new = f"output_blocks.{b * per + per - 1}.{2 if up_attn[b] else 1}.{rest}"
            else:
                new = f"output_blocks.{b * per + j}.{0 if part == 'resnets' else 1}.{rest}"
            new = _rename_parts(new, _LDM_RESNET) if part == "resnets" else new
        elif mid:
            new = f"middle_block.{2 * int(mid[2]) if mid[1] == 'resnets' else 1}.{mid[3]}"
            new = _rename_parts(new, _LDM_RESNET) if mid[1] == "resnets" else new
        elif controlnet and key.startswith("controlnet_down_blocks."):
            new = re.sub(r"^controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1.0.", key)
        elif controlnet and key.startswith("controlnet_mid_block."):
            new = key.replace("controlnet_mid_block.", "middle_block_out.0.")
        elif controlnet and key.startswith("controlnet_cond_embedding."):
            rest = key.removeprefix("controlnet_cond_embedding.")
            hint = re.match(r"blocks\.(\d+)\.(.*)", rest)
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest.removeprefix("conv_in.")
            elif rest.startswith("conv_out."):
                new = "input_hint_block.14." + rest.removeprefix("conv_out.")
            else:
                new = f"input_hint_block.{2 * (int(hint[1]) + 1)}.{hint[2]}"
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in LDM's names (decoder levels counted from the bottom,
    mid-block attention as 1x1 convolutions)."""
    import re

    n = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", lambda m: (
            f"decoder.up.{n - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}."), new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = _rename_parts(new.replace("mid_block.attentions.0.", "mid.attn_1."), (
                ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                ("to_out.0", "proj_out")))
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[new] = value
    return out


def _folder_weights(folder: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    return (load_file(str(next(folder.glob("*.safetensors")))),
            json.loads((folder / "config.json").read_text(encoding="utf-8")))


def save_sd15_single_file(sd_folder: str | Path, path: str | Path) -> Path:
    """One original-format SD 1.5 checkpoint (like v1-5-pruned-emaonly.safetensors) from a diffusers
    folder."""
    from safetensors.torch import save_file

    sd_folder = Path(sd_folder)
    unet, unet_cfg = _folder_weights(sd_folder / "unet")
    vae, vae_cfg = _folder_weights(sd_folder / "vae")
    text, _ = _folder_weights(sd_folder / "text_encoder")
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, unet_cfg).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae, vae_cfg).items()})
    clip = "cond_stage_model.transformer."  # + the HF names; transformers >= 5.6 drops "text_model."
    state.update({clip + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def save_controlnet_single_file(cn_folder: str | Path, path: str | Path,
                                prefix: str = "control_model.") -> Path:
    """An original-format ControlNet checkpoint (control_sd15_canny style keys; ``prefix=""`` for the
    files that hold the control model alone)."""
    from safetensors.torch import save_file

    state, cfg = _folder_weights(Path(cn_folder))
    ldm = unet_to_ldm(state, cfg, controlnet=True)
    save_file({prefix + k: v.contiguous() for k, v in ldm.items()}, str(path))
    return Path(path)


def copy_configs_only(folder: str | Path, dest: str | Path) -> Path:
    """A copy of a diffusers folder without its weights: what job.base_model_config and
    job.controlnet_config need."""
    import shutil

    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return Path(dest)
