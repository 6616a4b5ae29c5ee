"""RIFE frame interpolation networks, and the one loader for their checkpoints.

Two families: RIFE HDv3 (hdv3.py: the published ``rife-hdv3``, midpoint only) and Practical-RIFE
4.x (v4.py: t is an input; 17 layouts for the 36 published versions); ops.py holds what both use.
``load_rife`` reads a checkpoint weights-only (a pickle that would run code is refused, never run),
tells the family and layout apart from the state dict's keys and shapes alone, and loads the
matching network strictly; the network says what it is (``variant``, ``description``), so a caller
logs it without identifying anything itself.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .hdv3 import IFNet
from .v4 import TRAINING_ONLY, VERSIONS, IFNet4, Layout, layout_of

__all__ = ["CheckpointError", "IFNet", "IFNet4", "Layout", "VERSIONS", "identify", "load_rife", "read_state",
           "rife_variant"]


class CheckpointError(ValueError):
    """A file that is no RIFE checkpoint this version runs: unreadable, or of no known layout. One
    line that names the file."""


def read_state(path: Path) -> dict:
    """{key: tensor} of a RIFE checkpoint: safetensors, or RIFE's own ``flownet.pkl`` read
    weights-only; DataParallel's ``module.`` prefix removed. CheckpointError if unreadable."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, which would run code from the file
        raise CheckpointError(f"{path}: cannot read it as a weights-only PyTorch or safetensors file (not "
                              f"tensors only: a damaged file, or one that stores Python objects)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing problem
        raise CheckpointError(f"{path}: cannot read it as a weights-only PyTorch or safetensors file "
                              f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fits(net: nn.Module, shapes: dict) -> bool:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes


def identify(state: dict):
    """(variant, the network for it on the meta device, the state to load into it), or (None,
    None, None): ``state``'s keys and shapes are exactly those of RIFE HDv3's IFNet (``hdv3``) or
    of a Practical-RIFE 4.x layout (its family's name; training-only keys dropped)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    with torch.device("meta"):
        if "block_tea.conv0.0.0.weight" in shapes:
            net = IFNet()
            return ("hdv3", net, state) if _fits(net, shapes) else (None, None, None)
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
        shapes = {k: shapes[k] for k in state}
        layout = layout_of(shapes)
        net = IFNet4(layout) if layout is not None else None
        if net is not None and _fits(net, shapes):
            return layout.name, net, state
    return None, None, None


def rife_variant(path: Path) -> str:
    """What a RIFE checkpoint is, without building its network: ``hdv3`` (three 11-channel
    IFBlocks of 90 features and a teacher), the Practical-RIFE 4.x family it belongs to (``4.6``,
    ``4.13-4.19/4.24``, ``4.25/4.26`` ...: v4.py's table), else ``unknown``; the ``variant`` of
    what ``load_rife`` gives."""
    return identify(read_state(path))[0] or "unknown"


def load_rife(path: Path, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The network of a RIFE checkpoint, weights loaded strictly, in eval mode, fp32 on
    ``device``: an IFNet (RIFE HDv3, midpoint only) or an IFNet4 (Practical-RIFE 4.x,
    ``takes_time``); ``variant`` and ``description`` say which. CheckpointError (one line naming
    the file) for a file that is unreadable or fits neither."""
    path = Path(path)
    variant, net, state = identify(read_state(path))
    if variant is None:
        raise CheckpointError(f"{path} is not a RIFE checkpoint this version runs (RIFE HDv3, or a "
                              f"Practical-RIFE 4.0 - 4.26 flownet.pkl: its keys and shapes fit none of their "
                              f"layouts); use job.model=flow or blend for other models")
    net.load_state_dict(state, strict=True, assign=True)  # the meta network takes the loaded tensors
    return net.float().eval().to(device)
