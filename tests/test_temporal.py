"""The temporal model contract of job=upscale (vsr_ddp.models.temporal), with a tiny random
recurrent model on the CPU: segments read with context make the whole-video run's frames."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from builders import StubTemporal, StubWindow, make_clip, read_frames, save_srvgg
from conftest import one_and_two_ranks, read_report, run_job
from test_settings import settings

from vsr_ddp.jobs.upscale import UpscaleJob
from vsr_ddp.models import temporal
from vsr_ddp.models.temporal import Reach
from vsr_ddp import shards
from vsr_ddp.plan import VideoInfo, plan_units, probe


def video(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 10, 3), dtype=np.uint8)


def whole(model: StubTemporal, frames: np.ndarray) -> np.ndarray:
    model.start()
    return model.feed(frames, last=True)


def make_job(tmp_path, monkeypatch, model: StubTemporal, *overrides: str) -> UpscaleJob:
    weights = tmp_path / "stub.pth"
    weights.write_bytes(b"stub")
    monkeypatch.setattr(temporal, "load_temporal", lambda path, device: model)
    job = UpscaleJob(settings("input=a.mp4", "output=out", f"job.model={weights}", *overrides).job,
                     torch.device("cpu"))
    job.setup()
    return job


def run_units(job: UpscaleJob, frames: np.ndarray, chunk: int = 5):
    """Every unit of the job's plan, in process, as the runner drives the hooks: the outputs
    joined in frame order, and the units."""
    h, w = frames.shape[1:3]
    info = VideoInfo(path="v.mp4", frames=len(frames), fps=Fraction(30), width=w, height=h, codec="h264")

    def read(a, b):
        for i in range(a, b, chunk):
            yield frames[i:min(b, i + chunk)]

    units, outs = job.plan_video(info, 0), []
    for unit in units:
        job.begin(info, unit, lambda done: None)
        got = [job.process_piece(p, unit, info) for p in job.unit_pieces(read, unit, info)]
        got = np.concatenate([g for g in got if len(g)])
        assert len(got) == unit.frames, unit
        outs.append(got)
    return np.concatenate(outs), units


def test_the_planner_gives_asymmetric_context_and_aligned_starts():
    info = VideoInfo(path="v.mp4", frames=50, fps=Fraction(30), width=8, height=8, codec="h264")
    units = plan_units([info], "segment", 12, 3, context=(16, 1), align=5)  # overlap 3 is not used
    assert [(u.start, u.end, u.read_start, u.read_end) for u in units] == [
        (0, 15, 0, 16), (15, 30, 0, 31), (30, 45, 14, 46), (45, 50, 29, 50)]
    assert Reach(1, 2, recurrent=True, exact=True).context(16) == (16, 2)
    assert Reach(2, 2, recurrent=False, exact=True).context(16) == (2, 2)  # no warm-up for a window
    assert [(u.read_start, u.read_end) for u in plan_units([info], "segment", 20, 3)] == [
        (0, 23), (17, 43), (37, 50)]  # per-frame and other jobs: work.overlap as before


def test_streaming_in_pieces_equals_one_call():
    frames, model = video(17), StubTemporal()
    one = whole(model, frames)
    assert one.shape == (17, 16, 20, 3)
    for size in (1, 2, 3):
        model.start()
        parts = [model.feed(frames[i:i + size], last=i + size >= len(frames)) for i in range(0, 17, size)]
        assert np.array_equal(np.concatenate(parts), one), size


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_segments_read_from_frame_0_equal_the_whole_video_run_bit_for_bit(tmp_path, monkeypatch, chunk):
    frames, model = video(40), StubTemporal()
    job = make_job(tmp_path, monkeypatch, model, "work.segment_frames=12", "job.warmup=40")
    got, units = run_units(job, frames, chunk)
    assert [u.read_start for u in units] == [0, 0, 0, 0]
    assert np.array_equal(got, whole(StubTemporal(), frames))


def test_a_window_model_needs_no_warm_up_and_the_edge_rule_is_at_the_true_ends_only(tmp_path, monkeypatch):
    frames, model = video(40), StubTemporal(recurrent=False)
    job = make_job(tmp_path, monkeypatch, model, "work.segment_frames=12", "job.warmup=16")
    got, units = run_units(job, frames)
    assert [(u.read_start, u.read_end) for u in units] == [(0, 13), (11, 25), (23, 37), (35, 40)]
    assert np.array_equal(got, whole(StubTemporal(recurrent=False), frames))  # no seam at 12, 24, 36
    edge = whole(StubTemporal(recurrent=False), frames[12:24])  # a segment given no context
    assert not np.array_equal(edge[0], got[12]) and np.array_equal(edge[1:-1], got[13:23])


def test_a_longer_warm_up_brings_a_segments_first_frame_closer(tmp_path, monkeypatch):
    frames = video(60)
    ref = whole(StubTemporal(), frames).astype(np.int16)
    diffs = []
    for warmup in (0, 2, 8):
        job = make_job(tmp_path, monkeypatch, StubTemporal(), "work.segment_frames=30",
                       f"job.warmup={warmup}")
        got, units = run_units(job, frames)
        assert units[1].read_start == 30 - max(1, warmup)
        assert np.array_equal(got[:30], ref[:30])  # the first segment starts at the true start
        diffs.append(np.abs(got[30].astype(np.int16) - ref[30]).mean())
    assert diffs[0] > diffs[1] > diffs[2], diffs


def test_settings_name_the_reach_and_warm_up_and_what_is_unsupported_is_refused(tmp_path, monkeypatch):
    a = make_job(tmp_path, monkeypatch, StubTemporal(), "job.warmup=16").settings()
    b = make_job(tmp_path, monkeypatch, StubTemporal(), "job.warmup=32").settings()
    assert a != b and a["reach"]["recurrent"] and a["model"].startswith(str(tmp_path / "stub.pth"))
    for bad, key in (("job.tile=64", "job.tile"), ("job.outscale=3", "job.outscale"),
                     ("job.scale=4", "job.scale"), ("job.spans=[0-1]", "job.spans")):
        with pytest.raises(ValueError, match=key):
            make_job(tmp_path, monkeypatch, StubTemporal(), bad)
    joint = StubTemporal()
    joint.reach = Reach(0, 4, recurrent=False, exact=False)
    with pytest.raises(ValueError, match="batch-joint.*window and crossfade"):
        make_job(tmp_path, monkeypatch, joint)
    assert "window" not in a["reach"]  # a streaming model's settings as before the crossfade mode


def test_a_window_models_segments_read_the_windows_of_the_grid_and_equal_the_whole_run(tmp_path, monkeypatch):
    frames = video(22)  # windows of 5 sharing 2 (starts 0, 3, .., 18); segments 7, 7, 7 and 1
    model = StubWindow(5, 2)
    job = make_job(tmp_path, monkeypatch, model, "work.segment_frames=7")
    got, units = run_units(job, frames, chunk=4)
    assert [(u.start, u.end, u.read_start, u.read_end) for u in units] == [
        (0, 7, 0, 11), (7, 14, 3, 17), (14, 21, 12, 22), (21, 22, 18, 22)]
    assert model.calls == [5, 5, 5] + [5] * 4 + [5, 5, 4] + [4]  # 11 windows; 7 in a whole run
    one = StubWindow(5, 2)
    ref, whole_units = run_units(make_job(tmp_path, monkeypatch, one, "work.unit=video"), frames, chunk=4)
    assert len(whole_units) == 1 and one.calls == [5, 5, 5, 5, 5, 5, 4]
    assert np.array_equal(got, ref)  # bit for bit, across the seams at 7, 14 and 21


def test_the_crossfade_is_a_linear_ramp_over_each_overlap(tmp_path, monkeypatch):
    frames, stub = video(22), StubWindow(5, 2)
    got, _ = run_units(make_job(tmp_path, monkeypatch, StubWindow(5, 2), "work.segment_frames=7"), frames)
    w0, w1, w5, w6 = (stub.run(frames[a:a + 5]) for a in (0, 3, 15, 18))
    assert np.array_equal(got[:3], w0[:3]) and np.array_equal(got[20:], w6[2:])  # one window each
    for k, t in enumerate((3, 4)):  # the overlap of windows 0 and 1: later weight (k+1)/3
        want = np.float32((2 - k) / 3) * w0[t].astype(np.float32) + np.float32((k + 1) / 3) * w1[t - 3]
        assert np.array_equal(got[t], np.clip(np.rint(want), 0, 255).astype(np.uint8)), t
        exact = (2 - k) / 3 * w0[t].astype(np.float64) + (k + 1) / 3 * w1[t - 3]
        assert np.abs(got[t] - exact).max() <= 0.5 + 1e-3
        assert not np.array_equal(w0[t], w1[t - 3])  # the windows disagree there
    want = np.float32(2 / 3) * w5[3].astype(np.float32) + np.float32(1 / 3) * w6[0]  # the last overlap
    assert np.array_equal(got[18], np.clip(np.rint(want), 0, 255).astype(np.uint8))
    assert temporal.window_weight(1, 4, 22, 5, 2) == pytest.approx(2 / 3)


def test_a_window_models_outputs_do_not_depend_on_the_chunks_and_hold_at_most_a_window(tmp_path, monkeypatch):
    frames = video(23)
    job = make_job(tmp_path, monkeypatch, StubWindow(6, 2), "work.segment_frames=5")
    held, feed = [], temporal.Crossfade.feed

    def spy(self, chunk):
        out = feed(self, chunk)
        held.append(len(self.held))
        return out

    monkeypatch.setattr(temporal.Crossfade, "feed", spy)
    outs = [run_units(job, frames, chunk)[0] for chunk in (1, 2, 3)]
    assert outs[0].shape == (23, 16, 20, 3)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert max(held) < 6


@pytest.mark.parametrize("crossfade", [0, 5, 6])
def test_a_window_model_needs_a_crossfade_inside_its_window(tmp_path, monkeypatch, crossfade):
    with pytest.raises(ValueError, match="0 < crossfade < window") as err:
        make_job(tmp_path, monkeypatch, StubWindow(5, crossfade))
    assert "\n" not in str(err.value)
    a, b = (make_job(tmp_path, monkeypatch, StubWindow(5, o)).settings()["reach"] for o in (1, 2))
    assert (a["window"], a["crossfade"], b["crossfade"]) == (5, 1, 2)


def test_a_window_model_through_the_runner_segments_equal_one_unit(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=20, audio=False)
    weights = tmp_path / "stub.pth"
    weights.write_bytes(b"stub")
    monkeypatch.setattr(temporal, "load_temporal", lambda path, device: StubWindow(5, 2))
    common = [f"input={clip}", f"job.model={weights}", "encode.crf=0", "encode.preset=ultrafast",
              "log.progress=false"]
    run_job(["job=upscale", f"output={tmp_path / 'seg'}", "work.segment_frames=7", *common])
    run_job(["job=upscale", f"output={tmp_path / 'one'}", "work.unit=video", *common])
    assert read_report(tmp_path / "seg")["videos"][0]["status"] == "ok"
    seg, one = (read_frames(tmp_path / d / "v.mp4") for d in ("seg", "one"))
    assert seg.shape[0] == 20 and np.array_equal(seg, one)


def test_the_real_loader_leaves_per_frame_checkpoints_to_spandrel(tmp_path):
    assert temporal.load_temporal(save_srvgg(tmp_path / "compact.pth", scale=2), "cpu") is None


def test_a_run_with_a_temporal_model_through_the_runner(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=30, audio=False)
    weights = tmp_path / "stub.pth"
    weights.write_bytes(b"stub")
    monkeypatch.setattr(temporal, "load_temporal", lambda path, device: StubTemporal())
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={clip}", f"output={out}", f"job.model={weights}", "job.warmup=30",
             "work.segment_frames=8", "encode.crf=0", "encode.preset=ultrafast", "log.progress=false",
             "work.keep_shards=true"])
    assert read_report(out)["videos"][0]["status"] == "ok"
    assert [shards.read_sidecar(shards.work_dir(out, info, "2x"), u)["read_start"]
            for info in [probe(clip)] for u in plan_units([info], "segment", 8, 0)] == [0, 0, 0, 0]
    src = read_frames(clip)
    got = read_frames(out / "v.mp4").astype(np.int16)
    want = whole(StubTemporal(), src).astype(np.int16)
    fresh = np.concatenate([whole(StubTemporal(), src[a:a + 8]) for a in range(0, 30, 8)]).astype(np.int16)
    assert got.shape == want.shape
    firsts = [8, 16, 24]  # yuv420p noise only, where segments given no context would differ
    assert np.abs(got - want)[firsts].mean() < np.abs(got - fresh)[firsts].mean() / 2
    proc = run_job(["job=upscale", f"input={clip}", f"output={tmp_path / 'o2'}", f"job.model={weights}",
                    "job.tile=64"], check=False)
    assert proc.returncode == 2 and "job.tile=64" in proc.stderr


@pytest.mark.slow
def test_two_ranks_make_the_frames_of_one_rank(tmp_path, monkeypatch):
    """AnimeSR with random weights (the temporal model the ranks' own processes can load). The one
    rank runs with the CPU threads each of the two gets: a float sum split over other threads may
    round a pixel a level the other way, and the recurrent state carries it on."""
    animesr = pytest.importorskip("vsr_ddp.models.animesr")
    from safetensors.torch import save_file

    weights = tmp_path / "animesr.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in animesr.MSRSWVSR().state_dict().items()}, str(weights))
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=20, size=(32, 24), audio=False)
    common = [f"input={clip}", f"job.model={weights}", "work.segment_frames=6", "job.warmup=4",
              "encode.crf=0", "encode.preset=ultrafast", "log.progress=false"]
    one, two = one_and_two_ranks(common, tmp_path, monkeypatch)
    assert one.shape == two.shape == (20, 96, 128, 3)
    assert np.array_equal(one, two)
