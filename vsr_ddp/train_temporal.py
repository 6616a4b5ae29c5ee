"""Train a small temporal x2 upscaler (AnimeSR's network at a reduced width) on the CPU.

    python -m vsr_ddp.train_temporal --out /tmp/temporal_x2.safetensors

It made the shipped vsr_ddp/weights/temporal_x2.safetensors (job.model=default-temporal; issue 24
item 4): 4507 steps in 45 minutes (--max-minutes 45, 0.6 s a step, one thread, the other core busy),
evaluated with PREROLL: against the shipped per-frame model on the real clip below it has higher
PSNR and lower warping error and flicker, clean and noisy (the record's "evaluation"; README). One
thread (two spin-wait for each other on a shared 2-core machine). The learning rate follows a
cosine over STEPS or over --max-minutes (default 45), whichever ends first, and the loop stops
there (the record says which), so a rerun on another machine trains as many steps as its speed
allows. Tried and not kept: L1 over frames 2..T only (a 19-minute run: the cold start was never
trained and settled over 4 frames, flicker 0.365 on the clean clip) and, on top of this recipe, a
stillness term (the output's frame-to-frame change where the HR frame holds still, weight 1: 50
minutes gave PSNR 31.76 dB, below the per-frame model, and flicker 0.269 without the pre-roll).
Needs no download: the data are scikit-image's sample images
that ship inside its wheel (skimage.data), the same
TRAIN_IMAGES as vsr_ddp/train_default.py; its HELD_OUT images are never used.

Model: vsr_ddp.models.animesr.MSRSWVSR (AnimeSR's recurrent cell: previous, current and next LR
frame, the previous output unshuffled to LR size and a hidden state in; a residual over the
bilinear x2 of the current frame and the next state out) with num_feat NUM_FEAT, num_block
NUM_BLOCK, netscale 2. The state dict has AnimeSR's keys, so job.model loads it through the
temporal path (vsr_ddp.models.temporal.load_temporal -> animesr.load_animesr, which reads the
width and scale from the shapes). The last fusion conv's image channels start at zero: training
starts exactly at bilinear x2.

Data: sequences of SEQ HR frames made from one random TRAIN_IMAGES crop by smooth motion: a
constant sub-pixel pan (up to 3 HR px a frame) and a slow zoom (up to 1 % a frame), rendered per
frame with cv2.warpAffine (bicubic, reflect border) from the full image; STATIC_P of the sequences
hold still (locked-off shots, where a per-frame model's noise becomes flicker) and COMPOSITE_P are a
still background (another crop) beside a moving part cut at a random column (a locked-off camera with
something moving). Random flips and transposes per sequence.

Degradations, per frame: x1/2 with cv2.INTER_AREA (p 0.7) or bicubic / bilinear; on NOISE_P of the
sequences Gaussian noise of one sigma per sequence (1-4 levels of 255, new noise every frame,
grey for 30 %), then uint8 quantisation, as video frames are.

Loss: L1 on RGB in [0, 1] over every frame of each sequence, the cold start (zero output and state)
included, the recurrence run as AnimeSR.feed runs it without a pre-roll (the first frame its own
previous neighbour, the last its own next one). Adam (lr LR_MAX, cosine to LR_MIN), batch BATCH,
fixed seed.

Pre-roll (AnimeSR.preroll = PREROLL, saved in the file's metadata and used wherever it loads): at a
read range's start the recurrence first runs PREROLL times on the first frame held still, outputs
dropped, so the first output comes from a settled state (the edge rule for the state). Without it the
first 3 frames settle by about 0.6 levels on a still picture: flicker in static regions on the clean
clip 0.294 against the per-frame model's 0.219; with it 0.196.

Evaluation: the real clip of
vsr_ddp.bench.temporal_clip (``make demo``'s natural pan, a static left quarter; held-out pictures
in it) at EVAL_SIZE is the ground truth; its x1/2 cv2.INTER_AREA reduction the input, clean and
with Gaussian noise of 2 levels (seed 0). Outputs: bicubic x2, the shipped per-frame model
(job.model=default) and this model fed as one whole run (with its pre-roll). Each: PSNR to the
ground truth, warping
error (DIS flow from the ground truth), flicker in the ground truth's static pixels
(vsr_ddp.temporal_metrics). Then the seam check: segments of 8 frames, each fed from 16 frames
before its start (context outputs dropped, as the job runs it), against the whole run.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .models.animesr import MSRSWVSR, AnimeSR
from . import train_default
from .train_default import HELD_OUT, TRAIN_IMAGES, load_image, save

SCALE = 2
NUM_FEAT = 24
NUM_BLOCK = (3, 2, 1)
SEED = 0
STEPS = 6000
BATCH = 8
SEQ = 6  # frames a training sequence
PATCH = 32  # LR patch side (a multiple of 4); the HR frames are PATCH * SCALE
LR_MAX = 2e-3
LR_MIN = 2e-5
STATIC_P = 0.2
COMPOSITE_P = 0.3
PREROLL = 8  # AnimeSR.preroll the model ships with: a range's first frame held still before its output
NOISE_P = 0.6
EVAL_SIZE = (384, 216)  # (W, H) of the real clip's ground truth
EVAL_FRAMES = 48
EVAL_NOISE = 2.0
SEGMENT, WARMUP = 8, 16


def make_net() -> MSRSWVSR:
    net = MSRSWVSR(num_feat=NUM_FEAT, num_block=NUM_BLOCK, netscale=SCALE)
    with torch.no_grad():  # start at bilinear x2: zero the image part of the last conv
        last = net.recurrent_cell.fusion[2]
        last.weight[: 3 * SCALE * SCALE].zero_()
        last.bias[: 3 * SCALE * SCALE].zero_()
    return net


# -- data: a sequence of HR frames by smooth motion, then per-frame degradation -----------------------
def render(img: np.ndarray, rng: np.random.Generator, seq: int, hp: int, still: bool) -> np.ndarray:
    """# (seq, hp, hp, 3) uint8: a pan / zoom (or a still) across ``img`` from a random place."""
    h, w = img.shape[:2]
    v = np.zeros(2) if still else rng.uniform(-3, 3, 2)
    zr = 1.0 if still else float(np.exp(rng.uniform(-0.01, 0.01)))
    z0 = float(rng.uniform(0.8, 1.25))
    span = hp * z0 * max(zr, 1 / zr) ** seq + 3 * seq + 4  # room for the whole motion
    cx = rng.uniform(span / 2, max(span / 2 + 1, w - span / 2))
    cy = rng.uniform(span / 2, max(span / 2 + 1, h - span / 2))
    frames = []
    for t in range(seq):
        z = z0 * zr ** t  # source px per output px
        sx, sy = cx + v[0] * t, cy + v[1] * t
        m = np.array([[z, 0, sx - z * hp / 2], [0, z, sy - z * hp / 2]], np.float64)
        frames.append(cv2.warpAffine(img, m, (hp, hp), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REFLECT_101))
    return np.stack(frames)


def hr_sequence(images, rng: np.random.Generator, seq: int = SEQ, patch: int = PATCH) -> np.ndarray:
    """# (seq, P, P, 3) uint8, P = patch * SCALE: a still (STATIC_P), a still background with a
    moving part (COMPOSITE_P), or a pan / zoom, across one of ``images``."""
    hp = patch * SCALE
    img = images[rng.integers(len(images))]
    kind = rng.random()
    out = render(img, rng, seq, hp, still=kind < STATIC_P)
    if STATIC_P <= kind < STATIC_P + COMPOSITE_P:  # locked-off background, something moving beside it
        background = render(images[rng.integers(len(images))], rng, seq, hp, still=True)
        cut = int(rng.integers(hp // 4, 3 * hp // 4))
        out[:, :, :cut] = background[:, :, :cut]  # the flips below put the still part on any side
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(out)


def degrade_sequence(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """# (T, P/2, P/2, 3) uint8: each frame x1/2, with per-frame noise on NOISE_P of the sequences."""
    t, hp = hr.shape[:2]
    down = cv2.INTER_AREA if rng.random() < 0.7 else (cv2.INTER_CUBIC, cv2.INTER_LINEAR)[rng.integers(2)]
    lr = np.stack([cv2.resize(f.astype(np.float32), (hp // SCALE, hp // SCALE), interpolation=down)
                   for f in hr])
    if rng.random() < NOISE_P:
        sigma = rng.uniform(1.0, 4.0)
        shape = lr.shape[:3] + ((1,) if rng.random() < 0.3 else (3,))
        lr = lr + rng.normal(0.0, sigma, size=shape).astype(np.float32)
    return np.clip(np.round(lr), 0, 255).astype(np.uint8)


def sample_batch(images, rng, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr, hr): # (B, T, 3, p, p) and (B, T, 3, 2p, 2p) float in [0, 1]."""
    lrs, hrs = [], []
    for _ in range(batch):
        hr = hr_sequence(images, rng)
        lrs.append(degrade_sequence(hr, rng))
        hrs.append(hr)
    to_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 1, 4, 2, 3).float().div_(255)  # noqa: E731
    return to_t(lrs), to_t(hrs)


def run_sequence(net: MSRSWVSR, lr: torch.Tensor) -> torch.Tensor:
    """The recurrence over # (B, T, 3, h, w) as AnimeSR.feed runs it: # (B, T, 3, sh, sw)."""
    b, t, _, h, w = lr.shape
    s = net.netscale
    out = lr.new_zeros(b, 3, h * s, w * s)
    state = lr.new_zeros(b, net.num_feat, h, w)
    outs = []
    for i in range(t):
        window = torch.cat((lr[:, max(i - 1, 0)], lr[:, i], lr[:, min(i + 1, t - 1)]), dim=1)
        out, state = net.cell(window, out, state)
        outs.append(out)
    return torch.stack(outs, 1)


# -- evaluation on the real clip ----------------------------------------------------------------------
def real_clip(size=EVAL_SIZE, frames: int = EVAL_FRAMES, noise: float = EVAL_NOISE, seed: int = 0):
    """(ground truth # (T, H, W, 3), {"clean": lr, "noise 2": lr}) uint8: the real clip at x2."""
    from .bench import temporal_clip

    w, h = size
    gt = temporal_clip(frames, size)
    lr = np.stack([cv2.resize(f, (w // SCALE, h // SCALE), interpolation=cv2.INTER_AREA) for f in gt])
    rng = np.random.default_rng(seed)
    noisy = np.clip(np.rint(lr + rng.normal(0, noise, lr.shape)), 0, 255).astype(np.uint8)
    return gt, {"clean": lr, f"noise {noise:g}": noisy}


def whole_run(model: AnimeSR, clip: np.ndarray) -> np.ndarray:
    model.start()
    return model.feed(clip, last=True)


def segmented_run(model: AnimeSR, clip: np.ndarray, segment: int = SEGMENT,
                  warmup: int = WARMUP) -> np.ndarray:
    """As the job runs it: each segment fed from ``warmup`` frames before its start to one after
    its end, the context outputs dropped."""
    parts = []
    for s in range(0, len(clip), segment):
        a, b = max(0, s - warmup), min(len(clip), s + segment + model.reach.after)
        parts.append(whole_run(model, clip[a:b])[s - a:s - a + segment])
    return np.concatenate(parts)


def evaluate(model: AnimeSR, size=EVAL_SIZE, frames: int = EVAL_FRAMES) -> dict:
    from .models.sr import Upscaler
    from .temporal_metrics import flicker, pair_flows, psnr, seams, static_mask, warping_error

    cpu = torch.device("cpu")
    gt, inputs = real_clip(size, frames)
    flows, still = pair_flows(gt), static_mask(gt)
    outputs = {"bicubic x2": Upscaler("bicubic", device=cpu, scale=2),
               "per-frame default x2": Upscaler("default", device=cpu, batch_size=8),
               "temporal x2 (whole run)": lambda x: whole_run(model, x)}
    table = {"ground truth": {"psnr_db": None, "warping_error": round(warping_error(gt, flow=flows), 3),
                              "flicker_static": round(flicker(gt, still), 3)}}
    for name, run in outputs.items():
        for kind, clip in inputs.items():
            out = run(clip)
            table[f"{name} ({kind})"] = {"psnr_db": round(psnr(out, gt), 3),
                                         "warping_error": round(warping_error(out, flow=flows), 3),
                                         "flicker_static": round(flicker(out, still), 3)}
    seam = {}
    for kind, clip in inputs.items():
        whole, seg = whole_run(model, clip), segmented_run(model, clip)
        found = seams(seg, whole, range(0, frames, SEGMENT))
        diff = np.abs(seg.astype(np.int16) - whole.astype(np.int16))
        seam[kind] = {"max_at_starts": max(found.values()), "max_any_frame": int(diff.max()),
                      "mean_any_frame": round(float(diff.mean()), 5)}
    return {"clip": f"{size[0] // SCALE}x{size[1] // SCALE} -> {size[0]}x{size[1]}, {frames} frames, "
                    f"{still.mean():.0%} static", "table": table,
            f"seams (segment {SEGMENT}, warm-up {WARMUP})": seam}


def _print_eval(ev: dict) -> None:
    print(f"real clip {ev['clip']}")
    for k, v in ev["table"].items():
        print(f"  {k:40s} PSNR {v['psnr_db']}  warp {v['warping_error']:.3f}  "
              f"flicker {v['flicker_static']:.3f}")
    for k, v in ev.items():
        if k.startswith("seams"):
            print(f"  {k}: {v}")


# -- training ------------------------------------------------------------------------------------------
def train(out: Path, steps: int = STEPS, seed: int = SEED, max_minutes: float = 45.0,
          log_every: int = 50) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # 2 threads spin-wait for each other on a shared 2-core machine
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    assert not set(HELD_OUT) & set(TRAIN_IMAGES)
    images = [load_image(n) for n in TRAIN_IMAGES]
    net = make_net()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"MSRSWVSR x{SCALE}: num_feat {NUM_FEAT}, num_block {NUM_BLOCK}, {n_params} parameters; "
          f"{len(images)} training images, sequences of {SEQ}", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=LR_MAX)
    t0 = time.perf_counter()
    done, running, stopped_early = 0, 0.0, False
    net.train()
    for step in range(1, steps + 1):
        # cosine over the steps, or over --max-minutes if that ends first: the rate anneals either way
        frac = max((step - 1) / steps, (time.perf_counter() - t0) / (max_minutes * 60))
        if frac >= 1:
            print(f"WARNING: stopping at step {step - 1} of {steps}: over --max-minutes {max_minutes}",
                  flush=True)
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = LR_MIN + (LR_MAX - LR_MIN) * 0.5 * (1 + math.cos(math.pi * frac))
        lr, hr = sample_batch(images, rng)
        loss = F.l1_loss(run_sequence(net, lr), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done, running = step, running + loss.item()
        if step % log_every == 0 or step == steps:
            el = time.perf_counter() - t0
            print(f"step {step}/{steps}  L1 {running / log_every:.4f}  {el:.0f}s ({el / step:.2f} s/step)",
                  flush=True)
            running = 0.0
    seconds = time.perf_counter() - t0
    net.eval()
    record = {
        "architecture": "MSRSWVSR (AnimeSR, vsr_ddp/models/animesr.py), reduced width",
        "scale": SCALE, "num_feat": NUM_FEAT, "num_block": list(NUM_BLOCK), "parameters": n_params,
        "data_source": "scikit-image sample images bundled in the wheel (skimage.data)",
        "train_images": list(TRAIN_IMAGES), "held_out_images": list(HELD_OUT),
        "sequences": f"{SEQ} frames, LR {PATCH}x{PATCH}: pan <= 3 HR px/frame, zoom <= 1 %/frame "
                     f"(cv2.warpAffine bicubic), {STATIC_P:.0%} still, {COMPOSITE_P:.0%} a still background "
                     "beside a moving part; flips/transposes",
        "degradations": f"x1/2 area (p0.7) | bicubic | bilinear per sequence; on {NOISE_P:.0%} of sequences "
                        "Gaussian noise s1-4/255 new each frame (30% grey); uint8 LR",
        "loss": "L1 over every frame, the cold start included",
        "preroll": PREROLL,
        "optimizer": f"Adam lr {LR_MAX} cosine to {LR_MIN} over the steps or --max-minutes, "
                     "whichever ends first",
        "batch": BATCH, "seed": seed, "steps": done, "steps_planned": steps, "stopped_early": stopped_early,
        "train_seconds": round(seconds, 1),
        "command": "python -m vsr_ddp.train_temporal --out " + str(out),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    save(net, out, record)  # the weights first: the evaluation below takes a while
    ev = evaluate(AnimeSR(net, preroll=PREROLL))
    _print_eval(ev)
    record["evaluation"] = ev
    record["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save(net, out, record)
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.json')}; "
          f"trained {done} steps in {seconds:.0f}s")
    return record


def main(argv: list[str] | None = None) -> int:
    return train_default.main(argv, train_fn=train, doc=__doc__, steps=STEPS, seed=SEED,
                              max_minutes=45.0)


if __name__ == "__main__":
    sys.exit(main())
