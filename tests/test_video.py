"""Frame-exact reads, shard encoding and merge, checked against an independent sequential decode."""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
from builders import decode_indices, make_clip, make_corrupt, make_truncated, probe_streams, read_frames

from vsr_ddp.plan import probe
from vsr_ddp.video import DecodeError, EncodeError, FrameReader, ShardWriter, merge

RANGES = [(0, 48), (0, 1), (5, 17), (11, 13), (12, 24), (13, 37), (35, 48), (47, 48)]


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    d = tmp_path_factory.mktemp("containers")
    return {ext: make_clip(d / f"c{ext}", frames=48, size=(64, 48), audio=True)
            for ext in (".mp4", ".mkv", ".mov", ".webm", ".avi")}


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".webm", ".avi"])
@pytest.mark.parametrize("backend", ["auto", "decord"])
def test_reads_are_frame_exact(containers, ext, backend):
    path = containers[ext]
    info = probe(path)
    assert info.frames == 48
    reference = read_frames(path)  # (48, H, W, 3) sequential decode with PyAV's own API
    reader = FrameReader(info, backend=backend, chunk=5)
    assert reader.backend == ("decord" if backend == "decord" and ext != ".avi" else "pyav")
    for start, end in RANGES:
        got = np.concatenate(list(reader.read(start, end)))
        assert got.shape == (end - start, 48, 64, 3)
        assert np.array_equal(got, reference[start:end]), f"{ext} [{start}, {end}) via {reader.backend}"


def test_sizes_decord_rejects_are_read_through_pyav(tmp_path):
    path = make_clip(tmp_path / "portrait.mp4", frames=20, size=(48, 64), audio=False)
    reference = read_frames(path)
    reader = FrameReader(probe(path), backend="decord", chunk=4)
    got = np.concatenate(list(reader.read(3, 17)))
    assert np.array_equal(got, reference[3:17])


@pytest.mark.parametrize("ext,fps", [(".mp4", Fraction(30000, 1001)), (".mkv", Fraction(25)),
                                     (".webm", Fraction(24000, 1001)), (".avi", Fraction(25))])
def test_probe_finds_exact_rate_count_and_streams(tmp_path, ext, fps):
    path = make_clip(tmp_path / f"p{ext}", frames=30, fps=fps, audio=True)
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (30, fps, 64, 48)
    assert len(info.audio) == 1


@pytest.mark.parametrize("consumer", ["fast", "slow"])
def test_reading_a_long_range_keeps_memory_flat(tmp_path, consumer):
    """Also when the frames are taken more slowly than they decode (a model stage): a reader that
    decodes ahead and keeps the frames (decord does) would hold the whole range."""
    import time

    def rss_mb() -> float:  # current, not peak: the test's own process did other things before
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    path = make_clip(tmp_path / "long.mp4", frames=600, size=(320, 240), audio=False, gop=60)
    reader = FrameReader(probe(path), chunk=8)
    base, peak = rss_mb(), 0.0
    for chunk in reader.read(0, 600):
        if consumer == "slow":
            time.sleep(0.02)  # 400 frames/s, slower than this decoder
        peak = max(peak, rss_mb())
    # 600 frames of 320x240 RGB are 138 MB; holding them would show.
    assert peak - base < 40, f"RSS grew by {peak - base:.0f} MB over the read"


def test_truncated_and_corrupt_inputs_fail_loudly(tmp_path):
    src = make_clip(tmp_path / "ok.mp4", frames=48, audio=True, faststart=True)
    for bad in (make_truncated(src, tmp_path / "cut.mp4"), make_corrupt(src, tmp_path / "bad.mp4")):
        reader = FrameReader(probe(bad))
        with pytest.raises(DecodeError, match="truncated|corrupt"):
            for _ in reader.read(0, 48):
                pass


def test_shards_merge_without_reencoding_in_frame_order(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=40, fps="30000/1001", audio=True)
    info = probe(src)
    frames = read_frames(src)
    enc = {"codec": "libx264", "crf": 18, "preset": "veryfast", "pix_fmt": "yuv420p"}
    shards = []
    for i, (a, b) in enumerate([(0, 7), (7, 20), (20, 40)]):
        w = ShardWriter(tmp_path / f"segment_{i:04d}.mp4", 64, 48, info.fps, enc)
        w.write(frames[a:b])
        w.close()
        shards.append((w.path, a, b - a))
        assert probe_streams(w.path)["frames"] == b - a
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    got = probe_streams(out)
    assert got["frames"] == 40 and got["fps"] == Fraction(30000, 1001)
    assert decode_indices(read_frames(out)) == list(range(40))
    assert abs(got["audio_duration"] - probe_streams(src)["audio_duration"]) < 0.05
    # faststart: the moov box comes before the media data
    head = out.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_encoder_death_is_an_error_not_a_short_shard(tmp_path):
    enc = {"codec": "libx264", "crf": 18, "preset": "veryfast", "pix_fmt": "yuv420p"}
    w = ShardWriter(tmp_path / "segment_0000.mp4", 64, 48, Fraction(25), enc)
    w.write(np.zeros((4, 48, 64, 3), np.uint8))
    w._proc.kill()
    with pytest.raises(EncodeError, match="encoder exited") as e:
        for _ in range(50):
            w.write(np.zeros((8, 48, 64, 3), np.uint8))
        w.close()
    assert e.value.signal == 9  # what lets the runner tell a stop signal from a broken input
    w.abort()
    assert not (tmp_path / "segment_0000.mp4").exists()
    assert not list(tmp_path.iterdir())


def test_encoder_choice_and_quality_mapping():
    from vsr_ddp.video import encoder_args, encoder_for_size, encoder_works, resolve_codec

    assert resolve_codec("libx265") == "libx265"
    assert resolve_codec("auto", "h264", cuda=False) == "libx264"
    assert resolve_codec("auto", "hevc", cuda=False) == "libx265"
    if not encoder_works("h264_nvenc"):  # no NVIDIA GPU here: auto falls back even when asked for CUDA
        assert resolve_codec("auto", "h264", cuda=True) == "libx264"
    fps = Fraction(30000, 1001)
    x264 = encoder_args({"codec": "libx264", "crf": 20, "preset": "slow"}, fps)
    x265 = encoder_args({"codec": "libx265", "crf": 20, "preset": "slow"}, fps)
    nvenc = encoder_args({"codec": "h264_nvenc", "crf": 20, "preset": "slow"}, fps)
    assert x264[x264.index("-crf") + 1] == "20" and x265[x265.index("-crf") + 1] == "25"
    assert nvenc[nvenc.index("-preset") + 1] == "p5" and nvenc[nvenc.index("-cq") + 1] == "20"
    assert x264[-1] == "90000"  # the timescale in which a 30000/1001 frame lasts 3003 ticks
    with pytest.raises(ValueError, match="resolved"):
        encoder_args({"codec": "auto", "crf": 20, "preset": "slow"}, fps)
    # each rank's NVENC is its own GPU's; software encoders take no -gpu
    on_gpu3 = encoder_args({"codec": "hevc_nvenc", "crf": 20, "preset": "slow"}, fps, gpu=3)
    assert on_gpu3[on_gpu3.index("-gpu") + 1] == "3"
    assert "-gpu" not in encoder_args({"codec": "libx264", "crf": 20, "preset": "slow"}, fps, gpu=3)
    # NVENC's frame size limit: larger videos get the software encoder of the same format
    h264 = {"codec": "h264_nvenc", "crf": 18, "preset": "medium"}
    assert encoder_for_size(h264, 3840, 2160) is h264
    assert encoder_for_size(h264, 7680, 4320) == {**h264, "codec": "libx264"}
    assert encoder_for_size({**h264, "codec": "hevc_nvenc"}, 7680, 4320)["codec"] == "hevc_nvenc"
    assert encoder_for_size({**h264, "codec": "hevc_nvenc"}, 8192, 8194)["codec"] == "libx265"
    assert encoder_for_size({**h264, "codec": "libx264"}, 9000, 9000)["codec"] == "libx264"


def test_hevc_shards_merge_too(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=20, audio=False)
    info = probe(src)
    frames = read_frames(src)
    enc = {"codec": "libx265", "crf": 18, "preset": "ultrafast", "pix_fmt": "yuv420p"}
    shards = []
    for i, (a, b) in enumerate([(0, 9), (9, 20)]):
        w = ShardWriter(tmp_path / f"segment_{i:04d}.mp4", 64, 48, info.fps, enc)
        w.write(frames[a:b])
        w.close()
        shards.append((w.path, a, b - a))
    merge(shards, info, tmp_path / "final.mp4")
    got = probe_streams(tmp_path / "final.mp4")
    assert got["frames"] == 20 and got["video_codec"] == "hevc"
    assert decode_indices(read_frames(tmp_path / "final.mp4")) == list(range(20))
