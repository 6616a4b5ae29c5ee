"""``python -m vsr_ddp --help`` and ``python -m vsr_ddp job=NAME --help``, read off the shipped YAML.

    python -m vsr_ddp --help                  what vsr_ddp is, the jobs, launch examples, the settings
    python -m vsr_ddp job=interpolate --help  that job's settings, with their meaning
    python -m vsr_ddp --hydra-help            Hydra's own options

Everything shown comes from conf/: the launch examples are conf/config.yaml's opening commands,
a job's line is the first sentence of the paragraph under its file's commands, and a key's
meaning is the comment beside it (and the indented comment lines under it), or the comment block
just above it. A new key documented in its YAML is in the help with nothing else to change.
"""
from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from . import __doc__ as ABOUT
from .config import CONFIG_ERROR, config_dir

HELP_FLAGS = ("--help", "-h")
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?:\s+(?P<rest>.*))?$")
ITEM = re.compile(r"^ *- *(?P<rest>.*)$")
COMMANDS = ("python ", "torchrun ")


@dataclass
class Key:
    name: str      # dotted: work.unit, guides.color
    value: str     # as written in the YAML ("" for a group of keys)
    meaning: str


def wanted(argv: list[str]) -> bool:
    """Is this command line a request for vsr_ddp's help (not ``--hydra-help``)?"""
    return any(a in HELP_FLAGS for a in argv)


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is the value's."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def header(path: Path) -> list[str]:
    """The comment lines a YAML file opens with (up to its first setting), without ``# ``."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            out.append(line[2:].rstrip() if line.startswith("# ") else line[1:].rstrip())
    return out


def examples(path: Path) -> list[str]:
    """The commands a YAML file opens with."""
    return [ln for ln in header(path) if ln.startswith(COMMANDS)]


def description(path: Path) -> list[str]:
    """What a YAML file says under its opening commands, line by line."""
    lines = [ln for ln in header(path) if not ln.startswith(COMMANDS)]
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def summary(path: Path) -> str:
    """The first sentence of the paragraph under a YAML file's opening commands."""
    lines = description(path)
    text = " ".join(ln.strip() for ln in (lines[:lines.index("")] if "" in lines else lines))
    m = re.search(r"\.(\s|$)", text)
    return text[:m.start() + 1] if m else text


def keys(path: Path, prefix: str = "") -> list[Key]:
    """Every setting of a YAML file, in file order, with its value as written and its comment;
    a group that the file's ``defaults`` list pulls in (``- /ebsynth: default``) comes in at its
    place, its keys under ``<prefix><group>.``."""
    out: list[Key] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the groups the current line is in
    above: list[str] = []              # a comment block at column 0, for the next key
    last: Key | None = None            # the key whose comment an indented comment line goes on with
    started = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            above, last = [], None
            continue
        if stripped.startswith("#"):
            if not started:
                continue  # the file's header
            if line.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                last = None
            elif last is not None:
                last.meaning = f"{last.meaning} {stripped.lstrip('#').strip()}".strip()
            continue
        started = True
        item = ITEM.match(line)
        if item:  # an entry of the defaults list
            entry, comment = _split_comment(item.group("rest"))
            group, _, option = entry.partition(":")
            if group.startswith("/") and option.strip():  # /GROUP: OPTION -> conf/GROUP/OPTION.yaml
                group = group[1:].strip()
                sub = Path(config_dir()) / group / f"{option.strip()}.yaml"
                out.append(Key(f"{prefix}{group}", "", comment or summary(sub)))
                out.extend(keys(sub, f"{prefix}{group}."))
            last = None
            continue
        m = KEY.match(line)
        if not m:
            last = None
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = ".".join([k for _, k in stack] + [m.group("key")])
        value, comment = _split_comment(m.group("rest") or "")
        stack.append((indent, m.group("key")))
        if name.split(".")[0] in ("defaults", "hydra"):
            above, last = [], None
            continue
        last = Key(prefix + name, value, comment or " ".join(above))
        out.append(last)
        above = []
    return out


def _table(entries: list[Key], width: int) -> list[str]:
    """``  key=value    meaning``, the meaning wrapped under itself; a group as ``  key.*``."""
    column = 34
    lines = []
    for k in entries:
        left = f"  {k.name}.*" if not k.value else f"  {k.name}={k.value}"
        if not k.meaning:
            lines.append(left)
            continue
        wrapped = textwrap.wrap(k.meaning, max(30, width - column)) or [""]
        if len(left) < column - 1:
            lines.append(left.ljust(column) + wrapped[0])
            wrapped = wrapped[1:]
        else:
            lines.append(left)
        lines.extend(" " * column + w for w in wrapped)
    return lines


def _jobs() -> dict[str, Path]:
    return {p.stem: p for p in sorted((Path(config_dir()) / "job").glob("*.yaml"))}


def _readme() -> str:
    checkout = Path(config_dir()).parent / "README.md"
    return str(checkout) if checkout.is_file() else "README.md of the vsr_ddp repository"


def main_help(width: int) -> str:
    conf = Path(config_dir())
    settings = keys(conf / "config.yaml")
    chosen = [d["job"] for d in _defaults(conf / "config.yaml") if isinstance(d, dict) and "job" in d]
    default_job = chosen[0] if chosen else None  # config.yaml's defaults list: "- job: upscale"
    out = [ABOUT.strip(), "", "Usage: python -m vsr_ddp job=NAME input=PATH output=DIR [key=value ...]", "",
           "Jobs (job=NAME; python -m vsr_ddp job=NAME --help lists its job.* settings):"]
    for name, path in _jobs().items():
        line = f"{summary(path)}{' (the default job)' if name == default_job else ''}"
        out += textwrap.wrap(line, width, initial_indent=f"  {name:<12}", subsequent_indent=" " * 14)
    out += ["", "Examples:"] + [f"  {c}" for c in examples(conf / "config.yaml")]
    out += ["", "Settings (key=value on the command line; shown with their defaults, from conf/config.yaml):"]
    flat = [k for k in settings if "." not in k.name and k.value]
    out += _table(flat, width)
    for group in dict.fromkeys(k.name.split(".")[0] for k in settings if "." in k.name):
        out += [""] + _table([k for k in settings if k.name.startswith(group + ".")], width)
    out += ["", "Hydra's own options (sweeps with -m, --cfg job to print the composed config): "
                "python -m vsr_ddp --hydra-help",
            f"More: {_readme()}"]
    return "\n".join(out)


def job_help(name: str, width: int) -> str:
    path = _jobs()[name]
    out = [f"vsr_ddp job={name}", ""] + [f"  {ln}" if ln else "" for ln in description(path)]
    out += ["", "Examples:"] + [f"  {c}" for c in examples(path)]
    out += ["", f"Settings of job={name} (key=value on the command line; shown with their defaults, "
                f"from conf/job/{name}.yaml):"]
    out += _table([k for k in keys(path, "job.") if k.name != "job.name"], width)
    out += ["", "The settings every job shares: python -m vsr_ddp --help", f"More: {_readme()}"]
    return "\n".join(out)


def _defaults(path: Path) -> list:
    from omegaconf import OmegaConf

    return list(OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []))


def show(argv: list[str]) -> int:
    """Print the help that ``argv`` asks for (the last ``job=NAME`` names the job); the exit status."""
    import sys

    width = min(110, shutil.get_terminal_size((100, 24)).columns)
    job = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("job=")), None)
    if job is None:
        print(main_help(width), flush=True)
        return 0
    if job not in _jobs():
        print(f"error: job={job}: no such job ({', '.join(_jobs())})", file=sys.stderr, flush=True)
        return CONFIG_ERROR
    print(job_help(job, width), flush=True)
    return 0
