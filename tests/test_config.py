"""The typed config: defaults, YAML, flags over YAML, validation."""

import pytest

from mdu_cli.config import UnlearnConfig, build_config, read_yaml
from mdu_cli.errors import ConfigError


def test_defaults_resolve_alpha_from_retain():
    assert build_config({}, {"model": "m", "forget": "f"}).alpha == 0.0
    assert build_config({}, {"model": "m", "forget": "f", "retain": "r"}).alpha == 1.0
    assert build_config({}, {"model": "m", "forget": "f", "retain": "r", "alpha": 0.5}).alpha == 0.5


def test_yaml_paths_relative_to_file_and_flags_win(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text("model: model\nforget: f.jsonl\nmax-steps: 7\ntau: 2\nkl: js\n")
    options = read_yaml(tmp_path / "sub" / "run.yaml")
    cfg = build_config(options, {"tau": 0.5})
    assert cfg.model == str(tmp_path / "sub" / "model")
    assert cfg.forget == str(tmp_path / "sub" / "f.jsonl")
    assert cfg.max_steps == 7 and cfg.kl == "js"
    assert cfg.tau == 0.5 and isinstance(cfg.tau, float)


def test_hub_id_in_yaml_is_left_alone(tmp_path):
    (tmp_path / "run.yaml").write_text("model: GSAI-ML/LLaDA-8B-Instruct\nforget: f.jsonl\n")
    assert build_config(read_yaml(tmp_path / "run.yaml"), {}).model == "GSAI-ML/LLaDA-8B-Instruct"


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "run.yaml").write_text("model: m\nforget: f\ntua: 2\n")
    with pytest.raises(ConfigError, match="unknown option 'tua'"):
        read_yaml(tmp_path / "run.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    (tmp_path / "run.yaml").write_text("model: m\nforget: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        read_yaml(tmp_path / "run.yaml")


@pytest.mark.parametrize("override, message", [
    ({"tau": -0.5}, "--tau must be >= 0"),
    ({"kl": "sideways"}, "--kl must be one of"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"batch_size": 0}, "--batch-size must be a whole number"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio must be in"),
    ({"alpha": 1.0}, "no --retain file"),
    ({"tau": "two"}, "--tau must be a finite number"),
    ({"forget": None}, "--forget is required"),
])
def test_validation(override, message):
    options = {"model": "m", "forget": "f", **override}
    with pytest.raises(ConfigError, match=message):
        build_config({}, options)


def test_config_round_trips_through_dict():
    cfg = build_config({}, {"model": "m", "forget": "f"})
    assert UnlearnConfig(**cfg.to_dict()) == cfg
