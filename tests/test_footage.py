"""Footage as users have it: phone rotation, anamorphic DVD pixels, variable frame rate, interlacing.

Each output is checked the way a user's tools see it: ffmpeg's default decode (which applies a
display matrix, as players do), the stream's sample aspect ratio, PyAV's per-frame timestamps.
"""
from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from builders import (ffmpeg_decode, frame_times, luma_levels, make_clip, make_interlaced, make_rotated,
                      make_ten_bit_ramp, make_vfr, probe_streams)
from conftest import read_report, run_job

from vsr_ddp.plan import probe
from vsr_ddp.preview import GAP, LABEL_H
from vsr_ddp.video import FrameReader


def upscale(src, out, *extra):
    run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=bicubic", "job.scale=2",
             "log.progress=false", *extra])
    report = read_report(out)["videos"][0]
    assert report["status"] == "ok", report
    return out / (src.stem + ".mp4")


def halve(frames: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA)
                     for f in frames])


@pytest.mark.parametrize("degrees", [270, 90, 180])
def test_phone_rotation_is_applied_and_the_output_plays_upright(tmp_path, degrees):
    stored = make_clip(tmp_path / "stored.mp4", frames=12, size=(96, 64), fps="30", audio=True)
    src = make_rotated(stored, tmp_path / f"phone{degrees}.mp4", degrees)
    shown = ffmpeg_decode(src)  # what a player shows: ffmpeg applies the display matrix
    info = probe(src)
    assert (info.width, info.height) == (shown.shape[2], shown.shape[1])
    assert np.abs(np.concatenate(list(FrameReader(info).read(0, 12))).astype(int) - shown).mean() < 1

    out = upscale(src, tmp_path / "o", "work.segment_frames=5")
    with av.open(str(out)) as c:
        first = next(c.decode(video=0))
        assert first.rotation == 0  # pixels upright, no display matrix left to apply
    got = ffmpeg_decode(out)
    assert got.shape == (12, shown.shape[1] * 2, shown.shape[2] * 2, 3)
    assert np.abs(halve(got).astype(int) - shown).mean() < 6


def test_anamorphic_dvd_keeps_its_display_aspect_and_the_preview_shows_it(tmp_path):
    tags = "setparams=color_primaries=bt470bg:color_trc=smpte170m:colorspace=bt470bg"  # SD video
    src = make_clip(tmp_path / "dvd.mp4", frames=4, size=(720, 576), fps="25", audio=False,
                    video_opts=("-vf", f"setsar=64/45,{tags}", "-colorspace", "bt470bg"))
    info = probe(src)
    assert info.sar == Fraction(64, 45)
    out = upscale(src, tmp_path / "o", "job.preview=true")
    with av.open(str(out)) as c:
        vs = c.streams.video[0]
        assert (vs.width, vs.height) == (1440, 1152)
        assert vs.sample_aspect_ratio == Fraction(64, 45)
        assert vs.display_aspect_ratio == Fraction(16, 9)
        next(c.decode(vs))
        assert vs.codec_context.sample_aspect_ratio == Fraction(64, 45)  # in the H.264 stream too
        got_tags = [str(getattr(vs.codec_context, k)) for k in ("colorspace", "color_primaries", "color_trc")]
    with av.open(str(src)) as c:
        cc = c.streams.video[0].codec_context
        want_tags = [str(getattr(cc, k)) for k in ("colorspace", "color_primaries", "color_trc")]
    assert got_tags == want_tags and "2" not in want_tags  # carried, and not 'unspecified' (2)
    # the preview: default crop of 160x160 input pixels at x2, each panel widened by 64/45
    png = cv2.imread(str(out.with_name("dvd.preview.png")))
    assert png.shape[:2] == (LABEL_H + 320, 3 * round(320 * 64 / 45) + 2 * GAP)


def test_variable_frame_rate_keeps_every_timestamp_and_the_audio(tmp_path):
    src, times = make_vfr(tmp_path / "screen.mp4")  # 30 frames at 30 fps, then 15 at 10 fps
    info = probe(src)
    assert info.vfr and info.frames == 45 and info.time_of(45) == Fraction(5, 2)
    # segments of 20 frames: one spans the change of rate
    out = upscale(src, tmp_path / "o", "work.segment_frames=20")
    got_times, order = frame_times(out)
    assert order == list(range(45))
    assert got_times == times
    assert abs(probe_streams(out)["audio_duration"] - probe_streams(src)["audio_duration"]) < 0.03
    with av.open(str(out)) as c:
        assert abs(c.duration / 1e6 - 2.5) < 0.03


def test_variable_frame_rate_reads_by_timestamp_in_any_range(tmp_path):
    src, _ = make_vfr(tmp_path / "v.mp4", parts=((7, "24"), (9, "8"), (6, "30000/1001")), audio=False)
    info = probe(src)
    whole = np.concatenate(list(FrameReader(info, chunk=4).read(0, info.frames)))
    for a, b in [(0, 7), (6, 9), (15, 22), (21, 22)]:
        part = np.concatenate(list(FrameReader(info, backend="decord").read(a, b)))
        assert np.array_equal(part, whole[a:b])


def combing(frames: np.ndarray) -> float:
    """Mean difference between neighbouring rows less that between rows two apart: high when the
    two fields of a frame show the picture at different times."""
    f = frames.astype(np.float32).mean(axis=3)
    return float(np.abs(np.diff(f, axis=1)).mean() - np.abs(f[:, 2:] - f[:, :-2]).mean() / 2)


def test_interlaced_input_is_detected_and_deinterlaced(tmp_path):
    src = make_interlaced(tmp_path / "tv.mp4", frames=16)
    info = probe(src)
    assert info.interlaced
    woven = np.concatenate(list(FrameReader(info).read(0, 16)))
    reader = FrameReader(info, deinterlace=True)
    clean = np.concatenate(list(reader.read(0, 16)))
    reference = ffmpeg_decode(src, "bwdif=mode=send_frame:parity=auto:deint=interlaced")
    assert np.abs(clean.astype(int) - reference).mean() < 2
    assert combing(clean) < combing(woven) / 3
    # a segment gets exactly the frames a whole-video pass makes (bwdif reads one frame each side)
    parts = [np.concatenate(list(reader.read(a, b))) for a, b in [(0, 5), (5, 6), (6, 16)]]
    assert np.array_equal(np.concatenate(parts), clean)

    out = upscale(src, tmp_path / "o", "work.segment_frames=5")
    log = (tmp_path / "o" / ".vsr_ddp" / "logs" / "rank0.log").read_text()
    assert "deinterlacing with bwdif" in log
    assert np.abs(halve(ffmpeg_decode(out)).astype(int) - reference).mean() < 6
    off = upscale(src, tmp_path / "off", "decode.deinterlace=off")
    assert combing(ffmpeg_decode(off)) > 3 * combing(ffmpeg_decode(out))


def test_ten_bit_hevc_stays_ten_bit_and_h264_stays_the_8_bit_default(tmp_path):
    src = make_ten_bit_ramp(tmp_path / "ramp10.mp4")
    info = probe(src)
    assert (info.bit_depth, info.pix_fmt) == (10, "yuv420p10le")
    fmt, levels = luma_levels(src)
    assert levels > 800  # the source really has more than 8 bits of levels
    hevc = upscale(src, tmp_path / "hevc", "encode.format=hevc", "work.segment_frames=4")
    fmt, levels = luma_levels(hevc)
    # 16-bit frames from decoder to encoder: the levels survive (an 8-bit stage leaves ~220)
    assert fmt == "yuv420p10le" and levels > 800
    h264 = upscale(src, tmp_path / "h264")
    fmt, levels = luma_levels(h264)
    assert fmt == "yuv420p" and levels <= 256
    explicit = upscale(src, tmp_path / "x", "encode.format=hevc", "encode.pix_fmt=yuv420p")
    assert luma_levels(explicit)[0] == "yuv420p"
