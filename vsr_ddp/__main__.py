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

from . import config, dist, preempt, sweep, usage
from .config import CONFIG_ERROR
from .logs import close_logging, setup_logging
from .shards import logs_dir

log = logging.getLogger("vsr_ddp")

# Errors a user can fix from the message alone: one line on the console, exit status 2.
USER_ERRORS = (dist.DistError, ValueError, FileNotFoundError)


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
        say_error(f"error: {e}", ctx)
        return CONFIG_ERROR
    finally:
        dist.teardown(ctx)
        close_logging()


# How long a rank other than 0 waits, on an error found before the ranks can talk, for rank 0 to
# say it (see say_error). Rank 0 reaches the same check within moments of the others.
RANK0_GRACE_S = 10.0


def say_error(text: str, ctx: dist.Dist | None = None) -> None:
    """Say an error that stops the run, once for the whole launch: rank 0 prints it. torchrun stops
    every worker once one exits non-zero, so a rank that found the error before rank 0 did and
    exited at once could have rank 0 stopped before it said anything: under torchrun, before the
    ranks can talk, the others wait up to RANK0_GRACE_S for that stop (rank 0 found the same error,
    said it and exited) and then say it themselves, with their rank and host: an error only this
    rank finds (its node's own file system, say) is not lost either. (srun, without --kill-on-bad-exit,
    lets every task finish: rank 0 says it, the others exit at once, as they always did.)"""
    if ctx.is_main if ctx is not None else dist.env_rank() == 0:
        print(text, file=sys.stderr, flush=True)
        return
    if ctx is None and dist.env_world() > 1 and _under_torchrun():
        if preempt.requested.wait(RANK0_GRACE_S):
            return  # stopped by the launcher: rank 0 has said it
        import socket

        print(f"{text} (rank {dist.env_rank()} on {socket.gethostname()}; rank 0 did not stop on it)",
              file=sys.stderr, flush=True)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def log_dir(settings: config.Settings) -> Path:
    """``log.dir``, else ``<output>/.vsr_ddp/logs`` (a sweep point: its folder in the sweep's)."""
    if settings.log.dir:
        return Path(settings.log.dir).expanduser()
    if sweep.active():
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    return logs_dir(Path(settings.output).expanduser())


@hydra.main(version_base="1.3", config_path=config.config_dir(), config_name="config")
def main(cfg: DictConfig) -> int:
    status = run(cfg)
    if not sweep.active():
        _leave(status)
        return status
    sweep.point_done(status)  # a failed point run elsewhere (hydra/launcher=slurm) raises here
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
    """``python -m vsr_ddp``: a single run exits from main(); a sweep (-m) here, once every point ran;
    ``--help`` here, before Hydra (vsr_ddp.usage)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if usage.wanted(sys.argv[1:]):  # --help: vsr_ddp's own, read off conf/ (--hydra-help: Hydra's)
        _leave(usage.show(sys.argv[1:]) if dist.env_rank() == 0 else 0)
        return
    # Hydra's own errors (a misspelt key, an unknown job) reach us instead of Hydra's report,
    # so that they exit 2 with one or two lines like every other configuration error.
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sweep.begin()
    try:
        main()
    except sweep.SweepPointFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _leave(e.status)
    except (HydraException, OmegaConfBaseException) as e:
        if full and dist.env_rank() == 0:  # asked for: the traceback, then the short form
            import traceback

            traceback.print_exc()
        say_error("\n".join(hydra_error_lines(e)))
        _leave(CONFIG_ERROR)
    status = sweep.exit_status()
    if status is not None:
        _leave(status)


if __name__ == "__main__":
    cli()
