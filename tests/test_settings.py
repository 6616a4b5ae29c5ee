"""Settings are checked before any work: a wrong value, a misspelt key or an output that would
write over what the run reads stops the run with one line and exit status 2, leaving no file."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from builders import make_clip
from conftest import read_report, run_here, run_job
from hydra import compose, initialize_config_dir
from test_configs import CONF, JOB_OVERRIDES

from vsr_ddp import atomic, config


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def settings(*overrides: str, job: str = "upscale") -> config.Settings:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"job={job}", *JOB_OVERRIDES.get(job, []), "log.dir=logs",
                                           *overrides])
    return config.check(cfg)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """<tmp>/v/clip.mp4, a user's folder of videos."""
    d = tmp_path_factory.mktemp("user") / "v"
    make_clip(d / "clip.mp4", frames=6, audio=False)
    return d


# -- output= what the run reads --------------------------------------------------------------------

def test_output_the_input_folder_stops_before_any_work_and_the_source_stays(folder):
    """The issue's own commands: the source was replaced by the 2x output, exit 0."""
    before, files = sha(folder / "clip.mp4"), tree(folder)
    for inp in (folder, folder / "clip.mp4"):
        proc = run_job(["job=upscale", f"input={inp}", f"output={folder}", "job.model=lanczos",
                        "job.scale=2"], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert f"output={folder}" in lines[0] and str(inp) in lines[0]
        assert sha(folder / "clip.mp4") == before
        assert tree(folder) == files  # not even a log folder


@pytest.mark.parametrize("case", ["symlink", "dotdot", "relative", "input file", "file's folder",
                                  "input inside the work folder"])
def test_every_spelling_of_an_input_as_output_is_refused(folder, tmp_path, monkeypatch, case):
    inp, out = folder, None
    if case == "symlink":
        (tmp_path / "link").symlink_to(folder)
        out = tmp_path / "link"
    elif case == "dotdot":
        out = folder / "sub" / ".."
    elif case == "relative":
        monkeypatch.chdir(folder.parent)
        out = Path("v")
    elif case == "input file":
        inp = out = folder / "clip.mp4"
    elif case == "file's folder":
        inp, out = folder / "clip.mp4", folder.parent / "v" / "."
    else:
        out = tmp_path / "out"
        inp = out / ".vsr_ddp" / "in"
        make_clip(inp / "a.mp4", frames=2, audio=False)
    s = settings(f"input={inp}", f"output={out}", "job.model=lanczos", "job.scale=2")
    with pytest.raises(config.ConfigError) as e:
        config.check_paths(s)
    assert f"output={out}" in str(e.value) and str(inp) in str(e.value) and "\n" not in str(e.value)


def test_an_output_folder_inside_the_input_folder_is_fine(folder):
    """The folder is listed recursively, but the output folder is left out: <input>/out holds no input."""
    out = folder / "out"
    run_job(["job=upscale", f"input={folder}", f"output={out}", "job.model=lanczos", "job.scale=2",
             "encode.preset=ultrafast"])
    assert (out / "clip.mp4").is_file()
    assert sorted(p.name for p in folder.glob("*.mp4")) == ["clip.mp4"]  # not clip.mp4 of the output
    # run again: the output's clip.mp4 is still no input
    run_job(["job=upscale", f"input={folder}", f"output={out}", "job.model=lanczos", "job.scale=2",
             "encode.preset=ultrafast"])
    assert [v["input"] for v in read_report(out)["videos"]] == [str(folder / "clip.mp4")]


@pytest.mark.parametrize("job,key", [("propagate", "job.keys"), ("sim2real", "job.prompts"),
                                     ("upscale", "job.model"), ("interpolate", "job.flow_weights")])
def test_output_a_keyframe_prompt_or_model_path_is_refused(folder, tmp_path, job, key):
    target = tmp_path / "thing"
    if key in ("job.model", "job.flow_weights"):
        target.write_bytes(b"weights")
    else:
        target.mkdir()
    extra = {"upscale": [], "interpolate": ["job.model=flow"]}.get(job, [])
    s = settings(f"input={folder}", f"output={target}", f"{key}={target}", *extra, job=job)
    with pytest.raises(config.ConfigError) as e:
        config.check_paths(s)
    assert f"it is {key}={target}" in str(e.value)


def test_no_final_write_replaces_a_file_the_run_reads(tmp_path):
    """The atomic helpers refuse, whatever the caller: the last line behind check_paths."""
    src = tmp_path / "in" / "clip.mp4"
    src.parent.mkdir()
    src.write_bytes(b"the user's video")
    (tmp_path / "alias").symlink_to(src.parent)
    atomic.protect([src.parent])
    try:
        for final in (src, tmp_path / "alias" / "clip.mp4", src.parent / "new.mp4"):
            with pytest.raises(atomic.WouldReplaceInput):
                atomic.atomic_write_bytes(final, b"output")
        (tmp_path / "out").mkdir()
        atomic.atomic_write_bytes(tmp_path / "out" / "clip.mp4", b"output")  # elsewhere: fine
    finally:
        atomic.protect()
    assert src.read_bytes() == b"the user's video"
    assert sorted(p.name for p in src.parent.iterdir()) == ["clip.mp4"]  # no temporary file left


# -- settings ------------------------------------------------------------------------------------

BAD = [
    (["decode.deinterlace=of"], "decode.deinterlace=of: must be auto, on or off"),
    (["+job.modle=lanczos"], "job.modle: no such setting (did you mean job.model?)"),
    (["+work.segmnt_frames=8"], "work.segmnt_frames: no such setting (did you mean work.segment_frames?)"),
    (["work.segment_frames=abc"], "work.segment_frames=abc: must be an integer"),
    (["work.segment_frames=0"], "work.segment_frames=0: must be at least 1"),
    (["work.claim=greedy"], "work.claim=greedy: must be dynamic or strided"),
    (["work.lease_timeout_s=5"], "work.lease_timeout_s=5: must be at least 10 (seconds)"),
    (["work.shard_index=3", "work.num_shards=2"], "work.shard_index=3: must be in [0, 1]"),
    (["encode.crf=80"], "encode.crf=80: must be in [0, 51]"),
    (["encode.codec=h265"], "encode.codec=h265: must be auto, libx264, libx265, h264_nvenc or hevc_nvenc"),
    (["job.precision=fp8"], "job.precision=fp8: must be auto, fp32, fp16 or bf16"),
    (["job.scale=abc"], "job.scale=abc: must be a number, or null"),
    (["device=gpu"], "device=gpu: must be auto, cuda or cpu"),
    (["job=interpolate", "job.factor=0"], "job.factor=0: must be a positive number or fraction"),
    (["job=interpolate", "job.vfr=drop"], "job.vfr=drop: must be error or cfr"),
    (["job=propagate", "job.keys=k", "+job.ebsynth.pach_size=3"],
     "job.ebsynth.pach_size: no such setting (did you mean job.ebsynth.patch_size?)"),
    (["job=propagate", "job.keys=k", "job.keys_layout=nested"], "job.keys_layout=nested: must be auto, flat"),
    (["job=sim2real", "job.prompts=p", "job.base_model=b"], "job.controlnet is not set"),
    (["job=sim2real", "job.prompts=p", "job.base_model=b", "job.controlnet=c", "job.control=seg"],
     "job.control=seg: must be canny, hed or depth"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_wrong_setting_names_the_key_the_value_and_what_is_allowed(overrides, message):
    model = [] if any(o.startswith("job=") for o in overrides) else ["job.model=lanczos"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["input=a.mp4", "output=out", "log.dir=logs", *model, *overrides])
    with pytest.raises(config.ConfigError) as e:
        config.check(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_job_config_as_shipped_passes_the_check():
    for job in ("upscale", "interpolate", "propagate", "sim2real"):
        for extra in ([], ["+debug=default"]):
            s = settings("input=a.mp4", "output=out", *(["job.model=lanczos"] if job == "upscale" else []),
                         *extra, job=job)
            assert type(s.job).__name__.lower() == job


def test_a_typo_stops_the_run_in_one_line_before_any_probe_model_or_file(folder, tmp_path):
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={folder}", f"output={out}", "job.model=/nowhere/model.pth",
                    "decode.deinterlace=of"], check=False)
    assert proc.returncode == 2
    # one line; the missing model is not what it complains about: the settings come first
    assert proc.stderr.strip().splitlines() == ["error: decode.deinterlace=of: must be auto, on or off"]
    assert not out.exists()


@pytest.mark.parametrize("arg,lines", [
    ("job.modle=lanczos", ["error: Could not override 'job.modle': Key 'modle' is not in struct",
                           "To append to your config use +job.modle=lanczos"]),
    ("job=upscal", ["error: In 'config': Could not find 'job/upscal'",
                    "Available options in 'job': interpolate propagate sim2real upscale"]),
])
def test_hydra_own_errors_exit_2_in_two_lines(folder, tmp_path, arg, lines):
    # HYDRA_FULL_ERROR unset, as a user has it
    proc = run_here([f"input={folder}", f"output={tmp_path / 'out'}", arg], env={"HYDRA_FULL_ERROR": None})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == lines
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_say_a_wrong_setting_once(folder, tmp_path):
    proc = run_job(["job=upscale", f"input={folder}", f"output={tmp_path / 'out'}", "job.model=lanczos",
                    "job.scale=2", "work.claim=greedy"], nproc=2, check=False)
    assert proc.returncode == 1  # torchrun's own status: 1, listing each rank's 2
    assert proc.stderr.count("error: work.claim=greedy: must be dynamic or strided") == 1
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_error_only_another_rank_finds_is_said_by_it_after_rank_0s_grace(folder, tmp_path, monkeypatch):
    """Under torchrun, before the ranks can talk, a rank other than 0 waits for rank 0 to say the
    error (and torchrun to stop this rank); when that does not come (rank 0 did not find it: a
    node's own file system), it says the error itself, naming its rank and host. Rank 0 says it at
    once; under srun (no torchrun) the other tasks say nothing, as before."""
    import socket

    from vsr_ddp import __main__ as entry

    monkeypatch.setattr(entry, "RANK0_GRACE_S", 0.2)
    torchrun = [True]  # as if under torchrun (its variable would also make the run leave with os._exit)
    monkeypatch.setattr(entry, "_under_torchrun", lambda: torchrun[0])
    args = ["job=upscale", f"input={folder}", f"output={tmp_path / 'out'}", "job.model=lanczos",
            "job.scale=2", "work.claim=greedy"]
    lone = run_here(args, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert lone.returncode == 2
    assert lone.stderr.strip().splitlines() == [
        f"error: work.claim=greedy: must be dynamic or strided (rank 1 on {socket.gethostname()}; "
        f"rank 0 did not stop on it)"]
    first = run_here(args, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert (first.returncode, first.stderr.strip().splitlines()) == (
        2, ["error: work.claim=greedy: must be dynamic or strided"])
    torchrun[0] = False
    srun_task = run_here(args, env={"RANK": "1", "WORLD_SIZE": "2"})  # started without torchrun
    assert (srun_task.returncode, srun_task.stderr.strip()) == (2, "")
    assert not (tmp_path / "out").exists()


# -- inputs and outputs a run cannot use -----------------------------------------------------------

def test_an_input_folder_without_videos_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no video here")
    proc = run_job(["job=upscale", f"input={tmp_path / 'empty'}", f"output={tmp_path / 'out'}",
                    "job.model=lanczos", "job.scale=2"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'empty'}: no videos "
                                                f"(.mp4 .mkv .mov .avi .webm) in this folder"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into: permission bits, or (as root, who ignores them) a read-only
    mount."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("root here, and no read-only mount can be made")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_an_unwritable_output_folder_is_one_line_exit_2_before_any_work(folder, read_only_folder):
    out = read_only_folder / "out"
    proc = run_job(["job=upscale", f"input={folder}", f"output={out}", "job.model=lanczos", "job.scale=2"],
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: output={out}: cannot write there (permission denied "
                                                f"on {read_only_folder})"]
