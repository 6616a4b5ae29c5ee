"""Random weights of a useful scale for tiny networks whose outputs are compared with a reference."""
from __future__ import annotations

import math

import torch

__all__ = ["randomize"]


def randomize(net: torch.nn.Module, seed: int) -> dict:
    """Random weights of a useful scale (weights ~ 1/sqrt(fan_in), biases and gains near 0 and 1),
    loaded into ``net`` and returned."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("gamma"):
            state[k] = 1 + 0.2 * r
        elif v.ndim == 1:
            state[k] = 0.1 * r
        else:
            state[k] = r / math.sqrt(v[0].numel())
    net.load_state_dict(state)
    return state
