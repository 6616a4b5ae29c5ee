"""One module per job. A job is a small class (see :class:`vsr_ddp.jobs.base.Job`): the runner
hands it frames of one unit and writes what it returns; the job never touches files."""
from __future__ import annotations

from .base import Job
from .interpolate import InterpolateJob
from .propagate import PropagateJob
from .sim2real import Sim2RealJob
from .upscale import UpscaleJob

JOBS = {"upscale": UpscaleJob, "propagate": PropagateJob, "sim2real": Sim2RealJob,
        "interpolate": InterpolateJob}


def make_job(job_cfg, device) -> Job:
    """The job named by ``job_cfg.name``, given its config subtree (``job.*``, checked by
    :func:`vsr_ddp.config.check`)."""
    return JOBS[job_cfg.name](job_cfg, device)
