"""The streams beside the video, as films and music videos carry them: several audio tracks in
several languages, cover art, DVD (bitmap) subtitles. Each is kept in the output mp4 or dropped
with one warning in the rank log; none fails the merge, and the job reads the real video stream,
never the cover."""
from __future__ import annotations

import re

from builders import (audio_tones, decode_indices, make_audio_only, make_audio_tracks, read_frames,
                      stream_list, with_cover, with_image_subtitles)
from conftest import read_report, run_job


def test_audio_tracks_cover_art_and_image_subtitles_are_kept_or_dropped_with_one_warning(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # a ripped film: Opus English and FLAC German dubs, French DVD subtitles, a JPEG cover attached
    dubs = make_audio_tracks(tmp_path / "dubs.mkv", tracks=(("eng", 440, "libopus"), ("deu", 880, "flac")))
    subbed = with_image_subtitles(dubs, tmp_path / "subbed.mkv", language="fre")
    with_cover(subbed, d / "film.mkv", fmt="jpeg")
    # a music video: two AAC tracks and its cover art (attached_pic, the covr tag)
    two = make_audio_tracks(tmp_path / "two.mp4", tracks=(("eng", 440, "aac"), ("spa", 660, "aac")))
    with_cover(two, d / "song.mp4")
    # a cover no decoder reads (a damaged GIF attachment)
    one = make_audio_tracks(tmp_path / "one.mkv", tracks=(("jpn", 550, "aac"),))
    with_cover(one, d / "poster.mkv", fmt="gif", damaged=True)
    # a song with its cover art: a picture, not a video
    with_cover(make_audio_only(tmp_path / "audio.mp4"), d / "album.mp4")
    film_in = stream_list(d / "film.mkv")
    assert [(s["type"], s["codec"], s["attached_pic"]) for s in film_in] == [
        ("video", "h264", False), ("audio", "opus", False), ("audio", "flac", False),
        ("subtitle", "dvdsub", False), ("video", "mjpeg", True)]

    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={d}", f"output={out}", "job.model=lanczos", "job.scale=2"],
                   check=False)

    assert proc.returncode == 1, proc.stderr[-3000:]  # the song without a video, and only it
    report = {v["input"].rsplit("/", 1)[1]: v for v in read_report(out)["videos"]}
    assert report.pop("album.mp4")["reason"] == "no video stream, only cover art (streams: audio, video)"
    assert [v["status"] for v in report.values()] == ["ok"] * 3
    assert not (out / "album.mp4").exists()
    expected = {  # output streams: (type, codec, [language,] cover art?); each audio track's tone
        "film": ([("video", "h264", False), ("audio", "opus", "eng", False), ("audio", "aac", "deu", False),
                  ("video", "mjpeg", True)], [440, 880]),
        "song": ([("video", "h264", False), ("audio", "aac", "eng", False), ("audio", "aac", "spa", False),
                  ("video", "png", True)], [440, 660]),
        "poster": ([("video", "h264", False), ("audio", "aac", "jpn", False)], [550]),
    }
    for stem, (streams, tones) in expected.items():
        got = stream_list(out / f"{stem}.mp4")
        assert [(s["type"], s["codec"], s["attached_pic"]) if s["type"] == "video" else
                (s["type"], s["codec"], s["language"], s["attached_pic"]) for s in got] == streams, stem
        video = got[0]  # the picture, upscaled, every frame in order: not the 32x32 cover
        assert (video["width"], video["height"], video["frames"]) == (128, 96, 20), stem
        assert decode_indices(read_frames(out / f"{stem}.mp4")) == list(range(20)), stem
        assert [round(t / 10) * 10 for t in audio_tones(out / f"{stem}.mp4")] == tones, stem

    log = (out / ".vsr_ddp" / "logs" / "rank0.log").read_text(encoding="utf-8")
    warnings = [line.split(" WARNING ", 1)[1] for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert any(re.search(r"film\.mkv: subtitle stream 3 \(dvdsub, fre\) is a bitmap format mp4 cannot hold; "
                         r"dropped", w) for w in warnings), warnings
    assert any(re.search(r"poster\.mkv: cover art stream 2 \(gif\) could not be written to mp4 .*; "
                         r"dropped", w) for w in warnings), warnings
    assert not list(out.rglob("*.partial"))
