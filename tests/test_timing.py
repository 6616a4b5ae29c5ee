"""The merged video's timeline, as users' tools see it: every frame at n / fps, for every shard layout.

A shard's B-frame delay depends on how many frames it holds (x264 and x265 give a 1- or 2-frame
shard none, longer ones two); joining shards whose delays differ used to shift the timeline, and
ffmpeg's default decode then repeated frames (61 frames in, 63 out). Each merged file here is read
back the way users read it: ffmpeg's default decode to raw frames (constant-rate output at the
stream's rate, so a mistimed frame shows up as a repeat or a drop), and PyAV frame by frame.
"""
from __future__ import annotations

import subprocess
from fractions import Fraction

import av
import pytest
from builders import (FFMPEG, SUBTITLE_TEXTS, audio_onset, decode_indices, ffmpeg_decode, frame_times,
                      make_clip, probe_streams, read_frames, subtitle_cues, with_beep)
from conftest import read_report, run_job

from vsr_ddp.plan import probe
from vsr_ddp.video import EncodeError, ShardWriter, check_timeline, merge

# (name, shard sizes): a last shard of 1, 2 and 3 frames, a 1-frame video, interior shards of several sizes
LAYOUTS = [("last1", [30, 30, 1]), ("last2", [30, 30, 2]), ("last3", [30, 30, 3]), ("one_frame", [1]),
           ("mixed", [5, 1, 2, 17, 1, 3, 4])]
RATES = ["25", "30000/1001", "24000/1001"]


def check_merged(out, src, frames: int, fps: Fraction) -> None:
    """What a user sees: count, order, per-frame times, average rate, duration, audio length."""
    decoded = ffmpeg_decode(out)
    assert len(decoded) == frames, f"ffmpeg's default decode gives {len(decoded)} frames, not {frames}"
    assert decode_indices(decoded) == list(range(frames))
    times, order = frame_times(out)
    assert order == list(range(frames))
    assert times == [n / fps for n in range(frames)]
    with av.open(str(out)) as c:
        vs = c.streams.video[0]
        if frames > 1:
            assert vs.average_rate == fps
        duration = Fraction(vs.duration) * vs.time_base
        assert abs(duration - frames / fps) <= 1 / fps
        if c.streams.audio:
            a = c.streams.audio[0]
            audio_start = Fraction(a.start_time or 0) * a.time_base
            assert abs(audio_start - Fraction(vs.start_time) * vs.time_base) < 0.001
    got, want = probe_streams(out), probe_streams(src)
    if "audio_duration" in want:
        assert abs(got["audio_duration"] - want["audio_duration"]) < 0.03


def encode_shards(tmp_path, src, sizes, codec="libx264"):
    info = probe(src)
    frames = read_frames(src)
    enc = {"codec": codec, "crf": 18, "preset": "veryfast" if codec == "libx264" else "ultrafast",
           "pix_fmt": "yuv420p"}
    shards, start = [], 0
    for i, n in enumerate(sizes):
        w = ShardWriter(tmp_path / f"segment_{i:04d}.mp4", info.width, info.height, info.fps, enc)
        w.write(frames[start:start + n])
        w.close()
        shards.append((w.path, start, n))
        start += n
    return info, shards


@pytest.mark.parametrize("fps", RATES)
@pytest.mark.parametrize("name,sizes", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_merged_timeline_is_exact_for_every_shard_layout(tmp_path, name, sizes, fps):
    src = make_clip(tmp_path / "in.mp4", frames=sum(sizes), fps=fps, audio=True)
    info, shards = encode_shards(tmp_path, src, sizes)
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    check_merged(out, src, sum(sizes), Fraction(fps))


@pytest.mark.parametrize("name,sizes", [LAYOUTS[0], LAYOUTS[4]], ids=["last1", "mixed"])
def test_hevc_shards_keep_the_timeline_too(tmp_path, name, sizes):
    src = make_clip(tmp_path / "in.mp4", frames=sum(sizes), fps="30000/1001", audio=True)
    info, shards = encode_shards(tmp_path, src, sizes, codec="libx265")
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    check_merged(out, src, sum(sizes), Fraction(30000, 1001))


def test_a_run_with_a_one_frame_last_shard(tmp_path):
    """The reported case: 61 frames at 25 fps, 30-frame segments (it gave 63 frames on 2 ranks;
    the fault was the merge's, which sees the same three shards whichever rank made them)."""
    src = make_clip(tmp_path / "c.mp4", frames=61, fps="25", audio=True)
    out = tmp_path / "o"
    run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=bicubic", "job.scale=2",
             "work.segment_frames=30", "log.progress=false"])
    assert read_report(out)["videos"][0]["status"] == "ok"
    check_merged(out / "c.mp4", src, 61, Fraction(25))


def test_the_merge_check_fails_a_shifted_timeline(tmp_path):
    """The merge's own check reads timestamps: a file whose sample count is right but whose
    frames sit at the wrong times (what joining with ffmpeg's concat demuxer made) fails it."""
    src = make_clip(tmp_path / "in.mp4", frames=61, fps="25", audio=False)
    info, shards = encode_shards(tmp_path, src, [30, 30, 1])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{p}'\n" for p, _, _ in shards))
    bad = tmp_path / "concat.mp4"
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "concat", "-safe", "0",
                    "-i", str(listing), "-c", "copy", "-video_track_timescale", "90000", str(bad)],
                   check=True)
    assert len(ffmpeg_decode(bad)) != 61  # the failure users saw
    with pytest.raises(EncodeError, match="frame .* lasts .* not one frame"):
        check_timeline(bad, info)
    good = tmp_path / "good.mp4"
    merge(shards, info, good)
    check_timeline(good, info)


@pytest.mark.parametrize("container,codec,delay", [(".avi", "pcm_s16le", 0.0), (".mp4", "aac", 0.0),
                                                   (".mp4", "aac", 0.2)],
                         ids=["avi_pcm_reencoded", "mp4_aac_copied", "video_starts_late"])
def test_audio_stays_in_sync_through_the_merge(tmp_path, container, codec, delay):
    """Where a tone starts, against the video: PCM from .avi is re-encoded to AAC (mp4 cannot copy
    it), AAC is copied, and a video that starts 0.2 s after its audio keeps that offset."""
    plain = make_clip(tmp_path / f"plain{container}", frames=40, fps="25", audio=False)
    src = with_beep(plain, tmp_path / f"in{container}", onset=0.6, seconds=1.6, audio_codec=codec,
                    video_delay=delay)
    info = probe(src)
    assert abs(float(info.start) - delay) < 0.01
    info, shards = encode_shards(tmp_path, src, [17, 1, 22])
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    with av.open(str(out)) as c:
        vs, a = c.streams.video[0], c.streams.audio[0]
        assert a.codec_context.name == "aac"
        first_frame = Fraction(vs.start_time) * vs.time_base
    with av.open(str(src)) as c:
        vs = c.streams.video[0]
        src_first = Fraction(vs.start_time) * vs.time_base
    # the tone starts at the same time after the first frame as in the input, within 5 ms
    assert abs((audio_onset(out) - float(first_frame)) - (audio_onset(src) - float(src_first))) < 0.005
    assert abs(float(first_frame) - delay) < 0.005


def test_subtitle_text_and_cue_times_survive_the_merge(tmp_path):
    src = make_clip(tmp_path / "in.mkv", frames=36, fps="25", audio=True, subtitles=True)
    info, shards = encode_shards(tmp_path, src, [10, 1, 25])
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    want, got = subtitle_cues(src), subtitle_cues(out)
    assert [text for *_, text in want] == [text for *_, text in got] == list(SUBTITLE_TEXTS)
    for (a0, a1, _), (b0, b1, _) in zip(got, want):
        assert abs(a0 - b0) <= 0.002 and abs(a1 - b1) <= 0.002
