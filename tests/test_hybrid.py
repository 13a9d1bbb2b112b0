"""The hybrid family (conv-stem ViT and CCT): parity with timm and vit-pytorch, names, weights
round trips and adaptation, any input size, attention maps, checkpointing, FLOPs, config errors."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from timm.layers import HybridEmbed  # the reference implementations are required test dependencies
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer_hybrid import ConvStem
from torch.utils.flop_counter import FlopCounterMode
from vit_pytorch.cct import CCT, Tokenizer, TransformerClassifier

from vit_model import (
    available_models,
    config_from_name,
    create_model,
    flops_per_image,
    from_pretrained,
    to_preferred_memory_format,
)
from vit_model.hybrid import HybridConfig, HybridViT, convert_cct_state_dict, sine_pos_embed, stem_plan
from vit_model.layers import has_overlapping_convs
from vit_model.surgery import resample_pos_embed

TOL = 1e-5
TINY_CONV = dict(stem="conv", img_size=32, stem_channels=(8, 16), stem_strides=(2, 2), embed_dim=32, depth=2,
                 num_heads=4, mlp_ratio=2.0, num_classes=5)
TINY_CCT = dict(stem="cct", img_size=32, stem_channels=(8,), stem_strides=(1, 1), embed_dim=32, depth=2,
                num_heads=4, mlp_ratio=2.0, num_classes=5)


def _model(base: dict, **kw) -> HybridViT:
    torch.manual_seed(0)
    return HybridViT(HybridConfig(**{**base, **kw}))


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial values for every parameter and BatchNorm statistic, so parity covers them all."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            fixed = isinstance(t, torch.nn.Parameter) and not t.requires_grad
            if fixed or not t.is_floating_point():
                continue  # fixed sine tables stay what they are; BatchNorm's batch counter
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var") or (t.ndim == 1 and name.endswith("weight")):
                t.copy_(1.0 + 0.1 * noise)  # variances positive, norm gains near 1
            else:
                t.copy_(0.05 * noise if t.ndim > 1 or "bias" in name or "mean" in name else noise)


# ------------------------------------------------------------------------------ timm parity (conv stem)


def _timm_for(cfg: HybridConfig, **kw) -> TimmViT:
    """timm's ViT with ConvStem (k×k conv-BN-ReLU per stem width, then a 1×1 conv with bias) in HybridEmbed."""
    n = len(cfg.stem_channels)
    backbone = ConvStem(in_chans=cfg.in_chans, depth=n + 1, channels=cfg.stem_channels + (cfg.embed_dim,),
                        kernel_size=(cfg.stem_kernel,) * n + (1,), stride=cfg.stem_strides + (1,), padding="")
    return TimmViT(img_size=cfg.img_size, patch_size=1, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                   qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, global_pool=cfg.global_pool,
                   embed_layer=partial(HybridEmbed, backbone=backbone, proj=False), **kw)


TIMM_CASES = {
    "grey-28": (dict(TINY_CONV, img_size=28, in_chans=1, num_classes=10), None),
    "strides-2-1-2-avg-no-cls": (dict(TINY_CONV, stem_channels=(8, 8, 16), stem_strides=(2, 1, 2), class_token=False,
                                      global_pool="avg"), None),
    "kernel-5-avg-with-cls": (dict(TINY_CONV, stem_kernel=5, global_pool="avg"), None),
    "vit_tiny_convstem-224": ({}, "vit_tiny_convstem"),  # the full-size named config
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_conv_stem_matches_timm_with_our_state_dict_loaded_strictly(case):
    kw, name = TIMM_CASES[case]
    torch.manual_seed(0)
    ours = create_model(name) if name else HybridViT(HybridConfig(**kw))
    ours.eval()
    _randomise(ours)
    ref = _timm_for(ours.cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical keys and shapes
    h, w = ours.cfg.img_hw
    x = torch.randn(2, ours.cfg.in_chans, h, w)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("size", [(48, 40), (24, 24)])
def test_conv_stem_other_input_sizes_match_timm_dynamic_img_size(size):
    ours = _model(TINY_CONV).eval()
    _randomise(ours)
    ref = _timm_for(ours.cfg, dynamic_img_size=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------ vit-pytorch parity (CCT)


def _reference_cct(cfg: HybridConfig) -> torch.nn.Module:
    """vit-pytorch's CCT for ``cfg``; its Tokenizer + TransformerClassifier where its CCT class
    cannot express ``cfg`` (that class always max-pools and always has 64 hidden channels)."""
    (first,) = {(s.kernel, s.stride, s.padding) for s in stem_plan(cfg)}
    k, s, p = first
    common = dict(embedding_dim=cfg.embed_dim, num_layers=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                  num_classes=cfg.num_classes, positional_embedding={"learn": "learnable"}.get(cfg.pos_embed, cfg.pos_embed))
    hidden = set(cfg.stem_channels) or {64}
    assert len(hidden) == 1
    pool = dict(pooling_kernel_size=cfg.stem_pool_kernel, pooling_stride=cfg.stem_pool_stride,
                pooling_padding=cfg.stem_pool_padding)
    if cfg.stem_pool_kernel and hidden == {64}:
        return CCT(img_size=cfg.img_size, n_input_channels=cfg.in_chans, n_conv_layers=len(cfg.stem_strides),
                   kernel_size=k, stride=s, padding=p, **pool, **common)
    tokenizer = Tokenizer(kernel_size=k, stride=s, padding=p, n_conv_layers=len(cfg.stem_strides),
                          n_input_channels=cfg.in_chans, n_output_channels=cfg.embed_dim, in_planes=hidden.pop(),
                          activation=torch.nn.ReLU, max_pool=cfg.stem_pool_kernel > 0, **pool)
    n = tokenizer.sequence_length(cfg.in_chans, *cfg.img_hw)
    return torch.nn.Sequential(tokenizer, TransformerClassifier(sequence_length=n, seq_pool=True, **common))


def _prefixed(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys of the CCT class: nn.Sequential(tokenizer, classifier)'s "0." / "1." renamed."""
    names = {"0": "tokenizer", "1": "classifier"} if isinstance(ref, torch.nn.Sequential) else {}
    out = {}
    for key, value in ref.state_dict().items():
        head, _, rest = key.partition(".")
        out[f"{names[head]}.{rest}" if head in names else key] = value
    return out


CCT_CASES = {
    "cct_7_3x1_32-learnable": ({}, "cct_7_3x1_32"),
    "cct_7_3x1_28-grey": ({}, "cct_7_3x1_28"),
    "sine-two-convs": (dict(TINY_CCT, pos_embed="sine", stem_channels=(64,)), None),  # vit-pytorch's CCT class
    "no-pos-embed": (dict(TINY_CCT, pos_embed="none"), None),
    "7x2-kernel-7-stride-2": (dict(TINY_CCT, img_size=64, stem_kernel=7, stem_strides=(2, 2), stem_channels=(16,)), None),
    "no-max-pool": (dict(TINY_CCT, stem_pool_kernel=0, img_size=16), None),
}


@pytest.mark.parametrize("case", list(CCT_CASES))
def test_cct_matches_vit_pytorch_through_the_key_mapping(case):
    kw, name = CCT_CASES[case]
    torch.manual_seed(0)
    ours = (create_model(name) if name else HybridViT(HybridConfig(**kw))).eval()
    ref = _reference_cct(ours.cfg).eval()
    _randomise(ref)
    sd = convert_cct_state_dict(_prefixed(ref))
    if ours.cfg.pos_embed == "sine":  # our own table is the reference's, bit for bit
        assert torch.equal(ours.pos_embed, sd["pos_embed"])
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, ours.cfg.in_chans, *ours.cfg.img_hw)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL


def test_cct_converter_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unexpected key 'classifier.extra.weight' in a CCT state dict"):
        convert_cct_state_dict({"classifier.extra.weight": torch.zeros(1)})


def test_cct_block_is_the_references_layer():
    """Block(norm_layout='cct') alone against vit-pytorch's TransformerEncoderLayer."""
    from vit_pytorch.cct import TransformerEncoderLayer

    from vit_model.layers import Block

    torch.manual_seed(0)
    ref = TransformerEncoderLayer(32, 4, dim_feedforward=64).eval()
    _randomise(ref)
    ours = Block(32, 4, mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5, norm_layout="cct").eval()
    sd = convert_cct_state_dict({f"classifier.blocks.0.{k}": v for k, v in ref.state_dict().items()})
    ours.load_state_dict({k.removeprefix("blocks.0."): v for k, v in sd.items()}, strict=True)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------ names


def test_named_sizes():
    cfg = config_from_name("cct_14_7x2_224")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.num_classes) == (384, 14, 6, 3.0, 1000)
    assert (cfg.stem_kernel, cfg.stem_strides, cfg.stem_channels, cfg.grid_size) == (7, (2, 2), (64,), (14, 14))
    assert (cfg.class_token, cfg.global_pool, cfg.qkv_bias, cfg.norm_layout, cfg.norm_eps) == (False, "seq", False, "cct", 1e-5)
    cfg = config_from_name("cct_2_3x2_32")
    assert (cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.grid_size, cfg.num_classes) == (128, 2, 1.0, (8, 8), 10)
    assert config_from_name("cct_7_3x1_32").grid_size == (16, 16)
    assert config_from_name("cct_7_3x1_32_sine").pos_embed == "sine"
    grey = config_from_name("cct_7_3x1_28")
    assert (grey.in_chans, grey.img_size, grey.grid_size) == (1, 28, (14, 14))
    base = config_from_name("vit_base_convstem")
    assert (base.stem_channels, base.stem_strides, base.grid_size) == ((64, 128, 128, 256, 256, 512), (2, 2, 1, 2, 1, 2), (14, 14))
    assert (base.embed_dim, base.depth, base.class_token, base.global_pool, base.norm_eps) == (768, 11, True, "token", 1e-6)
    vt28 = config_from_name("vit_tiny_convstem_28")
    assert (vt28.in_chans, vt28.grid_size, vt28.embed_dim) == (1, (7, 7), 192)
    assert config_from_name("hybrid") == config_from_name("vit_tiny_convstem")  # bare family = ViTC-1GF defaults
    assert config_from_name("vit_tiny_patch16").family == "vit"  # the plain ViT keeps its names
    assert set(available_models("hybrid")) >= {"cct_7_3x1_32", "cct_7_7x2_224_sine", "vit_small_convstem", "cct_7_3x1_28"}
    with pytest.raises(ValueError, match=r"unknown model name 'cct_9_3x1_32'"):
        config_from_name("cct_9_3x1_32")


def test_create_model_with_overrides_and_explicit_fields_survive_json():
    m = create_model("cct_7_3x1_32", num_classes=3, depth=2, img_size=48)
    assert len(m.blocks) == 2 and m.cfg.grid_size == (24, 24) and m(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    cfg = HybridConfig(stem="cct", stem_channels=[16], stem_strides=[1, 1])  # lists accepted, stored as tuples
    assert cfg.stem_channels == (16,) and HybridConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["global_pool"] == "seq" and cfg.to_dict()["qkv_bias"] is False  # style defaults stored


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("base", [TINY_CONV, dict(TINY_CCT, pos_embed="sine")], ids=["conv", "cct-sine"])
def test_save_and_from_pretrained_round_trip(tmp_path, base):
    model = _model(base).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridViT) and loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert '"family": "hybrid"' in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_channels_last_layout_trains_like_nchw_and_saves_plain_weights(tmp_path, base):
    """to_preferred_memory_format turns conv stems channels-last: the same logits and gradients as
    the NCHW model (to float rounding), and weights saved from it load into an NCHW model exactly."""
    ref = _model(base).train()
    _randomise(ref)
    fast = to_preferred_memory_format(copy.deepcopy(ref))
    assert fast.patch_embed.backbone[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.patch_embed.backbone[0].conv.weight.is_contiguous()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for m in (ref, fast):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    fast.eval().save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.patch_embed.backbone[0].conv.weight.is_contiguous()
    plain = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)  # same layout: bit-equal outputs
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


def test_only_overlapping_convolutions_switch_layout():
    assert has_overlapping_convs(_model(TINY_CONV)) and has_overlapping_convs(_model(TINY_CCT))
    for name in ("vit_tiny_patch4", "swin_nano_patch2_window7_28", "t2t_vit_7_28"):
        model = create_model(name, img_size=28, in_chans=1, num_classes=10)
        assert not has_overlapping_convs(model), name
        weights = [p for p in to_preferred_memory_format(model).parameters() if p.ndim == 4]
        assert all(p.is_contiguous() for p in weights), name


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_from_pretrained_adapts_channels_and_classes(tmp_path, base):
    model = _model(base).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    grey = from_pretrained(tmp_path, in_chans=1).eval()
    w = model.state_dict()[HybridViT.first_conv]
    assert torch.equal(grey.state_dict()[HybridViT.first_conv], w.sum(dim=1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # summed kernels: a grey image gives the RGB model's answer on the grey RGB image
        assert (grey(x) - model(x.expand(-1, 3, -1, -1))).abs().max().item() <= TOL
    other = from_pretrained(tmp_path, num_classes=7)
    assert other.head.weight.shape == (7, 32)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in kept.items())


@pytest.mark.parametrize("pos", ["learn", "sine"])
@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_from_pretrained_adapts_img_size(tmp_path, base, pos):
    model = _model(base, pos_embed=pos).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    big = from_pretrained(tmp_path, img_size=48).eval()
    assert big.cfg.grid_size != model.cfg.grid_size
    if pos == "learn":
        want = resample_pos_embed(model.pos_embed.data, big.cfg.grid_size, model.cfg.grid_size, model.cfg.num_prefix_tokens)
        assert torch.equal(big.pos_embed.data, want)
    else:
        n = big.cfg.grid_size[0] * big.cfg.grid_size[1] + big.cfg.num_prefix_tokens
        assert torch.equal(big.pos_embed.data, sine_pos_embed(n, 32))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # the adapted model equals the original run at 48x48 (it resamples the same way)
        assert (big(x) - model(x)).abs().max().item() <= TOL


def test_structural_change_is_refused(tmp_path):
    _model(TINY_CCT).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot adapt weights: global_pool differs \(seq vs avg\)"):
        from_pretrained(tmp_path, global_pool="avg")
    with pytest.raises(ValueError, match=r"cannot adapt weights: stem_pool_kernel differs \(3 vs 0\)"):
        from_pretrained(tmp_path, stem_pool_kernel=0)  # same image size, another token grid


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_any_input_size_and_channel_count(base):
    model = _model(base).eval()
    for hw in [(32, 32), (33, 47), (64, 20), (9, 9)]:
        assert model(torch.randn(2, 3, *hw)).shape == (2, 5), hw
    five = _model(base, in_chans=5, img_size=(20, 36)).eval()
    assert five(torch.randn(1, 5, 20, 36)).shape == (1, 5)


@pytest.mark.parametrize(
    "base, shape, message",
    [
        (TINY_CONV, (2, 1, 32, 32), r"expected 3 input channels, got shape \(2, 1, 32, 32\); convert the images or adapt the model with in_chans=1"),
        (TINY_CONV, (3, 32, 32), r"expected images of shape \(B, 3, H, W\), got shape \(3, 32, 32\)"),
        (dict(TINY_CONV, stem_padding=0), (2, 3, 6, 32), r"input of shape \(2, 3, 6, 32\) is too small for the conv stem; use at least 7x7 pixels"),
    ],
)
def test_bad_inputs_raise_errors_naming_shapes(base, shape, message):
    with pytest.raises(ValueError, match=message):
        _model(base)(torch.randn(*shape))


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_attention_maps_sum_to_one_and_eager_equals_fused(base):
    fused = _model(base).eval()
    _randomise(fused)
    eager = HybridViT(fused.cfg.replace(fused_attn=False)).eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, maps = fused(x, return_attention=True)
        assert (logits - fused(x)).abs().max().item() <= 1e-6
        assert (eager(x) - fused(x)).abs().max().item() <= TOL
    t = fused.cfg.grid_size[0] * fused.cfg.grid_size[1] + fused.cfg.num_prefix_tokens
    assert len(maps) == 2
    for attn in maps:
        assert attn.shape == (2, 4, t, t) and (attn >= 0).all()
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, t), atol=1e-6)


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_gradient_checkpointing_keeps_outputs_and_gradients(base):
    model = _model(base, drop_path_rate=0.2).train()  # drop-path RNG must replay identically
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    out = model(x)
    out.square().sum().backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("base", [TINY_CONV, TINY_CCT], ids=["conv", "cct"])
def test_forward_intermediates_grid_layout(base):
    model = _model(base).eval()
    x = torch.randn(2, 3, 40, 24)
    gh, gw = model.patch_embed(x).shape[1:3]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        assert [t.shape for t in inter] == [(2, 32, gh, gw)] * 2
        (last,) = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True, output_fmt="NLC")
    n_prefix = model.cfg.num_prefix_tokens
    assert torch.allclose(last, final[:, n_prefix:], atol=1e-6)


@pytest.mark.parametrize(
    "base, kw, img_hw",
    [
        (TINY_CONV, {}, None),
        (TINY_CONV, dict(global_pool="seq", stem_kernel=5), (40, 24)),
        (TINY_CCT, {}, None),
        (TINY_CCT, dict(stem_kernel=7, stem_strides=(2, 2), class_token=True, global_pool="token"), (64, 48)),
        ({}, {}, None),  # vit_tiny_convstem (the bare family's defaults) at 224
    ],
)
def test_flops_match_flop_counter(base, kw, img_hw):
    model = _model(base, fused_attn=False, **kw).eval()
    hw = img_hw or model.cfg.img_hw
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *hw))
    ours = flops_per_image(model, hw)
    assert abs(ours - counter.get_total_flops()) <= 0.01 * counter.get_total_flops()


def test_reset_classifier_moves_the_final_norm_and_adds_sequence_pooling():
    model = _model(TINY_CONV).eval()
    _randomise(model)
    gain = model.norm.weight.clone()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(3, global_pool="avg")
    assert torch.equal(model.fc_norm.weight, gain) and isinstance(model.norm, torch.nn.Identity)
    assert model(x).shape == (2, 3) and model.cfg.global_pool == "avg"
    model.reset_classifier(0, global_pool="seq")
    assert torch.equal(model.norm.weight, gain) and model.seq_pool is not None
    assert model(x).shape == (2, 32) and model.cfg.num_classes == 0
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(stem="vit"), r"stem must be one of \('conv', 'cct'\), got 'vit'"),
        (dict(stem_strides=(2, 2, 2)), r"stem_channels \(8, 16\) must list 3 width\(s\) for stem='conv'"),
        (dict(stem="cct", stem_channels=(8,), stem_strides=(1,)), r"stem_channels \(8,\) must list 0 width\(s\) for stem='cct'"),
        (dict(stem_strides=(2, 0)), r"stem_strides must all be >= 1, got \(2, 0\)"),
        (dict(stem_channels=(8, "x")), r"stem_channels must be a tuple of ints, got \(8, 'x'\)"),
        (dict(stem_pool_kernel=3, stem_pool_padding=2), r"stem_pool_padding must be in \[0, stem_pool_kernel // 2 = 1\], got 2"),
        (dict(img_size=2, stem_padding=0), r"img_size 2 is too small for the stem: it leaves a 0x0 token grid; use at least 7 pixels per side"),
        (dict(embed_dim=30), r"embed_dim 30 is not divisible by num_heads 4"),
        (dict(class_token=False, global_pool="token"), r"global_pool='token' needs class_token=True"),
        (dict(global_pool="max"), r"global_pool must be one of \('token', 'avg', 'seq'\), got 'max'"),
        (dict(pos_embed="sincos"), r"pos_embed must be one of \('learn', 'sine', 'none'\), got 'sincos'"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_configs_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig(**{**TINY_CONV, **kw})
