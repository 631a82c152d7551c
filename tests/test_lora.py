"""--lora: adapters inside the blocks only, the adapter-off anchor, merged or
adapter-only output, and the adapter's effective delta in `mdu diff`."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_hostile_inputs import no_weight_loads  # noqa: F401 (a fixture)
from transformers import AutoModel

from mdu_cli.cli import cli
from mdu_cli.config.training import build_config
from mdu_cli.model.families import FAMILIES, model_logits
from mdu_cli.model.loading import load_model, resolve_source
from mdu_cli.model.lora import AdapterOffAnchor, apply_lora, default_targets
from mdu_cli.train.run import run_unlearn

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

LLADA_LINEARS = ["attn_out", "ff_out", "ff_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


def _load(directory):
    return load_model(resolve_source(str(directory)), True, torch.float32)


def test_default_targets_never_adapt_the_llada_head(llada_dir):
    model = _load(llada_dir)
    assert default_targets(model) == LLADA_LINEARS
    peft_model = apply_lora(model, 4, 8, 0.0)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert any(name.endswith("blocks.0.ff_out") for name in adapted)
    assert not any(name.endswith("transformer.ff_out") for name in adapted), "the head stays as it is"
    assert len(adapted) == 2 * len(LLADA_LINEARS)


def test_adapter_off_anchor_is_exactly_the_base_and_holds_no_copy(llada_dir):
    base = _load(llada_dir).eval()
    peft_model = apply_lora(_load(llada_dir), 4, 8, 0.0)
    with torch.no_grad():  # move the adapter away from its zero start
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    anchor = AdapterOffAnchor(peft_model)
    assert list(anchor.parameters()) == []
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    family = FAMILIES["llada"]
    with torch.no_grad():
        assert torch.equal(model_logits(anchor, ids, mask, family), model_logits(base, ids, mask, family))
        assert not torch.allclose(model_logits(peft_model, ids, mask, family), model_logits(base, ids, mask, family))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_merged_output_changes_only_adapted_weights(family, family_dirs, forget_file, retain_file, tmp_path):
    out = tmp_path / "merged"
    cfg = build_config({}, dict(model=str(family_dirs[family]), forget=str(forget_file), retain=str(retain_file),
                                out=str(out), lora=True, lora_r=4, max_steps=3, batch_size=2, lr=1e-2))
    result = run_unlearn(cfg, show_progress=False, keep_model=True)
    assert isinstance(result.anchor, AdapterOffAnchor)
    base = load_file(family_dirs[family] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys(), "same layout as the base"
    linears = set(default_targets(_load(family_dirs[family])))
    for name in base:
        adapted = ".layers." in name or ".blocks." in name
        adapted = adapted and name.endswith(".weight") and name.split(".")[-2] in linears
        assert torch.equal(base[name], merged[name]) != adapted, name
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(5, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model_logits(reloaded, ids, torch.ones_like(ids), FAMILIES[family]),
                              model_logits(result.model, ids, torch.ones_like(ids), FAMILIES[family]), atol=1e-6)


def test_save_adapter_and_its_effective_delta(llada_dir, forget_file, tmp_path):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
                                      "--out", str(out), "--lora", "--lora-r", "4", "--lora-alpha", "8",
                                      "--save-adapter", "--max-steps", "3", "--lr", "1e-2"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llada_dir) and config["r"] == 4
    assert not (out / "model.safetensors").exists()

    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load(llada_dir), out).merge_and_unload()
    assert not torch.equal(merged.state_dict()["model.transformer.blocks.0.q_proj.weight"],
                           _load(llada_dir).state_dict()["model.transformer.blocks.0.q_proj.weight"])

    report = json.loads((out / "delta_report.json").read_text())
    adapter = load_file(out / "adapter_model.safetensors")
    base = load_file(llada_dir / "model.safetensors")
    scale = 8 / 4
    assert report["total"]["tensors"] == 2 * len(LLADA_LINEARS)
    for entry in report["tensors"]:
        module = entry["name"][: -len(".weight")]
        a = adapter[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        b = adapter[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        w = base[entry["name"]].double().numpy()
        delta = scale * b @ a
        assert entry["l2"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        assert entry["rel_l2"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=1e-9)
        assert entry["max_abs"] == pytest.approx(np.abs(delta).max(), rel=1e-9)
    assert report["unchanged"] == len(base) - len(report["tensors"])

    result = CliRunner().invoke(cli, ["push", str(out), "--repo-id", "me/adapter", "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    uploaded = {e["path"] for e in json.loads(result.stdout)["upload"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= uploaded
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_save_adapter_needs_lora():
    with pytest.raises(Exception, match="--save-adapter needs --lora"):
        build_config({}, dict(model="m", forget="f", save_adapter=True))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_delta_follows_the_adapter_config_like_peft_merges_it(use_rslora, llada_dir, tmp_path):
    """`mdu diff BASE ADAPTER` reports the delta that merging the adapter makes:
    scale alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA. The
    expected delta is peft's own merge minus the base weight, per tensor."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora,
                        init_lora_weights=False)  # random A and B: a delta to measure
    adapter = tmp_path / "adapter"
    get_peft_model(_load(llada_dir), config).save_pretrained(adapter)
    result = CliRunner().invoke(cli, ["diff", str(llada_dir), str(adapter), "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    base = load_file(llada_dir / "model.safetensors")
    merged = PeftModel.from_pretrained(_load(llada_dir), adapter).merge_and_unload().state_dict()
    entries = {entry["name"]: entry for entry in report["tensors"]}
    assert len(entries) == 4 and all(".q_proj." in n or ".v_proj." in n for n in entries)
    for name, entry in entries.items():
        delta = merged[name].double().numpy() - base[name].double().numpy()
        # peft merges in float32: its delta carries float32 rounding of the weight.
        assert entry["l2"] == pytest.approx(np.linalg.norm(delta), rel=1e-5), name
        assert entry["max_abs"] == pytest.approx(np.abs(delta).max(), rel=1e-4), name


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"rank_pattern": {"q_proj": 8}},
                                     {"alpha_pattern": {"v_proj": 2}}])
def test_adapter_variants_without_one_scale_are_refused(variant, llada_dir, tmp_path):
    """DoRA and per-module ranks or alphas do not merge as one scale x B @ A:
    `mdu diff` says so (exit 1, one line) instead of reporting a wrong delta."""
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(_load(llada_dir), config).save_pretrained(adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, **variant}))
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    result = CliRunner().invoke(cli, ["diff", str(llada_dir), str(adapter)])
    assert result.exit_code == 1, result.output
    assert f"{next(iter(variant))} is set, and mdu diff measures plain LoRA only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_every_lora_option_reaches_the_adapter(llada_dir, forget_file, tmp_path):
    """--lora-r, --lora-alpha, --lora-dropout and --lora-targets, read back from
    the saved adapter (peft's own config file and the tensors it wrote): only
    the named layers carry A and B, of rank r."""
    from safetensors import safe_open

    out = tmp_path / "adapter"
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
                                      "--out", str(out), "--lora", "--lora-r", "2", "--lora-alpha", "3",
                                      "--lora-dropout", "0.25", "--lora-targets", "q_proj,v_proj", "--save-adapter",
                                      "--max-steps", "1", "--lr", "1e-2"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 3, 0.25)
    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in names}
    layers = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert layers == {"q_proj", "v_proj"}, layers
    assert len(names) == 2 * 2 * 2, "A and B of two layers in each of two blocks"
    assert all(shape[0] == 2 for name, shape in shapes.items() if ".lora_A" in name)
    assert all(shape[1] == 2 for name, shape in shapes.items() if ".lora_B" in name)
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["config"]["lora_targets"] == "q_proj,v_proj" and record["config"]["lora_dropout"] == 0.25


def test_lora_targets_naming_no_layer_are_refused_before_loading(llada_dir, forget_file, tmp_path,
                                                                 no_weight_loads):  # noqa: F811
    from test_hostile_inputs import snapshot

    before = snapshot(forget_file, llada_dir)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "o"), "--lora", "--lora-targets", "q_proj,nope"])
    assert result.exit_code == 1, result.output
    assert "--lora-targets nope: no such layer inside the blocks of this model; it has" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(forget_file, llada_dir) == before and not (tmp_path / "o").exists()
