"""python -m vsr_ddp --help and job=NAME --help: what a user sees, read off conf/ (issue 23, item 5)."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_job

JOBS = ("upscale", "interpolate", "propagate", "sim2real")


def one_line(text: str) -> str:
    """The help with its wrapping undone, to look for a phrase wherever the lines break."""
    return " ".join(text.split())


def test_help_says_what_vsr_ddp_is_its_jobs_examples_settings_and_where_the_readme_is():
    proc = run_job(["--help"])
    out = proc.stdout
    assert proc.returncode == 0 and not proc.stderr.strip()
    assert "powered by Hydra" not in out
    assert out.startswith("vsr_ddp: distributed batch jobs for AI video processing on torchrun and Slurm.")
    flat = one_line(out)
    for name, line in [("upscale", "Super-resolution of every frame"),
                       ("interpolate", "Frame interpolation to a new frame rate"),
                       ("propagate", "EbSynth-style keyframe propagation"),
                       ("sim2real", "FRESCO keyframe translation")]:
        assert re.search(rf"^  {name} +{line}", out, re.M), name
    assert "(the default job)" in flat
    # the three ways to launch it
    assert re.search(r"^  torchrun --standalone --nproc_per_node=8 -m vsr_ddp job=upscale ", out, re.M)
    assert re.search(r"^  python -m vsr_ddp job=upscale .*# one process, no torchrun$", out, re.M)
    assert re.search(r"^  python -m vsr_ddp -m job=upscale .*job\.scale=2,3 .*# a Hydra sweep$", out, re.M)
    # every group's main keys, with their default and the YAML's comment
    for key, meaning in [("input=???", "a video file or a folder of videos"),
                         ("output=???", "final videos go to <output>/<stem>.mp4"),
                         ("work.unit=segment", "segment: frame segments of every video"),
                         ("work.lease_timeout_s=300", "a unit or merge whose holder has not renewed"),
                         ("work.segment_frames=600", "owned frames per segment"),
                         ("decode.deinterlace=auto", "auto (bwdif when the stream flags interlaced frames"),
                         ("encode.codec=auto", "auto (NVENC on a GPU that has it"),
                         ("encode.crf=18", "quality on x264's scale"),
                         ("dist.backend=auto", "auto: nccl on CUDA, gloo on CPU"),
                         ("log.every_s=30", "each rank logs frames/s and ETA this often")]:
        assert re.search(rf"{re.escape(key)} +{re.escape(meaning)}", flat), key
    assert "job=NAME --help" in flat and "--hydra-help" in flat
    assert f"More: {ROOT / 'README.md'}" in out


def test_job_help_lists_that_jobs_keys_with_their_meaning_from_the_yaml():
    proc = run_job(["job=interpolate", "--help"])
    out, flat = proc.stdout, one_line(proc.stdout)
    assert proc.returncode == 0 and out.startswith("vsr_ddp job=interpolate")
    assert "Frame interpolation to a new frame rate" in flat
    assert re.search(r"^  python -m vsr_ddp job=interpolate .*job\.fps=60000/1001$", out, re.M)
    assert re.search(r"job\.factor=2 +output rate = input rate x factor: any positive rational "
                     r"\(2, 5/2, 2\.5\)", flat)
    assert re.search(r"job\.fps=null +or an exact output rate \(60000/1001, 60\): overrides factor", flat)
    # a comment that goes on over indented lines is read whole
    assert "scene cut: its in-between frames repeat the earlier source frame; 0 turns detection off" in flat
    assert "job.scale" in flat and "work.unit" not in flat  # that job's keys, not the shared ones
    assert "vsr_ddp --help" in flat and "README.md" in flat


def test_job_help_takes_in_groups_and_nested_keys():
    flat = one_line(run_job(["--help", "job=propagate", "input=x.mp4"]).stdout)  # the order does not matter
    assert re.search(r"job\.ebsynth\.uniformity=3500 +penalty for source patches used more than their share",
                     flat)
    assert re.search(r"job\.guides\.color=6\.0 +the video frame itself", flat)
    assert re.search(r"job\.keys=\?\?\? +folder of stylized keyframes", flat)


@pytest.mark.parametrize("name", JOBS)
def test_every_job_has_its_help(name):
    proc = run_job([f"job={name}", "-h"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"vsr_ddp job={name}")
    assert "job.model" in proc.stdout or "job.keys" in proc.stdout or "job.prompts" in proc.stdout


def test_help_for_a_job_that_does_not_exist_is_one_line_and_exit_status_2():
    proc = run_job(["job=upscal", "--help"], check=False)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip() == "error: job=upscal: no such job (interpolate, propagate, sim2real, upscale)"


def test_hydra_help_is_still_hydras():
    proc = run_job(["--hydra-help"])
    assert proc.returncode == 0 and "Hydra (" in proc.stdout and "--multirun" in proc.stdout


def test_the_help_reads_every_key_that_the_settings_check_knows():
    """No key is left out of the help: every key of config.yaml and of each job's YAML is there."""
    from dataclasses import fields

    from vsr_ddp import config, usage

    shown = {k.name for k in usage.keys(ROOT / "conf" / "config.yaml")}
    for name, cls in config.GROUPS.items():
        assert {f"{name}.{f.name}" for f in fields(cls)} <= shown, name
    for name, cls in config.JOB_SETTINGS.items():
        shown = {k.name for k in usage.keys(ROOT / "conf" / "job" / f"{name}.yaml", "job.")}
        assert {f"job.{f.name}" for f in fields(cls)} <= shown, name


def test_a_sweeps_status_is_its_worst_points_and_a_failed_point_pickles_back():
    """vsr_ddp.sweep: what cli() and main() use for -m (the sweep itself runs in test_e2e.py)."""
    import pickle

    from vsr_ddp import sweep

    assert [sweep.worst(s) for s in ([0, 0], [0, 1], [1, 2, 0], [2, 143, 1], [])] == [0, 1, 2, 143, 0]
    e = pickle.loads(pickle.dumps(sweep.SweepPointFailed(2, "#0 (job.scale=0)")))  # submitit sends it back
    assert (e.status, e.point) == (2, "#0 (job.scale=0)")
    assert str(e) == "sweep point #0 (job.scale=0) exited with status 2"
    sweep.begin()
    sweep.point_done(0)
    sweep.point_done(2)
    assert sweep.exit_status() == 2
    sweep.begin()  # a second command line in one process starts with no points
    assert sweep.exit_status() is None
