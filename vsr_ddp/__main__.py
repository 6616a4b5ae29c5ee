"""Entry point.

    python -m vsr_ddp job=upscale input=clip.mp4 output=out job.model=lanczos job.scale=2
    torchrun --standalone --nproc_per_node=8 -m vsr_ddp job=upscale input=/data/videos output=/data/out \
        job.model=/models/RealESRGAN_x4plus.pth
    python -m vsr_ddp -m job=upscale input=clip.mp4 output='out/s${job.scale}' job.model=bicubic job.scale=2,3
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import config, dist, preempt
from .logs import close_logging, setup_logging
from .shards import WORK_DIR

log = logging.getLogger("vsr_ddp")

# Errors a user can fix from the message alone: one line on the console, exit status 2.
USER_ERRORS = (dist.DistError, ValueError, FileNotFoundError)
CONFIG_ERROR = 2


def config_dir() -> str:
    """conf/ lives at the top of the repository; a built wheel carries it as vsr_ddp/conf
    (setup.cfg's package_dir). The installed copy first, then the checkout's."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parent / "conf"):
        if (d / "config.yaml").is_file():
            return str(d)
    raise SystemExit(f"error: vsr_ddp's conf/ is in neither {here / 'conf'} nor {here.parent / 'conf'}: "
                     "reinstall vsr_ddp")


def run(cfg: DictConfig) -> int:
    ctx = None
    preempt.install()
    try:
        # Every setting, and what the output would write over, before anything else: a typo
        # costs one line, not an allocation (no probe, no model load, no file made).
        settings = config.check(cfg)
        config.check_paths(settings)
        ctx = dist.init(settings.device, settings.dist.backend, settings.dist.timeout_min)
        try:
            setup_logging(log_dir(settings), ctx.rank, settings.log.level)
        except OSError as e:  # the first write under output= (a read-only mount, a full disk)
            raise config.ConfigError(f"output={settings.output}: cannot write the rank logs in "
                                     f"{log_dir(settings)} ({e.strerror or e})") from None
        log.info("vsr_ddp job=%s input=%s output=%s", settings.job_cfg.name, settings.input, settings.output)
        from .runner import Runner

        return Runner(settings, ctx).run()
    except USER_ERRORS as e:
        if ctx is not None:
            log.error("stopped before any work: %s", e, exc_info=True, extra={"console": False})
        if (ctx.is_main if ctx is not None else dist.env_rank() == 0):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR
    finally:
        dist.teardown(ctx)
        close_logging()


def log_dir(settings: config.Settings) -> Path:
    """``log.dir``, else ``<output>/.vsr_ddp/logs`` (a sweep point: its folder in the sweep's)."""
    if settings.log.dir:
        return Path(settings.log.dir).expanduser()
    if _multirun():
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    return Path(settings.output).expanduser() / WORK_DIR / "logs"


class SweepPointFailed(RuntimeError):
    """A sweep point run away from the sweeping process (hydra/launcher=slurm) that exited non-zero:
    raised so that the sweep, which only sees the point's result, fails too."""

    def __init__(self, status: int, point: str = ""):
        super().__init__(status, point)  # its arguments: the exception is pickled back to the sweep
        self.status, self.point = status, point

    def __str__(self) -> str:
        return f"sweep point {self.point} exited with status {self.status}"


_SWEEP_PID = os.getpid()   # the process that runs `python -m vsr_ddp -m ...`
_sweep: list[int] = []      # exit status of each sweep point run in that process


def sweep_status(statuses: list[int]) -> int:
    """A sweep's exit status: that of its most serious point. 128 + N when one was stopped by a
    signal, 2 when one had a configuration error, 1 when one failed, else 0."""
    failed = [s for s in statuses if s]
    if not failed:
        return 0
    stopped = [s for s in failed if s > 128]
    if stopped:
        return stopped[0]
    return CONFIG_ERROR if CONFIG_ERROR in failed else 1


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> int:
    status = run(cfg)
    if not _multirun():
        _leave(status)
        return status
    if os.getpid() != _SWEEP_PID:  # a launcher ran this point elsewhere: its status reaches the sweep only so
        if status:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            raise SweepPointFailed(status, f"#{hc.job.num} ({' '.join(hc.overrides.task)})")
        return status
    _sweep.append(status)
    if status > 128:  # stopped by a signal (preemption): so is the sweep, its later points included
        _leave(status)
    return status  # the sweep goes on to its next point in this process


def _leave(status: int) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker whose work, logs and report are done leaves now: the C++ destructors
        # of interpreter shutdown could still abort it ("terminate called without an active
        # exception", seen after gloo runs), and torchrun would then fail a finished job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    # not initialized: run() called with a config composed by hydra.compose (tests, notebooks)
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def hydra_error_lines(e: BaseException) -> list[str]:
    """Hydra's message for a command line it cannot compose, in one or two lines: what is wrong
    (and its cause), then what would be right (the options of a config group, ``+key=`` for a
    new key), without the config search path or the HYDRA_FULL_ERROR hint."""
    lines = [ln.strip() for ln in str(e).split("Config search path:")[0].splitlines() if ln.strip()]
    first = lines[0] if lines else e.__class__.__name__
    cause = [ln.strip() for ln in str(e.__cause__ or "").splitlines() if ln.strip()]
    if cause and cause[0] not in first:
        first = f"{first.rstrip('.')}: {cause[0]}"
    return [f"error: {first}"] + ([" ".join(" ".join(lines[1:]).split())] if lines[1:] else [])


def cli() -> None:
    """``python -m vsr_ddp``: a single run exits from main(); a sweep (-m) here, once every point ran."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra's own errors (a misspelt key, an unknown job) reach us instead of Hydra's report,
    # so that they exit 2 with one or two lines like every other configuration error.
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _sweep.clear()
    try:
        main()
    except SweepPointFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _leave(e.status)
    except (HydraException, OmegaConfBaseException) as e:
        if dist.env_rank() == 0:
            if full:  # asked for: the traceback, then the short form
                import traceback

                traceback.print_exc()
            print("\n".join(hydra_error_lines(e)), file=sys.stderr, flush=True)
        _leave(CONFIG_ERROR)
    if _sweep:
        _leave(sweep_status(_sweep))


if __name__ == "__main__":
    cli()
