"""Train the shipped default x2 upscaler (vsr_ddp/weights/compact_x2.safetensors) on the CPU.

    python -m vsr_ddp.train_default --out vsr_ddp/weights/compact_x2.safetensors

(``make train-default`` runs exactly this.) 1000 steps: about 4 minutes on 2 idle CPU cores (0.2 s a
step), 12 minutes for the shipped file on 2 cores shared with a test run; --max-minutes (default 25)
stops it early, and says so, on a machine slower still. Needs no download: the data are
scikit-image's sample images that ship inside its wheel (skimage.data).

Model: Real-ESRGAN's SRVGGNetCompact (conv + PReLU, ``num_conv`` x (conv3x3 + PReLU), a last conv to
3*scale^2 channels, PixelShuffle, plus the nearest-upsampled input), x2, 32 features, 12 body convs:
about 116k parameters, under 0.5 MB as float32 safetensors. The state dict keys are Real-ESRGAN's
(body.0.weight, body.1.weight (PReLU), ..., body.N.bias), so spandrel loads the file as
"RealESRGAN Compact" x2 like any published Compact checkpoint.

Data: the images in TRAIN_IMAGES, random 80x80 HR crops with flips/transposes. HELD_OUT images are
never seen in training (nor used to pick anything); they are only scored at the end.

Degradations, in Real-ESRGAN's spirit but moderate so the model also helps on clean input (the HR
crop is degraded into the LR input): half the inputs are clean (x2 downscale only); the
rest get, with p=0.5, a Gaussian blur (sigma 0.2-1.0 HR px, sometimes anisotropic), then the x2
downscale (area, bicubic or bilinear, at random), with p=0.3 Gaussian noise (sigma 1-5 of
255, colour or grey), with p=0.4 JPEG (quality 70-95, cv2.imencode); with p=0.15 a second, lighter
pass (blur, noise, JPEG) at LR size. The LR input is quantised to uint8, as video frames are.

Loss: L1 on RGB in [0, 1]. Adam (lr 1e-3, cosine decay to 1e-5 over the steps), batch 16, fixed seed.

Evaluation (also what tests/test_default_model.py checks): each held-out HR image, cropped to even
size, is downscaled by 2 with cv2.INTER_AREA (a 2x2 box average: clean, anti-aliased), then upscaled
back with cv2.INTER_CUBIC and with the model (uint8 in, uint8 out, as vsr_ddp runs it). PSNR and SSIM
are computed on the Y channel (ITU-R BT.601, 16-235, as in the SR literature) with a 4 px border
cropped; SSIM is skimage.metrics.structural_similarity with a Gaussian window (sigma 1.5, Wang et
al.). The script prints them and writes them, with the data, seed, steps and seconds, to the
safetensors header and to a JSON file next to the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE = 2
NUM_FEAT = 32
NUM_CONV = 12
SEED = 0
STEPS = 1000
BATCH = 16
PATCH = 40  # LR patch side; the HR crop is PATCH * SCALE
LR_MAX = 1e-3
LR_MIN = 1e-5
CLEAN_P = 0.5  # share of training inputs that are only downscaled
DEGRADED_SEED = 1234  # for the informational held-out score on degraded input
BORDER = 4  # px cropped from every side before PSNR / SSIM

# Names of skimage.data images that ship inside the scikit-image wheel (no pooch download).
# Never used in training: scored at the end only.
HELD_OUT = ("chelsea", "coffee", "camera", "coins")
TRAIN_IMAGES = ("astronaut", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
                "retina", "colorwheel", "logo", "brick", "grass", "gravel", "moon", "page", "text",
                "clock", "cell")


def load_image(name: str) -> np.ndarray:
    """A bundled skimage.data sample as # (H, W, 3) uint8 RGB (grey -> RGB, RGBA over white)."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        a = img[:, :, 3:].astype(np.float32) / 255
        img = np.round(img[:, :, :3] * a + 255 * (1 - a)).astype(np.uint8)
    return np.ascontiguousarray(img)


# -- the model: Real-ESRGAN's SRVGGNetCompact (realesrgan/archs/srvgg_arch.py), PReLU only ------------
class SRVGGNetCompact(nn.Module):
    """conv_first + PReLU, num_conv x (conv3x3 + PReLU), conv to 3*upscale^2, PixelShuffle, + nearest(x).

    The layers live in one ModuleList ``body`` so the state dict reads body.0.weight, body.1.weight
    (the PReLU), ..., which is how spandrel recognises the architecture and reads its scale.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = NUM_FEAT,
                 num_conv: int = NUM_CONV, upscale: int = SCALE):
        super().__init__()
        self.upscale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, sH, sW)
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


@torch.no_grad()
def init_weights(model: SRVGGNetCompact) -> None:
    """He init for the PReLU convs (torch's default shrinks the signal ~3x per layer) and a zero
    last conv, so training starts exactly at nearest-neighbour upsampling. With a random residual
    at the start, L1 first drives the whole residual to zero and a short run never recovers."""
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")
        conv.bias.zero_()
    convs[-1].weight.zero_()


# -- degradations: HR crop # (h, w, 3) uint8 -> LR # (h/2, w/2, 3) uint8 --------------------------------
_DOWN = (cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LINEAR)


def _blur(img: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    sx = rng.uniform(lo, hi)
    sy = rng.uniform(lo, hi) if rng.random() < 0.3 else sx
    k = 2 * math.ceil(3 * max(sx, sy)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT_101)


def _noise(img: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    sigma = rng.uniform(lo, hi)
    shape = img.shape[:2] + ((1,) if rng.random() < 0.4 else (3,))  # grey noise sometimes
    return img + rng.normal(0.0, sigma, size=shape).astype(np.float32)


def _jpeg(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    q = int(rng.integers(lo, hi + 1))
    u8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32)


def degrade(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random, moderate Real-ESRGAN-style degradation of an HR crop to its x2 LR input."""
    img = hr.astype(np.float32)
    h, w = hr.shape[:2]
    down = _DOWN[rng.integers(len(_DOWN))]
    if rng.random() < CLEAN_P:  # clean: the x2 downscale only
        return np.clip(np.round(cv2.resize(img, (w // SCALE, h // SCALE), interpolation=down)), 0, 255
                       ).astype(np.uint8)
    if rng.random() < 0.5:
        img = _blur(img, rng, 0.2, 1.0)
    img = cv2.resize(img, (w // SCALE, h // SCALE), interpolation=down)
    if rng.random() < 0.3:
        img = _noise(img, rng, 1.0, 5.0)
    if rng.random() < 0.4:
        img = _jpeg(img, rng, 70, 95)
    if rng.random() < 0.15:  # a second, lighter pass
        if rng.random() < 0.5:
            img = _blur(img, rng, 0.2, 0.6)
        if rng.random() < 0.4:
            img = _noise(img, rng, 1.0, 4.0)
        if rng.random() < 0.5:
            img = _jpeg(img, rng, 70, 95)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample_batch(images: list[np.ndarray], rng: np.random.Generator, batch: int = BATCH,
                 patch: int = PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr, hr): # (B, 3, patch, patch) and (B, 3, 2*patch, 2*patch) float in [0, 1]."""
    hp = patch * SCALE
    lrs, hrs = [], []
    for _ in range(batch):
        img = images[rng.integers(len(images))]
        y, x = rng.integers(img.shape[0] - hp + 1), rng.integers(img.shape[1] - hp + 1)
        hr = img[y:y + hp, x:x + hp]
        if rng.random() < 0.5:
            hr = hr[:, ::-1]
        if rng.random() < 0.5:
            hr = hr[::-1]
        if rng.random() < 0.5:
            hr = hr.transpose(1, 0, 2)
        hr = np.ascontiguousarray(hr)
        lrs.append(degrade(hr, rng))
        hrs.append(hr)
    to_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float().div_(255)  # noqa: E731
    return to_t(lrs), to_t(hrs)


# -- evaluation ------------------------------------------------------------------------------------
def heldout_pairs(names=HELD_OUT,
                  degraded_seed: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, hr, lr): HR cropped to even size, LR = cv2.INTER_AREA x1/2 of it (or, given
    ``degraded_seed``, a random training degradation of it); # (H, W, 3) uint8."""
    rng = None if degraded_seed is None else np.random.default_rng(degraded_seed)
    out = []
    for name in names:
        hr = load_image(name)
        h, w = hr.shape[0] // SCALE * SCALE, hr.shape[1] // SCALE * SCALE
        hr = np.ascontiguousarray(hr[:h, :w])
        lr = (cv2.resize(hr, (w // SCALE, h // SCALE), interpolation=cv2.INTER_AREA) if rng is None
              else degrade(hr, rng))
        out.append((name, hr, lr))
    return out


def _y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] (MATLAB rgb2ycbcr) of # (H, W, 3) uint8 RGB, float64."""
    f = img.astype(np.float64)
    return 16.0 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0


def psnr_ssim(a: np.ndarray, b: np.ndarray, border: int = BORDER) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two # (H, W, 3) uint8 RGB images, on Y, ``border`` px cropped."""
    from skimage.metrics import structural_similarity

    ya, yb = _y(a), _y(b)
    if border:
        ya, yb = ya[border:-border, border:-border], yb[border:-border, border:-border]
    mse = float(np.mean((ya - yb) ** 2))
    psnr = 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")
    ssim = structural_similarity(ya, yb, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    return psnr, float(ssim)


def evaluate(upscale, names=HELD_OUT, degraded_seed: int | None = None) -> dict:
    """Score ``upscale`` (# (1, h, w, 3) uint8 -> (1, 2h, 2w, 3) uint8) against bicubic on ``names``."""
    per = {}
    for name, hr, lr in heldout_pairs(names, degraded_seed):
        bic = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
        sr = upscale(lr[None])[0]
        pm, sm = psnr_ssim(sr, hr)
        pb, sb = psnr_ssim(bic, hr)
        per[name] = {"psnr_model": round(pm, 3), "psnr_bicubic": round(pb, 3),
                     "ssim_model": round(sm, 4), "ssim_bicubic": round(sb, 4)}
    mean = {k: round(float(np.mean([v[k] for v in per.values()])), 4 if k.startswith("ssim") else 3)
            for k in ("psnr_model", "psnr_bicubic", "ssim_model", "ssim_bicubic")}
    return {"mean": mean, "per_image": per}


def module_upscaler(model: nn.Module):
    """The same uint8 -> uint8 path as vsr_ddp.models.sr.Upscaler, for a module in memory."""
    @torch.inference_mode()
    def run(frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W)
        y = model.eval()(x).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().numpy()  # (B, 2H, 2W, 3) uint8
    return run


def _fmt(m: dict) -> str:
    return (f"PSNR model {m['psnr_model']:.2f} dB vs bicubic {m['psnr_bicubic']:.2f} dB, "
            f"SSIM model {m['ssim_model']:.4f} vs bicubic {m['ssim_bicubic']:.4f}")


# -- training --------------------------------------------------------------------------------------
def train(out: Path, steps: int = STEPS, seed: int = SEED, max_minutes: float = 25.0,
          log_every: int = 100, eval_every: int = 400) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = [load_image(n) for n in TRAIN_IMAGES]
    assert not set(HELD_OUT) & set(TRAIN_IMAGES)

    model = SRVGGNetCompact()
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=LR_MAX)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=LR_MIN)
    print(f"SRVGGNetCompact x{SCALE}: {NUM_FEAT} features, {NUM_CONV} convs, {n_params} parameters; "
          f"{len(images)} training images, held out: {', '.join(HELD_OUT)}", flush=True)
    print(f"before training (= nearest neighbour): {_fmt(evaluate(module_upscaler(model))['mean'])}",
          flush=True)

    t0 = time.perf_counter()
    done, running, stopped_early = 0, 0.0, False
    model.train()
    for step in range(1, steps + 1):
        lr, hr = sample_batch(images, rng)
        loss = F.l1_loss(model(lr), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done, running = step, running + loss.item()
        if step % log_every == 0 or step == steps:
            el = time.perf_counter() - t0
            print(f"step {step}/{steps}  L1 {running / log_every:.4f}  {el:.0f}s "
                  f"({el / step:.2f} s/step)", flush=True)
            running = 0.0
        if eval_every and step % eval_every == 0 and step < steps:  # progress only; nothing is picked by it
            print(f"  held-out at step {step}: {_fmt(evaluate(module_upscaler(model))['mean'])}", flush=True)
            model.train()
        if time.perf_counter() - t0 > max_minutes * 60 and step < steps:
            print(f"WARNING: stopping at step {step} of {steps}: over --max-minutes {max_minutes}",
                  flush=True)
            stopped_early = True
            break
    seconds = time.perf_counter() - t0
    model.eval()

    metrics = evaluate(module_upscaler(model))
    for name, m in metrics["per_image"].items():
        print(f"  {name:10s} {_fmt(m)}")
    print(f"held-out mean: {_fmt(metrics['mean'])}")
    degraded = evaluate(module_upscaler(model), degraded_seed=DEGRADED_SEED)
    print(f"held-out mean, degraded input (training degradations, seed {DEGRADED_SEED}): "
          f"{_fmt(degraded['mean'])}")

    record = {
        "architecture": "SRVGGNetCompact (Real-ESRGAN, realesrgan/archs/srvgg_arch.py), act PReLU",
        "scale": SCALE, "num_feat": NUM_FEAT, "num_conv": NUM_CONV, "parameters": n_params,
        "data_source": "scikit-image sample images bundled in the wheel (skimage.data)",
        "train_images": list(TRAIN_IMAGES), "held_out_images": list(HELD_OUT),
        "degradations": "50% clean (x1/2 only); else p0.5 Gaussian blur s0.2-1.0 (30% anisotropic); "
                        "x1/2 area|bicubic|bilinear; "
                        "p0.3 Gaussian noise s1-5/255 (40% grey); p0.4 JPEG q70-95; "
                        "p0.15 second pass (blur s0.2-0.6, noise s1-4, JPEG q70-95); uint8 LR",
        "loss": "L1", "optimizer": f"Adam lr {LR_MAX} cosine to {LR_MIN}",
        "batch": BATCH, "lr_patch": PATCH, "seed": seed, "steps": done, "steps_planned": steps,
        "stopped_early": stopped_early, "train_seconds": round(seconds, 1),  # the loop, with progress evals
        "total_seconds": round(time.perf_counter() - t_start, 1),  # data loading to final evaluation
        "evaluation": ("held-out HR cropped to even size, downscaled x1/2 with cv2.INTER_AREA, upscaled x2 "
                       "with cv2.INTER_CUBIC vs the model (uint8 in/out); PSNR/SSIM on Y (BT.601, 16-235), "
                       f"{BORDER} px border cropped; SSIM skimage.metrics.structural_similarity, Gaussian "
                       "window sigma 1.5"),
        "metrics": metrics,
        "metrics_degraded_input": dict(degraded, note=(
            f"same, but each held-out LR made by degrade() with np.random.default_rng({DEGRADED_SEED}) "
            "instead of clean INTER_AREA; informational")),
        "command": "python -m vsr_ddp.train_default --out " + str(out),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    save(model, out, record)
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.json')}; "
          f"trained {done} steps in {seconds:.0f}s")
    return record


def save(model: nn.Module, out: Path, record: dict) -> None:
    """The bare state dict (Real-ESRGAN keys) as safetensors, ``record`` in its header and as JSON."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    save_file(state, str(out), metadata=meta)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None, *, train_fn=None, doc: str = __doc__, steps: int = STEPS,
         seed: int = SEED, max_minutes: float = 25.0) -> int:
    """The command line of a training script: this one's, or (``train_fn``, its ``doc``, default
    ``steps``, ``seed`` and ``max_minutes``) another's, such as train_temporal's."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors to write (JSON goes next to it)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--max-minutes", type=float, default=max_minutes,
                   help="stop training early (recorded as stopped_early) past this wall time")
    args = p.parse_args(argv)
    (train_fn or train)(args.out, steps=args.steps, seed=args.seed, max_minutes=args.max_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
