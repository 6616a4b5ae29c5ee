"""Three overlapping stages for one unit: decode -> model -> encode.

The decoder and the encoder run in threads (decoding and the ffmpeg pipe release the GIL),
the model runs in the calling thread, and bounded queues between them keep memory flat however
long the video is. An error in any stage stops the others and is raised to the caller: a
failed unit never hangs and never yields a short shard.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable

import numpy as np

from .preempt import Preempted

_END = object()


class _Stop(Exception):
    pass


def run_stages(source: Iterable[np.ndarray], model: Callable[[np.ndarray], np.ndarray],
               sink: Callable[[np.ndarray], None], depth: int = 4,
               cancel: threading.Event | None = None) -> dict:
    """Feed every chunk of ``source`` through ``model`` into ``sink``, stages overlapped.

    ``cancel``, when set from outside (a signal handler), stops all stages with Preempted.
    Returns seconds per stage: busy time of decode, model and encode, the model stage's time
    spent waiting for decoded frames (``model_starved_s``: ~0 in steady state when decoding
    keeps up), and the wall time.
    """
    t_start = time.perf_counter()
    busy = {"decode_s": 0.0, "model_s": 0.0, "encode_s": 0.0, "model_starved_s": 0.0}

    stop = threading.Event()
    errors: list[BaseException] = []
    decoded: queue.Queue = queue.Queue(depth)
    modelled: queue.Queue = queue.Queue(depth)

    def put(q: queue.Queue, item) -> None:
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def get(q: queue.Queue):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                pass

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                errors.append(e)
                stop.set()
        return run

    def decode() -> None:
        it = iter(source)
        while True:
            t = time.perf_counter()
            chunk = next(it, _END)  # (n, H, W, 3) uint8
            busy["decode_s"] += time.perf_counter() - t
            put(decoded, chunk)
            if chunk is _END:
                return

    def encode() -> None:
        while (chunk := get(modelled)) is not _END:
            t = time.perf_counter()
            sink(chunk)
            busy["encode_s"] += time.perf_counter() - t

    def infer() -> None:
        first = True
        while True:
            t = time.perf_counter()
            chunk = get(decoded)
            if not first:  # the first wait is the pipeline filling, not starvation
                busy["model_starved_s"] += time.perf_counter() - t
            first = False
            if chunk is _END:
                break
            if cancel is not None and cancel.is_set():
                raise Preempted("stop requested")
            t = time.perf_counter()
            out = model(chunk)
            busy["model_s"] += time.perf_counter() - t
            put(modelled, out)
        put(modelled, _END)

    threads = [threading.Thread(target=guarded(decode), name="decode", daemon=True),
               threading.Thread(target=guarded(encode), name="encode", daemon=True)]
    for t in threads:
        t.start()
    try:
        guarded(infer)()
    except BaseException:  # KeyboardInterrupt and the like: stop the stages, then re-raise
        stop.set()
        raise
    finally:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
                if errors:
                    stop.set()
    if errors:
        raise errors[0]
    busy["wall_s"] = time.perf_counter() - t_start
    return {k: round(v, 4) for k, v in busy.items()}
