"""FlashVSR's spatial tiles (job.flashvsr.tile, tile_overlap; issue 25 item 3), with tiny random
networks on the CPU:

* the tile grid: tiles every tile - overlap LR pixels, the last one shifted back inside the frame,
  a side no larger than a tile one tile (positions worked out by hand here);
* the blend weights: the linear ramps written here over each overlap, 1 elsewhere, no ramp at the
  frame's edges, summing to 1 at every pixel of the x4 frame (three tiles deep too);
* a tile at least as large as the frame is the untiled pipeline, bit for bit;
* the pixels only one tile covers are that tile's own stream (the untiled pipeline on the cropped
  tile, with the tile's noise place and the range's first frame), and the overlaps lie between the
  two tiles' values;
* streaming in pieces of any size equals one call, with tiles;
* the settings: checked (a bad one stops the command line with exit status 2 and one line), passed to
  the pipeline, recorded in the job's settings fingerprint;
* the command line runs tiles, and segments whose warm-up reaches frame 0 make the whole run's frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_job
from test_flashvsr_job import COMMON, flashvsr_job, write_folder
from test_flashvsr_pipeline import frames, networks

from vsr_ddp.config import ConfigError, FlashVSR, shipped
from vsr_ddp.models.flashvsr.pipeline import (FlashVSRTiny, blend_ramps, latent_noise, tile_grid,
                                              tile_starts)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch at one thread


def pipeline(seed: int = 0, **options) -> FlashVSRTiny:
    return FlashVSRTiny(*networks(seed), attention="dense", **options)


def tile_stream(pipe: FlashVSRTiny, lr: np.ndarray, top: int, left: int, th: int, tw: int,
                first_frame: int = 0) -> np.ndarray:
    """The untiled pipeline on one tile's crop, as the tiled pipeline runs that tile: its noise drawn
    with the tile's place (latent_noise), its range from ``first_frame``."""
    pipe.start(first_frame=first_frame)
    pipe._place = (top, left)
    return pipe.feed(lr[:, top:top + th, left:left + tw], last=True)


def test_the_tile_grid():
    # tile 64, overlap 16: a stride of 48
    assert tile_starts(200, 64, 16) == [0, 48, 96, 136]   # 0, 48, 96 end before 200; 136 = 200 - 64
    assert tile_starts(112, 64, 16) == [0, 48]            # 48 + 64 = 112: no shift needed
    assert tile_starts(100, 64, 16) == [0, 36]            # 36 = 100 - 64, overlapping the first by 28
    assert tile_starts(64, 64, 16) == [0] == tile_starts(50, 64, 16) == tile_starts(50, 0, 16)
    assert tile_starts(88, 48, 16) == [0, 32, 40]         # 32 + 48 = 80 < 88: one more at 40
    assert tile_grid(40, 100, 64, 16) == [(0, 0, 40, 64), (0, 36, 40, 64)]   # 40 rows: one row of tiles
    assert tile_grid(72, 72, 48, 16) == [(0, 0, 48, 48), (0, 24, 48, 48), (24, 0, 48, 48), (24, 24, 48, 48)]
    assert tile_grid(30, 20, 0, 16) == [(0, 0, 30, 20)]


def test_blend_weights_are_linear_ramps_summing_to_1():
    # 100 LR pixels, tiles [0, 64) and [36, 100): x4, [0, 256) and [144, 400), overlapping on [144, 256)
    left, right = blend_ramps(100, [0, 36], 64)
    assert left.shape == right.shape == (256,) and left.dtype == torch.float32
    k = torch.arange(112, dtype=torch.float64)
    ramp = ((k + 0.5) / 112).float()                      # the later tile's weight at pixel 144 + k
    assert torch.equal(left[:144], torch.ones(144)) and torch.equal(right[112:], torch.ones(144))
    assert torch.allclose(right[:112], ramp, rtol=0, atol=1e-7)
    assert torch.allclose(left[144:], ((112 - k - 0.5) / 112).float(), rtol=0, atol=1e-7)
    assert 0 < right[:112].min() and left[144:].max() < 1  # the ramp covers the whole overlap
    total = torch.zeros(400)
    total[:256] += left
    total[144:] += right
    assert torch.allclose(total, torch.ones(400), rtol=0, atol=1e-6)
    # tiles larger than half a tile apart overlap three deep: still a partition of unity
    starts = tile_starts(88, 48, 16)
    total = torch.zeros(88 * 4)
    for s, w in zip(starts, blend_ramps(88, starts, 48)):
        total[4 * s:4 * s + 192] += w
        assert w.min() > 0
    assert torch.allclose(total, torch.ones(88 * 4), rtol=0, atol=1e-6)
    # the pipeline's 2-D weights (rows x columns) sum to 1 over a 2 x 2 grid
    pipe = pipeline(tile=48, tile_overlap=16)
    pipe.feed(frames(1, 72, 72), last=False)
    total = torch.zeros(288, 288)
    for (top, left_, th, tw), w in zip(pipe._tiles, pipe._weights):
        total[4 * top:4 * (top + th), 4 * left_:4 * (left_ + tw)] += w
    assert len(pipe._weights) == 4 and torch.allclose(total, torch.ones(288, 288), rtol=0, atol=1e-6)
    assert (total == 1).float().mean() > 0.3 and torch.equal(pipe._weights[0][:96, :96], torch.ones(96, 96))


@torch.no_grad()
def test_a_tile_at_least_the_frame_is_the_untiled_pipeline():
    lr = frames(21, 40, 48, seed=1)
    whole = pipeline(1).feed(lr, last=True)
    for tile in (48, 64):
        pipe = pipeline(1, tile=tile, tile_overlap=16)
        assert np.array_equal(pipe.feed(lr, last=True), whole)
        assert not pipe._streams


@torch.no_grad()
def test_pixels_of_one_tile_are_its_own_stream():
    """A 2 x 2 grid of 48-pixel tiles over 72 x 72 frames (overlap 24 in LR pixels both ways), read
    from frame 8: each corner of 24 x 24 LR pixels (96 x 96 out) is one tile's alone."""
    lr = frames(21, 72, 72, seed=2)
    out = pipeline(2, tile=48, tile_overlap=16).feed(lr, last=False)
    assert len(out) == 0
    pipe = pipeline(2, tile=48, tile_overlap=16)
    pipe.start(first_frame=8)
    out = pipe.feed(lr, last=True)
    assert out.shape == (21, 288, 288, 3)
    ref = pipeline(2)
    own = {(top, left): tile_stream(ref, lr, top, left, 48, 48, first_frame=8) for top in (0, 24)
           for left in (0, 24)}
    for (top, left), tile_out in own.items():
        r, c = 4 * top, 4 * left                       # the tile's corner in the output
        ar, ac = (0 if top == 0 else 96), (0 if left == 0 else 96)  # its 96 x 96 pixels alone, tile coords
        assert np.array_equal(out[:, r + ar:r + ar + 96, c + ac:c + ac + 96],
                              tile_out[:, ar:ar + 96, ac:ac + 96]), (top, left)
    # the overlap between the top two tiles (rows [0, 96), columns [96, 192)) lies between their values
    a, b = own[(0, 0)][:, :96, 96:], own[(0, 24)][:, :96, :96]
    mid = out[:, :96, 96:192]
    assert np.all(np.minimum(a, b) <= mid) and np.all(mid <= np.maximum(a, b))
    assert not np.array_equal(mid, a) and not np.array_equal(mid, b)
    # each tile's noise is its own: the first tile's is the untiled rule's
    assert torch.equal(latent_noise(0, [8], 4, 4, 4), latent_noise(0, [8], 4, 4, 4, (0, 0)))
    assert not torch.equal(latent_noise(0, [8], 4, 4, 4), latent_noise(0, [8], 4, 4, 4, (0, 24)))


@torch.no_grad()
def test_pieces_equal_one_call_with_tiles():
    n, h, w = 34, 24, 72          # tiles [0, 48) and [24, 72) of 24 rows
    lr = frames(n, h, w, seed=3)
    pipe = pipeline(4, tile=48, tile_overlap=16)
    whole = pipe.feed(lr, last=True)
    assert whole.shape == (34, 96, 288, 3)
    for pieces in ([1, 5, 0, 13, 2, 9, 4], [24, 1, 9], [34]):
        outs, fed = [], 0
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            out = pipe.feed(lr[fed:fed + p], last=last)
            fed += p
            if not last:
                assert sum(len(o) for o in outs) + len(out) == (0 if fed < 25 else 21 + 8 * ((fed - 25) // 8))
                if fed >= 25:
                    assert len(pipe._streams) == 2 and pipe.cache_bytes() > sum(
                        pipe._stream_bytes(s) for s in pipe._streams[:1])
            outs.append(out)
        assert np.array_equal(np.concatenate(outs), whole)


def test_the_settings_are_checked():
    values = shipped("job/upscale", "flashvsr")
    assert (values["tile"], values["tile_overlap"]) == (0, 16)
    assert FlashVSR.from_values(dict(values, tile=32, tile_overlap=0)).tile == 32
    assert FlashVSR.from_values(dict(values, tile=0, tile_overlap=100)).tile == 0   # overlap unused
    for tile, overlap, says in ((16, 8, "job.flashvsr.tile=16: must be 0"), (-1, 16, "job.flashvsr.tile=-1"),
                                (64, 64, "job.flashvsr.tile_overlap=64: must be 0 or more and less than "
                                         "job.flashvsr.tile=64"),
                                (64, -1, "job.flashvsr.tile_overlap=-1")):
        with pytest.raises(ConfigError, match=says):
            FlashVSR.from_values(dict(values, tile=tile, tile_overlap=overlap))
    with pytest.raises(ValueError, match="tile"):
        pipeline(tile=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("flashvsr") / "FlashVSR-v1.1")


def test_the_settings_reach_the_pipeline_and_the_fingerprint(folder):
    job = flashvsr_job(folder, "job.flashvsr.tile=64", "job.flashvsr.tile_overlap=8")
    assert (job.temporal.tile, job.temporal.tile_overlap) == (64, 8)
    recorded = job.settings()["flashvsr"]
    assert (recorded["tile"], recorded["tile_overlap"]) == (64, 8)
    assert flashvsr_job(folder).settings()["flashvsr"]["tile"] == 0


@pytest.mark.parametrize("tile, overlap, says", [
    (16, 8, "job.flashvsr.tile=16: must be 0 (whole frames) or at least 32"),
    (64, 64, "job.flashvsr.tile_overlap=64: must be 0 or more and less than job.flashvsr.tile=64"),
])
def test_a_bad_tile_setting_stops_the_run_with_one_line(folder, tmp_path, tile, overlap, says):
    from builders import make_clip

    clip = make_clip(tmp_path / "in" / "v.mp4", frames=4, size=(32, 24), audio=False)
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={clip}", f"output={out}", "job.model=flashvsr",
                    f"job.flashvsr.dir={folder}", f"job.flashvsr.tile={tile}",
                    f"job.flashvsr.tile_overlap={overlap}", *COMMON], check=False)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:") and ln.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and says in errors[0], proc.stderr
    assert not (out / "v.mp4").exists()


def test_the_command_line_runs_tiles_and_segments_make_the_whole_run(folder, tmp_path, monkeypatch):
    """64 x 24 frames in tiles of 32 (three along the width, the last shifted back): two segments whose
    warm-up reaches frame 0 make the whole run's frames, tile by tile."""
    import os

    from builders import make_clip, read_frames
    from conftest import read_report

    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the run's torch threads: one (see one_thread)
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=30, size=(64, 24), audio=False)
    got = {}
    for name, unit in (("segments", "work.segment_frames=16"), ("whole", "work.unit=video")):
        run_job(["job=upscale", f"input={clip}", f"output={tmp_path / name}", "job.model=flashvsr",
                 f"job.flashvsr.dir={folder}", "job.flashvsr.tile=32", "job.flashvsr.tile_overlap=8", unit,
                 *COMMON])
        assert read_report(tmp_path / name)["videos"][0]["status"] == "ok"
        got[name] = read_frames(tmp_path / name / "v.mp4")
    assert got["whole"].shape == (30, 96, 256, 3)
    assert np.array_equal(got["segments"], got["whole"])
