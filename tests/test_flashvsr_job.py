"""FlashVSR as job=upscale's temporal model (job.model=flashvsr, issue 25), with a tiny random
folder of the published file names on the CPU:

* load_flashvsr reads the DiT's shape off its file (heads of 128), the published 1.3B shapes too;
* the command line upscales every frame x4 from the folder, report ok; so does mode=full (the Wan VAE
  decoder from Wan2.1_VAE.pth in the folder);
* a missing file and a bad job.flashvsr setting stop the run with exit status 2 and one line;
* segments: read starts on the step grid (multiples of 8), the warm-up rounded up to it, job.warmup
  auto resolved and recorded; a segmented run whose warm-ups reach frame 0 equals the whole run bit
  for bit; 9 frames past a segment's end (the Reach's after) keep its last owned outputs off the
  end-of-range padding, 8 do not; a segment's noise is the whole run's (noise by absolute frame);
* two ranks make the frames of one rank (slow: torchrun);
* the bench entry's CPU configuration runs."""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from builders import StubTemporal, make_clip, read_frames
from conftest import one_and_two_ranks, read_report, run_job
from test_settings import settings
from test_temporal import make_job, run_units

from vsr_ddp.jobs.upscale import UpscaleJob
from vsr_ddp.models.flashvsr.decoder import LQProjector, TCDecoder
from vsr_ddp.models.flashvsr.dit import DiTConfig, WanDiT, config_from_shapes
from vsr_ddp.models.flashvsr.pipeline import FILES, VAE_FILE, FlashVSRTiny, load_flashvsr
from vsr_ddp.models.flashvsr.vae import WanVAEDecoder
from vsr_ddp.plan import VideoInfo

TINY = DiTConfig(dim=128, num_heads=1, num_layers=1, ffn_dim=32, text_dim=16, freq_dim=16)
COMMON = ["encode.crf=0", "encode.pix_fmt=yuv444p", "encode.preset=ultrafast", "log.progress=false"]


def write_folder(folder, config: DiTConfig = TINY, seed: int = 0):
    """A FlashVSR folder of the published names with tiny random networks (dim 128: one head)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dit = WanDiT(config)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / FILES["dit"]))
    torch.save(LQProjector(out_dim=config.dim, hidden=(8, 12)).state_dict(), folder / FILES["lq_proj"])
    torch.save(TCDecoder(channels=(6, 5, 4, 3), latent_channels=config.out_dim).state_dict(),
               folder / FILES["decoder"])
    torch.save(torch.randn(1, 5, config.text_dim), folder / FILES["prompt"])
    torch.save(WanVAEDecoder(dim=8, z_dim=config.out_dim).state_dict(), folder / VAE_FILE)  # mode=full's
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("flashvsr") / "FlashVSR-v1.1")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch at one thread


def clip_frames(n: int, h: int = 24, w: int = 32) -> np.ndarray:
    from vsr_ddp.demo import natural_frames

    return np.stack(list(natural_frames(n, (w, h))))


def flashvsr_job(folder, *overrides: str) -> UpscaleJob:
    job = UpscaleJob(settings("input=a.mp4", "output=out", "job.model=flashvsr", f"job.flashvsr.dir={folder}",
                              *overrides).job, torch.device("cpu"))
    job.setup()
    return job


def test_the_dit_shape_comes_from_the_file(folder):
    pipe = load_flashvsr(folder, "cpu", torch.float32)
    assert pipe.dit.config == TINY
    with torch.device("meta"):
        published = WanDiT(DiTConfig())  # Wan 2.1 1.3B: 1536 wide, 12 heads of 128, 30 blocks
    assert config_from_shapes({k: tuple(v.shape) for k, v in published.state_dict().items()}) == DiTConfig()


@pytest.mark.parametrize("mode", ["tiny", pytest.param("full", marks=pytest.mark.slow)])
def test_the_command_line_upscales_every_frame_x4(folder, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the run's torch threads: one (see one_thread)
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=30, size=(32, 24), audio=False)
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={clip}", f"output={out}", "job.model=flashvsr",
             f"job.flashvsr.dir={folder}", f"job.flashvsr.mode={mode}", "work.segment_frames=16", *COMMON])
    assert read_report(out)["videos"][0]["status"] == "ok"
    got = read_frames(out / "v.mp4")
    assert got.shape == (30, 96, 128, 3)
    if mode == "tiny":  # job.warmup=auto (48) reaches frame 0 from both segments: the whole run's frames
        run_job(["job=upscale", f"input={clip}", f"output={tmp_path / 'whole'}", "job.model=flashvsr",
                 f"job.flashvsr.dir={folder}", "work.unit=video", *COMMON])
        assert np.array_equal(got, read_frames(tmp_path / "whole" / "v.mp4"))


@pytest.mark.parametrize("override, says", [
    ("job.flashvsr.version=2", "job.flashvsr.version=2: must be 1.1"),
    ("job.flashvsr.mode=large", "job.flashvsr.mode=large: must be tiny or full"),
    ("job.flashvsr.attention=flash", "job.flashvsr.attention=flash: must be sparse or dense"),
    ("job.flashvsr.kv_ratio=0.5", "job.flashvsr.kv_ratio=0.5: must be at least 1"),
    ("job.flashvsr.dir=null", "job.model=flashvsr needs job.flashvsr.dir"),
    ("job.warmup=soon", "job.warmup=soon: must be"),
    ("missing", "missing posi_prompt.pth"),
    ("no-vae", "missing Wan2.1_VAE.pth"),
])
def test_a_bad_setting_or_a_missing_file_stops_the_run_with_one_line(folder, tmp_path, override, says):
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=4, size=(32, 24), audio=False)
    model_dir = folder
    if override in ("missing", "no-vae"):  # a copy of the folder without a file
        model_dir = write_folder(tmp_path / "partial")
        (model_dir / (FILES["prompt"] if override == "missing" else VAE_FILE)).unlink()
        override = "job.flashvsr.mode=" + ("tiny" if override == "missing" else "full")
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={clip}", f"output={out}", "job.model=flashvsr",
                    f"job.flashvsr.dir={model_dir}", override, *COMMON], check=False)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:") and ln.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and says in errors[0], proc.stderr
    # no work done: no video, shard, sidecar or bundle record
    assert not [*out.rglob("*.mp4"), *out.rglob("segment_*"), *out.rglob("bundle-*")]


def test_segments_start_on_the_step_grid_and_the_warmup_is_resolved(folder, tmp_path, monkeypatch):
    info = VideoInfo(path="v.mp4", frames=100, fps=Fraction(30), width=32, height=24, codec="h264")
    job = flashvsr_job(folder, "work.segment_frames=20", "job.warmup=20")
    assert job.temporal.reach.align == 8 and job.temporal.reach.after == 9
    units = job.plan_video(info, 0)
    assert [(u.start, u.end, u.read_start, u.read_end) for u in units] == [
        (0, 24, 0, 33), (24, 48, 0, 57), (48, 72, 24, 81), (72, 96, 48, 100), (96, 100, 72, 100)]
    assert job.settings()["warmup"] == 24  # 20 rounded up to the step grid
    # a short warm-up: the read range still takes its whole first window (25 frames)
    assert [(u.read_start, u.read_end) for u in flashvsr_job(folder, "work.segment_frames=8",
                                                             "job.warmup=0").plan_video(info, 0)][:2] == [
        (0, 25), (8, 33)]
    auto = flashvsr_job(folder).settings()
    assert auto["warmup"] == FlashVSRTiny.default_warmup >= 40 and auto["flashvsr"]["version"] == "1.1"
    # AnimeSR-like models keep their number (and so their settings fingerprint): auto is 16
    assert make_job(tmp_path, monkeypatch, StubTemporal()).settings()["warmup"] == 16


@torch.no_grad()
def test_segments_whose_warmup_reaches_frame_0_equal_the_whole_run(folder):
    frames = clip_frames(45)
    job = flashvsr_job(folder, "work.segment_frames=12", "job.warmup=48")
    got, units = run_units(job, frames, chunk=7)
    assert len(units) == 3 and all(u.read_start == 0 and u.read_end < 45 for u in units[:2])
    whole = job._whole(frames)
    assert got.shape == whole.shape == (45, 96, 128, 3)
    assert np.array_equal(got, whole)


@pytest.mark.slow  # many seconds of CPU
@torch.no_grad()
def test_nine_frames_past_the_end_keep_the_last_owned_outputs_off_the_padding(folder):
    """A read range from frame 16 (on the grid): its outputs up to frame e - 1 (e a segment end, on
    the grid) are the same whatever comes after e + 8 (read_end = e + 9), but not always when the
    range stops one frame earlier (its last step then pads: e = 40 here); and a segment's latents get
    the whole run's noise and positions, so with the reach of this one-block model covered (64
    frames) a segment read from frame 32 makes the whole run's frames from frame 96 on."""
    frames = np.random.default_rng(0).integers(0, 256, (150, 24, 32, 3), dtype=np.uint8)  # every frame new
    pipe = load_flashvsr(folder, "cpu", torch.float32)

    def run(a, b):
        pipe.start(first_frame=a)
        return pipe.feed(frames[a:b], last=True)

    far = run(16, 150)
    short = []
    for e in (40, 48, 56, 64, 72):
        assert np.array_equal(run(16, e + 9)[:e - 16], far[:e - 16]), e
        short.append(np.array_equal(run(16, e + 8)[:e - 16], far[:e - 16]))
    assert not all(short)
    whole = run(0, 150)
    assert np.array_equal(run(32, 150)[64:], whole[96:])  # a warm-up of 64 frames
    pipe.start()  # without first_frame, the noise and positions are those of a range from frame 0
    assert not np.array_equal(pipe.feed(frames[32:150], last=True)[64:], whole[96:])


@pytest.mark.slow
def test_two_ranks_make_the_frames_of_one_rank(folder, tmp_path, monkeypatch):
    """The one rank runs with the CPU threads each of the two gets (tests/test_temporal.py's test
    of the same name says why)."""
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=40, size=(32, 24), audio=False)
    common = [f"input={clip}", "job.model=flashvsr", f"job.flashvsr.dir={folder}", "work.segment_frames=16",
              "job.warmup=8", *COMMON]
    one, two = one_and_two_ranks(common, tmp_path, monkeypatch)
    assert one.shape == two.shape == (40, 96, 128, 3)
    assert np.array_equal(one, two)


def test_the_bench_entry_runs_on_the_cpu():
    from vsr_ddp.bench import bench_flashvsr

    r = bench_flashvsr(torch.device("cpu"), frames=9, size=(32, 24))
    [(label, row)] = r.items()
    assert "tiny random configuration, CPU" in label and row["frames/s"] > 0
