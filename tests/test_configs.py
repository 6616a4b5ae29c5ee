"""Every config composes, and every YAML opens with the command that runs it."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
YAMLS = sorted(CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_opens_with_its_command(path):
    lines = path.read_text().splitlines()
    # Hydra reads a "# @package" header only while no other comment precedes it
    first = lines[1] if lines[0].startswith("# @package") else lines[0]
    assert first.startswith("# python -m vsr_ddp") or first.startswith("# torchrun"), first


@pytest.mark.parametrize("extra", [[], ["+debug=default"]])
def test_config_composes_with_design_keys(extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["input=a.mp4", "output=out", "job.model=lanczos", *extra])
    for key in ("job.name", "job.model", "job.scale", "job.outscale", "job.tile", "job.tile_pad",
                "job.precision", "work.unit", "work.segment_frames", "work.overlap", "encode.codec",
                "encode.crf", "encode.preset", "dry_run", "input", "output"):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    assert cfg.job.name == "upscale"
    if extra:  # debug/ shrinks the run itself, not a "debug" subtree beside it
        assert "debug" not in cfg and cfg.device == "cpu" and cfg.work.segment_frames == 16


JOB_OVERRIDES = {
    "upscale": ["job.model=lanczos"],
    "propagate": ["job.keys=keys"],
    "sim2real": ["job.prompts=prompts", "job.base_model=sd15", "job.controlnet=control"],
}  # required keys of each job; a job not named here needs none


def compose_job(name: str, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"job={name}", "input=a.mp4", "output=out",
                                            *JOB_OVERRIDES.get(name, []), *extra])


JOBS = sorted(p.stem for p in (CONF / "job").glob("*.yaml"))


@pytest.mark.parametrize("name", JOBS)
def test_every_job_config_composes(name):
    """Each job's config composes with its required keys given (``???``), alone and with debug/."""
    assert {"upscale", "propagate", "sim2real"} <= set(JOBS)
    for extra in ([], ["+debug=default"]):
        cfg = compose_job(name, *extra)
        assert cfg.job.name == name
        OmegaConf.to_container(cfg.job, resolve=False, throw_on_missing=True)  # nothing left ???


def test_each_subtree_is_one_dataclass_whose_values_only_the_yaml_holds():
    """Every key of a subtree is a field, and every field the YAML sets has no default in code
    (the YAML is the one home of those values); ``shipped()`` gives them to direct callers."""
    from dataclasses import MISSING, fields

    from vsr_ddp.jobs.sim2real import VideoOptions
    from vsr_ddp.models.ebsynth import GuideWeights, SynthParams
    from vsr_ddp.models.fresco import FrescoSettings

    prop, s2r = compose_job("propagate").job, compose_job("sim2real").job
    assert SynthParams.from_config(prop.ebsynth) == SynthParams.from_config(s2r.ebsynth) \
        == SynthParams.shipped()
    assert GuideWeights.from_config(prop.guides) == GuideWeights.shipped()
    opts = {"prompt": "", "negative_prompt": s2r.negative_prompt, "added_prompt": s2r.added_prompt,
            **{k: s2r[k] for k in ("strength", "steps", "seed", "guidance_scale", "cond_scale")},
            **s2r.keyframes}
    assert set(opts) == {f for f in VideoOptions.__dataclass_fields__}
    run = {k: opts[k] for k in ("steps", "strength", "guidance_scale", "cond_scale", "seed")}
    fresco_values = {**s2r.fresco, **run, "batch_size": s2r.batch_size}
    assert FrescoSettings.from_config(fresco_values) == FrescoSettings.shipped()
    for cls, values in ((SynthParams, prop.ebsynth), (GuideWeights, prop.guides),
                        (FrescoSettings, fresco_values)):
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        assert required == set(values), cls.__name__  # chunk_mb (no config key) keeps a default
    with pytest.raises(TypeError, match="unknown setting.*pach_size"):
        SynthParams.from_config({"pach_size": 5})
    with pytest.raises(TypeError, match="patch_size"):
        SynthParams.from_config({k: v for k, v in prop.ebsynth.items() if k != "patch_size"})


@pytest.mark.parametrize("name", ["propagate", "sim2real"])
def test_the_engine_between_keys_is_spelled_the_same_in_every_job(name):
    from vsr_ddp import jobs

    cfg = compose_job(name, "job.ebsynth.patch_size=7", "job.ebsynth.search_vote_iters=2")
    job = jobs.make_job(cfg.job, "cpu")
    synth = job.settings()["synth"] if name == "propagate" else job.settings()["propagation"]["ebsynth"]
    assert (synth["patch_size"], synth["search_vote_iters"], synth["uniformity"]) == (7, 2, 3500.0)
