"""Every config file composes and validates, and each default is written once, in its dataclass.

The dataclasses are Hydra structured configs (:mod:`fedtune.config.composition`), so what
``compose(['<group>=<name>'])`` yields for an option must be exactly its dataclass's
defaults, and the run's fixed sections must be exactly :class:`RunConfig`'s.  A YAML
file may only select and override: a key it sets that no dataclass declares is an error.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from cli_testing import fedtune_run

from fedtune.models.zoo import minilm_dir
from fedtune.config import CONFIG_DIR, ConfigError, RunConfig, compose
from fedtune.config import composition
from fedtune.config.run import NAMED_SECTIONS
from fedtune.schema import to_dict

PRESETS = sorted((CONFIG_DIR / "preset").glob("*/*.yaml"))
EXPERIMENTS = sorted((CONFIG_DIR / "experiment").glob("*.yaml"))  # published setups: tests/test_experiments.py
OPTIONS = [(group, name) for group, registry in NAMED_SECTIONS.items() for name in registry.names()]
# what an option needs beside it to be valid (a causal LM needs an instruction task; client-level DP a uniform mean)
COMPANIONS = {("model", "smollm2"): ["dataset=bbc_instruct"], ("dataset", "bbc_instruct"): ["model=smollm2"],
              ("model", "hf"): [f"model.path={minilm_dir()}", "model.lora.target_modules=[query,value]"],
              ("privacy", "client_dp"): ["strategy.weighting=uniform", "privacy.delta=1e-3"],
              ("dataset", "hf"): ["dataset.format=text_label"]}  # the default model is a classifier


def _defaults(cls: type, name: str) -> dict:
    """The dataclass's field defaults as a plain dict (built without ``__post_init__``)."""
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        object.__setattr__(obj, f.name, default)
    return {**to_dict(obj), "name": name}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def test_the_config_files_only_select_and_preset() -> None:
    """No option YAML repeats a section: only config.yaml, the presets and the experiments exist."""
    files = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    assert files == sorted(["config.yaml", *(p.relative_to(CONFIG_DIR).as_posix() for p in [*PRESETS, *EXPERIMENTS])])
    root = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    assert set(root) == {"defaults", "hydra"}, "config.yaml sets run fields: they belong in RunConfig's dataclasses"


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_option_composes_to_its_dataclass_defaults(group: str, name: str) -> None:
    mapping = composition.compose_mapping([f"{group}={name}"], resolve=True)
    cls = NAMED_SECTIONS[group].get(name).config_cls
    assert mapping[group] == _defaults(cls, name)
    cfg = compose([f"{group}={name}", *COMPANIONS.get((group, name), [])])  # and it validates
    assert type(getattr(cfg, group)) is cls


def test_the_default_run_is_the_dataclass_defaults() -> None:
    mapping = composition.compose_mapping([], resolve=True)
    defaults = to_dict(RunConfig(strategy=None, model=None, dataset=None))
    for section in NAMED_SECTIONS:
        defaults.pop(section), mapping.pop(section)
    mapping.pop("hydra", None)
    assert mapping == defaults


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_composes_validates_and_applies(preset: Path) -> None:
    group, name = preset.parent.name, preset.stem
    assert name in NAMED_SECTIONS[group].names(), f"{preset} presets no registered {group}"
    cfg = compose([f"{group}={name}", *COMPANIONS.get((group, name), [])]).to_dict()
    flat = _flatten(cfg)
    for key, value in _flatten(yaml.safe_load(preset.read_text())).items():
        assert flat[key] == value, key


@pytest.fixture
def config_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    monkeypatch.setattr(composition, "CONFIG_DIR", tmp_path / "configs")
    return tmp_path / "configs"


@pytest.mark.parametrize("text,message", [
    ("# @package _global_\nmodel:\n  hiden_size: 8\n",
     "model.hiden_size is not a known field; accepted: hidden_size, initializer_range, intermediate_size"),
    ("# @package _global_\ntrain:\n  momentum: 0.9\n",
     "train.momentum is not a known field; accepted: batch_size, local_steps, lr, lr_min, lr_schedule, optimizer, warmup_steps, weight_decay"),
    ("# @package _global_\ntrain:\n  lr: fast\n", "train.lr must be a number, got 'fast'"),
])
def test_a_yaml_key_or_value_its_dataclass_does_not_accept_is_an_error(config_copy: Path, text: str,
                                                                       message: str) -> None:
    (config_copy / "preset" / "model" / "tiny.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        compose(["model=tiny", "dataset=tiny"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_help_and_cfg_job_show_the_dataclass_fields() -> None:
    job = fedtune_run(["--cfg", "job", "strategy=fed_sb", "strategy.rank=8", "model=tiny"])
    assert job.returncode == 0, job.stderr
    shown = yaml.safe_load(job.stdout)
    assert shown["strategy"] == {**_defaults(NAMED_SECTIONS["strategy"].get("fed_sb").config_cls, "fed_sb"), "rank": 8}
    assert shown["train"]["lr"] == 1e-2  # model=tiny's preset
    help_text = fedtune_run(["--help"]).stdout
    for group, names in (("strategy", NAMED_SECTIONS["strategy"].names()), ("privacy", ["client_dp", "dp_sgd"])):
        assert f"{group}: " in help_text and all(n in help_text for n in names)
    assert "round_timeout: 3600.0" in help_text
