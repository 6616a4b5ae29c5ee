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

from . import dist, preempt
from .logs import setup_logging

log = logging.getLogger("vsr_ddp")

# Errors a user can fix from the message alone: one line on the console, exit status 2.
USER_ERRORS = (dist.DistError, ValueError, FileNotFoundError)


def run(cfg: DictConfig) -> int:
    ctx = None
    preempt.install()
    try:
        ctx = dist.init(cfg.device, cfg.dist.backend, cfg.dist.timeout_min)
        setup_logging(Path(cfg.log.dir), ctx.rank, cfg.log.level)
        log.info("vsr_ddp job=%s input=%s output=%s", cfg.job.name, cfg.input, cfg.output)
        from .runner import Runner

        return Runner(cfg, ctx).run()
    except USER_ERRORS as e:
        log.error("stopped before any work: %s", e, exc_info=True, extra={"console": False})
        if ctx is None or ctx.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.teardown(ctx)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    status = run(cfg)
    if _multirun():
        return  # the sweep goes on to its next job in this process
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

    return HydraConfig.get().mode.name == "MULTIRUN"


if __name__ == "__main__":
    main()
