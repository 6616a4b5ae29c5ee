"""The upscale job with Real-ESRGAN-layout checkpoints (random weights), tiling, and model errors."""
from __future__ import annotations

import numpy as np
import pytest
import spandrel
import torch
from builders import decode_indices, make_clip, probe_streams, read_frames, save_rrdbnet, save_srvgg
from conftest import read_report, run_job
from test_e2e import psnr

from vsr_ddp import shards
from vsr_ddp.models.sr import Upscaler


def spandrel_direct(model_path, frames: np.ndarray) -> np.ndarray:
    """Independent inference: spandrel on the file, frame by frame, fp32 on the CPU."""
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    desc = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(state)).eval()
    outs = []
    with torch.no_grad():
        for f in frames:  # (H, W, 3) uint8
            x = torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255
            y = desc(x).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
            outs.append(y)
    return np.stack(outs)  # (N, H*s, W*s, 3) uint8


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("sr") / "clip.mp4", frames=12, size=(64, 48), audio=True)


@pytest.mark.parametrize("kind,scale,nproc", [
    pytest.param("rrdb", 4, 2, marks=pytest.mark.slow),  # two ranks: each loads the model once
    ("rrdb", 2, 1), ("srvgg", 4, 1)])
def test_real_esrgan_layout_checkpoint_matches_spandrel(kind, scale, nproc, small_clip, tmp_path):
    save = save_rrdbnet if kind == "rrdb" else save_srvgg
    model = save(tmp_path / f"{kind}_x{scale}.pth", scale=scale, seed=1)
    other = save(tmp_path / f"{kind}_x{scale}_other.pth", scale=scale, seed=2)
    out = tmp_path / "out"
    # crf 0: the only loss left is yuv420p's chroma subsampling
    run_job(["job=upscale", f"input={small_clip}", f"output={out}", f"job.model={model}",
             "work.segment_frames=5", "encode.crf=0", "encode.preset=ultrafast"], nproc=nproc)
    final = out / "clip.mp4"
    got = read_frames(final)
    src = read_frames(small_clip)
    assert got.shape == (12, 48 * scale, 64 * scale, 3)
    want = spandrel_direct(model, src)
    unrelated = spandrel_direct(other, src)
    assert psnr(got, want) > 30
    assert psnr(got, want) > psnr(got, unrelated) + 6  # it is this model's output, not any model's
    assert probe_streams(final)["frames"] == 12
    assert read_report(out)["videos"][0]["status"] == "ok"
    for rank in range(nproc):  # each rank loaded the model exactly once for its segments
        log = (out / ".vsr_ddp" / "logs" / f"rank{rank}.log").read_text()
        assert log.count("vsr_ddp.models.sr: loaded") == 1


def test_tiled_equals_untiled():
    """With tile_pad covering the receptive field, tiles are seamless: identical up to float noise."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        model = save_srvgg(Path(d) / "c.pth", scale=2, seed=3)
        frames = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
        whole = Upscaler(str(model), device=torch.device("cpu"))(frames)
        tiled = Upscaler(str(model), device=torch.device("cpu"), tile=16, tile_pad=24)(frames)
        thin = Upscaler(str(model), device=torch.device("cpu"), tile=16, tile_pad=0)(frames)
    assert whole.shape == tiled.shape == (3, 80, 112, 3)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    # and the test can tell: without context the seams show
    assert np.abs(whole.astype(int) - thin.astype(int)).max() > 1


def test_tiled_job_output_equals_untiled_job_output(small_clip, tmp_path):
    model = save_srvgg(tmp_path / "c.pth", scale=2, seed=4)
    outs = {}
    for name, extra in (("whole", []), ("tiled", ["job.tile=24", "job.tile_pad=24"])):
        run_job(["job=upscale", f"input={small_clip}", f"output={tmp_path / name}", f"job.model={model}",
                 "work.unit=video", *extra])
        outs[name] = read_frames(tmp_path / name / "clip.mp4")
    assert outs["whole"].shape == outs["tiled"].shape
    assert psnr(outs["whole"], outs["tiled"]) > 45
    assert decode_indices(outs["tiled"]) == list(range(12))


def test_outscale_resizes_model_output():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        model = save_srvgg(Path(d) / "c.pth", scale=4, seed=5)
        up = Upscaler(str(model), device=torch.device("cpu"), outscale=2)
        frames = np.zeros((2, 30, 40, 3), np.uint8)
        assert up(frames).shape == (2, 60, 80, 3)
        assert up.output_size(40, 30) == (80, 60)


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), (b"not a checkpoint", "cannot read")])
def test_bad_model_file_fails_before_any_work(content, needle, small_clip, tmp_path):
    model = tmp_path / "RealESRGAN_x4plus.pth"
    if content is not None:
        model.write_bytes(content)
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={small_clip}", f"output={out}", f"job.model={model}"], check=False)
    assert proc.returncode == 2
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and needle in line[0] and str(model) in line[0]
    assert "github.com/xinntao/Real-ESRGAN/releases" in line[0]
    assert "python -m vsr_ddp.models fetch realesrgan-x4plus" in line[0]
    assert not (out / "clip.mp4").exists() and not list(shards.work_dirs(out))  # no video, no work folder
    assert not list(out.rglob("*.mp4"))


def test_scale_mismatch_is_a_clear_error(tmp_path):
    model = save_srvgg(tmp_path / "c.pth", scale=4, seed=6)
    with pytest.raises(ValueError, match="x4 model.*job.outscale=2"):
        Upscaler(str(model), device=torch.device("cpu"), scale=2)


def test_spans_get_the_model_and_the_rest_the_fallback(small_clip, tmp_path):
    import cv2

    clip = make_clip(tmp_path / "c.mp4", frames=48, size=(64, 48), fps="30000/1001", audio=True)
    model = save_srvgg(tmp_path / "m.pth", scale=2, seed=9)
    out = tmp_path / "out"
    # 0.5 s .. 1 s at 29.97 fps = frames [15, 30): edges inside segments [10, 20) and [20, 30)
    run_job(["job=upscale", f"input={clip}", f"output={out}", f"job.model={model}", "job.spans=[0:00.5-0:01]",
             "work.segment_frames=10", "encode.crf=0", "encode.preset=ultrafast"])
    got = read_frames(out / "c.mp4")
    src = read_frames(clip)
    by_model = spandrel_direct(model, src)
    by_lanczos = np.stack([cv2.resize(f, (128, 96), interpolation=cv2.INTER_LANCZOS4) for f in src])
    chose_model = [psnr(g, m) > psnr(g, c) for g, m, c in zip(got, by_model, by_lanczos)]
    assert chose_model == [15 <= i < 30 for i in range(48)]
    assert decode_indices(got) == list(range(48))


def test_span_times_snap_to_frames():
    from fractions import Fraction

    from vsr_ddp.jobs.upscale import span_frames
    from vsr_ddp.plan import VideoInfo

    info = VideoInfo(path="v.mp4", frames=3000, fps=Fraction(30000, 1001), width=64, height=48, codec="h264")
    assert span_frames(["0:01:00-0:01:30"], info) == [(1798, 2697)]
    assert span_frames(["10-20.5", "1:30:00-2:00:00"], info) == [(300, 614)]
    with pytest.raises(ValueError, match="ends before it starts"):
        span_frames(["20-10"], info)
    with pytest.raises(ValueError, match="cannot read the time"):
        span_frames(["1m-2m"], info)


def test_transformer_checkpoint_with_size_requirements(tmp_path):
    """SwinIR (spandrel-detected, Real-ESRGAN-style `params` wrapper): frames smaller than the
    architecture's minimum are padded for the model and cropped back."""
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    torch.manual_seed(0)
    net = SwinIR(upscale=2, in_chans=3, img_size=16, window_size=4, img_range=1.0, depths=[1, 1],
                 embed_dim=12, num_heads=[2, 2], mlp_ratio=2, upsampler="pixelshuffle",
                 resi_connection="1conv")
    path = tmp_path / "swinir_x2.pth"
    torch.save({"params": net.state_dict()}, path)
    up = Upscaler(str(path), device=torch.device("cpu"))
    frames = np.random.default_rng(0).integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
    assert np.abs(up(frames).astype(int) - spandrel_direct(path, frames).astype(int)).max() <= 1
    # below the 16-px minimum
    small = np.random.default_rng(1).integers(0, 256, (1, 12, 14, 3), dtype=np.uint8)
    assert up(small).shape == (1, 24, 28, 3)


def test_out_of_memory_halves_the_batch_then_tiles_and_keeps_every_frame(tmp_path, monkeypatch):
    """The CUDA OOM path, driven on the CPU: pretend anything above 1 frame or a 64-px tile is too big."""
    model = save_srvgg(tmp_path / "c.pth", scale=2, seed=10)
    frames = np.random.default_rng(2).integers(0, 256, (5, 100, 140, 3), dtype=np.uint8)
    want = Upscaler(str(model), device=torch.device("cpu"))(frames)
    up = Upscaler(str(model), device=torch.device("cpu"), batch_size=4, tile_pad=24)
    real_infer = up._infer
    seen = []

    def fake_infer(batch, tile):
        seen.append((len(batch), tile))
        if len(batch) > 1 or not tile or tile > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_infer(batch, tile)

    monkeypatch.setattr(up, "_infer", fake_infer)
    got = up(frames)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # same frames, same order
    assert up.batch_size == 1 and up.tile == 64
    assert (4, 0) in seen and (1, 512) in seen and (1, 128) in seen and (1, 64) in seen
