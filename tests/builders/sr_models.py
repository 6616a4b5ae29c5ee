"""Tiny Real-ESRGAN models with seeded random weights, saved in Real-ESRGAN's own layouts."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --- Tiny Real-ESRGAN architectures (copies of basicsr / Real-ESRGAN modules) ---
# Attribute names must match upstream exactly: they become the state-dict keys
# that spandrel uses to detect the architecture.


class ResidualDenseBlock(nn.Module):
    """basicsr ResidualDenseBlock: 5 densely connected convs, 0.2 residual scaling."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    """basicsr Residual-in-Residual Dense Block."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """basicsr RRDBNet (RealESRGAN_x4plus / x2plus), tiny by default.

    The trunk always upsamples x4; scale 2 and 1 pixel-unshuffle the input first (by
    2 and 4) exactly as upstream, so conv_first sees 12 / 48 input channels - that is
    how spandrel infers the scale. num_grow_ch stays 32 (upstream's value) because
    spandrel 0.4.2 hard-codes gc=32 and cannot load anything else.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4,
                 num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 32):
        super().__init__()
        self.scale = scale
        num_in_ch *= {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, sH, sW)
        feat = F.pixel_unshuffle(x, 4 // self.scale) if self.scale != 4 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN SRVGGNetCompact (realesr-animevideov3 / realesr-general-x4v3).

    Layer order in `body` matters: spandrel detects this arch by body.0 and body.1
    weights (so only act_type='prelu' is recognisable) and reads the scale from the
    last conv's channel count.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 8,
                 num_conv: int = 2, upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        self.upscale = upscale
        act = {"relu": lambda: nn.ReLU(inplace=True), "prelu": lambda: nn.PReLU(num_parameters=num_feat),
               "leakyrelu": lambda: nn.LeakyReLU(negative_slope=0.1, inplace=True)}[act_type]
        layers = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), act()]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), act()]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, sH, sW)
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


@torch.no_grad()
def _seeded(cls, seed: int, last, mean: float, std: float, **kw) -> nn.Module:
    """Build cls with seeded default init, then recondition the conv last(model).

    Raw random nets give near-constant outputs (default init shrinks activations) plus
    a fixed per-channel / per-subpixel bias pattern. So: zero the bias, make the output
    luma-dominant, and rescale so a fixed random batch has the requested mean/std.
    Outputs then vary visibly with the input and stay roughly within [-0.5, 1.5].
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = cls(**kw).eval()
    conv = last(model)
    conv.bias.zero_()
    # PixelShuffle makes output channel c from conv channels c*s*s .. c*s*s+s*s-1, so
    # this view is (colour, subpixel, in, kh, kw) for both archs. Mostly shared weights
    # across colours: independent per-pixel colour noise is what yuv420p's chroma
    # subsampling destroys, which would swamp pipeline-vs-reference comparisons.
    w = conv.weight.view(3, -1, *conv.weight.shape[1:])
    w.copy_(w.mean(0, keepdim=True) + 0.2 * (w - w.mean(0, keepdim=True)))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1234))  # (B, 3, H, W)
    compact = isinstance(model, SRVGGNetCompact)

    def out() -> torch.Tensor:  # for Compact, only the residual over nearest-upsampling
        y = model(x)
        return y - F.interpolate(x, scale_factor=model.upscale, mode="nearest") if compact else y

    conv.weight.mul_(std / out().std().clamp_min(1e-8))
    conv.bias.add_(mean - out().mean())
    return model


def make_rrdbnet(scale: int = 4, seed: int = 0, **kw) -> RRDBNet:
    """Deterministic tiny RRDBNet; outputs have mean ~0.5, std ~0.15 for [0, 1] input."""
    return _seeded(RRDBNet, seed, lambda m: m.conv_last, 0.5, 0.15, scale=scale, **kw)


def make_srvgg(scale: int = 4, seed: int = 0, **kw) -> SRVGGNetCompact:
    """Deterministic tiny SRVGGNetCompact: nearest upsampling + a small (std 0.05) residual,
    so its output still resembles the input (the frame-index code survives it)."""
    return _seeded(SRVGGNetCompact, seed, lambda m: m.body[-1], 0.0, 0.05, upscale=scale, **kw)


def _save(model: nn.Module, path: str | Path, wrapper_key: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":  # safetensors releases are bare state dicts
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({wrapper_key: state}, path)
    return path


def save_rrdbnet(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save make_rrdbnet() as RealESRGAN_x4plus.pth / x2plus.pth are: {"params_ema": state_dict}."""
    return _save(make_rrdbnet(scale, seed, **kw), path, "params_ema")


def save_srvgg(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save make_srvgg() as realesr-animevideov3.pth is: {"params": state_dict}."""
    return _save(make_srvgg(scale, seed, **kw), path, "params")
