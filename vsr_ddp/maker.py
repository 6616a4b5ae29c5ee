"""One unit's shard: frames read, the job's model, the encoder, overlapped (pipeline.py), and
the estimate of a run from the model's speed on real frames (``job.calibrate``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import preempt, shards
from .logs import human_duration
from .pipeline import run_stages
from .plan import Plan, Unit, VideoInfo, strided
from .video import (NVENC_MAX_SIDE, FrameReader, ShardWriter, encoder_for_size, even_size, output_sar,
                    pad_even, pick_pix_fmt, pix_fmt_depth, resolve_codec)

log = logging.getLogger(__name__)


def agree_encoder(encode: dict, ctx) -> dict:
    """Pick the concrete encoder once per run. All ranks must agree (the merge concatenates
    shards without re-encoding), so a run where some node lacks NVENC uses software."""
    wanted = encode["codec"]
    mine = resolve_codec(wanted, encode["format"], ctx.device.type == "cuda")
    chosen = set(ctx.all_gather_object(mine))
    codec = mine if len(chosen) == 1 else resolve_codec(wanted, encode["format"], cuda=False)
    if wanted == "auto":
        log.info("encode.codec=auto: using %s%s", codec, "" if len(chosen) == 1 else
                 f" (ranks disagreed: {sorted(chosen)})")
    return {**encode, "codec": codec}


class ShardMaker:
    """Makes shards for a run: ``cfg`` its settings, ``encode`` the encoder every rank agreed on,
    ``leases`` this rank's (a unit's lease is checked before its shard is committed), ``progress``
    the bar its frames go on, ``sig_of(unit)`` a sidecar's signature."""

    def __init__(self, cfg, ctx, job, encode: dict, run: str, leases=None, progress=None, sig_of=None,
                 wdir=None):
        self.cfg, self.ctx, self.job, self.encode, self.run_id = cfg, ctx, job, encode, run
        self.leases, self.progress, self.sig_of, self.wdir = leases, progress, sig_of, wdir
        self._told_deinterlace: set[str] = set()

    def make_shard(self, info: VideoInfo, unit: Unit, path: Path, lease: Path | None = None) -> dict:
        """Make one shard at ``path`` (a segment's: and its sidecar); returns what the sidecar
        records. ``lease``: this rank's lease on the unit, checked before anything is committed
        (a rank whose lease was taken over commits nothing)."""
        t0 = time.monotonic()
        progress = self.progress
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)  # the sidecar's GPU peak is this unit's
        wdir = self.wdir(info)
        segment = path == shards.shard_path(wdir, unit)
        if segment:
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
        writer = ShardWriter(path, out_w, out_h, self.job.output_info(info).fps,
                             encode, info.color, gpu=gpu, sar=output_sar(info, made_w, made_h), deep=deep,
                             writer=f"{self.run_id}-r{self.ctx.rank}", durable=segment)

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
        extra = {"read_start": start, "read_end": end, "width": out_w, "height": out_h,
                 "reader": reader.backend, "stages": stages, "counts": self.job.unit_counts(),
                 **resource_peaks(self.ctx.device)}
        log.info("%s %s: frames [%d, %d) in %.1f s (%.2f frames/s)", info.stem, unit.key, unit.start,
                 unit.end, seconds, unit.frames / max(seconds, 1e-9))
        if not segment:
            return {"seconds": seconds, "encode": encode, **extra}
        return shards.write_sidecar(wdir, unit, signature=self.sig_of(unit), encode=encode,
                                    rank=self.ctx.rank, host=self.ctx.host, seconds=seconds, run=self.run_id,
                                    extra=extra)

    def calibrate(self, plan: Plan, claim: str) -> str | None:
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
        if claim == "strided":
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
