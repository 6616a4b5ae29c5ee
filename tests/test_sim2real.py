"""job=sim2real: FRESCO's keyframe rule and correspondences, its attention and feature optimization
judged by their effect, reference latents on a tiny random SD 1.5 + ControlNet, skipped videos,
missing weights, and command-line runs whose pixels are checked."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import (copy_configs_only, make_clip, probe_streams, read_frames, save_controlnet_single_file,
                      save_sd15_single_file, save_tiny_controlnet, save_tiny_sd15, synth_frames)
from conftest import job_runner, read_report, run_job
from hydra import compose, initialize_config_dir
from test_configs import CONF

from vsr_ddp import jobs, shards
from vsr_ddp.models import fresco
from vsr_ddp.models.flow import warp
from vsr_ddp.models.propagation import propagate_keys
from vsr_ddp.plan import SkipVideo, Unit

# every frame a keyframe, in one batch: the output is FRESCO's alone, no propagation between keys
ALL_KEYS = ["job.short_side=64", "job.steps=2", "job.strength=1.0", "job.batch_size=4",
            "job.fresco.opt_iters=2", "job.keyframes.min_interval=1", "job.keyframes.max_interval=1"]
TINY_JOB = ["job.short_side=64", "job.steps=3", "job.strength=1.0", "job.batch_size=4",
            "job.keyframes.min_interval=3", "job.keyframes.max_interval=3", "job.fresco.opt_iters=5",
            "job.ebsynth.search_vote_iters=1", "job.ebsynth.patchmatch_iters=1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    return {"sd": save_tiny_sd15(d / "sd15"), "cn": save_tiny_controlnet(d / "control_canny")}


@pytest.fixture(scope="module")
def single_files(models, tmp_path_factory):
    """The tiny models as original-format single files, and their configs in weightless folders."""
    d = tmp_path_factory.mktemp("single")
    files = {"sd": save_sd15_single_file(models["sd"], d / "realistic.safetensors"),
             "sd_config": copy_configs_only(models["sd"], d / "sd15_configs"),
             "cn_config": copy_configs_only(models["cn"], d / "control_configs")}
    for prefix in ("control_model.", ""):
        name = d / f"cn{prefix or '_bare'}.safetensors"
        files[f"cn{prefix}"] = save_controlnet_single_file(models["cn"], name, prefix=prefix)
    assert not [*files["sd_config"].rglob("*.safetensors"), *files["cn_config"].rglob("*.safetensors")]
    return files


@pytest.fixture(scope="module")
def pipe(models):
    return fresco.FrescoPipeline.from_local(models["sd"], models["cn"])


# --- Keyframes -------------------------------------------------------------------------------------


def test_keyframes_follow_frescos_rule():
    assert fresco.select_keyframes(23, 5, 5) == [0, 5, 10, 15, 20]  # equal intervals: fixed, from 0
    diffs = np.array([0.001 * (i % 7) for i in range(30)])
    for i, v in {10: 1.0, 11: 0.9, 20: 0.8, 5: 0.5, 25: 0.4, 15: 0.3, 28: 2.0, 1: 2.0}.items():
        diffs[i] = v
    # 28 and 1 are within min_interval of the ends; 11 is too close to 10 once 10 is a key;
    # insertion stops as soon as no two neighbouring keys are more than 8 apart.
    assert fresco.select_keyframes(30, 3, 8, diffs) == [0, 5, 10, 15, 20, 25, 29]
    assert fresco.select_keyframes(30, 3, 30, diffs) == [0, 29]
    assert fresco.select_keyframes(1, 3, 8, np.zeros(1)) == [0]
    # the cue: blurred MSE to the previous frame, largest at a cut
    scene = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = np.stack([np.roll(scene if i < 6 else 255 - scene, i, axis=1) for i in range(12)])  # cut at 6
    d = fresco.frame_differences(frames)
    assert d[0] == 0 and int(np.argmax(d)) == 6
    # batches: the first holds batch_size keys, later ones batch_size - 2; a short last one borrows
    keys = list(range(0, 45, 5))  # 9 keys
    assert fresco.keyframe_batches(keys, 8) == [[0, 5, 10, 15, 20, 25], [30, 35, 40]]
    assert fresco.keyframe_batches(keys[:8], 8) == [keys[:8]]
    assert fresco.keyframe_batches(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9]]
    assert fresco.work_size(1920, 1080, 512) == (896, 512) and fresco.work_size(64, 48, 64) == (64, 64)


def scan_link(bwd_flow, bwd_occ, images, size):
    """FRESCO's get_single_mapping_ind as published: one token at a time."""
    h, w = size
    H, W = bwd_flow.shape[-2:]
    flow = F.interpolate(bwd_flow[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    flow = flow * torch.tensor([w / W, h / H]).view(2, 1, 1)
    occ = F.interpolate(bwd_occ[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    visible = ~(occ > 0.5)
    col = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).flatten(2)
    n = h * w
    mapping, mask = [-1] * n, [False] * n
    for p in range(n):
        y, x = divmod(p, w)
        ty, tx = int(torch.round(y + flow[1, y, x])), int(torch.round(x + flow[0, y, x]))
        if not (0 <= ty < h and 0 <= tx < w and visible[y, x]):
            continue
        q = ty * w + tx
        mask[p] = True
        if mapping[q] == -1:
            mapping[q] = p
            continue
        prev = mapping[q]
        if ((col[1][:, prev] - col[0][:, q]) ** 2).mean() > ((col[1][:, p] - col[0][:, q]) ** 2).mean():
            mask[prev], mapping[q] = False, p
        else:
            mask[p] = False
    unused = iter([p for p in range(n) if not mask[p]])
    unlinked = [m == -1 for m in mapping]
    return torch.tensor([next(unused) if m == -1 else m for m in mapping]), torch.tensor(unlinked)


def test_trajectories_are_the_published_scan_vectorized():
    g = torch.Generator().manual_seed(0)
    flow = torch.randint(-3, 4, (2, 24, 32), generator=g).float()  # whole pixels: many collisions
    occ = (torch.rand(24, 32, generator=g) < 0.2).float()
    images = torch.rand(2, 3, 24, 32, generator=g)
    images[:, :, :, :8] = 0.5  # equal colours: ties go to the lowest index
    for size in ((12, 16), (24, 32)):
        mapping, unlinked = fresco.link_next(flow, occ, images, size)
        ref_map, ref_unlinked = scan_link(flow, occ, images, size)
        assert torch.equal(mapping, ref_map) and torch.equal(unlinked, ref_unlinked)
        assert torch.equal(mapping.sort().values, torch.arange(size[0] * size[1]))  # a permutation
    # a static clip: trajectories stay put and every frame sees every other
    still = np.repeat(synth_frames(1, (64, 64)), 4, axis=0)
    guide = fresco.guidance_for(still, [(8, 8)], torch.device("cpu"))
    fwd, bwd, mask = guide.paths[64]
    assert torch.equal(fwd[:, 0], torch.arange(64).expand(4, -1)) and mask.all()
    assert guide.masks[64][0].all() and not guide.masks[64][1:].any()  # frame 0, nothing newly visible


# --- The pipeline on tiny random weights -----------------------------------------------------------


def attention_case(seed: int = 0):
    """A diffusers self-attention layer with random weights, the hidden states of 3 frames x 2 CFG
    halves on a 4 x 4 token grid, and FRESCO's guidance of a moving clip at that grid."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    hidden = torch.randn(2 * 3, 16, 8)  # (chunk * F, L, C)
    frames = synth_frames(3, (64, 64), seed=seed)  # moving shapes: occlusions, broken trajectories
    control = fresco.FrescoControl()
    control.frames = 3
    control.guidance = fresco.guidance_for(frames, [(4, 4)], torch.device("cpu"))
    return attn, hidden, control


def test_fresco_attention_with_every_part_off_is_diffusers_own_and_each_part_changes_it():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, hidden, control = attention_case()
    proc = fresco.FrescoAttnProcessor(control, "up_blocks.3.attentions.0.transformer_blocks.0.attn1")
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden)
        off = proc(attn, hidden)
        assert torch.allclose(off, plain, atol=1e-6)  # guidance present, every part off: plain SDPA
        control.stored[proc.name] = torch.randn_like(hidden)  # the reference pass's input
        changed = {}
        for part in ("cross_frame", "spatial", "temporal"):
            setattr(control, part, True)
            changed[part] = (proc(attn, hidden) - plain).abs().max().item()
            setattr(control, part, False)
        assert torch.allclose(proc(attn, hidden), plain, atol=1e-6)  # and switched off again
    assert all(v > 1e-3 for v in changed.values()), changed
    # the case is not degenerate: later frames have newly visible tokens, and not all of them are
    assert control.guidance.masks[16][1:].any() and not control.guidance.masks[16][1:].all()


def test_feature_optimization_hook_changes_the_decoder_input_only_when_on(pipe):
    """The forward pre-hook on a decoder block replaces its input when the control says so."""
    c = pipe.control
    block = pipe.unet.up_blocks[2]
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"]),
                                             with_kwargs=True)  # runs after FRESCO's hook
    frames = fresco.resize_frames(synth_frames(3, (64, 48)), (64, 64))
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = pipe.encode_prompt("a red car").repeat_interleave(3, dim=0)
    try:
        c.frames, c.guidance = 3, fresco.guidance_for(frames, pipe.token_sizes(64, 64), pipe.device)
        c.opt = {"temporal": True, "spatial_weight": 0.0, "iters": 3, "lr": 0.2}
        c.opt_layers = (2,)
        with torch.no_grad():
            for optimize in (False, True):
                c.optimize = optimize
                pipe.unet(latents, 500, encoder_hidden_states=embeds)
    finally:
        handle.remove()
        c.reset()
    plain, optimized = seen
    assert plain.shape == optimized.shape and (plain - optimized).abs().max() > 1e-3


@pytest.fixture(scope="module")
def switched(pipe):
    """One batch of three keys translated with every FRESCO part on, then with each part off alone,
    then with all off: same frames, keys, prompt and seed, so only the switch differs."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    frames = fresco.resize_frames(synth_frames(3, (64, 48)), (64, 64))
    embeds = pipe.encode_prompt("a red car", "lowres")
    # temporal attention at every step (t >= 0) and optimization at the first: each part acts
    base = dict(steps=2, strength=1.0, batch_size=3, opt_iters=2, temporal_attn_min_t=0)
    parts = ("cross_frame_attn", "spatial_attn", "temporal_attn", "feature_opt")
    runs = {"on": base, **{p: {**base, p: False} for p in parts},
            "off": {**base, **dict.fromkeys(parts, False)}}
    out = {k: pipe.translate(frames, [0, 1, 2], embeds, fresco.FrescoSettings.shipped(**v))
           for k, v in runs.items()}
    out["again"] = pipe.translate(frames, [0, 1, 2], embeds, fresco.FrescoSettings.shipped(**base))
    torch.set_num_threads(torch_threads)
    return out


@pytest.mark.parametrize("part", ["cross_frame_attn", "spatial_attn", "temporal_attn", "feature_opt"])
def test_each_part_can_be_switched_off_and_switching_it_changes_the_keys(switched, part):
    on, off = switched["on"], switched[part]
    assert all(np.array_equal(on[k], switched["again"][k]) for k in on)  # a rerun is bit-identical
    diff = np.mean([np.abs(on[k].astype(np.int16) - off[k]).mean() for k in on])
    assert diff > 1.0, f"{part} off changed the keys by {diff:.3f} grey levels on average"


def test_with_every_part_off_the_unet_runs_diffusers_attention(pipe, switched, one_thread):
    """All parts off: the FRESCO processors give what diffusers' AttnProcessor2_0 gives."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    frames = fresco.resize_frames(synth_frames(3, (64, 48)), (64, 64))
    embeds = pipe.encode_prompt("a red car", "lowres")
    off = fresco.FrescoSettings.shipped(steps=2, strength=1.0, batch_size=3, cross_frame_attn=False,
                                        spatial_attn=False, temporal_attn=False, feature_opt=False)
    fresco_procs = pipe.unet.attn_processors
    try:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        plain = pipe.translate(frames, [0, 1, 2], embeds, off)
    finally:
        pipe.unet.set_attn_processor(fresco_procs)
    assert all(np.array_equal(plain[k], switched["off"][k]) for k in plain)
    assert not all(np.array_equal(plain[k], switched["on"][k]) for k in plain)


def test_processors_are_installed_and_references_carry_across_batches(pipe, one_thread):
    procs = pipe.unet.attn_processors
    fresco_names = sorted(k for k, p in procs.items() if isinstance(p, fresco.FrescoAttnProcessor))
    assert fresco_names == sorted(pipe.fresco_processors) and len(fresco_names) == 4
    assert all(k.startswith(("up_blocks.2.", "up_blocks.3.")) and ".attn1." in k for k in fresco_names)
    assert all(type(p).__name__ == "AttnProcessor2_0" for k, p in procs.items() if k not in fresco_names)

    frames = fresco.resize_frames(synth_frames(10, (64, 48)), (64, 64))  # (10, 64, 64, 3)
    keys = list(range(10))
    embeds = pipe.encode_prompt("a red car, best quality", "lowres")
    seen = {}
    settings = fresco.FrescoSettings.shipped(steps=3, strength=1.0, batch_size=4, opt_iters=3)
    out = pipe.translate(frames, keys, embeds, settings,
                         on_step=lambda b, i, t, lat: seen.__setitem__((b, i), lat.clone()))
    assert sorted(out) == keys and all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in out.values())
    batches = fresco.keyframe_batches(keys, 4)  # [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9]]
    assert len(batches) == 4
    # Later batches start with key 0 and the previous batch's last key, with their recorded latents.
    for b in range(1, 4):
        n_prev = len(batches[b - 1]) + (0 if b == 1 else 2)
        for i in range(3):
            assert torch.equal(seen[(b, i)][0], seen[(0, i)][0])
            assert torch.equal(seen[(b, i)][1], seen[(b - 1, i)][n_prev - 1])


def test_a_half_precision_vae_that_overflows_is_redone_in_float32(models, one_thread, caplog):
    """inf/NaN from an fp16 VAE would be black frames with no error: the pipeline notices, says so
    and decodes in float32 from then on (A1111's --no-half-vae, automatically)."""
    half = fresco.FrescoPipeline.from_local(models["sd"], models["cn"], dtype=torch.float16)
    with torch.no_grad():  # push the decoder's output beyond float16's 65504
        half.vae.decoder.conv_out.weight.mul_(60000)
        half.vae.decoder.conv_out.bias.mul_(60000)
    frames = fresco.resize_frames(synth_frames(3, (64, 48)), (64, 64))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).half() / 127.5 - 1
    z = half.vae_encode(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.isfinite(half.vae.decode(z / half.vae.config.scaling_factor).sample).all()
    settings = fresco.FrescoSettings.shipped(steps=2, strength=1.0, batch_size=3, opt_iters=1)
    out = half.translate(frames, [0, 1, 2], half.encode_prompt("a red car"), settings)
    assert half.vae.dtype == torch.float32 and half.unet.dtype == torch.float16
    assert "the VAE overflowed in float16 while it decoded" in caplog.text
    assert sorted(out) == [0, 1, 2]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in out.values())
    assert torch.isfinite(half.vae_decode(z)).all()


def test_feature_optimization_pulls_frames_together_and_keeps_statistics():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 8, 8, generator=g)
    noise = 0.5 * torch.randn(1, 8, 8, 8, generator=g)
    sample = torch.cat([base, base.roll(1, dims=3) + noise])  # (2, 8, 8, 8)
    flow = torch.zeros(2, 2, 64, 64)  # pairs 0 -> 1 and 1 -> 0, at 8x the token grid
    flow[0, 0] = 8  # frame 1 is frame 0 moved right by one token
    flow[1, 0] = -8
    back = -flow
    occ = torch.zeros(2, 64, 64)
    guide = fresco.Guidance(flow, back, occ, occ, {}, {})
    out = fresco.optimize_feature(sample, 2, guide, None, iters=20)
    left = torch.zeros(1, 2, 8, 8)
    left[:, 0] = -1  # frame 1's token p came from frame 0's p - 1
    err = lambda x: (x[1] - warp(x[:1], left, padding="zeros")[0])[:, :, 1:].abs().mean()  # noqa: E731
    assert err(out) < err(sample)
    assert torch.allclose(out.mean((2, 3)), sample.mean((2, 3)), atol=1e-4)  # AdaIN: same channel means
    assert torch.allclose(out.std((2, 3)), sample.std((2, 3)), atol=1e-3)


def test_bench_sim2real_runs_a_batch(models, one_thread):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from vsr_ddp.bench import bench_sim2real

    parts = (UNet2DConditionModel.from_pretrained(models["sd"], subfolder="unet"),
             ControlNetModel.from_pretrained(models["cn"]),
             AutoencoderKL.from_pretrained(models["sd"], subfolder="vae"),
             DDPMScheduler.from_pretrained(models["sd"], subfolder="scheduler"))
    result = bench_sim2real(size=64, frames=3, steps=2, device="cpu", components=parts, opt_iters=2,
                            vae_slicing=True, vae_tiling=True)
    assert parts[2].use_slicing and parts[2].use_tiling
    assert result["frames"] == 3 and result["seconds"] > 0 and result["models"] == "given"


# --- The job ---------------------------------------------------------------------------------------


def sim2real_cfg(tmp_path, models, *extra):
    """The ``job`` subtree of a sim2real config (what make_job takes)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[
            "job=sim2real", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
            f"job.prompts={tmp_path / 'prompts'}", f"job.base_model={models['sd']}",
            f"job.controlnet={models['cn']}", f"log.dir={tmp_path / 'logs'}", "log.progress=false",
            *extra]).job


def test_missing_weights_fail_before_work_naming_what_to_put_where(tmp_path, models, single_files):
    from safetensors.torch import load_file, save_file

    (tmp_path / "prompts").mkdir()
    single = tmp_path / "realistic.safetensors"
    single.write_bytes(b"\0" * 16)
    sd = load_file(str(single_files["sd"]))
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
              tmp_path / "novae.safetensors")
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1), **sd}, tmp_path / "sdxl.safetensors")
    norm = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    save_file({k: v for k, v in sd.items() if k != norm}, tmp_path / "no_norm.safetensors")
    del sd["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    save_file(sd, tmp_path / "hole.safetensors")
    configs = [f"job.base_model_config={single_files['sd_config']}"]
    cases = [
        (["job.base_model=/nowhere/sd15"], "job.base_model=/nowhere/sd15: not found"),
        ([f"job.base_model={single}"], "set job.base_model_config to a local diffusers folder"),
        ([f"job.base_model={single}", *configs], "realistic.safetensors: not a readable .safetensors file"),
        ([f"job.base_model={tmp_path / 'novae.safetensors'}", *configs],
         "lacks the VAE (first_stage_model.*); set job.vae to a diffusers AutoencoderKL folder"),
        ([f"job.base_model={tmp_path / 'sdxl.safetensors'}", *configs], "is an SDXL checkpoint"),
        ([f"job.base_model={tmp_path / 'hole.safetensors'}", *configs],
         "hole.safetensors: could not load it as an original-format SD 1.5 checkpoint with the given "
         "configs (NotImplementedError: tensors its configs call for are missing from the file)"),
        ([f"job.base_model={tmp_path / 'no_norm.safetensors'}", *configs],
         "no_norm.safetensors lacks 1 tensor(s) its configs call for (text_encoder.final_layer_norm.weight)"),
        ([f"job.controlnet={single_files['sd']}", f"job.controlnet_config={single_files['cn_config']}"],
         "realistic.safetensors: not a ControlNet checkpoint (no input_hint_block.* weights)"),
        (["job.controlnet=/nowhere/cn"], "job.controlnet=/nowhere/cn: not found"),
        (["job.control=hed"], "needs ControlNetHED.pth in job.annotator (not set)"),
        (["job.control=depth", f"job.annotator={tmp_path}"], "dpt_hybrid-midas-501f0c75.pt"),
        (["job.prompts=/nowhere/prompts"], "one <video stem>.txt prompt per video"),
    ]
    for extra, words in cases:
        job = jobs.make_job(sim2real_cfg(tmp_path, models, *extra), torch.device("cpu"))
        with pytest.raises(ValueError) as e:
            job.setup()
        assert words in str(e.value) and "\n" not in str(e.value)
    # through the command line: one line on stderr, exit status 2, before any work
    make_clip(tmp_path / "in" / "a.mp4", frames=2, audio=False)  # the input itself is fine
    proc = run_job(["job=sim2real", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                    f"job.prompts={tmp_path / 'prompts'}", "job.base_model=/nowhere/sd15",
                    f"job.controlnet={models['cn']}"], check=False)
    assert proc.returncode == 2 and "error: job.base_model=/nowhere/sd15: not found" in proc.stderr


def settings_of(model) -> dict:
    c = model.config
    items = c.to_dict() if hasattr(c, "to_dict") else dict(c)  # transformers or diffusers config
    return {k: v for k, v in items.items() if k != "_name_or_path"}


@pytest.mark.parametrize("cn_prefix", ["control_model.", ""])
def test_single_file_checkpoints_load_the_weights_of_the_folders(tmp_path, models, single_files, pipe,
                                                                 cn_prefix, one_thread):
    """An original-format SD 1.5 file and ControlNet file (configs from weightless local folders) give the
    job the very weights and configs of the diffusers folders they were written from."""
    (tmp_path / "prompts").mkdir()
    f = single_files
    job = jobs.make_job(sim2real_cfg(tmp_path, models, f"job.base_model={f['sd']}",
                                     f"job.controlnet={f['cn' + cn_prefix]}",
                                     f"job.base_model_config={f['sd_config']}",
                                     f"job.controlnet_config={f['cn_config']}"), torch.device("cpu"))
    job.setup()
    for part in ("unet", "vae", "text_encoder", "controlnet"):
        want, got = getattr(pipe, part).state_dict(), getattr(job.pipe, part).state_dict()
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k], want[k]) for k in want), part
        assert settings_of(getattr(job.pipe, part)) == settings_of(getattr(pipe, part)), part
    assert dict(job.pipe.scheduler.config) == dict(pipe.scheduler.config)
    # and the same network: one ControlNet + UNet step agrees to float precision (tensors at other
    # addresses take other SIMD paths, so not bit for bit)
    torch.manual_seed(0)
    latents, hint = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    embeds = pipe.encode_prompt("a red car")
    assert torch.equal(job.pipe.encode_prompt("a red car"), embeds)

    def step(p):
        down, mid = p.controlnet(latents, 500, encoder_hidden_states=embeds, controlnet_cond=hint,
                                 return_dict=False)
        return p.unet(latents, 500, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample

    with torch.no_grad():
        assert torch.allclose(step(job.pipe), step(pipe), atol=1e-5)


def test_a_single_file_without_a_vae_takes_job_vae(tmp_path, models, single_files, pipe):
    from safetensors.torch import load_file, save_file

    (tmp_path / "prompts").mkdir()
    sd = load_file(str(single_files["sd"]))
    novae = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, novae)
    job = jobs.make_job(sim2real_cfg(tmp_path, models, f"job.base_model={novae}",
                                     f"job.base_model_config={single_files['sd_config']}",
                                     f"job.vae={models['sd'] / 'vae'}"), torch.device("cpu"))
    job.setup()
    want, got = pipe.vae.state_dict(), job.pipe.vae.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_hed_annotator_loads_from_a_local_folder(tmp_path, one_thread):
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")  # random weights
    maps = fresco.ControlMaps("hed", str(tmp_path))
    frame = synth_frames(1, (64, 48))[0]
    edges = maps(frame)
    assert edges.shape == (48, 64, 3) and edges.dtype == np.uint8
    assert fresco.ControlMaps("canny")(frame).shape == (48, 64, 3)


@pytest.mark.slow
def test_depth_annotator_loads_from_a_local_folder(tmp_path, one_thread):
    """controlnet-aux's MiDaS (DPT-Hybrid, about 490 MB of random weights here) from
    job.annotator, by the file name ControlNet's Annotators repository gives it."""
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)  # no download: random
    torch.save(net.state_dict(), tmp_path / fresco.ANNOTATOR_FILES["depth"])
    del net
    maps = fresco.ControlMaps("depth", str(tmp_path))
    depth = maps(synth_frames(1, (64, 48))[0])
    assert depth.shape == (48, 64, 3) and depth.dtype == np.uint8
    (tmp_path / fresco.ANNOTATOR_FILES["depth"]).unlink()  # 490 MB: not left in pytest's tmp


def test_every_frame_comes_from_the_engine_interval_by_interval():
    calls = []

    def engine(frames, left, right):  # job=propagate's Propagator contract: owned frames of the interval
        calls.append((len(frames), int(left[0, 0, 0]), None if right is None else int(right[0, 0, 0])))
        return np.repeat(left[None], len(frames) - (right is not None), axis=0)

    frames = np.zeros((11, 4, 4, 3), np.uint8)
    styled = {k: np.full((4, 4, 3), k, np.uint8) for k in (0, 4, 8)}
    out = propagate_keys(frames, styled, engine)
    assert calls == [(5, 0, 4), (5, 4, 8), (3, 8, None)]  # [0, 4] and [4, 8] with both keys; 8.. forward
    assert [int(f[0, 0, 0]) for f in out] == [0] * 4 + [4] * 4 + [8] * 3
    calls.clear()
    assert len(propagate_keys(frames[:9], styled, engine)) == 9 and calls == [(5, 0, 4), (5, 4, 8)]


def test_a_video_is_read_in_pieces_and_comes_out_as_if_held_whole(tmp_path, models, one_thread):
    """The job never holds the video: pieces are the keyframes, then one key interval each; the
    frames it makes are those of the whole-video computation (keys by frame difference here)."""
    from vsr_ddp.plan import probe
    from vsr_ddp.video import FrameReader

    clip = make_clip(tmp_path / "in" / "v.mp4", frames=15, size=(80, 48), audio=False, seed=5)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "v.txt").write_text("a red car")
    job = jobs.make_job(sim2real_cfg(tmp_path, models, *TINY_JOB[:-4], "job.keyframes.min_interval=2",
                                     "job.keyframes.max_interval=5", *TINY_JOB[-2:]), torch.device("cpu"))
    job.setup()
    info = probe(clip)
    unit = Unit(0, 0, 0, info.frames, 0, info.frames)
    pieces = list(job.unit_pieces(FrameReader(info).read, unit, info))
    kinds = [p[0] for p in pieces]
    assert kinds[0] == "keys" and set(kinds[1:]) == {"interval"}
    keys = pieces[0][2]
    assert keys[0] == 0 and keys[-1] == 14 and len(keys) > 2 and sorted(pieces[0][3]) == keys
    assert all(b - a <= 5 for a, b in zip(keys, keys[1:]))
    assert [(p[1], p[2]) for p in pieces[1:]] == list(zip(keys, keys[1:])) + [(14, 15)]
    assert all(len(p[3]) == p[2] - p[1] + (p[2] < 15) for p in pieces[1:])  # an interval and its right key
    out = np.concatenate([job.process_piece(p, unit, info) for p in pieces])

    frames = read_frames(clip)  # decoded independently (PyAV), the whole video at once
    work = fresco.resize_frames(frames, fresco.work_size(80, 48, 64))  # (15, 64, 128, 3)
    assert fresco.select_keyframes(15, 2, 5, fresco.frame_differences(work)) == keys
    opts = job.video_options("v")
    styled = job.pipe.translate(work, keys, job.pipe.encode_prompt(opts.prompt + opts.added_prompt,
                                                                   opts.negative_prompt),
                                job.settings_for(opts), control_maps=job.maps)
    want = fresco.resize_frames(propagate_keys(work, styled, job.propagator), (80, 48))
    assert out.shape == want.shape == (15, 48, 80, 3)
    assert np.array_equal(out, want)


def test_prompts_and_overrides_by_stem(tmp_path, models):
    p = tmp_path / "prompts"
    p.mkdir()
    (p / "car_01.txt").write_text("a red car on a wet street\n")
    (p / "car_01.yaml").write_text("strength: 0.5\nseed: 7\nnegative_prompt: blurry\n")
    (p / "car_02.txt").write_text("a truck")
    (p / "car_02.json").write_text(json.dumps({"steps": 30, "colour": "red"}))
    job = jobs.make_job(sim2real_cfg(tmp_path, models), torch.device("cpu"))
    opts = job.video_options("car_01")
    assert (opts.prompt, opts.strength, opts.seed, opts.negative_prompt, opts.steps) == \
        ("a red car on a wet street", 0.5, 7, "blurry", 20)
    with pytest.raises(SkipVideo, match="no prompt"):
        job.video_options("car_03")
    with pytest.raises(ValueError, match="unknown setting"):
        job.video_options("car_02")


class SkippingJob(jobs.Job):
    """Copies frames; leaves out videos whose name starts with 'x'."""

    name = "skipper"

    def __init__(self, cfg, device):
        pass

    def tag(self):
        return "skip"

    def settings(self):
        return {"job": self.name}

    def plan_video(self, info, vi):
        if info.stem.startswith("x"):
            raise SkipVideo("no prompt for it")
        return [Unit(vi, 0, 0, info.frames, 0, info.frames)]

    def process_unit(self, frames, unit, info):
        return frames


def test_a_skipped_video_is_reported_and_is_not_a_failure(tmp_path, monkeypatch):
    make_clip(tmp_path / "in" / "a.mp4", frames=6, audio=False)
    make_clip(tmp_path / "in" / "x.mp4", frames=6, audio=False)
    out = tmp_path / "out"
    assert job_runner(SkippingJob, tmp_path / "in", out, monkeypatch, "encode.preset=ultrafast").run() == 0
    report = {v["input"].rsplit("/", 1)[1]: v for v in read_report(out)["videos"]}
    assert report["a.mp4"]["status"] == "ok"
    assert report["x.mp4"]["status"] == "skipped" and report["x.mp4"]["reason"] == "no prompt for it"
    assert not (out / "x.mp4").exists()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_the_command_line_writes_the_translated_keyframes_of_each_videos_prompt(tmp_path, models, one_thread):
    """Pixels, not counts: through ``python -m vsr_ddp``, the keyframes of each output video are the
    pipeline's translation of that video's keyframes with that video's prompt (up to H.264); two
    prompts give two different sets of keys, the same prompt and seed the same ones."""
    src = tmp_path / "in"
    for name in ("a", "b", "c"):  # one clip three times: only the prompts differ
        make_clip(src / f"{name}.mp4", frames=4, size=(64, 48), audio=False, seed=4)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, text in (("a", "a red car"), ("b", "a blue sky at night"), ("c", "a red car")):
        (prompts / f"{name}.txt").write_text(text)
    out = tmp_path / "out"
    run_job(["job=sim2real", f"input={src}", f"output={out}", f"job.prompts={prompts}",
             f"job.base_model={models['sd']}", f"job.controlnet={models['cn']}", "encode.preset=ultrafast",
             # random weights make noise-like keys, which 4:2:0 chroma alone takes to ~28 dB: lossless
             # x264 in 4:4:4 leaves the RGB <-> YUV rounding, so a tight bound can tell keys apart
             "encode.crf=0", "encode.pix_fmt=yuv444p", "log.progress=false", *ALL_KEYS], timeout=240)
    result = {name: read_frames(out / f"{name}.mp4") for name in "abc"}
    assert all(r.shape == (4, 48, 64, 3) for r in result.values())

    job = jobs.make_job(sim2real_cfg(tmp_path, models, *ALL_KEYS), torch.device("cpu"))
    job.setup()
    keys = [0, 1, 2, 3]
    work = fresco.resize_frames(read_frames(src / "a.mp4"), fresco.work_size(64, 48, 64))
    want = {}
    for name in "ab":
        opts = job.video_options(name)
        embeds = job.pipe.encode_prompt(opts.prompt + opts.added_prompt, opts.negative_prompt)
        styled = job.pipe.translate(work, keys, embeds, job.settings_for(opts), control_maps=job.maps)
        want[name] = fresco.resize_frames(np.stack([styled[k] for k in keys]), (64, 48))
        for i, k in enumerate(keys):
            assert psnr(result[name][k], want[name][i]) > 40, (name, k, psnr(result[name][k], want[name][i]))
    # the other prompt's keys are far from these: the prompt, not noise, made them
    for i, k in enumerate(keys):
        assert psnr(result["b"][k], want["a"][i]) < 25 and psnr(result["a"][k], want["b"][i]) < 25
    assert np.array_equal(result["a"], result["c"])  # same clip, prompt and seed: the same video


@pytest.mark.slow
def test_two_ranks_three_videos_through_the_command_line(tmp_path, models):
    src = tmp_path / "in"
    make_clip(src / "a.mp4", frames=10, size=(64, 48), fps="30000/1001", audio=True)
    make_clip(src / "b.mp4", frames=6, size=(64, 48), audio=False)  # no prompt: skipped
    make_clip(src / "c.mp4", frames=8, size=(96, 64), fps="25", audio=True, seed=3)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a real car on a road")
    (prompts / "c.txt").write_text("a real street at night")
    (prompts / "c.json").write_text(json.dumps({"seed": 3, "strength": 0.9}))
    out = tmp_path / "out"
    proc = run_job(["job=sim2real", f"input={src}", f"output={out}", f"job.prompts={prompts}",
                    f"job.base_model={models['sd']}", f"job.controlnet={models['cn']}", "job.control=canny",
                    "encode.preset=ultrafast", "log.progress=false", "work.bundle_frames=1", *TINY_JOB],
                   nproc=2, timeout=240)
    report = {v["input"].rsplit("/", 1)[1]: v for v in read_report(out)["videos"]}
    assert report["b.mp4"]["status"] == "skipped" and "no prompt" in report["b.mp4"]["reason"]
    assert report["a.mp4"]["status"] == report["c.mp4"]["status"] == "ok", proc.stderr[-2000:]
    for name, frames, fps, size in (("a", 10, Fraction(30000, 1001), (64, 48)),
                                    ("c", 8, Fraction(25), (96, 64))):
        got = probe_streams(out / f"{name}.mp4")
        assert got["frames"] == frames and got["fps"] == fps and (got["width"], got["height"]) == size
        assert got["audio_codec"] is not None
    # whole videos, the kept ones only, each its own unit (work.bundle_frames=1): who made it
    sides = bundles_by_clip(out)
    assert sorted(sides) == ["a", "c"]
    assert sorted(json.loads(text)["rank"] for text in sides.values()) == [0, 1]  # one each: a rank
    assert not (out / "b.mp4").exists()  # takes the next video when it is free

    # A new prompt for c and a run again: c is redone, a is kept as it was.
    before = bundles_by_clip(out)
    (prompts / "c.txt").write_text("a real street in the rain")
    run_job(["job=sim2real", f"input={src}", f"output={out}", f"job.prompts={prompts}",
             f"job.base_model={models['sd']}", f"job.controlnet={models['cn']}", "job.control=canny",
             "encode.preset=ultrafast", "log.progress=false", "work.bundle_frames=1", *TINY_JOB], timeout=240)
    after = bundles_by_clip(out)
    assert after["a"] == before["a"] and after["c"] != before["c"]
    assert probe_streams(out / "c.mp4")["frames"] == 8


def bundles_by_clip(out) -> dict:
    """The record of each bundle of one clip under ``out``, as text, by the clip's relative path."""
    found = {}
    for p in shards.bundle_sidecars(out):
        [clip] = json.loads(p.read_text())["clips"]
        found[clip["rel"]] = p.read_text()
    return found


def test_calibrate_estimates_a_sim2real_run_and_says_what_it_leaves_out(tmp_path, models):
    src = make_clip(tmp_path / "in" / "a.mp4", frames=6, size=(64, 48), audio=False)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.txt").write_text("a red car")
    proc = run_job(["job=sim2real", f"input={src}", f"output={tmp_path / 'out'}",
                    f"job.prompts={tmp_path / 'prompts'}", f"job.base_model={models['sd']}",
                    f"job.controlnet={models['cn']}", "job.short_side=64", "dry_run=true",
                    "job.calibrate=true", "device=cpu"])
    assert "estimate: about" in proc.stdout and "frames/s per rank at 64x48" in proc.stdout
    assert "propagation only" in proc.stderr and "SD 1.5 translation" in proc.stderr
    assert not (tmp_path / "out" / "a.mp4").exists()
