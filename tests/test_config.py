"""Config system: presets load, overrides apply, and every failure mode names file, key and expectation."""

import glob
import json
import os

import pytest

from lct_fast.parallel import deepspeed_config
from lct_fast.config import (CONFIG_DIR, Config, ConfigError, _base_path, config_to_dict, load_config,
                             parse_overrides, save_config)

PRESETS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.json"), recursive=True))


def write(tmp_path, obj, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


@pytest.mark.parametrize("path", PRESETS)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.name == os.path.splitext(os.path.basename(path))[0]
    assert cfg.train.total_steps == cfg.train.total_samples // cfg.train.global_batch


def test_overrides_dotted_and_typed():
    cfg = load_config("tiny", ["optim.lr=2e-4", "deepspeed.zero_optimization.stage=3", "model.norm=layernorm",
                               "train.ema.decays=[0.9, 0.99]", "method.ict.distance=l2", "data.resample=false"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.model.norm == "layernorm"
    assert cfg.train.ema.decays == [0.9, 0.99]
    assert cfg.method.ict.distance == "l2"
    assert cfg.data.resample is False


def test_override_creates_new_deepspeed_sections():
    cfg = load_config("tiny", ["deepspeed.activation_checkpointing.partition_activations=true"])
    assert cfg.deepspeed["activation_checkpointing"] == {"partition_activations": True}


@pytest.mark.parametrize("obj, key, expected", [
    ({"model": {"widht": 3}}, "model.widht", "expected one of"),
    ({"modle": {}}, "modle", "expected one of"),
    ({"model": {"width": "64"}}, "model.width", "expected an integer"),
    ({"model": {"width": 64.5}}, "model.width", "expected an integer"),
    ({"model": {"checkpointing": 1}}, "model.checkpointing", "expected true/false"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number"),
    ({"optim": {"lr": -1}}, "optim.lr", "positive"),
    ({"optim": {"betas": [0.9]}}, "optim.betas", "two values"),
    ({"model": {"arch": "vit"}}, "model.arch", "expected one of ['dit', 'unet']"),
    ({"model": {"channel_mult": "1,2"}}, "model.channel_mult", "expected a list"),
    ({"model": {"channel_mult": [1, "x"]}}, "model.channel_mult[1]", "expected an integer"),
    ({"method": {"ict": {"distance": "huber"}}}, "method.ict.distance", "expected one of"),
    ({"method": {"sct": {"t_mid": 2.0}}}, "method.sct.t_mid", "(0, pi/2)"),
    ({"train": {"global_batch": 30, "micro_batch": 4}}, "train.global_batch", "not a multiple"),
    ({"train": {"total_samples": 3}}, "train.total_samples", ">= global_batch"),
    ({"deepspeed": []}, "deepspeed", "expected an object"),
    ({"model": {"size": "custom", "width": 64}}, "model.size", "custom"),
    ({"model": {"width": 64, "heads": 3}}, "model.width", "divisible"),
    ({"method": {"name": "sct"}}, "model.adaptive_weight", "adaptive_weight"),
])
def test_errors_name_file_key_and_expectation(tmp_path, obj, key, expected):
    path = write(tmp_path, obj)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and key in msg and expected in msg, msg


def test_invalid_json_and_missing_file(tmp_path):
    path = write(tmp_path, '{"model": {,}}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.json"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("tiny", ["optim.lr.x=1"])


def test_batch_arithmetic():
    cfg = load_config("xxl")
    assert cfg.train.batch_layout(256) == (8, 1)
    assert cfg.train.batch_layout(64) == (8, 4)
    with pytest.raises(ConfigError, match="not divisible by world size 48"):
        cfg.train.batch_layout(48)
    cfg = load_config("tiny", ["train.micro_batch=4", "train.grad_accum=2"])
    assert cfg.train.batch_layout(4) == (4, 2)
    with pytest.raises(ConfigError, match="global_batch=32 != micro_batch=4 \\* grad_accum=2 \\* world_size=2"):
        cfg.train.batch_layout(2)


def test_deepspeed_block_derived_and_conflicts_caught():
    cfg = load_config("tiny", ["train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    assert "train_batch_size" not in cfg.deepspeed  # the stored block is not mutated
    cfg = load_config("tiny", ["deepspeed.train_batch_size=64"])
    with pytest.raises(ConfigError, match="deepspeed.train_batch_size: 64 disagrees"):
        deepspeed_config(cfg, 1)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["optim.lr=3e-4"])
    out = tmp_path / "config.json"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, Config) and again.optim.lr == 3e-4
    # what the trainer derived (the precision plan) is written beside the settings and ignored on load
    save_config(cfg, str(out), derived={"precision_plan": {"jvp": "tf32"}})
    assert json.loads(out.read_text())["derived"] == {"precision_plan": {"jvp": "tf32"}}
    assert config_to_dict(load_config(str(out))) == config_to_dict(cfg)


def test_ablation_presets_follow_table_2a():
    """Table 2a: iLCT -> +Cauchy -> +Diff -> +OT -> +scaled c -> +NsLN, one switch per row."""
    rows = [load_config(os.path.join(CONFIG_DIR, "ablation", f"{n}.json"))
            for n in ("a_ilct", "b_cauchy", "c_diff", "d_ot", "e_scaled_c", "f_nsln")]
    state = [(r.method.ict.distance, r.method.ict.diffusion_weight > 0, r.method.ot.method, r.method.ict.c_mode,
              r.model.norm) for r in rows]
    assert state == [("pseudo_huber", False, "none", "fixed", "groupnorm"),
                     ("cauchy", False, "none", "fixed", "groupnorm"),
                     ("cauchy", True, "none", "fixed", "groupnorm"),
                     ("cauchy", True, "exact", "fixed", "groupnorm"),
                     ("cauchy", True, "exact", "adaptive", "groupnorm"),
                     ("cauchy", True, "exact", "adaptive", "nsln")]


def test_bf16_weights_need_bf16_precision():
    assert deepspeed_config(load_config("tiny", ["train.precision=bf16"]), 1)["bf16"]["enabled"] is False
    cfg = load_config("tiny", ["train.precision=bf16", "deepspeed.bf16.enabled=true"])
    assert deepspeed_config(cfg, 1)["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="deepspeed.bf16.enabled: true needs train.precision=bf16"):
        deepspeed_config(load_config("tiny", ["deepspeed.bf16.enabled=true"]), 1)


def test_extends_chain_deep_merges(tmp_path):
    write(tmp_path, {"model": {"width": 64, "depth": 2, "heads": 2, "size": "custom"},
                     "train": {"ema": {"decays": [0.9, 0.99], "power_stds": [0.05]}}, "notes": ["base"]}, "a.json")
    write(tmp_path, {"extends": "a", "model": {"depth": 3}, "train": {"ema": {"decays": [0.5]}}}, "b.json")
    leaf = write(tmp_path, {"extends": "b.json", "model": {"heads": 4}, "optim": {"lr": 3e-4}}, "c.json")
    cfg = load_config(leaf, ["model.depth=5", "optim.betas=[0.8, 0.9]"])
    assert (cfg.model.size, cfg.model.width, cfg.model.heads) == ("custom", 64, 4)  # nested keys merge
    assert cfg.model.depth == 5 and cfg.optim.betas == [0.8, 0.9]  # --set applies after the merge
    assert cfg.optim.lr == 3e-4
    assert cfg.train.ema.decays == [0.5] and cfg.train.ema.power_stds == [0.05]  # lists replace, siblings stay
    assert cfg.notes == ["base"]
    assert cfg.name == "c"  # the leaf's stem, not a base's
    assert load_config(leaf, ["notes=[\"mine\"]"]).notes == ["mine"]


def test_extends_does_not_inherit_name_and_errors_name_the_leaf(tmp_path):
    write(tmp_path, {"name": "base_run", "optim": {"lr": -1}}, "base.json")
    leaf = write(tmp_path, {"extends": "base", "train": {"seed": 1}}, "leaf.json")
    with pytest.raises(ConfigError) as e:
        load_config(leaf)
    assert leaf in str(e.value) and "optim.lr" in str(e.value)
    assert load_config(leaf, ["optim.lr=1e-4"]).name == "leaf"


def test_extends_relative_to_the_file_then_configs(tmp_path):
    sub = tmp_path / "ablation"
    sub.mkdir()
    write(tmp_path, {"model": {"width": 96, "heads": 2}}, "root.json")
    write(sub, {"extends": "../root", "model": {"depth": 3}}, "one.json")
    cfg = load_config(write(sub, {"extends": "one"}, "two.json"))  # a sibling, found beside the file
    assert (cfg.model.width, cfg.model.depth, cfg.name) == (96, 3, "two")
    # Not beside the file: a shipped preset in configs/.
    cfg = load_config(write(sub, {"extends": "tiny", "optim": {"lr": 5e-4}}, "mine.json"))
    assert cfg.optim.lr == 5e-4 and config_to_dict(cfg) == {**config_to_dict(load_config("tiny", ["optim.lr=5e-4"])),
                                                             "name": "mine"}


def test_extends_cycle_is_an_error_naming_the_chain(tmp_path):
    a = write(tmp_path, {"extends": "b"}, "a.json")
    b = write(tmp_path, {"extends": "a"}, "b.json")
    with pytest.raises(ConfigError, match="extends cycle") as e:
        load_config(a)
    assert f"{a} -> {b} -> {a}" in str(e.value)
    with pytest.raises(ConfigError, match="extends cycle"):
        load_config(write(tmp_path, {"extends": "self"}, "self.json"))


def test_extends_missing_base_names_file_and_name(tmp_path):
    leaf = write(tmp_path, {"extends": "no_such_base"}, "leaf.json")
    with pytest.raises(ConfigError) as e:
        load_config(leaf)
    assert leaf in str(e.value) and "'no_such_base'" in str(e.value) and "no such preset" in str(e.value)
    with pytest.raises(ConfigError, match="extends: expected a preset name"):
        load_config(write(tmp_path, {"extends": ["tiny"]}, "bad.json"))


def test_notes_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, {"extends": "tiny", "notes": ["lr 1e-3: the paper's 1e-4 is slow on CPU"]}))
    # A list replaces the parent's list under the deep merge: the child's notes are its own.
    assert load_config("tiny").notes and cfg.notes == ["lr 1e-3: the paper's 1e-4 is slow on CPU"]
    out = tmp_path / "config.json"
    save_config(cfg, str(out))
    assert json.loads(out.read_text())["notes"] == cfg.notes
    assert config_to_dict(load_config(str(out))) == config_to_dict(cfg)
    with pytest.raises(ConfigError, match="notes\\[0\\]: expected a string"):
        load_config(write(tmp_path, {"notes": [1]}, "bad.json"))


@pytest.mark.parametrize("path", [p for p in PRESETS if "extends" in json.load(open(p, encoding="utf-8"))])
def test_every_extending_preset_changes_something(path):
    """No shipped preset is a pointless copy of its base."""
    with open(path, encoding="utf-8") as f:
        base = _base_path(json.load(f)["extends"], path)
    mine, theirs = config_to_dict(load_config(path)), config_to_dict(load_config(base))
    mine.pop("name"), theirs.pop("name")
    assert mine != theirs, f"{path} resolves to the same config as its base {base}"
