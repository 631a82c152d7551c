"""The typed config: defaults, YAML, flags over YAML, validation."""

import pytest

from mdu_cli.config.training import FinetuneConfig, UnlearnConfig, build_config
from mdu_cli.config.yaml_file import read_yaml
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


@pytest.mark.parametrize("command, data_key", [("unlearn", "forget"), ("finetune", "data")])
def test_every_path_in_a_yaml_file_is_relative_to_the_file(command, data_key, tmp_path, monkeypatch):
    """Whatever the working directory, each option naming a local file or
    folder (data, model, chat template, output, tracker logs) is read from
    the YAML file's folder; absolute paths and hf:// names stay as written."""
    config_dir = tmp_path / "configs" / "run"
    (config_dir / "model").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    retain = "" if command == "finetune" else "retain: data/r.jsonl\n"
    (config_dir / "run.yaml").write_text(
        f"model: model\n{data_key}: data/f.jsonl\n{retain}chat-template: templates/chat.jinja\n"
        "out: ../outputs/o\nlogging-dir: logs\nreport-to: tensorboard\n")
    options = read_yaml(config_dir / "run.yaml", command)
    kind = FinetuneConfig if command == "finetune" else UnlearnConfig
    cfg = build_config(options, {}, kind)
    assert cfg.model == str(config_dir / "model")
    assert cfg.records == str(config_dir / "data" / "f.jsonl")
    assert cfg.chat_template == str(config_dir / "templates" / "chat.jinja")
    assert cfg.out == str(tmp_path / "configs" / "outputs" / "o")
    assert cfg.logging_dir == str(config_dir / "logs")
    if command == "unlearn":
        assert cfg.retain == str(config_dir / "data" / "r.jsonl")
    (config_dir / "abs.yaml").write_text(f"model: model\n{data_key}: hf://datasets/o/n/f.json\n"
                                         f"out: {tmp_path / 'abs-out'}\n")
    cfg = build_config(read_yaml(config_dir / "abs.yaml", command), {}, kind)
    assert cfg.records == "hf://datasets/o/n/f.json" and cfg.out == str(tmp_path / "abs-out")


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
