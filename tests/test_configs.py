"""Every config composes, and every YAML opens with the command that runs it."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
YAMLS = sorted(CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python -m vsr_ddp") or first.startswith("# torchrun"), first


@pytest.mark.parametrize("extra", [[], ["+debug=default"]])
def test_config_composes_with_design_keys(extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["input=a.mp4", "output=out", "job.model=lanczos", *extra])
    for key in ("job.name", "job.model", "job.scale", "job.outscale", "job.tile", "job.tile_pad", "job.precision",
                "work.unit", "work.segment_frames", "work.overlap", "encode.codec", "encode.crf", "encode.preset",
                "dry_run", "input", "output"):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    assert cfg.job.name == "upscale"
