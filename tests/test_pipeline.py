"""The overlapped decode/model/encode stages: same frames as a sequential loop, errors surface."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vsr_ddp.pipeline import run_stages


def chunks(n=20, size=3):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8) + np.uint8(i)


def model(x):
    return (x[:, ::-1] // 2).copy()


def test_overlapped_stages_give_exactly_the_sequential_frames():
    sequential = [model(c) for c in chunks()]
    got = []
    run_stages(chunks(), model, got.append, depth=2)
    assert len(got) == len(sequential)
    assert all(np.array_equal(a, b) for a, b in zip(got, sequential))


@pytest.mark.parametrize("stage", ["decode", "model", "encode"])
def test_a_failing_stage_raises_and_never_hangs(stage):
    def source():
        for i, c in enumerate(chunks(1000)):
            if stage == "decode" and i == 5:
                raise OSError("decoder died")
            yield c

    def bad_model(x, calls=[0]):  # noqa: B006 - a counter local to this test
        calls[0] += 1
        if stage == "model" and calls[0] == 5:
            raise RuntimeError("model died")
        return x

    written = []

    def sink(x):
        if stage == "encode" and len(written) == 5:
            raise BrokenPipeError("encoder died")
        written.append(x)

    t0 = time.monotonic()
    with pytest.raises((OSError, RuntimeError)) as err:
        run_stages(source(), bad_model, sink, depth=2)
    assert "died" in str(err.value)
    assert time.monotonic() - t0 < 10
    assert len(written) < 1000
    assert not [t for t in threading.enumerate() if t.name in ("decode", "encode")]
