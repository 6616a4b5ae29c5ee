"""One run of a vsr_ddp job, top to bottom: load, plan, work, merge, report.

The steps are in :meth:`Runner.run`; the claim loop is work.py's, merges and the report are
merge.py's, every path is shards.py's.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import atomic, claims, config, preempt, shards
from .config import Settings
from .dist import Dist
from .jobs import make_job
from .jobs.base import signature
from .logs import Progress, set_run
from .maker import ShardMaker, agree_encoder
from .merge import Merger, Reports, entry, finish_report
from .plan import Plan, Unit, VideoInfo, format_plan, make_plan
from .work import Board, Made, State, work

log = logging.getLogger(__name__)
SHARD_FIGURES = ("stages", "reader", "width", "height", "peak_rss_mb", "peak_gpu_mb", "peak_gpu_reserved_mb")


class Runner:
    def __init__(self, cfg: Settings, ctx: Dist):
        self.cfg = cfg  # checked (config.check): every key there, every value allowed
        self.ctx = ctx
        self.output = Path(cfg.output).expanduser()
        self.encode = agree_encoder(asdict(cfg.encode), ctx)
        self.job = make_job(cfg.job_cfg, ctx.device)
        self.claim = cfg.work.claim
        self._unit_sigs: dict[tuple, str] = {}

    def run(self) -> int:
        """Returns the process exit status: 0 when every input is ok, 1 when any failed."""
        # 1. The model, once per rank. A missing or unreadable model fails here, before any work.
        self.job.setup()
        self.settings = {**self.job.settings(), "encode": self.encode,
                         "decode": asdict(self.cfg.decode)}
        self.sig = signature(self.settings)
        self.tag = self.job.tag()
        # Which launch this is: several may share the output folder (claims.py).
        self.run_id = self.ctx.all_gather_object(claims.new_run_id())[0]
        set_run(self.run_id)
        self.maker = ShardMaker(self.cfg, self.ctx, self.job, self.encode, self.run_id, sig_of=self.sig_of,
                                wdir=self.wdir)
        self.reader = self.maker.reader

        # 2. List and probe the inputs and plan the same units on every rank.
        self.ctx.check_shared_folder(self.output, run=self.run_id)
        plan = self.make_plan()
        if self.cfg.dry_run:
            estimate = self.maker.calibrate(plan, self.claim) if getattr(self.cfg.job, "calibrate", False) \
                else None
            if self.ctx.is_main:
                print(format_plan(plan, self.ctx.world, self.claim), flush=True)
                if estimate:
                    print(estimate, flush=True)
            return 0
        self.output.mkdir(parents=True, exist_ok=True)
        runs = shards.runs_dir(self.output)
        self.leases = claims.Leases(self.run_id, self.ctx.rank, self.ctx.host, runs=runs,
                                    timeout_s=self.cfg.work.lease_timeout_s)
        self.reports = Reports(self.output, self.run_id, self.ctx.rank)
        try:
            return self._run(plan)
        finally:
            atomic.protect()  # what this run read is the next run's (or sweep point's) business
            self.reports.close()
            self.leases.close()  # our run file and any lease still held go
            if self.ctx.is_main:
                shutil.rmtree(shards.hosts_dir(self.output, self.run_id), ignore_errors=True)
                shards.plan_file(self.output, self.run_id).unlink(missing_ok=True)

    def _run(self, plan: Plan) -> int:
        self.join_folder()
        self.plan = plan
        self.board = Board(plan, self.ctx, self.leases, wdir=self.unit_wdir, sig=self.sig_of, live=self.live,
                           merged=lambda vi: self.merger.merged(vi), bundle_rels=self.bundle_rels)
        self.merger = Merger(output=self.output, plan=plan, job=self.job, leases=self.leases, ctx=self.ctx,
                             run=self.run_id, wdir=self.wdir, sigs=self.sigs_of, live=self.live,
                             reports=self.reports, keep_shards=self.cfg.work.keep_shards, reader=self.reader)
        self.progress = Progress(self.ctx, show_bar=self.ctx.is_main and self.cfg.log.progress,
                                 log_every_s=self.cfg.log.every_s)
        self.maker.progress = self.progress
        self.maker.leases = self.leases
        if self.ctx.is_main:
            self.progress.add_total(sum(u.out_frames for u in plan.units))  # less what is found done
            shards.remove_dead_runs_files(self.output, claims.live_runs(self.output, self.leases.timeout_s))
            for vi in (vi for vi in range(len(plan.videos)) if not plan.units_of(vi)):
                self.fail_video(vi, f"{self.job.name} made no units of it")
            for path, reason in plan.failed.items():
                self.reports.add(entry(path, "failed", reason))
            for path, reason in plan.skipped.items():
                self.reports.add(entry(path, "skipped", reason))
        self.ctx.barrier()  # the total is in before any rank takes units off it

        # 3. Work: units claimed in plan order by whichever rank is free, decode/model/encode
        #    overlapped; each video merged by the rank that completes it; done when every video
        #    of the plan is settled, by this launch or another one sharing the folder.
        self.progress.start()
        try:
            log.info("taking units in plan order (work.claim=%s): %d in the plan", self.claim,
                     len(plan.units))
            work(self.board, self.claim, self.handle, poll_s=min(2.0, self.leases.timeout_s / 10))
            self.reports.close()
            arrived = not preempt.requested.is_set() and self.ctx.wait_for_all(
                "units_done", cancel=preempt.requested)
        finally:
            self.progress.close()
        if not arrived:
            # The job is being taken away. Finished shards stay for the rerun.
            log.warning("stopped early on request; rerun the same command to resume")
            return preempt.exit_status()
        if not self.ctx.is_main:
            return 0

        # 4. Rank 0 writes the report from every rank's part.
        report = self.output / shards.report_name(self.cfg.work.shard_index, self.cfg.work.num_shards)
        return 1 if finish_report(shards.report_parts(self.output, self.run_id), report)["failed"] else 0

    def join_folder(self) -> None:
        """Register this launch on the folder and stop before any work when a live launch there
        runs other settings (claims.register_run). Launches with the same settings share the work."""
        problem = None
        if self.ctx.is_main:
            # what the files depend on: the shards' settings, and how the videos are cut into units
            w = self.cfg.work
            settings = {**self.settings, "work": {"unit": w.unit, "segment_frames": w.segment_frames,
                                                  "overlap": w.overlap, "bundle_frames": w.bundle_frames}}
            problem = claims.register_run(self.output, self.leases, settings, world=self.ctx.world,
                                          job=self.job.name, input=str(self.cfg.input))
        problem = self.ctx.all_gather_object(problem)[0]
        if problem:
            raise ValueError(problem)

    # -- units ----------------------------------------------------------------------------------
    def handle(self, i: int, state: State | None, found: dict | None, watching: bool) -> bool:
        """Act on what the board says of unit ``i`` (``i < 0``: the merge of video ``-1 - i`` in
        another launch's hands); True once it is settled here, False while others hold it."""
        if i < 0:
            return self.complete(-1 - i, watching=True)
        unit = self.plan.units[i]
        if state is State.FREE:
            made = self.take(unit)
            if made in (Made.MADE, Made.FAILED, Made.STOPPED):
                return True
            state = State.HELD  # LOST: its lease went to another launch
        if state is State.HELD:
            if not watching:
                self.board.watch(i)
            return False
        self.uncount(unit)
        if state is State.FAILED:
            reason = (found or {}).get("reason") or "failed in another launch"
            self.fail_video(unit.video, f"{unit.key} (frames [{unit.start}, {unit.end})): {reason}")
        elif unit.parts:
            self.settle_bundle(unit, found)
        elif self.board.unit_done(unit):
            self.complete(unit.video)
        return True

    def take(self, unit: Unit) -> Made:
        """Make a free unit under its lease."""
        wdir = self.unit_wdir(unit)
        lease = shards.lease_path(wdir, unit)
        lease.parent.mkdir(parents=True, exist_ok=True)
        if not self.leases.acquire(lease, what=f"{self.plan.videos[unit.video].stem} {unit.key}"):
            return Made.LOST
        try:
            if unit.parts:
                return self.make_bundle(unit, lease)
            if shards.shard_done(wdir, unit, self.sig_of(unit)):  # finished (elsewhere) as we looked
                self.uncount(unit)
                made = Made.MADE
            else:
                made = self.make_segment(unit, lease)
        finally:
            self.leases.release(lease)
        if made is Made.MADE and self.board.unit_done(unit):
            self.complete(unit.video)  # this rank completed the video: it merges it
        return made

    def make_segment(self, unit: Unit, lease: Path) -> Made:
        """Process a unit whose lease this rank holds; failures are recorded, never raised."""
        info = self.plan.videos[unit.video]
        wdir = self.wdir(info)
        if self.ctx.add(f"begun/{unit.video}", 1) == 1:  # the video's state changes: it is being made
            units = self.plan.units_of(unit.video)
            shards.write_checkpoint(wdir, info, units, self.sigs_of(unit.video), {})
        try:
            self.maker.make_shard(info, unit, shards.shard_path(wdir, unit), lease)
            return Made.MADE
        except Exception as e:  # noqa: BLE001 - one broken input never stops the batch
            made, reason = self.failure(info, unit, e)
            if made is Made.FAILED:
                shards.write_failure(wdir, unit, reason=reason, rank=self.ctx.rank, host=self.ctx.host,
                                     run=self.run_id)
                self.uncount(unit)  # its frames came off the bar in make_shard
                self.fail_video(unit.video, f"{unit.key} (frames [{unit.start}, {unit.end})): {reason}")
            return made

    def make_bundle(self, unit: Unit, lease: Path) -> Made:
        """Make a bundle's clips one after the other, each remuxed straight to its output; clips
        a launch that ended made already are kept. One failing clip fails that clip only."""
        wdir = self.unit_wdir(unit)
        before = shards.bundle_state(wdir, unit, self.bundle_rels(unit), self.sig_of(unit)) or {"clips": []}
        kept = {c["rel"]: c for c in before["clips"] if c.get("status") == "ok"}
        t0 = time.monotonic()
        clips = []
        for part in unit.parts:
            info = self.plan.videos[part.video]
            rel = shards.rel_of(info)
            if rel in kept:
                self.uncount(part)
                clips.append(kept[rel])
                continue
            shard = shards.clip_shard(wdir, unit, len(clips))
            shard.parent.mkdir(parents=True, exist_ok=True)
            try:
                side = self.maker.make_shard(info, part, shard, lease)
                result = self.merger.commit_clip(part.video, shard, part, side)
                clips.append({"rel": rel, "input": info.path, "status": "ok",
                              "size": Path(result["output"]).stat().st_size, **result,
                              "shard": {k: v for k, v in side.items() if k in SHARD_FIGURES}})
            except Exception as e:  # noqa: BLE001 - one broken clip never stops its bundle
                made, reason = self.failure(info, part, e)
                if made is not Made.FAILED:
                    return made
                self.uncount(part)
                clips.append({"rel": rel, "input": info.path, "status": "failed", "reason": reason,
                              "output": None, "frames": info.frames})
            finally:
                shard.unlink(missing_ok=True)
        if not self.leases.holds(lease):
            return Made.LOST
        side = shards.write_bundle(wdir, unit, signature=self.sig_of(unit), clips=clips, rank=self.ctx.rank,
                                   host=self.ctx.host, seconds=time.monotonic() - t0, run=self.run_id)
        shutil.rmtree(wdir / unit.key, ignore_errors=True)
        self.settle_bundle(unit, side)
        return Made.MADE

    def failure(self, info: VideoInfo, unit: Unit, e: Exception) -> tuple[Made, str]:
        """What an exception out of a unit means: stopped (preemption), lost (its lease was taken
        over) or failed, with the reason."""
        if isinstance(e, preempt.Preempted):
            return Made.STOPPED, ""
        if isinstance(e, claims.LeaseLost):  # another launch took it over: its shard, not ours
            log.warning("%s %s: %s; leaving it to them", info.stem, unit.key, e)
            return Made.LOST, ""
        # The stop signal reaches the unit's ffmpeg too (same process group), and may kill it
        # before this process has run its own handler: an encoder killed by a signal waits a
        # moment for the stop to show. Not a broken input; make_shard removed the partial shard.
        killed = getattr(e, "signal", None) is not None
        if preempt.requested.wait(timeout=5.0 if killed else 0.0):
            return Made.STOPPED, ""
        reason = str(e) or e.__class__.__name__
        log.error("%s: %s failed: %s", info.path, unit.key, reason)
        return Made.FAILED, reason

    # -- what settles a video ---------------------------------------------------------------------
    def complete(self, vi: int, watching: bool = False) -> bool:
        """Every unit of segmented video ``vi`` is done: merge it (or watch another launch do it)."""
        state, reason = self.merger.try_merge(vi)
        if state == "merged":
            self.board.settle()
        elif state == "failed":
            self.fail_video(vi, reason)
        elif not watching:
            self.board.watch(-1 - vi)
        return state != "busy"

    def settle_bundle(self, unit: Unit, side: dict) -> None:
        for part, clip in zip(unit.parts, side["clips"]):
            if clip.get("status") == "ok":
                kept = {k: v for k, v in clip.items() if k not in ("rel", "input", "status", "size", "shard")}
                self.reports.add(entry(clip["input"], "ok", **kept))
                self.board.settle()
            else:
                self.fail_video(part.video, clip.get("reason") or "failed")

    def fail_video(self, vi: int, reason: str) -> None:
        if self.board.fail(vi):
            info = self.plan.videos[vi]
            log.error("%s: %s", info.path, reason)
            self.reports.add(entry(info.path, "failed", reason, frames=info.frames))

    def uncount(self, unit: Unit) -> None:
        """A unit this launch does not make (done before, by another launch, or its video
        failed) leaves the progress total."""
        self.ctx.add("frames_total", -unit.out_frames)

    def live(self, run: str | None) -> bool:
        """Is ``run`` this launch or another live one on the folder?"""
        if run is None:
            return False
        if run == self.run_id:
            return True
        return run in claims.live_runs(self.output, self.leases.timeout_s)

    # -- one shard --------------------------------------------------------------------------------
    # -- planning -------------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        # No final write may replace an input: a folder input's files are its direct children, a
        # single file's folder is refused as an output too (config.check_paths says why).
        given = Path(self.cfg.input).expanduser()
        atomic.protect([*(p for _, p in config.read_paths(self.cfg)),
                        *((given.parent,) if given.is_file() else ())])
        return make_plan(self.cfg, self.ctx, self.job, self.output, self.run_id,
                         lambda rels: shards.bundle_key(rels, self.tag), dry_run=self.cfg.dry_run)

    def wdir(self, info: VideoInfo) -> Path:
        return shards.work_dir(self.output, info, self.tag)

    def unit_wdir(self, unit: Unit) -> Path:
        """The folder of a unit's files: its video's work folder, or its bundle's."""
        if unit.parts:
            return shards.bundle_dir(self.output, unit.key)
        return self.wdir(self.plan.videos[unit.video])

    def bundle_rels(self, unit: Unit) -> list[str]:
        return [shards.rel_of(self.plan.videos[vi]) for vi in unit.clips]

    def sig_of(self, unit: Unit) -> str:
        """The signature a unit's sidecar must carry: the run's settings, plus what the job says
        this unit alone depends on (``unit_settings``: a prompt, two keyframes); a bundle's, its
        clips' in order."""
        key = (unit.video, unit.key, unit.start, unit.end)  # hashed once per run, not per look
        if key not in self._unit_sigs:
            if unit.parts:
                own = [self.job.unit_settings(self.plan.videos[p.video], p) for p in unit.parts]
                own = own if any(own) else None
            else:
                own = self.job.unit_settings(self.plan.videos[unit.video], unit)
            self._unit_sigs[key] = signature({"run": self.sig, "unit": own}) if own else self.sig
        return self._unit_sigs[key]

    def sigs_of(self, vi: int) -> dict[str, str]:
        return {u.key: self.sig_of(u) for u in self.plan.units_of(vi)}
