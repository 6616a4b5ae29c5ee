"""One run of a vsr_ddp job, top to bottom: load, plan, work, wait, merge, report."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from . import preempt, shards
from .atomic import atomic_write_json
from .dist import Dist
from .jobs import make_job
from .jobs.base import signature
from .logs import Progress, human_duration
from .pipeline import run_stages
from .plan import InputError, Plan, SkipVideo, Unit, VideoInfo, format_plan, list_inputs, plan_units, probe
from .video import (NVENC_MAX_SIDE, FrameReader, ShardWriter, encoder_for_size, even_size, merge, output_sar,
                    pad_even, pick_pix_fmt, pix_fmt_depth, resolve_codec)

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, cfg, ctx: Dist):
        self.cfg = cfg
        self.ctx = ctx
        self.output = Path(cfg.output).expanduser()
        self.encode = self.resolve_encoder(OmegaConf.to_container(cfg.encode, resolve=True))
        self.job = make_job(cfg, ctx.device)
        self.failures: dict[str, str] = {}  # input path -> first reason, on this rank
        self.merged: dict[int, dict] = {}  # rank 0: video index -> merge result, as videos complete
        self._units_by_video: dict | None = None
        self._last_merge_scan = float("-inf")
        self._unit_sigs: dict[tuple, str] = {}
        self._told_deinterlace: set[str] = set()

    def run(self) -> int:
        """Returns the process exit status: 0 when every input is ok, 1 when any failed."""
        # 1. The model, once per rank. A missing or unreadable model fails here, before any work.
        self.job.setup()
        self.sig = signature({**self.job.settings(), "encode": self.encode,
                              "decode": OmegaConf.to_container(self.cfg.decode, resolve=True)})
        self.tag = self.job.tag()

        # 2. Probe the inputs (each rank a share) and plan the same units on every rank.
        self.ctx.check_shared_folder(self.output)
        plan = self.make_plan()
        if self.cfg.dry_run:
            estimate = self.calibrate(plan) if self.cfg.job.get("calibrate") else None
            if self.ctx.is_main:
                print(format_plan(plan, self.ctx.world), flush=True)
                if estimate:
                    print(estimate, flush=True)
            return 0
        self.output.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            for vi, info in enumerate(plan.videos):
                self.write_checkpoint(plan, vi)

        # 3. Work: this rank's units, decode/model/encode overlapped.
        mine = plan.units_for_rank(self.ctx.rank, self.ctx.world)
        todo = [u for u in mine if not shards.shard_done(self.wdir(plan.videos[u.video]), u,
                                                         self.sig_of(plan.videos[u.video], u))]
        log.info("%d unit(s) for this rank, %d already done", len(mine), len(mine) - len(todo))
        progress = Progress(self.ctx, show_bar=self.ctx.is_main and self.cfg.log.progress,
                            log_every_s=float(self.cfg.log.get("every_s", 30)))
        progress.add_total(sum(u.out_frames for u in todo))
        progress.start()
        try:
            self.work(plan, todo, progress)
            # 4. Every rank arrives here when its units are done, however long the others take;
            #    rank 0 goes on merging the videos the others complete meanwhile, and its bar
            #    goes on counting their frames.
            log.info("units done; waiting for the other ranks")
            on_poll = (lambda: self.merge_ready(plan, min_interval_s=5.0)) if self.ctx.is_main else None
            arrived = not preempt.requested.is_set() and self.ctx.wait_for_all(
                "units_done", cancel=preempt.requested, on_poll=on_poll)
        finally:
            progress.close()
        if not arrived:
            # No merge: the job is being taken away. Finished shards stay for the rerun.
            log.warning("stopped early on request; rerun the same command to resume")
            return preempt.exit_status()
        failures = {}
        for per_rank in self.ctx.all_gather_object(self.failures):
            for path, reason in per_rank.items():
                failures.setdefault(path, reason)
        if not self.ctx.is_main:
            return 0

        # 5. Rank 0 merges each video's shards and writes the report.
        return self.finish(plan, failures)

    def work(self, plan: Plan, todo: list[Unit], progress: Progress) -> None:
        """This rank's units, in order. A failed unit fails its video, never the batch."""
        for unit in todo:
            info = plan.videos[unit.video]
            if preempt.requested.is_set():
                return
            if info.path in self.failures:
                continue
            try:
                self.process_unit(info, unit, progress)
            except preempt.Preempted:
                return
            except Exception as e:  # noqa: BLE001 - one broken input never stops the batch
                # The stop signal reaches the unit's ffmpeg too (same process group), and may kill
                # it before this process has run its own handler: an encoder killed by a signal
                # waits a moment for the stop to show. Not a broken input; process_unit has
                # already removed the partial shard.
                killed = getattr(e, "signal", None) is not None
                if preempt.requested.wait(timeout=5.0 if killed else 0.0):
                    return
                reason = str(e) or e.__class__.__name__
                log.error("%s: %s failed: %s", info.path, unit.key, reason)
                self.failures.setdefault(info.path,
                                         f"{unit.key} (frames [{unit.start}, {unit.end})): {reason}")
                shards.write_failure(self.wdir(info), unit, reason=reason, rank=self.ctx.rank,
                                     host=self.ctx.host)
            if self.ctx.is_main:
                self.merge_ready(plan)

    def resolve_encoder(self, encode: dict) -> dict:
        """Pick the concrete encoder once per run. All ranks must agree (the merge concatenates
        shards without re-encoding), so a run where some node lacks NVENC uses software."""
        wanted = encode["codec"]
        mine = resolve_codec(wanted, encode.get("format", "h264"), self.ctx.device.type == "cuda")
        chosen = set(self.ctx.all_gather_object(mine))
        codec = mine if len(chosen) == 1 else resolve_codec(wanted, encode.get("format", "h264"), cuda=False)
        if wanted == "auto":
            log.info("encode.codec=auto: using %s%s", codec, "" if len(chosen) == 1 else
                     f" (ranks disagreed: {sorted(chosen)})")
        return {**encode, "codec": codec}

    # -- planning -------------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        inputs = list_inputs(self.cfg.input, self.cfg.work.shard_index, self.cfg.work.num_shards)
        probed = {}
        for path in inputs[self.ctx.rank::self.ctx.world]:
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
        batch = int(self.cfg.job.get("batch_size", 4))
        frames = np.concatenate(list(self.reader(info).read(0, min(info.frames, batch))))
        if len(frames) < batch:
            frames = np.concatenate([frames] * (batch // len(frames) + 1))[:batch]
        self.job.begin(info)
        try:
            s_per_px = self.job.seconds_per_frame(frames, info) / (info.width * info.height)
        except NotImplementedError as e:
            return f"estimate: {e}"
        rates = self.ctx.all_gather_object(s_per_px)
        per_rank = []
        for rank, rate in enumerate(rates):
            mine = plan.units_for_rank(rank, self.ctx.world)
            px = sum(u.out_frames * plan.videos[u.video].width * plan.videos[u.video].height for u in mine)
            per_rank.append(px * rate)
        fps = [1 / (r * info.width * info.height) for r in rates]
        device = f"{self.ctx.world} GPU{'s' if self.ctx.world > 1 else ''}" \
            if self.ctx.device.type == "cuda" \
            else f"{self.ctx.world} CPU rank{'s' if self.ctx.world > 1 else ''}"
        return (f"estimate: about {human_duration(max(per_rank))} on {device} "
                f"(model {min(fps):.2f}-{max(fps):.2f} frames/s per rank at {info.width}x{info.height}; "
                f"slowest rank {max(range(len(per_rank)), key=per_rank.__getitem__)})")

    def deinterlace(self, info: VideoInfo) -> bool:
        """``decode.deinterlace``: auto (when the stream flags interlaced frames), on, off."""
        mode = str(self.cfg.decode.deinterlace)
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"decode.deinterlace must be auto, on or off, not {mode!r}")
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
        shards.write_checkpoint(wdir, info, units, sigs, status, output=output)

    # -- one unit -------------------------------------------------------------------------------
    def process_unit(self, info: VideoInfo, unit: Unit, progress: Progress) -> None:
        t0 = time.monotonic()
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)  # the sidecar's GPU peak is this unit's
        wdir = self.wdir(info)
        wdir.mkdir(parents=True, exist_ok=True)
        shards.discard_partial(wdir, unit)
        start, end = (unit.read_start, unit.read_end) if self.job.uses_context else (unit.start, unit.end)
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
                             encode, info.color, gpu=gpu, sar=output_sar(info, made_w, made_h), deep=deep)

        counted = [0, 0]  # frames of this unit on the bar, frames written

        def count(frames_done: float) -> None:
            n = min(int(frames_done), unit.out_frames) - counted[0]
            if n > 0:
                progress.advance(n)
                counted[0] += n

        self.job.progress = count
        self.job.begin(info)
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
            writer.close()
        except BaseException:
            writer.abort()
            shards.discard_partial(wdir, unit)
            raise
        seconds = time.monotonic() - t0
        shards.write_sidecar(wdir, unit, signature=self.sig_of(info, unit), encode=encode,
                             rank=self.ctx.rank, host=self.ctx.host, seconds=seconds,
                             extra={"read_start": start, "read_end": end, "width": out_w, "height": out_h,
                                    "reader": reader.backend, "stages": stages,
                                    "counts": self.job.unit_counts(),
                                    **resource_peaks(self.ctx.device)})
        log.info("%s %s: frames [%d, %d) in %.1f s (%.2f frames/s)", info.stem, unit.key, unit.start,
                 unit.end, seconds, unit.frames / max(seconds, 1e-9))

    # -- merge and report (rank 0) --------------------------------------------------------------
    def merge_ready(self, plan: Plan, min_interval_s: float = 0.0) -> None:
        """Merge every video whose shards are all present, so finished videos appear while the
        batch goes on (a days-long run over a folder does not hold them back until the end)."""
        now = time.monotonic()
        if now - self._last_merge_scan < min_interval_s:
            return
        self._last_merge_scan = now
        if self._units_by_video is None:
            self._units_by_video = {}
            for u in plan.units:
                self._units_by_video.setdefault(u.video, []).append(u)
        for vi, info in enumerate(plan.videos):
            if vi in self.merged or info.path in self.failures:
                continue
            wdir = self.wdir(info)
            if all(shards.sidecar_path(wdir, u).exists() for u in self._units_by_video.get(vi, ())):
                try:
                    self.merged[vi] = self.merge_video(plan, vi)
                except Exception as e:  # noqa: BLE001 - retried, and reported, by finish()
                    log.warning("%s: early merge failed (%s); will retry at the end", info.path, e)

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
            try:
                entry.update(self.merged[vi] if vi in self.merged else self.merge_video(plan, vi))
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - reported per video
                entry["reason"] = f"merge: {e}"
                log.error("%s: merge failed: %s", info.path, e)
        report = {"videos": [entries[p] for p in plan.inputs if p in entries]}
        report_file = self.output / shards.report_name(self.cfg.work.shard_index, self.cfg.work.num_shards)
        atomic_write_json(report_file, report)
        failed = [e for e in report["videos"] if e["status"] == "failed"]
        for e in failed:
            log.error("FAILED %s: %s", e["input"], e["reason"])
        ok = sum(e["status"] == "ok" for e in report["videos"])
        log.info("%d ok, %d failed, %d skipped; report: %s", ok, len(failed), len(plan.skipped), report_file)
        return 1 if failed else 0

    def merge_video(self, plan: Plan, vi: int) -> dict:
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
        merge(ordered, out_info, out)
        merge_s = time.monotonic() - t0
        seconds = sum(s["seconds"] for s in sides) + merge_s
        self.write_checkpoint(plan, vi, output=str(out))
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
