"""One run of a vsr_ddp job, top to bottom: load, plan, work, wait, merge, report."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import atomic, claims, config, preempt, shards
from .atomic import atomic_write_json, partials
from .config import Settings
from .dist import Dist
from .jobs import make_job
from .jobs.base import signature
from .logs import Progress, human_duration, set_run
from .pipeline import run_stages
from .plan import (InputError, Plan, SkipVideo, Unit, VideoInfo, format_plan, list_inputs, plan_units, probe,
                   strided)
from .video import (NVENC_MAX_SIDE, FrameReader, ShardWriter, encoder_for_size, even_size, merge, output_sar,
                    pad_even, pick_pix_fmt, pix_fmt_depth, resolve_codec)

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, cfg: Settings, ctx: Dist):
        self.cfg = cfg  # checked (config.check): every key there, every value allowed
        self.ctx = ctx
        self.output = Path(cfg.output).expanduser()
        self.encode = self.resolve_encoder(asdict(cfg.encode))
        self.job = make_job(cfg.job_cfg, ctx.device)
        self.failures: dict[str, str] = {}  # input path -> first reason, on this rank
        self.merged: dict[int, dict] = {}  # video index -> merge result, once known to this rank
        self.claim = cfg.work.claim
        self._unit_sigs: dict[tuple, str] = {}
        self._told_deinterlace: set[str] = set()

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

        # 2. Probe the inputs (each rank a share) and plan the same units on every rank.
        self.ctx.check_shared_folder(self.output, run=self.run_id)
        plan = self.make_plan()
        if self.cfg.dry_run:
            estimate = self.calibrate(plan) if getattr(self.cfg.job, "calibrate", False) else None
            if self.ctx.is_main:
                print(format_plan(plan, self.ctx.world, self.claim), flush=True)
                if estimate:
                    print(estimate, flush=True)
            return 0
        self.output.mkdir(parents=True, exist_ok=True)
        self.leases = claims.Leases(self.run_id, self.ctx.rank, self.ctx.host,
                                    timeout_s=self.cfg.work.lease_timeout_s,
                                    runs=claims.runs_dir(self.output))
        try:
            return self._run(plan)
        finally:
            atomic.protect()  # what this run read is the next run's (or sweep point's) business
            self.leases.close()  # our run file and any lease still held go
            if self.ctx.is_main:
                shutil.rmtree(self.output / ".vsr_ddp" / "hosts" / self.run_id, ignore_errors=True)

    def _run(self, plan: Plan) -> int:
        self.join_folder()
        progress = Progress(self.ctx, show_bar=self.ctx.is_main and self.cfg.log.progress,
                            log_every_s=self.cfg.log.every_s)
        if self.ctx.is_main:
            progress.add_total(sum(u.out_frames for u in plan.units))  # less what is found done
        self.ctx.barrier()  # the total is in before any rank takes units off it
        if self.ctx.is_main:
            for vi in range(len(plan.videos)):
                self.write_checkpoint(plan, vi)

        # 3. Work: units claimed in plan order by whichever rank is free, decode/model/encode
        #    overlapped; each video merged by the rank that completes it.
        progress.start()
        try:
            self.work(plan, progress)
            # 4. Every unit and merge is done, by this run or another one sharing the folder.
            arrived = not preempt.requested.is_set() and self.ctx.wait_for_all(
                "units_done", cancel=preempt.requested)
        finally:
            progress.close()
        if not arrived:
            # The job is being taken away. Finished shards stay for the rerun.
            log.warning("stopped early on request; rerun the same command to resume")
            return preempt.exit_status()
        failures = {}
        for per_rank in self.ctx.all_gather_object(self.failures):
            for path, reason in per_rank.items():
                failures.setdefault(path, reason)
        if not self.ctx.is_main:
            return 0

        # 5. Rank 0 writes the report.
        return self.finish(plan, failures)

    def join_folder(self) -> None:
        """Register this launch in ``<output>/.vsr_ddp/runs/`` (rank 0 keeps its file renewed) and
        stop before any work when a live launch on the folder runs other settings: the two would
        overwrite each other's videos. Launches with the same settings share the work."""
        problem = None
        if self.ctx.is_main:
            claims.runs_dir(self.output).mkdir(parents=True, exist_ok=True)
            # what the files depend on: the shards' settings, and how the videos are cut into units
            w = self.cfg.work
            settings = {**self.settings, "work": {"unit": w.unit, "segment_frames": w.segment_frames,
                                                  "overlap": w.overlap}}
            sig = signature(settings)
            self.leases.acquire(claims.run_file(self.output, self.run_id), what="run", extra={
                "signature": sig, "settings": settings, "world": self.ctx.world,
                "job": self.job.name, "input": str(self.cfg.input)})
            others = {r: h for r, h in claims.live_runs(self.output, self.leases.timeout_s).items()
                      if r != self.run_id}
            for holder in others.values():
                if holder.get("signature") != sig:
                    differ = claims.settings_difference(holder.get("settings") or {}, settings)
                    problem = (f"output folder {self.output} is in use by {claims.holder_text(holder)} with "
                               f"other settings ({differ}): wait for it to finish, launch with its settings "
                               f"to join it, or use another output=")
                    break
            if others and problem is None:
                log.info("joining %d run(s) already working on %s: %s; units are shared", len(others),
                         self.output, ", ".join(claims.holder_text(h) for h in others.values()))
            log.info("run %s: %d rank(s)", self.run_id, self.ctx.world)
        problem = self.ctx.all_gather_object(problem)[0]
        if problem:
            raise ValueError(problem)

    # -- claiming units -------------------------------------------------------------------------
    def claim_order(self, plan: Plan):
        """Unit indices for this rank to try, in plan order: ``work.claim=dynamic`` draws the next
        one from a counter in the rendezvous store whenever this rank is free (the ranks of a run
        never wait on each other's long units); ``strided`` takes every world-th, fixed up front."""
        if self.claim == "strided":
            yield from strided(range(len(plan.units)), self.ctx.rank, self.ctx.world)
            return
        while (i := self.ctx.add("claim", 1) - 1) < len(plan.units):
            yield i

    def work(self, plan: Plan, progress: Progress) -> None:
        """Claim units until every unit and every merge of the plan is done, here or by another
        launch on the same folder. A failed unit fails its video, never the batch."""
        self._by_video: dict[int, list[int]] = {}
        for i, u in enumerate(plan.units):
            self._by_video.setdefault(u.video, []).append(i)
        self._done: set[int] = set()  # units known done (shard and sidecar in place)
        seen = {"done": 0, "held": 0}
        drawn = 0
        log.info("taking units in plan order (work.claim=%s): %d in the plan", self.claim, len(plan.units))
        for i in self.claim_order(plan):
            if preempt.requested.is_set():
                return
            drawn += 1
            what = self.try_unit(plan, i, progress, verify=True)
            if what in seen:
                seen[what] += 1
        log.info("%d unit(s) for this rank, %d already done%s", drawn, seen["done"],
                 f", {seen['held']} in other launches' hands" if seen["held"] else "")
        # What is left: units other launches hold (taken over if their holder dies), failed units
        # of runs that ended (retried), and videos whose shards are all done but not merged yet.
        poll_s = min(2.0, self.leases.timeout_s / 10)
        told = False
        mine = (set(strided(range(len(plan.units)), self.ctx.rank, self.ctx.world))
                if self.claim == "strided" else None)  # the fixed assignment's units of this rank
        while not preempt.requested.is_set():
            pending, busy = self.survey(plan)
            if not pending and not busy:
                return
            if not told:
                log.info("waiting for %d unit(s) and %d merge(s) in other hands", len(pending), busy)
                told = True
            if mine is not None:  # work.claim=strided: no rank takes another's units
                pending = [i for i in pending if i in mine]
            for i in pending:
                if preempt.requested.is_set() or self.try_unit(plan, i, progress) == "made":
                    break  # made one: look again from the start of the plan
            else:
                preempt.requested.wait(poll_s)

    def try_unit(self, plan: Plan, i: int, progress: Progress, verify: bool = False) -> str:
        """Make unit ``i`` unless it is done, failed in a live run or another rank's; returns what
        it found: done, failed, held (someone else's lease), made or stopped."""
        unit = plan.units[i]
        info = plan.videos[unit.video]
        wdir = self.wdir(info)
        if i in self._done:
            return "done"
        if info.path in self.failures:
            self.uncount(i, unit)
            return "failed"
        sig = self.sig_of(info, unit)
        if shards.shard_done(wdir, unit, sig, verify_checksum=verify):
            return self.found_done(i, unit)
        failed = atomic.read_json(shards.failure_path(wdir, unit))
        if failed and self.live(failed.get("run")):
            self.failures.setdefault(info.path, f"{unit.key} (frames [{unit.start}, {unit.end})): "
                                                f"{failed.get('reason')}")
            self.uncount(i, unit)
            return "failed"
        wdir.mkdir(parents=True, exist_ok=True)
        lease = shards.lease_path(wdir, unit)
        if not self.leases.acquire(lease, what=f"{info.stem} {unit.key}"):
            return "held"
        try:
            if shards.shard_done(wdir, unit, sig, verify_checksum=False):  # finished as we looked
                return self.found_done(i, unit)
            made = self.make_unit(info, unit, lease, progress)
        finally:
            self.leases.release(lease)
        if made == "failed":
            self.uncount(i, unit)  # its frames came off the bar in process_unit
        if made == "made":
            self._done.add(i)
            self.made_here(i, unit)
            if all(j in self._done or shards.shard_done(wdir, plan.units[j], self.sig_of(info, plan.units[j]),
                                                        verify_checksum=False)
                   for j in self._by_video[unit.video]):
                self.try_merge(plan, unit.video)  # this rank completed the video: it merges it
        return made

    def found_done(self, i: int, unit: Unit) -> str:
        self._done.add(i)
        self.uncount(i, unit)
        return "done"

    def uncount(self, i: int, unit: Unit) -> None:
        """A unit this run will not make (done before, by another launch, or its video failed)
        leaves the progress total, once per run, unless a rank of this run made it (``made_here``
        first: its frames are on the bar; any rank may find a unit made by another one done)."""
        if self.ctx.add(f"gone/{i}", 1) == 1:
            self.ctx.add("frames_total", -unit.out_frames)

    def made_here(self, i: int, unit: Unit) -> None:
        """Unit ``i`` was made by this rank, its frames are on the bar: it stays in the total,
        and comes back to it when a rank took it off as we committed it (it saw the sidecar)."""
        if self.ctx.add(f"gone/{i}", 1) > 1:
            self.ctx.add("frames_total", unit.out_frames)

    def live(self, run: str | None) -> bool:
        """Is ``run`` this launch or another live one on the folder?"""
        if run is None:
            return False
        if run == self.run_id:
            return True
        return run in claims.live_runs(self.output, self.leases.timeout_s)

    def make_unit(self, info: VideoInfo, unit: Unit, lease: Path, progress: Progress) -> str:
        """Process a unit whose lease this rank holds; failures are recorded, never raised."""
        try:
            self.process_unit(info, unit, progress, lease)
            return "made"
        except preempt.Preempted:
            return "stopped"
        except claims.LeaseLost as e:  # another launch took it over: its shard, not ours
            log.warning("%s %s: %s; leaving it to them", info.stem, unit.key, e)
            return "held"
        except Exception as e:  # noqa: BLE001 - one broken input never stops the batch
            # The stop signal reaches the unit's ffmpeg too (same process group), and may kill
            # it before this process has run its own handler: an encoder killed by a signal
            # waits a moment for the stop to show. Not a broken input; process_unit has
            # already removed the partial shard.
            killed = getattr(e, "signal", None) is not None
            if preempt.requested.wait(timeout=5.0 if killed else 0.0):
                return "stopped"
            reason = str(e) or e.__class__.__name__
            log.error("%s: %s failed: %s", info.path, unit.key, reason)
            self.failures.setdefault(info.path, f"{unit.key} (frames [{unit.start}, {unit.end})): {reason}")
            shards.write_failure(self.wdir(info), unit, reason=reason, rank=self.ctx.rank, host=self.ctx.host,
                                 run=self.run_id)
            return "failed"

    def survey(self, plan: Plan) -> tuple[list[int], int]:
        """What keeps this run from finishing: units not done yet (their indices), and how many
        videos another rank is merging now. Merges videos whose shards are all done meanwhile."""
        pending, busy = [], 0
        for vi, info in enumerate(plan.videos):
            if vi in self.merged or info.path in self.failures:
                continue
            wdir = self.wdir(info)
            left = []
            for i in self._by_video.get(vi, ()):
                u = plan.units[i]
                if i in self._done:
                    continue
                if shards.shard_done(wdir, u, self.sig_of(info, u), verify_checksum=False):
                    self._done.add(i)
                    self.uncount(i, u)
                else:
                    left.append(i)
            if left:
                pending += left
            elif self.try_merge(plan, vi) == "busy":
                busy += 1
        return pending, busy

    def resolve_encoder(self, encode: dict) -> dict:
        """Pick the concrete encoder once per run. All ranks must agree (the merge concatenates
        shards without re-encoding), so a run where some node lacks NVENC uses software."""
        wanted = encode["codec"]
        mine = resolve_codec(wanted, encode["format"], self.ctx.device.type == "cuda")
        chosen = set(self.ctx.all_gather_object(mine))
        codec = mine if len(chosen) == 1 else resolve_codec(wanted, encode["format"], cuda=False)
        if wanted == "auto":
            log.info("encode.codec=auto: using %s%s", codec, "" if len(chosen) == 1 else
                     f" (ranks disagreed: {sorted(chosen)})")
        return {**encode, "codec": codec}

    # -- planning -------------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        inputs = list_inputs(self.cfg.input, self.cfg.work.shard_index, self.cfg.work.num_shards)
        # No final write may replace an input: a folder input's files are its direct children, a
        # single file's folder is refused as an output too (config.check_paths says why).
        given = Path(self.cfg.input).expanduser()
        atomic.protect([*(p for _, p in config.read_paths(self.cfg)),
                        *((given.parent,) if given.is_file() else ())])
        probed = {}
        for path in strided(inputs, self.ctx.rank, self.ctx.world):
            try:
                probed[str(path)] = probe(path)
            except InputError as e:
                probed[str(path)] = str(e)
            except OSError as e:
                probed[str(path)] = f"cannot read ({e.strerror or e})"
        results = {}
        for part in self.ctx.all_gather_object(probed):
            results.update(part)
        videos, failed, stems = [], {}, {}
        for path in map(str, inputs):
            res = results[path]
            if isinstance(res, str):
                failed[path] = res
                log.error("%s: %s", path, res)
            elif res.stem in stems:
                failed[path] = f"same output name {res.stem}.mp4 as {stems[res.stem]}; rename one of them"
                log.error("%s: %s", path, failed[path])
            else:
                stems[res.stem] = path
                videos.append(res)
        w = self.cfg.work
        skipped, kept, units = {}, [], []
        for info in videos:
            # The job may cut its own units (key intervals, whole videos, retimed segments) and
            # reject a video (missing keys, say) with a reason of its own; else work.* segments.
            try:
                mine = self.job.plan_video(info, len(kept))
                if mine is None:
                    mine = plan_units([info], w.unit, w.segment_frames, w.overlap, first_index=len(kept))
                units += mine
                kept.append(info)
            except SkipVideo as e:  # left out on purpose (no prompt for it, say): not a failure
                skipped[info.path] = str(e)
                log.warning("%s: skipped: %s", info.path, e)
            except InputError as e:
                failed[info.path] = str(e)
                log.error("%s: %s", info.path, e)
        videos = kept
        log.info("plan: %d video(s), %d unit(s), %d failed to probe", len(videos), len(units), len(failed))
        return Plan(videos=videos, failed=failed, units=units, inputs=[str(p) for p in inputs],
                    skipped=skipped)

    def calibrate(self, plan: Plan) -> str | None:
        """Time the job on real frames on every rank's device and estimate the run.

        Each rank asks the job for its seconds per output frame on the first video's first frames
        (``job.seconds_per_frame``: a few model batches for upscale, one EbSynth synthesis for
        propagate and sim2real); the time per pixel scales to the other videos' sizes. Decoding
        and encoding overlap the model, so the model's time is the run's time in steady state.
        """
        if not plan.videos:
            return None
        info = plan.videos[0]
        batch = getattr(self.cfg.job, "batch_size", 4)  # propagate has none: a few frames will do
        frames = np.concatenate(list(self.reader(info).read(0, min(info.frames, batch))))
        if len(frames) < batch:
            frames = np.concatenate([frames] * (batch // len(frames) + 1))[:batch]
        self.job.begin(info, plan.units_of(0)[0], lambda frames_done: None)  # no bar to move here
        try:
            s_per_px = self.job.seconds_per_frame(frames, info) / (info.width * info.height)
        except NotImplementedError as e:
            return f"estimate: {e}"
        rates = self.ctx.all_gather_object(s_per_px)
        px = [u.out_frames * plan.videos[u.video].width * plan.videos[u.video].height for u in plan.units]
        if self.claim == "strided":
            per_rank = [sum(strided(px, rank, self.ctx.world)) * rate for rank, rate in enumerate(rates)]
            total, tail = max(per_rank), f"slowest rank {max(range(len(per_rank)), key=per_rank.__getitem__)}"
        else:
            # Units go to whichever rank is free: the ranks' speeds add up, and the run lasts at
            # least as long as its largest unit on the fastest rank.
            total = max(sum(px) / sum(1 / r for r in rates), max(px, default=0) * min(rates))
            tail = "units claimed dynamically"
        fps = [1 / (r * info.width * info.height) for r in rates]
        device = f"{self.ctx.world} GPU{'s' if self.ctx.world > 1 else ''}" \
            if self.ctx.device.type == "cuda" \
            else f"{self.ctx.world} CPU rank{'s' if self.ctx.world > 1 else ''}"
        return (f"estimate: about {human_duration(total)} on {device} (model {min(fps):.2f}-{max(fps):.2f} "
                f"frames/s per rank at {info.width}x{info.height}; {tail})")

    def deinterlace(self, info: VideoInfo) -> bool:
        """``decode.deinterlace``: auto (when the stream flags interlaced frames), on, off."""
        mode = self.cfg.decode.deinterlace
        on = mode == "on" or (mode == "auto" and info.interlaced)
        if info.path not in self._told_deinterlace:
            self._told_deinterlace.add(info.path)
            if on:
                log.info("%s: deinterlacing with bwdif (decode.deinterlace=%s%s)", info.path, mode,
                         ", the stream flags interlaced frames" if info.interlaced else "")
            elif info.interlaced:
                log.warning("%s: the stream flags interlaced frames and decode.deinterlace=off: the model "
                            "will see (and magnify) the combing", info.path)
        return on

    def reader(self, info: VideoInfo, deep: bool = False) -> FrameReader:
        """Every read of a video's frames, for the model, keyframes and previews alike."""
        return FrameReader(info, backend=self.cfg.work.reader, chunk=self.cfg.work.read_chunk,
                           deinterlace=self.deinterlace(info), deep=deep)

    def wdir(self, info: VideoInfo) -> Path:
        return shards.work_dir(self.output, info, self.tag)

    def sig_of(self, info: VideoInfo, unit: Unit) -> str:
        """The signature a unit's sidecar must carry: the run's settings, plus what the job says
        this unit alone depends on (``unit_settings``: a prompt, two keyframes)."""
        key = (info.path, unit.key, unit.start, unit.end)  # keys are hashed once per run, not per poll
        if key not in self._unit_sigs:
            own = self.job.unit_settings(info, unit)
            self._unit_sigs[key] = signature({"run": self.sig, "unit": own}) if own else self.sig
        return self._unit_sigs[key]

    def write_checkpoint(self, plan: Plan, vi: int, output: str | None = None) -> None:
        info = plan.videos[vi]
        wdir = self.wdir(info)
        wdir.mkdir(parents=True, exist_ok=True)
        units = plan.units_of(vi)
        sigs = {u.key: self.sig_of(info, u) for u in units}
        status = {u.key: "done" if shards.shard_done(wdir, u, sigs[u.key], verify_checksum=False)
                  else "pending" for u in units}
        if output is None:  # merged already, maybe by another launch on the folder
            out = self.output / f"{info.stem}.mp4"
            if shards.merged_result(wdir, out, [shards.read_sidecar(wdir, u) for u in units]) is not None:
                output = str(out)
        shards.write_checkpoint(wdir, info, units, sigs, status, output=output)

    # -- one unit -------------------------------------------------------------------------------
    def process_unit(self, info: VideoInfo, unit: Unit, progress: Progress,
                     lease: Path | None = None) -> None:
        """Make one shard and its sidecar. ``lease``: this rank's lease on the unit, checked before
        anything is committed (a rank whose lease was taken over commits nothing)."""
        t0 = time.monotonic()
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)  # the sidecar's GPU peak is this unit's
        wdir = self.wdir(info)
        wdir.mkdir(parents=True, exist_ok=True)
        shards.discard_partial(wdir, unit)
        start, end = self.job.read_range(unit)
        made_w, made_h = self.job.output_size(info.width, info.height)
        out_w, out_h = even_size(made_w, made_h)
        encode = encoder_for_size(self.encode, out_w, out_h)
        if encode is not self.encode:
            log.info("%s: %dx%d is beyond %s's %d pixels a side: encoding with %s", info.stem, out_w, out_h,
                     self.encode["codec"], NVENC_MAX_SIDE[self.encode["codec"]], encode["codec"])
        encode = pick_pix_fmt(encode, info.bit_depth)
        # 16-bit frames from decoder to encoder when the input has more than 8 bits, the output
        # format keeps them and the job computes in more than 8 bits (upscale)
        deep = info.bit_depth > 8 and pix_fmt_depth(encode["pix_fmt"]) > 8 and self.job.deep_frames
        reader = self.reader(info, deep=deep)
        gpu = self.ctx.device.index if self.ctx.device.type == "cuda" else None
        writer = ShardWriter(shards.shard_path(wdir, unit), out_w, out_h, self.job.output_info(info).fps,
                             encode, info.color, gpu=gpu, sar=output_sar(info, made_w, made_h), deep=deep,
                             writer=f"{self.run_id}-r{self.ctx.rank}")

        counted = [0, 0]  # frames of this unit on the bar, frames written

        def count(frames_done: float) -> None:
            n = min(int(frames_done), unit.out_frames) - counted[0]
            if n > 0:
                progress.advance(n)
                counted[0] += n

        self.job.begin(info, unit, count)
        source = self.job.unit_pieces(reader.read, unit, info)

        def model(piece):  # a piece -> the unit's next output frames, in order (maybe none)
            out = self.job.process_piece(piece, unit, info)
            return pad_even(out) if len(out) else out

        def sink(frames):
            if len(frames):
                writer.write(frames)
                counted[1] += len(frames)
                count(counted[1])

        try:
            stages = run_stages(source, model, sink,
                                depth=self.cfg.work.queue_depth, cancel=preempt.requested)
            if writer.frames != unit.out_frames:
                raise RuntimeError(f"wrote {writer.frames} frames, the unit makes {unit.out_frames}")
            if lease is not None:
                self.leases.check(lease)
            writer.close()
        except BaseException:
            writer.abort()  # this writer's partial file
            progress.advance(-counted[0])  # and its frames off the bar: lost, failed or stopped
            raise
        seconds = time.monotonic() - t0
        shards.write_sidecar(wdir, unit, signature=self.sig_of(info, unit), encode=encode,
                             rank=self.ctx.rank, host=self.ctx.host, seconds=seconds, run=self.run_id,
                             extra={"read_start": start, "read_end": end, "width": out_w, "height": out_h,
                                    "reader": reader.backend, "stages": stages,
                                    "counts": self.job.unit_counts(),
                                    **resource_peaks(self.ctx.device)})
        log.info("%s %s: frames [%d, %d) in %.1f s (%.2f frames/s)", info.stem, unit.key, unit.start,
                 unit.end, seconds, unit.frames / max(seconds, 1e-9))

    # -- merge and report ------------------------------------------------------------------------
    def try_merge(self, plan: Plan, vi: int) -> str:
        """Merge a video whose shards are all done, once: under its merge lease, unless
        ``merged.json`` says its output is already the merge of these very shards. Returns merged,
        failed (here or in a live launch) or busy (another rank is merging it now)."""
        info = plan.videos[vi]
        wdir = self.wdir(info)
        out = self.output / f"{info.stem}.mp4"
        units = plan.units_of(vi)
        result = shards.merged_result(wdir, out, [shards.read_sidecar(wdir, u) for u in units])
        if result is not None:
            self.merged[vi] = result
            return "merged"
        failed = atomic.read_json(shards.merge_failure_path(wdir))
        if failed and self.live(failed.get("run")):
            self.failures.setdefault(info.path, f"merge: {failed.get('reason')}")
            return "failed"
        lock = wdir / shards.MERGE_LEASE
        if not self.leases.acquire(lock, what=f"merge {info.stem}"):
            return "busy"
        try:
            sides = [shards.read_sidecar(wdir, u) for u in units]
            result = shards.merged_result(wdir, out, sides)  # merged as we took the lease
            if result is None:
                # what an interrupted merge left behind (every writer's temporary files)
                for leftover in (*partials(out), *partials(wdir / "joined.mp4"),
                                 shards.merge_failure_path(wdir)):
                    leftover.unlink(missing_ok=True)
                result = self.merge_video(plan, vi, lock)
            self.merged[vi] = result
            return "merged"
        except claims.LeaseLost as e:
            log.warning("%s: merge abandoned: %s", info.path, e)
            return "busy"
        except Exception as e:  # noqa: BLE001 - reported per video
            log.error("%s: merge failed: %s", info.path, e)
            self.failures.setdefault(info.path, f"merge: {e}")
            atomic_write_json(shards.merge_failure_path(wdir), {
                "reason": str(e), "run": self.run_id, "rank": self.ctx.rank, "host": self.ctx.host,
                "failed_at": time.strftime(shards.TIME_FORMAT)})
            return "failed"
        finally:
            self.leases.release(lock)

    def finish(self, plan: Plan, failures: dict) -> int:
        entries = {path: {"input": path, "status": "failed", "reason": reason, "output": None,
                          "frames": None, "seconds": None} for path, reason in plan.failed.items()}
        entries.update({path: {"input": path, "status": "skipped", "reason": reason, "output": None,
                               "frames": None, "seconds": None} for path, reason in plan.skipped.items()})
        for vi, info in enumerate(plan.videos):
            entry = {"input": info.path, "status": "failed", "reason": failures.get(info.path),
                     "output": None, "frames": info.frames, "seconds": None}
            entries[info.path] = entry
            if entry["reason"]:
                continue
            # merged by whichever rank of whichever launch completed the video
            state = self.try_merge(plan, vi) if vi not in self.merged else "merged"
            if state == "merged":
                entry.update(self.merged[vi])
                entry["status"] = "ok"
            else:
                entry["reason"] = failures.get(info.path) or self.failures.get(info.path) or \
                    "merge: another launch was still merging it when this one finished"
        report = {"videos": [entries[p] for p in plan.inputs if p in entries]}
        report_file = self.output / shards.report_name(self.cfg.work.shard_index, self.cfg.work.num_shards)
        atomic_write_json(report_file, report)
        failed = [e for e in report["videos"] if e["status"] == "failed"]
        for e in failed:
            log.error("FAILED %s: %s", e["input"], e["reason"])
        ok = sum(e["status"] == "ok" for e in report["videos"])
        log.info("%d ok, %d failed, %d skipped; report: %s", ok, len(failed), len(plan.skipped), report_file)
        return 1 if failed else 0

    def merge_video(self, plan: Plan, vi: int, lock: Path | None = None) -> dict:
        info = plan.videos[vi]
        wdir = self.wdir(info)
        units = plan.units_of(vi)
        missing = [u for u in units if not shards.shard_done(wdir, u, self.sig_of(info, u))]
        if missing:
            raise RuntimeError("shards missing or inconsistent: " + ", ".join(
                f"{u.key} [{u.start}, {u.end})" for u in missing[:5]))
        sides = [shards.read_sidecar(wdir, u) for u in units]
        # Coverage from what the sidecars say, not from the plan: stale or foreign shards show here.
        shards.check_coverage([Unit(vi, s["seg_idx"], s["start"], s["end"], s["read_start"], s["read_end"])
                               for s in sides], info.frames)
        out = self.output / f"{info.stem}.mp4"
        out_info = self.job.output_info(info)
        t0 = time.monotonic()
        ordered = [(wdir / s["shard"], s.get("out_start", s["start"]), s["frames_written"])
                   for s in sorted(sides, key=lambda s: s["start"])]
        if lock is not None:
            self.leases.check(lock)
        merge(ordered, out_info, out, writer=f"{self.run_id}-r{self.ctx.rank}")
        merge_s = time.monotonic() - t0
        seconds = sum(s["seconds"] for s in sides) + merge_s
        log.info("%s -> %s: %d frames, merged in %.2f s (work %s)", info.path, out, out_info.frames, merge_s,
                 human_duration(seconds))
        result = {"output": str(out), "frames": out_info.frames, "seconds": round(seconds, 3),
                  "merge_seconds": round(merge_s, 3)}
        counts: dict = {}
        for s in sides:
            for key, value in (s.get("counts") or {}).items():
                counts[key] = counts.get(key, 0) + value
        result.update(counts)
        try:  # e.g. upscale's side-by-side preview
            result.update(self.job.finish_video(info, out, self.reader(info)) or {})
        except Exception as e:  # noqa: BLE001 - the video itself is done and fine
            log.warning("%s: %s after the merge failed: %s", info.path, self.job.name, e)
        shards.write_merged(wdir, out, sides, result, run=self.run_id, rank=self.ctx.rank, host=self.ctx.host)
        self.write_checkpoint(plan, vi, output=str(out))
        return result


def resource_peaks(device) -> dict:
    """Peak host RSS of this process so far, and on CUDA the peak GPU memory of this unit:
    allocated by tensors, and reserved by torch's caching allocator (for benchmarks)."""
    import resource

    import torch

    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        peaks["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return peaks
