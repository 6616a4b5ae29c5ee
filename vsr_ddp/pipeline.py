"""Three overlapping stages for one unit: decode -> model -> encode.

The decoder and the encoder run in threads (decord and the ffmpeg pipe release the GIL), the
model runs in the calling thread, and bounded queues between them keep memory flat however
long the video is. An error in any stage stops the others and is raised to the caller: a
failed unit never hangs and never yields a short shard.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

import numpy as np

from .preempt import Preempted

_END = object()


class _Stop(Exception):
    pass


def run_stages(source: Iterable[np.ndarray], model: Callable[[np.ndarray], np.ndarray],
               sink: Callable[[np.ndarray], None], depth: int = 4,
               cancel: threading.Event | None = None) -> None:
    """Feed every chunk of ``source`` through ``model`` into ``sink``, stages overlapped.

    ``cancel``, when set from outside (a signal handler), stops all stages with Preempted.
    """

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
        for chunk in source:  # (n, H, W, 3) uint8
            put(decoded, chunk)
        put(decoded, _END)

    def encode() -> None:
        while (chunk := get(modelled)) is not _END:
            sink(chunk)

    def infer() -> None:
        while (chunk := get(decoded)) is not _END:
            if cancel is not None and cancel.is_set():
                raise Preempted("stop requested")
            put(modelled, model(chunk))
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
