"""Behaviour of vit_model beyond reference parity: attention paths, checkpointing, shapes, errors."""

from __future__ import annotations

import pytest
import torch

from vit_model import (
    VisionTransformer,
    ViTConfig,
    config_from_name,
    create_model,
    resample_pos_embed,
    sincos_pos_embed_2d,
)
from vit_model.surgery import adapt_input_conv

SMALL = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=3, num_heads=4)


def _model(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{**SMALL, **kw}))


def test_fused_and_eager_attention_agree_forward_and_backward():
    fused = _model().eval()
    eager = VisionTransformer(fused.cfg.replace(fused_attn=False)).eval()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(3, 3, 32, 32)
    out_f, out_e = fused(x), eager(x)
    assert (out_f - out_e).abs().max() <= 1e-5
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    for (n, pf), (_, pe) in zip(fused.named_parameters(), eager.named_parameters()):
        assert torch.allclose(pf.grad, pe.grad, atol=1e-5, rtol=1e-4), n


def test_bf16_attention_on_the_cpu_runs_the_float32_kernel():
    # under bf16 autocast the shared attention() gives exactly float32 SDPA on the bf16 inputs
    # (rounded to bf16 once at the end), with and without a float mask, and gradients reach q/k/v
    from vit_model.layers import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.randn(2, 3, 7, 7).bfloat16()
    for kw in ({}, {"attn_mask": mask}, {"scale": 0.5}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(q, k, v, **kw)
        ref_kw = {key: val.float() if torch.is_tensor(val) else val for key, val in kw.items()}
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **ref_kw)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    x = torch.randn(2, 3, 7, 8)  # float32 inputs: F.scaled_dot_product_attention itself
    assert torch.equal(attention(x, x, x), torch.nn.functional.scaled_dot_product_attention(x, x, x))


@pytest.mark.parametrize("kw", [{}, dict(reg_tokens=2, drop_path_rate=0.2, init_values=0.1)])
def test_gradient_checkpointing_keeps_outputs_and_gradients(kw):
    model = _model(**kw).train()  # train mode: dropout/drop-path RNG must replay identically
    x = torch.randn(2, 3, 32, 32)
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


def test_attention_maps_rows_sum_to_one_and_logits_unchanged():
    model = _model(reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    logits, maps = model(x, return_attention=True)
    assert torch.equal(logits, plain) or (logits - plain).abs().max() <= 1e-6
    tokens = 1 + 2 + 16
    assert len(maps) == 3
    for attn in maps:
        assert attn.shape == (2, 4, tokens, tokens)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, tokens), atol=1e-6)
        assert (attn >= 0).all()
    # the fused path stays the default for later calls
    assert all(b.attn.fused for b in model.blocks)


def test_resample_pos_embed_same_grid_is_identity_and_new_grid_shape():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), (4, 4), num_prefix_tokens=1) is pe
    out = resample_pos_embed(pe, (6, 3), (4, 4), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 18, 8)
    assert torch.equal(out[:, :1], pe[:, :1])  # the class token's embedding is kept
    # a constant field stays constant under resampling
    const = torch.ones(1, 16, 8) * 0.5
    assert torch.allclose(resample_pos_embed(const, (8, 8), (4, 4), num_prefix_tokens=0), torch.full((1, 64, 8), 0.5), atol=1e-6)


def test_sincos_embeddings_are_fixed_and_exact_at_other_sizes():
    model = _model(pos_embed="sincos").eval()
    assert not model.pos_embed.requires_grad
    ref = sincos_pos_embed_2d(64, (4, 4), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.data, ref)
    assert torch.equal(ref[0, 0], torch.zeros(64))
    # at a 6x6 grid the model uses the exact 6x6 table, whose top-left 4x4 block equals the 4x4 table
    big = sincos_pos_embed_2d(64, (6, 6), num_prefix_tokens=1)[0, 1:].reshape(6, 6, 64)
    assert torch.allclose(big[:4, :4].reshape(16, 64), ref[0, 1:], atol=1e-6)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_any_input_size_and_channels():
    model = _model(in_chans=1, img_size=28, patch_size=4).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert model(torch.randn(2, 1, 36, 20)).shape == (2, 5)  # non-square, resampled embeddings
    five = _model(in_chans=5).eval()
    assert five(torch.randn(1, 5, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 32, 32), r"expected 3 input channels, got shape \(2, 1, 32, 32\)"),
        ((2, 3, 4, 32), r"input of shape \(2, 3, 4, 32\) is smaller than one 8x8 patch"),
        ((2, 3, 30, 32), r"input of shape \(2, 3, 30, 32\): height 30 and width 32 must be divisible by patch size 8"),
        ((3, 32, 32), r"expected images of shape \(B, 3, H, W\), got shape \(3, 32, 32\)"),
    ],
)
def test_bad_inputs_raise_errors_naming_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        _model()(torch.randn(*shape))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(img_size=30), r"img_size 30 is not divisible by patch_size 8"),
        (dict(embed_dim=66), r"embed_dim 66 is not divisible by num_heads 4"),
        (dict(class_token=False), r"global_pool='token' needs class_token=True"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
        (dict(global_pool="max"), r"global_pool must be one of"),
    ],
)
def test_invalid_configs_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{**SMALL, **kw})


def test_size_table_and_names():
    cfg = config_from_name("vit_small_patch16", num_classes=10)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_classes) == (384, 12, 6, 16, 10)
    assert config_from_name("B/32").patch_size == 32
    assert config_from_name("vit_base_patch16_384").img_size == 384
    assert config_from_name("vit_tiny_patch4", img_size=28, in_chans=1).grid_size == (7, 7)
    with pytest.raises(ValueError, match=r"unknown model name 'vit_giant_patch16'"):
        config_from_name("vit_giant_patch16")
    m = create_model("vit_tiny_patch4", img_size=28, in_chans=1, num_classes=10, depth=2)
    assert m.cfg.embed_dim == 192 and len(m.blocks) == 2


def test_model_contract_methods():
    model = _model(reg_tokens=1)
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 1 + 16, 64)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.cfg.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_drop_path_is_active_only_in_training():
    model = _model(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)


def test_adapt_input_conv_rgb_to_grey_matches_grey_rgb_response():
    w = torch.randn(8, 3, 4, 4)
    grey = torch.rand(1, 1, 4, 4)
    out_grey = torch.nn.functional.conv2d(grey, adapt_input_conv(w, 1))
    out_rgb = torch.nn.functional.conv2d(grey.expand(1, 3, 4, 4), w)
    assert torch.allclose(out_grey, out_rgb, atol=1e-6)
    assert adapt_input_conv(w, 3) is w
    assert adapt_input_conv(w, 4).shape == (8, 4, 4, 4)


def test_flops_per_image_matches_torch_flop_counter():
    """Our closed-form count against PyTorch's own counter on the eager path (2 x multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vit_model import flops_per_image

    cfg = ViTConfig(img_size=(28, 32), patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3,
                    num_heads=3, reg_tokens=2, fused_attn=False)
    model = VisionTransformer(cfg).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(2, 1, 28, 32))
    assert flops_per_image(model) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
    assert flops_per_image(cfg, (56, 64)) > 4 * flops_per_image(cfg)  # attention grows faster than tokens


def test_registry_dispatch_and_format_1_files(tmp_path):
    """A bare family name gives its defaults; a config.json written before families existed
    (format 1, no ``family``) still loads as a plain ViT."""
    import json

    from vit_model import arch_from_dict, arch_to_dict, config_from_name, create_model, from_pretrained

    assert config_from_name("vit", num_classes=3) == ViTConfig(num_classes=3)
    with pytest.raises(ValueError, match=r"^unknown model family 'cnn'; known families: \["):
        arch_from_dict({"family": "cnn", "config": {}})
    model = create_model("vit_tiny_patch4", img_size=28, in_chans=1, num_classes=10, depth=2).eval()
    assert arch_from_dict(arch_to_dict(model.cfg)) == model.cfg
    model.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["family"] == "vit" and doc["format_version"] == 2
    del doc["family"]
    doc["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(doc))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path).eval()(x), model(x))
