"""The merge as one pass: what a user of the output and the run's folder can see of it. The file
starts with its index (faststart) for H.264 and HEVC; a shard altered after its checksum was
taken fails the merge by name and leaves nothing behind; a good merge leaves only its output;
the input's audio, copied or re-encoded, lasts as long as the input's."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from builders import decode_indices, make_clip, probe_streams, read_frames
from test_timing import encode_shards

from vsr_ddp.video import EncodeError, merge

SIZES = [30, 1, 29]


def top_level_atoms(path: Path) -> list[bytes]:
    """The types of an mp4's top-level boxes, in file order, from their headers."""
    atoms, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size == 1:
            size = struct.unpack_from(">Q", data, pos + 8)[0]
        elif size == 0:
            size = len(data) - pos
        assert size >= 8, f"damaged box {kind!r} at {pos}"
        atoms.append(kind)
        pos += size
    return atoms


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_the_output_starts_with_its_index(tmp_path, codec):
    src = make_clip(tmp_path / "in.mp4", frames=sum(SIZES), fps="25", audio=True)
    info, shards = encode_shards(tmp_path, src, SIZES, codec=codec)
    out = tmp_path / "final.mp4"
    stats = merge(shards, info, out, checksums=[sha256(p) for p, _, _ in shards])
    atoms = top_level_atoms(out)
    assert b"moov" in atoms and b"mdat" in atoms
    assert atoms.index(b"moov") < atoms.index(b"mdat"), atoms
    got = probe_streams(out)
    assert got["frames"] == sum(SIZES) and got["video_codec"] == ("h264" if codec == "libx264" else "hevc")
    assert got["audio_codec"] == "aac"
    assert decode_indices(read_frames(out)) == list(range(sum(SIZES)))
    assert stats == {"shard_bytes": sum(p.stat().st_size for p, _, _ in shards),
                     "output_bytes": out.stat().st_size}


def test_a_shard_altered_after_its_checksum_fails_the_merge_and_leaves_nothing(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=sum(SIZES), fps="25", audio=True)
    info, shards = encode_shards(tmp_path, src, SIZES)
    checksums = [sha256(p) for p, _, _ in shards]
    bad = shards[2][0]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of its media data
    bad.write_bytes(bytes(data))
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "final.mp4"
    with pytest.raises(EncodeError, match=r"segment_0002\.mp4: its bytes do not match the checksum"):
        merge(shards, info, out, checksums=checksums)
    assert not out.exists()
    assert sorted(tmp_path.iterdir()) == before  # no temporary file beside the output or the shards


def test_a_good_merge_leaves_only_its_output(tmp_path):
    src = make_clip(tmp_path / "in.mkv", frames=sum(SIZES), fps="25", audio=True, subtitles=True,
                    audio_codec="flac")  # a side file of converted streams is made, and removed
    info, shards = encode_shards(tmp_path, src, SIZES)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "final.mp4"
    merge(shards, info, out, checksums=[sha256(p) for p, _, _ in shards])
    assert sorted(tmp_path.iterdir()) == sorted(before + [out])
    got = probe_streams(out)
    assert got["frames"] == sum(SIZES) and got["audio_codec"] == "aac" and got["subtitles"] == 1


@pytest.mark.parametrize("name,audio_codec",
                         [("in.mp4", "aac"), ("in.mov", "pcm_s16le"), ("in.mkv", "pcm_s16le")],
                         ids=["aac_copied", "pcm_mov_reencoded", "pcm_mkv_reencoded"])
def test_the_input_audio_lasts_as_long_in_the_output(tmp_path, name, audio_codec):
    src = make_clip(tmp_path / name, frames=sum(SIZES), fps="30000/1001", audio=True, audio_codec=audio_codec)
    info, shards = encode_shards(tmp_path, src, SIZES)
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    want, got = probe_streams(src), probe_streams(out)
    assert want["audio_codec"] == audio_codec and got["audio_codec"] == "aac"
    assert abs(got["audio_duration"] - want["audio_duration"]) <= 1024 / 48000  # one AAC frame
    assert got["frames"] == sum(SIZES)
    assert top_level_atoms(out).index(b"moov") < top_level_atoms(out).index(b"mdat")


def test_an_index_larger_than_its_reserved_room_still_ends_up_first(tmp_path, monkeypatch, caplog):
    """The room reserved for the index is an estimate; when the index outgrows it the file is
    written again with ffmpeg's faststart, with a warning, and still starts with its index."""
    import vsr_ddp.video as video

    src = make_clip(tmp_path / "in.mp4", frames=sum(SIZES), fps="25", audio=True)
    info, shards = encode_shards(tmp_path, src, SIZES)
    monkeypatch.setattr(video, "_moov_estimate", lambda *a: 64)
    out = tmp_path / "final.mp4"
    merge(shards, info, out)
    assert "writing the file again with +faststart" in caplog.text
    atoms = top_level_atoms(out)
    assert atoms.index(b"moov") < atoms.index(b"mdat"), atoms
    assert probe_streams(out)["frames"] == sum(SIZES)
    assert not list(tmp_path.glob("*.partial"))
