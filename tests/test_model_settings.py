"""``model.name`` + ``model.args``: any family's arguments from YAML, validated by the family,
with one-line errors naming ``model.args.<key>`` (exit code 2 from the CLI, before Ray starts)."""

from __future__ import annotations

import sys

import pytest
import torch

import vit_model
from pipelines.architecture import arch_from_dict, arch_to_dict, check_model_settings, model_arch
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.errors import ConfigError
from pipelines.tune import param_space


def test_any_family_argument_reaches_the_model():
    """Fields the old fixed schema could not set (reg_tokens, qk_norm, init_values, pos_embed)."""
    cfg = load_config(None, ["model.name=vit_tiny_patch4", "model.args.reg_tokens=2", "model.args.qk_norm=true",
                             "model.args.init_values=1e-5", "model.args.pos_embed=sincos", "model.args.depth=2"])
    check_model_settings(cfg)
    arch = model_arch(cfg, num_classes=10, channels=1, image_hw=(28, 28))
    assert (arch.reg_tokens, arch.qk_norm, arch.init_values, arch.pos_embed, arch.depth) == (2, True, 1e-5, "sincos", 2)
    assert (arch.img_size, arch.in_chans, arch.num_classes) == (28, 1, 10)  # from the dataset
    assert isinstance(arch.init_values, float)  # "1e-5" read by YAML 1.1 as a string, made a number


def test_img_size_from_args_wins_over_the_dataset_and_non_square_sizes_pass_through():
    cfg = load_config(None, ["model.args.img_size=32"])
    assert model_arch(cfg, 10, 1, (28, 28)).img_size == 32
    assert model_arch(load_config(None, []), 10, 3, (28, 32)).img_size == (28, 32)


@pytest.mark.parametrize("overrides,message", [
    (["model.args.dept=3"], r"^model.args.dept is not an argument of vit_tiny_patch4 \(vit family\); valid arguments: "
                            r"attn_drop_rate, class_token, depth, "),
    (["model.args.in_chans=3"], r"^model.args.in_chans is set from the dataset \(data.channels\); remove it$"),
    (["model.args.num_classes=3"], r"^model.args.num_classes is set from the dataset"),
    (["model.args.drop_path_rate=1.0"], r"^vit_tiny_patch4 cannot be built with these settings \(model.args.drop_path_rate\): "
                                        r"drop_path_rate must be in \[0, 1\), got 1.0$"),
    (["model.args.depth=six"], r"\(model.args.depth\): depth='six' has the wrong type for a vit model; expected int$"),
    (["model.args.patch_size=5"], r"\(model.args.patch_size\): img_size 28 is not divisible by patch_size 5"),
    (["model.name=vit_gigantic_patch4"], r"^model.name='vit_gigantic_patch4' is not a known model: names look like vit: "),
])
def test_bad_model_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_model_settings(load_config(None, overrides))


def test_moved_keys_are_refused_with_their_new_name():
    with pytest.raises(ConfigError, match=r"^model.embed_dim moved to model.args.embed_dim"):
        load_config(None, ["model.embed_dim=64"])


def test_cli_refuses_a_bad_model_argument_before_ray_starts(capsys):
    ray_loaded = "ray" in sys.modules
    code = main(["train", "--set", "model.args.num_head=4"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: model.args.num_head is not an argument of vit_tiny_patch4 (vit family)")
    assert ray_loaded or "ray" not in sys.modules


def test_tune_space_keys_are_checked_against_the_family():
    base = ["tune.space={'train.lr': {loguniform: [1e-4, 1e-3]}, 'model.args.dpth': {choice: [2, 4]}}"]
    with pytest.raises(ConfigError, match=r"^tune.space key 'model.args.dpth' is not usable: model.args.dpth is not an "
                                          r"argument of vit_tiny_patch4"):
        param_space(load_config(None, base))
    ok = param_space(load_config(None, ["tune.space={'model.args.depth': {choice: [2, 4]}}"]))
    assert list(ok) == ["model.args.depth"]


@pytest.mark.parametrize("name", sorted({names[0] for names in (
    vit_model.available_models(family) for family in vit_model.FAMILIES) if names}))
def test_every_family_builds_from_a_pipeline_config_and_round_trips(name):
    """One name per registered family: the worker's JSON architecture rebuilds the same model."""
    cfg = load_config(None, [f"model.name={name}"])
    arch = model_arch(cfg, num_classes=10, channels=1, image_hw=None)
    doc = arch_to_dict(arch)
    assert doc["family"] == arch.family and arch_from_dict(doc) == arch
    torch.manual_seed(0)
    model = vit_model.build_model(arch)
    assert type(model) is vit_model.get_family(arch.family).model_cls and model.cfg.num_classes == 10


MODEL_CHOICE = ("tune.space={model: {choice: ["
                "{name: vit_tiny_patch7, args: {embed_dim: 16, depth: 1, num_heads: 2}}, "
                "{name: cct_7_3x1_28, args: {embed_dim: 32, depth: 1, num_heads: 2}}, "
                "{name: vit_tiny_patch7, args: {embed_dim: 32, depth: 1, num_heads: 2}}]}, "
                "'train.lr': {loguniform: [1e-4, 1e-3]}}")


def test_tune_space_model_choice_samples_labels_and_expands_to_whole_sections():
    from ray.tune.search.sample import Categorical

    from pipelines.tune import overrides_of

    cfg = load_config(None, [MODEL_CHOICE])
    space = param_space(cfg)
    assert isinstance(space["model"], Categorical)
    assert space["model"].categories == ["vit_tiny_patch7#0", "cct_7_3x1_28", "vit_tiny_patch7#2"]
    overrides = overrides_of({"train.lr": 3e-4, "model": "cct_7_3x1_28"}, cfg.tune.space)
    assert overrides[0].startswith("model=") and overrides[1] == "train.lr=0.0003"
    trial = load_config(None, [MODEL_CHOICE, *overrides])
    assert trial.model.name == "cct_7_3x1_28" and trial.model.args == {"embed_dim": 32, "depth": 1, "num_heads": 2}
    assert trial.train.lr == 3e-4
    second = load_config(None, [MODEL_CHOICE, *overrides_of({"model": "vit_tiny_patch7#2"}, cfg.tune.space)])
    assert (second.model.name, second.model.args["embed_dim"]) == ("vit_tiny_patch7", 32)


@pytest.mark.parametrize("space, message", [
    ("tune.space={model: {choice: [{name: vit_tiny_patch7}, {name: cct_7_3x1_28, args: {dpth: 2}}]}}",
     r"^tune.space key 'model' is not usable: model.args.dpth is not an argument of cct_7_3x1_28 \(hybrid family\)"),
    ("tune.space={model: {choice: [{name: vit_tiny_patch7}, {name: no_such_model}]}}",
     r"^tune.space key 'model' is not usable: .*no_such_model"),
    ("tune.space={model: {choice: [vit_tiny_patch7]}}",
     r"^tune.space key 'model' is not usable: 'vit_tiny_patch7' is not a model section; give \{name: MODEL"),
    ("tune.space={model: {uniform: [0, 1]}}", r"^tune.space.model.uniform: a whole model is picked with choice or grid"),
])
def test_tune_space_model_choice_refuses_what_no_trial_could_build(space, message):
    with pytest.raises(ConfigError, match=message):
        param_space(load_config(None, [space]))


def test_tune_space_model_choice_labels_name_trials_and_are_not_model_keys():
    from pipelines.tune import overrides_of

    space = ("tune.space={model: {grid: [{label: small, name: vit_tiny_patch7, args: {embed_dim: 16, depth: 1, num_heads: 2}}, "
             "{label: cct, name: cct_7_3x1_28, args: {embed_dim: 32, depth: 1, num_heads: 2}}]}}")
    cfg = load_config(None, [space])
    assert param_space(cfg)["model"] == {"grid_search": ["small", "cct"]}
    trial = load_config(None, [space, *overrides_of({"model": "small"}, cfg.tune.space)])
    assert (trial.model.name, trial.model.args) == ("vit_tiny_patch7", {"embed_dim": 16, "depth": 1, "num_heads": 2})
