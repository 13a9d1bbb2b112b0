"""Logit parity with the reference implementations for the same weights (float32, <= 1e-5).

timm's VisionTransformer loads our state dict as the identity; Hugging Face transformers and
torchvision checkpoints go through vit_model's converters.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.models.vision_transformer as tv_vit  # a core dependency
import transformers  # a declared test dependency (pyproject [test]): missing is an error, not a skip
from timm.models.vision_transformer import VisionTransformer as TimmViT  # likewise

from vit_model import VisionTransformer, ViTConfig, from_pretrained
from vit_model.convert import hf_to_timm, torchvision_to_timm

TOL = 1e-5

TIMM_CASES = {
    "class-token": dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4),
    "avg-pool-no-cls": dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4,
                            class_token=False, global_pool="avg"),
    "avg-pool-with-cls": dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=2, num_heads=4, global_pool="avg"),
    "registers": dict(img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4, reg_tokens=4),
    "registers-no-embed-class-layerscale-qknorm": dict(
        img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4, reg_tokens=4,
        no_embed_class=True, init_values=0.1, qk_norm=True),
    "fashion-mnist-1ch-28-p4": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=3),
    "vit-small-16-224": dict(img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12, num_heads=6),
}


def _pair(kw: dict) -> tuple[VisionTransformer, torch.nn.Module]:
    torch.manual_seed(0)
    ours = VisionTransformer(ViTConfig(**kw)).eval()
    ref = TimmViT(**kw).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, ref


def _randomise(model: torch.nn.Module) -> None:
    """Give every parameter non-trivial values (norm weights, biases, head) so parity is tested
    on all of them, not just on timm's init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = p.ndim == 1 and name.endswith("weight")  # LayerNorm gains stay near 1
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_identity_parity(name):
    kw = TIMM_CASES[name]
    ours, ref = _pair(kw)
    _randomise(ours)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, kw.get("in_chans", 3), *(kw["img_size"],) * 2)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
        feat_diff = (ours.forward_features(x) - ref.forward_features(x)).abs().max().item()
    assert diff <= TOL, diff
    assert feat_diff <= TOL, feat_diff


@pytest.mark.parametrize("size", [(32, 48), (48, 24), (24, 24)])
def test_timm_dynamic_size_parity_non_square(size):
    kw = dict(img_size=(32, 32), patch_size=8, num_classes=5, embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    ours = VisionTransformer(ViTConfig(**kw)).eval()
    _randomise(ours)
    ref = TimmViT(**kw, dynamic_img_size=True).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= TOL, diff


def test_timm_forward_intermediates_parity():
    kw = TIMM_CASES["registers"]
    ours, ref = _pair(kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f1, i1 = ours.forward_intermediates(x, indices=2, norm=True)
        f2, i2 = ref.forward_intermediates(x, indices=2, norm=True)
        p1 = ours.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        p2 = ref.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    assert (f1 - f2).abs().max() <= TOL
    assert len(i1) == len(i2) == 2
    for a, b in zip(i1, i2):
        assert a.shape == b.shape == (2, 64, 4, 4)
        assert (a - b).abs().max() <= TOL
    for (s1, pre1), (s2, pre2) in zip(p1, p2):
        assert s1.shape == s2.shape and pre1.shape == pre2.shape == (2, 5, 64)
        assert (s1 - s2).abs().max() <= TOL and (pre1 - pre2).abs().max() <= TOL


# ---------------------------------------------------------------------- Hugging Face transformers


def _hf_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                image_size=32, patch_size=8, num_channels=3, num_labels=6, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return transformers.ViTConfig(**base)


def test_hf_classification_converter_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(_hf_config()).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors, as users have them
    ours = from_pretrained(tmp_path).eval()
    assert ours.cfg.norm_eps == hf.config.layer_norm_eps
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
    assert diff <= TOL, diff


def test_hf_vitmodel_converter_parity_features():
    torch.manual_seed(0)
    hf = transformers.ViTModel(_hf_config(), add_pooling_layer=True).eval()
    _randomise(hf)
    sd = hf_to_timm(hf.state_dict())
    assert not any(k.startswith("pooler") for k in sd)
    from vit_model.convert import hf_config_to_vit

    cfg = hf_config_to_vit(hf.config.to_dict()).replace(num_classes=0)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours.forward_features(x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
    assert diff <= TOL, diff


# ---------------------------------------------------------------------- torchvision


def test_torchvision_small_converter_parity(tmp_path):
    torch.manual_seed(0)
    tv = tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=64,
                                  mlp_dim=256, num_classes=9).eval()
    _randomise(tv)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)  # the format torchvision users have: a pickled state dict
    ours = from_pretrained(path, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - tv(x)).abs().max().item()
    assert diff <= TOL, diff


def test_torchvision_vit_b_16_converter_parity():
    torch.manual_seed(0)
    tv = tv_vit.vit_b_16().eval()  # random weights, the real ViT-B/16 architecture
    sd = torchvision_to_timm(tv.state_dict())
    ours = VisionTransformer(ViTConfig()).eval()  # defaults are ViT-B/16 at 224, 1000 classes
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - tv(x)).abs().max().item()
    assert diff <= TOL, diff
