"""Typed config: unknown keys are errors that name the key; values are coerced or rejected by field name."""

from __future__ import annotations

import pytest

from dopd.common.config import Config
from dopd.common.errors import ConfigError
from dopd.common.load import config_from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 0.0005\nrollout:\n  block_size: 6\n")
    cfg = load_config(
        f,
        [
            "learner.lr=1e-4",
            "drafter.kind=dflash",
            "drafter.feature_layers=[1, 2]",
            "cluster.shards=none",
            "metrics.enabled=false",
        ],
    )
    assert cfg.learner.lr == 1e-4 and cfg.rollout.block_size == 6 and cfg.drafter.kind == "dflash"
    assert cfg.drafter.feature_layers == [1, 2] and cfg.cluster.shards is None and cfg.metrics.enabled is False
    assert config_from_dict(cfg.to_dict()) == cfg


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'learner.lrr' \(did you mean 'lr'\?\)"):
        load_config(None, ["learner.lrr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  blocksize: 4\n")
    with pytest.raises(ConfigError, match="rollout.blocksize"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown config key 'nosection.x'"):
        load_config(None, ["nosection.x=1"])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="learner.steps' must be an integer"):
        load_config(None, ["learner.steps=many"])
    with pytest.raises(ConfigError, match="drafter.kind' must be one of"):
        load_config(None, ["drafter.kind=medusa"])
    with pytest.raises(ConfigError, match="rollout.block_size must be >= 1"):
        load_config(None, ["rollout.block_size=0"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["learner=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="num_blocks > 1 needs"):
        load_config(None, ["replay.num_blocks=2"])
    with pytest.raises(ConfigError, match="data.rollout_skip must be >= 0 and needs data.rollout_prompts=after_sft"):
        load_config(None, ["data.rollout_skip=8"])
    with pytest.raises(ConfigError, match="learner.eval_at must list steps >= 1"):
        load_config(None, ["learner.eval_at=[0, 5]"])
    assert load_config(
        None, ["data.rollout_prompts=after_sft", "data.rollout_skip=8", "learner.eval_at=[5, 10]"]
    ).learner.eval_at == [5, 10]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_eval_block_size_defaults_to_rollout():
    assert Config().eval_block_size == Config().rollout.block_size
