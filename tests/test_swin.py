"""Swin Transformer family: parity with timm's SwinTransformer, the model contract, weights I/O.

timm loads our state dict with strict=True (and we load timm's), so the keys are the same; logits
and per-stage features agree within 1e-5 in float32, at img_size and at other input sizes (where
timm needs ``strict_img_size=False`` to accept them).
"""

from __future__ import annotations

import json

import pytest
import timm  # a declared test dependency: missing is an error, not a skip
import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin  # likewise
from torch.utils.flop_counter import FlopCounterMode

from vit_model import available_models, config_from_name, create_model, flops_per_image, from_pretrained
from vit_model.swin import (
    SwinConfig,
    SwinTransformer,
    match_name,
    resample_rel_pos_table,
    shifted_window_mask,
    swin_flops,
)

TOL = 1e-5

# 1-channel 28x28 (patch 2, window 7): stages 14 -> 7 -> 4, shifted windows in stage 0 only
FMNIST = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depths=(2, 2, 2),
              num_heads=(2, 4, 8), window_size=7)
CASES = {
    "fmnist-1ch-28-p2-w7": FMNIST,
    # 14x10 tokens with window 4: windows padded to 16x12 (after the roll); 7x5 merged with padding
    "non-square-odd-padded": dict(img_size=(28, 20), patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2, 2),
                                  num_heads=(2, 2, 4), window_size=4),
    # non-square window, 4 stages down to 3x2, no pooling (logits per position), odd merges
    "rect-window-no-pool": dict(img_size=(36, 20), patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
                                num_heads=(2, 2, 4, 4), window_size=(5, 3), global_pool=""),
    # full windows and shifts even where the stage is smaller than the window; explicit head_dim
    "always-partition-head-dim": dict(img_size=32, patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2),
                                      num_heads=(2, 2), window_size=5, always_partition=True, head_dim=8),
    # tall and narrow: stages 10x3 and 5x2 are shifted along the height only (windows padded to 12x3, 8x2)
    "one-dim-shift": dict(img_size=(20, 6), patch_size=2, num_classes=3, embed_dim=8, depths=(2, 2), num_heads=(2, 2),
                          window_size=4),
    "headless-qkv-no-bias": dict(img_size=24, patch_size=3, num_classes=0, embed_dim=12, depths=(1, 3),
                                 num_heads=(3, 3), window_size=3, qkv_bias=False, mlp_ratio=2.0),
}


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial values for every parameter (norm gains near 1), so parity covers all of them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.05 * noise)


def _pair(kw: dict, fused: bool = False, **timm_kw) -> tuple[SwinTransformer, torch.nn.Module]:
    torch.manual_seed(0)
    ours = SwinTransformer(SwinConfig(**kw, fused_attn=fused)).eval()
    _randomise(ours)
    ref = TimmSwin(**kw, **timm_kw).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(SwinConfig(**{**FMNIST, **kw}))


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(CASES))
def test_timm_parity_logits_features_and_strict_keys_both_ways(name):
    kw = CASES[name]
    ours, ref = _pair(kw)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    fused = SwinTransformer(ours.cfg.replace(fused_attn=True)).eval()
    fused.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, kw.get("in_chans", 3), *ours.cfg.img_hw)
    with torch.no_grad():
        expected = ref(x)
        assert (ours(x) - expected).abs().max() <= TOL
        assert (fused(x) - expected).abs().max() <= TOL
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max() <= TOL
    if kw.get("global_pool") == "":
        assert expected.shape == (2, 3, 2, 5)  # (B, h, w, classes)


def test_swin_tiny_224_matches_timm_named_model():
    ours = create_model("swin_tiny_patch4_window7_224", fused_attn=False).eval()
    _randomise(ours)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert ours.num_params == sum(p.numel() for p in ref.parameters()) == 28_288_354
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= TOL


@pytest.mark.parametrize("size", [(28, 28), (32, 24), (20, 36), (14, 14), (6, 10), (56, 56)])
def test_other_input_sizes_match_timm_dynamic_size(size):
    """Windows and shifts stay those of img_size; the mask is built for the actual resolution."""
    ours, ref = _pair(CASES["non-square-odd-padded"], strict_img_size=False)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= TOL


@pytest.mark.parametrize("kwargs", [
    {}, dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[1], stop_early=True),
    dict(indices=1, norm=True, intermediates_only=True),
])
def test_forward_intermediates_match_timm(kwargs):
    ours, ref = _pair(CASES["non-square-odd-padded"])
    x = torch.randn(2, 3, 28, 20)
    with torch.no_grad():
        got, expected = ours.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        (got_final, got), (exp_final, expected) = got, expected
        assert got_final.shape == exp_final.shape and (got_final - exp_final).abs().max() <= TOL
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and (a - b).abs().max() <= TOL


def test_forward_intermediates_shapes_and_nhwc():
    model = _tiny().eval()
    x = torch.randn(2, 1, 28, 28)
    nchw = model.forward_intermediates(x, intermediates_only=True)
    assert [t.shape for t in nchw] == [(2, 32, 14, 14), (2, 64, 7, 7), (2, 128, 4, 4)]
    nhwc = model.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    assert all(torch.equal(a, b.permute(0, 3, 1, 2)) for a, b in zip(nchw, nhwc))
    with pytest.raises(ValueError, match=r"output_fmt must be 'NCHW' or 'NHWC', got 'NLC'"):
        model.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(ValueError, match=r"indices \[3\] out of range for depth 3"):
        model.forward_intermediates(x, indices=[3])


# ------------------------------------------------------------------------------- windows


def test_window_and_shift_per_stage_follow_timm():
    """A stage no larger than the window uses one window of its size and no shift."""
    cfg = SwinConfig(**FMNIST)
    assert cfg.stage_resolutions() == [(14, 14), (7, 7), (4, 4)]
    assert cfg.stage_windows() == [((7, 7), (3, 3)), ((7, 7), (0, 0)), ((4, 4), (0, 0))]
    ref = TimmSwin(**FMNIST)
    assert [(s.blocks[1].window_size, s.blocks[1].shift_size) for s in ref.layers] == cfg.stage_windows()
    tiny = config_from_name("swin_tiny_patch4_window7_224")
    assert [s for _, s in tiny.stage_windows()] == [(3, 3), (3, 3), (3, 3), (0, 0)]
    odd = SwinConfig(**CASES["rect-window-no-pool"])
    assert odd.stage_resolutions() == [(18, 10), (9, 5), (5, 3), (3, 2)]
    assert odd.stage_windows() == [((5, 3), (2, 1)), ((5, 3), (2, 1)), ((5, 3), (0, 0)), ((3, 2), (0, 0))]
    one_dim = SwinConfig(**CASES["one-dim-shift"])
    assert one_dim.stage_windows() == [((4, 3), (2, 0)), ((4, 2), (2, 0))]
    for kw in CASES.values():  # blocks[1] is each stage's first shifted block
        if min(kw["depths"]) < 2:
            continue
        ref = TimmSwin(**kw)
        assert [(s.blocks[1].window_size, s.blocks[-1].shift_size) for s in ref.layers] == SwinConfig(**kw).stage_windows()


def test_shifted_window_mask_separates_wrapped_regions():
    mask = shifted_window_mask((4, 4), (2, 2), (1, 1))  # 4 windows of 4 tokens
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped tokens
    # bottom-right window: tokens (2,2), (2,3), (3,2), (3,3) come from 4 different regions
    assert torch.equal(mask[3], torch.full((4, 4), -100.0).fill_diagonal_(0.0))


def test_attention_maps_are_probabilities_masked_across_regions():
    model = _tiny().eval()
    _randomise(model)
    x = torch.randn(2, 1, 28, 28)
    plain = model(x)
    logits, maps = model(x, return_attention=True)
    assert (logits - plain).abs().max() <= TOL  # eager for this call vs the fused default
    assert [tuple(m.shape) for m in maps] == [(8, 2, 49, 49)] * 2 + [(2, 4, 49, 49)] * 2 + [(2, 8, 16, 16)] * 2
    for attn in maps:
        assert (attn >= 0).all() and torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-6)
    # the shifted block: no probability between tokens the roll brought together
    mask = shifted_window_mask((14, 14), (7, 7), (3, 3)).repeat(2, 1, 1)  # (B * nW, N, N)
    assert maps[1][mask.unsqueeze(1).expand_as(maps[1]) < 0].max() < 1e-30
    assert all(b.attn.fused for s in model.layers for b in s.blocks)


def test_fused_and_eager_attention_agree_forward_and_backward():
    fused = _tiny(drop_path_rate=0.0).eval()
    eager = SwinTransformer(fused.cfg.replace(fused_attn=False)).eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(3, 1, 28, 28)
    out_f, out_e = fused(x), eager(x)
    assert (out_f - out_e).abs().max() <= TOL
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    for (n, pf), (_, pe) in zip(fused.named_parameters(), eager.named_parameters()):
        assert torch.allclose(pf.grad, pe.grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("kw", [dict(drop_path_rate=0.0), dict(drop_path_rate=0.3, proj_drop_rate=0.1)])
def test_gradient_checkpointing_keeps_outputs_and_gradients(kw):
    model = _tiny(**kw).train()  # train mode: dropout / drop-path RNG must replay identically
    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(5)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    out = model(x)
    out.sum().backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5), n


def test_drop_path_is_active_only_in_training():
    model = _tiny(drop_path_rate=0.5)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 28, 28), r"expected 1 input channels, got shape \(2, 3, 28, 28\)"),
    ((2, 1, 27, 28), r"height 27 and width 28 must be divisible by patch size 2"),
    ((2, 1, 1, 28), r"smaller than one 2x2 patch"),
])
def test_bad_inputs_raise_errors_naming_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(torch.randn(*shape))


# ------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("name, img_hw", [
    ("fmnist-1ch-28-p2-w7", None), ("fmnist-1ch-28-p2-w7", (40, 24)), ("non-square-odd-padded", None),
    ("rect-window-no-pool", None), ("always-partition-head-dim", (20, 28)), ("headless-qkv-no-bias", None),
])
def test_flops_match_flop_counter(name, img_hw):
    cfg = SwinConfig(**CASES[name], fused_attn=False)
    model = SwinTransformer(cfg).eval()
    x = torch.randn(1, cfg.in_chans, *(img_hw or cfg.img_hw))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counted = counter.get_total_flops()
    assert abs(swin_flops(cfg, img_hw) - counted) <= 0.01 * counted
    assert flops_per_image(model, img_hw) == swin_flops(cfg, img_hw)


def test_swin_tiny_flops_are_the_papers():
    assert swin_flops(config_from_name("swin_tiny_patch4_window7_224")) / 2e9 == pytest.approx(4.49, abs=0.01)  # GMACs


# ---------------------------------------------------------------------- config and names


@pytest.mark.parametrize("kw, message", [
    (dict(num_heads=(2, 4)), r"num_heads \(2, 4\) needs one entry per stage like depths \(2, 2, 2\)"),
    (dict(num_heads=(3, 4, 8)), r"num_heads \(3, 4, 8\) must divide the stage widths \[32, 64, 128\]"),
    (dict(depths=(2, 0, 2)), r"depths must all be >= 1, got \(2, 0, 2\)"),
    (dict(depths=()), r"depths must be a non-empty sequence of ints"),
    (dict(img_size=27), r"img_size 27 must be a multiple of patch_size 2"),
    (dict(window_size=0), r"window_size must be >= 1, got 0"),
    (dict(window_size=(7, 7, 7)), r"window_size must be an int or \(height, width\)"),
    (dict(global_pool="token"), r"global_pool must be one of \('avg', ''\), got 'token'"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
    (dict(head_dim=0), r"head_dim must be None or >= 1, got 0"),
    (dict(mlp_ratio=0), r"mlp_ratio must be > 0"),
    (dict(num_classes=-1), r"num_classes must be >= 0"),
])
def test_invalid_configs_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        SwinConfig(**{**FMNIST, **kw})


def test_config_json_round_trip_and_unknown_argument():
    cfg = SwinConfig(**CASES["rect-window-no-pool"])
    doc = json.loads(json.dumps(cfg.to_dict()))
    assert doc["depths"] == [2, 2, 2, 2] and doc["window_size"] == [5, 3]
    assert SwinConfig.from_dict(doc) == cfg
    assert SwinConfig(**{**FMNIST, "depths": [2, 2, 2]}).depths == (2, 2, 2)
    with pytest.raises(ValueError, match=r"unknown swin model argument\(s\) \['depth'\]"):
        SwinConfig.from_dict({"depth": 3})


def test_names_create_models_of_the_right_shape():
    assert set(available_models("swin")) >= {
        "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
        "swin_base_patch4_window12_384", "swin_micro_patch2_window7_28", "swin_nano_patch2_window7_28"}
    timm_names = [n for n in available_models("swin") if n in timm.list_models("swin_*")]
    assert len(timm_names) == 6
    for name in timm_names:  # timm's model of the same name has the same architecture (built on meta: no memory)
        with torch.device("meta"):
            ref = timm.create_model(name)
        cfg = SwinConfig(**match_name(name))
        assert (ref.embed_dim, tuple(len(s.blocks) for s in ref.layers), tuple(s.blocks[0].attn.num_heads for s in ref.layers),
                ref.layers[0].blocks[0].window_size, ref.patch_embed.patch_size[0], ref.patch_embed.img_size) == (
                cfg.embed_dim, cfg.depths, cfg.num_heads, (cfg.window_size,) * 2, cfg.patch_size, cfg.img_hw), name
    base384 = config_from_name("swin_base_patch4_window12_384")
    assert (base384.embed_dim, base384.depths, base384.num_heads, base384.window_size, base384.img_size) == (
        128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384)
    small = config_from_name("swin_small_patch4_window7_224")
    assert (small.embed_dim, small.depths, small.num_heads) == (96, (2, 2, 18, 2), (3, 6, 12, 24))
    assert config_from_name("swin") == SwinConfig() == config_from_name("swin_tiny_patch4_window7_224")
    micro = create_model("swin_micro_patch2_window7_28", in_chans=1, num_classes=10, drop_path_rate=0.0).eval()
    assert micro.cfg.family == "swin" and (micro.cfg.patch_size, micro.cfg.window_size, micro.cfg.img_size) == (2, 7, 28)
    assert micro(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert create_model("swin_nano_patch2_window7_28", in_chans=1, num_classes=10).num_params < micro.num_params
    with pytest.raises(ValueError, match=r"unknown model name 'swin_giant_patch4_window7_224'.*swin_<nano\|micro"):
        config_from_name("swin_giant_patch4_window7_224")
    with pytest.raises(ValueError, match=r"unknown swin model argument\(s\) \['depth'\]"):
        create_model("swin", depth=3)


def test_model_contract_methods():
    model = _tiny()
    assert model.no_weight_decay() == {f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"
                                       for i in range(3) for j in range(2)}
    assert model.get_classifier() is model.head.fc
    assert not any("relative_position_index" in k or "attn_mask" in k for k in model.state_dict())
    model.reset_classifier(3)
    assert model.cfg.num_classes == 3 and model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    model.reset_classifier(0, global_pool="")
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 4, 4, 128)
    assert model.forward_head(model.forward_features(torch.randn(1, 1, 28, 28)), pre_logits=True).shape == (1, 4, 4, 128)


# ---------------------------------------------------------------------------------- weights


def test_save_and_from_pretrained_round_trip_is_exact(tmp_path):
    model = _tiny().eval()
    _randomise(model)
    model.save_pretrained(tmp_path, meta={"class_names": list("abcdefghij")})
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "swin"
    loaded, meta = from_pretrained(tmp_path, return_meta=True)
    assert isinstance(loaded, SwinTransformer) and loaded.cfg == model.cfg and meta["class_names"][0] == "a"
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded.eval()(x))


def test_from_pretrained_adapts_classes_and_channels(tmp_path):
    src = _tiny(in_chans=3).eval()
    _randomise(src)
    src.save_pretrained(tmp_path)
    grey = from_pretrained(tmp_path, num_classes=4, in_chans=1).eval()
    assert (grey.cfg.num_classes, grey.cfg.in_chans) == (4, 1)
    sd, src_sd = grey.state_dict(), src.state_dict()
    assert sd["head.fc.weight"].shape == (4, 128)
    assert all(torch.equal(sd[k], src_sd[k]) for k in sd if not k.startswith(("head.", "patch_embed.proj.weight")))
    x = torch.randn(2, 1, 28, 28)  # a grey image through the summed conv == the RGB model on grey RGB
    with torch.no_grad():
        diff = (grey.forward_features(x) - src.forward_features(x.expand(-1, 3, -1, -1))).abs().max()
    assert diff <= TOL


def test_from_pretrained_adapts_img_size(tmp_path):
    """28 -> 56: stage 2 grows from 4x4 (window 4) to 7x7 (window 7); only its tables change."""
    src = _tiny().eval()
    _randomise(src)
    src.save_pretrained(tmp_path)
    big = from_pretrained(tmp_path, img_size=56).eval()
    assert big.cfg.stage_windows()[2] == ((7, 7), (0, 0))
    sd, src_sd = big.state_dict(), src.state_dict()
    for k, v in sd.items():
        if k.startswith("layers.2.blocks.") and k.endswith("relative_position_bias_table"):
            old = src_sd[k].T.reshape(8, 7, 7)  # (49, heads) -> (heads, 7, 7) offsets
            new = v.T.reshape(8, 13, 13)
            assert torch.allclose(new[:, 6, 6], old[:, 3, 3]) and torch.allclose(new[:, ::12, ::12], old[:, ::6, ::6])
        else:
            assert torch.equal(v, src_sd[k]), k
    assert big(torch.randn(1, 1, 56, 56)).shape == (1, 10)


def test_resample_rel_pos_table():
    table = torch.randn(13 * 13, 3)
    assert resample_rel_pos_table(table, (7, 7), 7) is table
    small = resample_rel_pos_table(table, (7, 7), (4, 3))
    assert small.shape == (7 * 5, 3)
    grid, out = table.T.reshape(3, 13, 13), small.T.reshape(3, 7, 5)
    assert torch.allclose(out[:, 3, 2], grid[:, 6, 6]) and torch.allclose(out[:, -1, -1], grid[:, -1, -1])
    with pytest.raises(ValueError, match=r"relative position table of shape \(169, 3\) does not fit window \(4, 4\)"):
        resample_rel_pos_table(table, (4, 4), (7, 7))
