"""T2T-ViT (vit_model.t2t): parity with vit-pytorch's T2TViT, the paper's parameter counts and
MACs, hand-computed token transformer and soft split, and the family contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from vit_pytorch.t2t import T2TViT as RefT2TViT  # a declared test dependency: missing is an error

from vit_model import available_models, config_from_name, create_model, flops_per_image, from_pretrained
from vit_model.t2t import (
    T2T_LAYERS_28,
    T2TConfig,
    T2TModule,
    T2TViT,
    TokenTransformer,
    config_from_vit_pytorch,
    convert_vit_pytorch,
    sinusoid_pos_embed_1d,
)

TOL = 1e-5
# tiny paper-layout model (token_dim reduction, v skip, sinusoid table) on 32x32 RGB: 32 -> 16 -> 8
TINY = dict(img_size=32, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, token_dim=16,
            t2t_layers=((3, 2, 1), (3, 2, 1)))


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values in every trainable parameter (norm gains near 1, the rest small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            is_norm_gain = p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".net.0." in name)
            p.copy_(1.0 + 0.1 * noise if is_norm_gain else 0.05 * noise)


def _tiny(**kw) -> T2TViT:
    torch.manual_seed(0)
    model = T2TViT(T2TConfig(**{**TINY, **kw}))
    _randomise(model)
    return model.eval()


# ------------------------------------------------------------------------ vit-pytorch parity

VIT_PYTORCH_CASES = {
    "fashion-mnist-28-grey": dict(image_size=28, num_classes=10, dim=64, depth=2, heads=4, dim_head=16, mlp_dim=128,
                                  channels=1, t2t_layers=((7, 2), (3, 2), (3, 1))),
    "rgb-224-default-splits": dict(image_size=224, num_classes=7, dim=48, depth=2, heads=3, dim_head=16, mlp_dim=96),
    "rgb-32-two-splits": dict(image_size=32, num_classes=3, dim=32, depth=3, heads=2, dim_head=16, mlp_dim=64,
                              t2t_layers=((3, 2), (3, 2))),
}


@pytest.mark.parametrize("name", list(VIT_PYTORCH_CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_vit_pytorch_parity(name, fused):
    kw = VIT_PYTORCH_CASES[name]
    torch.manual_seed(0)
    ref = RefT2TViT(**kw).eval()
    _randomise(ref)
    cfg = config_from_vit_pytorch(**kw, fused_attn=fused)
    assert (cfg.token_dim, cfg.token_layout, cfg.pos_embed, cfg.qkv_bias) == (None, "vit_pytorch", "learn", False)
    ours = T2TViT(cfg).eval()
    sd = convert_vit_pytorch(ref.state_dict(), cfg)
    assert len(sd) == len(ref.state_dict())
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, kw.get("channels", 3), kw["image_size"], kw["image_size"])
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dim_head=8), r"dim_head \* heads \(8 \* 4\) must equal dim 64"),
        (dict(heads=1, dim_head=64), r"heads=1 \(dim_head == dim\) has no attention output projection"),
        (dict(pool="mean"), r"pool='mean' .* is not reproduced"),
    ],
)
def test_vit_pytorch_layouts_we_do_not_reproduce_are_refused(kw, message):
    base = dict(image_size=28, num_classes=10, dim=64, depth=1, heads=4, dim_head=16, mlp_dim=128, channels=1)
    with pytest.raises(ValueError, match=message):
        config_from_vit_pytorch(**{**base, **kw})


# ------------------------------------------------------------------------ the paper's numbers

# T2T-ViT table (params, 224x224 RGB, 1000 classes) and the original README's MACs of the
# token-transformer models T2T-ViT_t-14/19/24.
PAPER_PARAMS_M = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
                  "t2t_vit_24": 64.1}
PAPER_MACS_G = {"t2t_vit_t_14": 6.1, "t2t_vit_t_19": 9.8, "t2t_vit_t_24": 15.0}


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_named_sizes_have_the_papers_parameter_counts(name):
    model = create_model(name)
    assert round(model.num_params / 1e6, 1) == PAPER_PARAMS_M[name]
    assert model.cfg.grid_size == (14, 14) and model.pos_embed.shape == (1, 197, model.cfg.embed_dim)


@pytest.mark.parametrize("name", list(PAPER_MACS_G))
def test_token_transformer_models_have_the_papers_macs(name):
    assert round(flops_per_image(config_from_name(name)) / 2e9, 1) == PAPER_MACS_G[name]
    assert config_from_name(name) == config_from_name(name.replace("_t_", "_"))  # same architecture here


def test_sinusoid_table_is_the_originals_formula():
    n, d = 7, 10
    table = sinusoid_pos_embed_1d(n, d)
    expected = [[(math.sin if j % 2 == 0 else math.cos)(pos / 10000 ** (2 * (j // 2) / d)) for j in range(d)]
                for pos in range(n)]
    assert torch.allclose(table[0], torch.tensor(expected), atol=1e-6)
    model = _tiny()
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed.data, sinusoid_pos_embed_1d(1 + 8 * 8, 32))


# ------------------------------------------------------------------------ hand-computed checks


def _token_transformer_by_hand(tt: TokenTransformer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The paper's token transformer, written out: y = v + proj(softmax(q k^T / sqrt(C_in / heads)) v),
    out = y + fc2(gelu(fc1(LN(y)))), per sample and per head."""
    B, N, C = x.shape
    d = tt.attn.qkv.weight.shape[0] // 3
    dh = d // heads
    Wq, Wk, Wv = tt.attn.qkv.weight.split(d)
    out = []
    for b in range(B):
        n1 = (x[b] - x[b].mean(-1, keepdim=True)) / torch.sqrt(x[b].var(-1, unbiased=False, keepdim=True) + 1e-5)
        n1 = n1 * tt.norm1.weight + tt.norm1.bias
        q, k, v = n1 @ Wq.T, n1 @ Wk.T, n1 @ Wv.T  # (N, d)
        mixed = []
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(C / heads)
            mixed.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        y = v + torch.cat(mixed, dim=1) @ tt.attn.proj.weight.T + tt.attn.proj.bias
        n2 = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
        n2 = n2 * tt.norm2.weight + tt.norm2.bias
        hidden = F.gelu(n2 @ tt.mlp.fc1.weight.T + tt.mlp.fc1.bias)
        out.append(y + hidden @ tt.mlp.fc2.weight.T + tt.mlp.fc2.bias)
    return torch.stack(out)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_token_transformer_equals_the_formula(heads, fused):
    torch.manual_seed(0)
    tt = TokenTransformer(in_dim=12, dim=6, num_heads=heads, mlp_ratio=1.0, layout="paper", norm_eps=1e-5,
                          fused_attn=fused).double()
    _randomise(tt)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        ours = tt(x)
        expected = _token_transformer_by_hand(tt, x, heads)
    assert ours.shape == (2, 5, 6)
    assert torch.allclose(ours, expected, atol=1e-10)


def _soft_split_by_hand(img: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """(C, H, W) -> (h*w, C*k*k): token (i, j) is the padded k×k neighbourhood at (i*s, j*s), channel-major."""
    C, H, W = img.shape
    padded = torch.zeros(C, H + 2 * p, W + 2 * p, dtype=img.dtype)
    padded[:, p:p + H, p:p + W] = img
    h, w = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    return torch.stack([padded[:, i * s:i * s + k, j * s:j * s + k].reshape(-1) for i in range(h) for j in range(w)])


def test_t2t_module_equals_soft_split_and_restructurization_by_hand():
    cfg = T2TConfig(img_size=(9, 7), in_chans=2, embed_dim=8, num_heads=2, depth=1, token_dim=4,
                    t2t_layers=((3, 2, 1), (3, 2, 1), (2, 1, 0)))
    torch.manual_seed(0)
    t2t = T2TModule(cfg).double().eval()
    _randomise(t2t)
    x = torch.randn(2, 2, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        tokens, grid = t2t(x)
        expected = []
        for img in x:
            hw = (9, 7)
            for i, (k, s, p) in enumerate(cfg.t2t_layers):
                t = _soft_split_by_hand(img, k, s, p)
                hw = ((hw[0] + 2 * p - k) // s + 1, (hw[1] + 2 * p - k) // s + 1)
                if i < 2:
                    t = t2t.token_transformers()[i](t[None])[0]  # checked against the formula above
                    img = t.T.reshape(-1, *hw)  # token (i, j) -> pixel (i, j) of a d-channel image
            expected.append(t @ t2t.project.weight.T + t2t.project.bias)
    assert grid == (2, 1) == cfg.grid_size and cfg.grids_for((9, 7)) == [(5, 4), (3, 2), (2, 1)]
    assert cfg.token_widths == [2 * 9, 4 * 9, 4 * 4]
    assert torch.allclose(tokens, torch.stack(expected), atol=1e-10)


def test_soft_split_grids_of_the_papers_and_our_28_layouts():
    assert config_from_name("t2t_vit_14").grids_for((224, 224)) == [(56, 56), (28, 28), (14, 14)]
    cfg = config_from_name("t2t_vit_7_28")
    assert (cfg.img_size, cfg.in_chans, cfg.t2t_layers) == (28, 1, T2T_LAYERS_28)
    assert cfg.grids_for((28, 28)) == [(14, 14), (7, 7), (7, 7)]
    assert cfg.token_widths == [49, 64 * 9, 64 * 9]


# ------------------------------------------------------------------------ names and configs


def test_names_and_overrides():
    assert available_models("t2t") == [
        "t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24",
        "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24",
        "t2t_vit_7_28", "t2t_vit_10_28", "t2t_vit_12_28", "t2t_vit_14_28", "t2t_vit_19_28", "t2t_vit_24_28"]
    cfg = config_from_name("t2t_vit_19")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.token_dim) == (448, 19, 7, 3.0, 64)
    assert config_from_name("t2t") == T2TConfig() == config_from_name("t2t_vit_14")
    m = create_model("t2t_vit_7_28", num_classes=10, depth=2, embed_dim=64, num_heads=2, token_dim=32)
    assert isinstance(m, T2TViT) and len(m.blocks) == 2 and m.cfg.token_dim == 32
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for bad in ("t2t_vit_8", "t2t_vit_t_7", "t2t_vit_t_14_28", "t2t_vit_14_32"):
        with pytest.raises(ValueError, match=rf"unknown model name '{bad}'"):
            config_from_name(bad)
    with pytest.raises(ValueError, match=r"unknown t2t model argument\(s\) \['patch_size'\]"):
        create_model("t2t_vit_7", patch_size=16)


def test_config_json_round_trip():
    cfg = T2TConfig(**{**TINY, "token_dim": None, "token_layout": "vit_pytorch", "pos_embed": "learn", "img_size": (32, 24)})
    doc = json.loads(json.dumps(cfg.to_dict()))
    assert doc["t2t_layers"] == [[3, 2, 1], [3, 2, 1]] and doc["token_dim"] is None
    assert T2TConfig.from_dict(doc) == cfg
    assert T2TConfig(t2t_layers=[[7, 4, 2], [3, 2, 1], [3, 2, 1]]) == T2TConfig()  # lists become tuples


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(t2t_layers=()), r"^t2t_layers must be a non-empty sequence of \(kernel, stride, padding\) integer triples, got \(\)$"),
        (dict(t2t_layers=((3, 2),)), r"^t2t_layers must be a non-empty sequence"),
        (dict(t2t_layers=((3, 0, 1),)), r"^t2t_layers \(\(3, 0, 1\),\): each .* stride >= 1"),
        (dict(t2t_layers=((3, 2, 3),)), r"^t2t_layers \(\(3, 2, 3\),\): each .* 0 <= padding < kernel$"),
        (dict(img_size=2, t2t_layers=((7, 4, 2),)), r"^img_size 2 is too small for t2t_layers \(\(7, 4, 2\),\)"),
        (dict(token_dim=0), r"^token_dim must be an integer >= 1 or None .*, got 0$"),
        (dict(token_heads=3), r"^token_heads 3 does not divide the token transformer width \[16\]"),
        (dict(token_layout="timm"), r"^token_layout must be one of \('paper', 'vit_pytorch'\), got 'timm'$"),
        (dict(token_layout="vit_pytorch"), r"^token_layout='vit_pytorch' needs token_dim=None and token_heads=1, got token_dim=16"),
        (dict(pos_embed="none"), r"^pos_embed must be one of \('sincos', 'learn'\), got 'none'$"),
        (dict(global_pool="max"), r"^global_pool must be one of \('token', 'avg'\), got 'max'$"),
        (dict(embed_dim=30), r"^embed_dim 30 is not divisible by num_heads 4$"),
        (dict(token_mlp_ratio=0), r"^token_mlp_ratio must be > 0, got 0$"),
        (dict(in_chans=0), r"^in_chans must be >= 1, got 0$"),
        (dict(drop_path_rate=1.0), r"^drop_path_rate must be in \[0, 1\), got 1.0$"),
        (dict(norm_eps=0.0), r"^norm_eps must be > 0, got 0.0$"),
    ],
)
def test_bad_config_values_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message) as info:
        T2TConfig(**{**TINY, **kw})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 32, 32), r"expected 3 input channels, got shape \(2, 1, 32, 32\)"),
        ((3, 32, 32), r"expected images of shape \(B, 3, H, W\), got shape \(3, 32, 32\)"),
    ],
)
def test_bad_inputs_raise_errors_naming_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(torch.randn(*shape))


def test_too_small_input_is_refused():
    model = _tiny(t2t_layers=((3, 2, 0), (3, 2, 0)))  # 32 -> 15 -> 7; 6 -> 2 -> 0
    assert model(torch.randn(1, 3, 7, 32)).shape == (1, 5)  # 7 -> 3 -> 1: one row of tokens
    with pytest.raises(ValueError, match=r"input of shape \(1, 3, 6, 32\) is too small for t2t_layers \(\(3, 2, 0\), \(3, 2, 0\)\)"):
        model(torch.randn(1, 3, 6, 32))


# ------------------------------------------------------------------------ model behaviour


@pytest.mark.parametrize("pos_embed", ["sincos", "learn"])
def test_any_input_size(pos_embed):
    model = _tiny(pos_embed=pos_embed)
    for size in [(32, 32), (40, 24), (17, 9)]:
        out, maps = model(torch.randn(2, 3, *size), return_attention=True)
        grid = model.cfg.grid_for(size)
        assert out.shape == (2, 5) and maps[0].shape[-1] == 1 + grid[0] * grid[1]
    # the learned table on another grid is the resampled one; at img_size it is the table itself
    if pos_embed == "learn":
        assert model._pos_embed_for((8, 8)) is model.pos_embed
        assert model._pos_embed_for((10, 6)).shape == (1, 61, 32)


def test_fused_and_eager_attention_agree_forward_and_backward():
    fused = _tiny().train()
    eager = T2TViT(fused.cfg.replace(fused_attn=False)).train()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_f, out_e = fused(x), eager(x)
    assert (out_f - out_e).abs().max() <= 1e-5
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    for (n, pf), (_, pe) in zip(fused.named_parameters(), eager.named_parameters()):
        if pf.requires_grad:
            assert torch.allclose(pf.grad, pe.grad, atol=1e-5, rtol=1e-4), n


def test_attention_maps_are_the_backbones_and_rows_sum_to_one():
    model = _tiny(token_heads=2)
    x = torch.randn(2, 3, 32, 32)
    logits, maps = model(x, return_attention=True)
    assert (logits - model(x)).abs().max() <= 1e-5
    assert len(maps) == 2  # backbone blocks only
    for attn in maps:
        assert attn.shape == (2, 4, 65, 65) and (attn >= 0).all()
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 65), atol=1e-5)
    token_maps = model.token_attention_maps(x)
    assert [m.shape for m in token_maps] == [(2, 2, 256, 256)]
    assert torch.allclose(token_maps[0].sum(-1), torch.ones(2, 2, 256), atol=1e-5)
    assert all(b.attn.fused for b in model.blocks)


@pytest.mark.parametrize("kw", [{}, dict(drop_path_rate=0.3, proj_drop_rate=0.1, pos_drop_rate=0.1, drop_rate=0.1)])
def test_gradient_checkpointing_keeps_outputs_and_gradients(kw):
    model = _tiny(**kw).train()  # train mode: dropout / drop-path RNG must replay identically
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    out = model(x)
    out.sum().backward()
    assert torch.equal(out, ref)
    for n, g in ref_grads.items():
        assert torch.allclose(model.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5), n


def test_forward_intermediates_and_head_contract():
    model = _tiny()
    x = torch.randn(2, 3, 40, 24)  # token grid (10, 6)
    final, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [(2, 32, 10, 6)] * 2
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert torch.allclose(last[0], final[:, 1:], atol=1e-6)
    (spatial, prefix), = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True,
                                                      return_prefix_tokens=True)
    assert spatial.shape == (2, 32, 10, 6) and prefix.shape == (2, 1, 32)
    assert model.forward_head(final, pre_logits=True).shape == (2, 32)
    avg = _tiny(global_pool="avg")
    assert torch.allclose(avg.forward_head(final, pre_logits=True), final[:, 1:].mean(1))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.cfg.num_classes == 3 and model.get_classifier().out_features == 3
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}


# ------------------------------------------------------------------------ weights


@pytest.mark.parametrize("kw", [{}, dict(pos_embed="learn", token_dim=None, token_layout="vit_pytorch")])
def test_from_pretrained_round_trip_is_exact(tmp_path, kw):
    model = _tiny(**kw)
    model.save_pretrained(tmp_path, meta={"note": "t2t"})
    loaded, meta = from_pretrained(tmp_path, return_meta=True)
    assert isinstance(loaded, T2TViT) and loaded.cfg == model.cfg and meta == {"note": "t2t"}
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "t2t"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_from_pretrained_adapts_classes_size_and_grey_channels(tmp_path):
    model = _tiny(pos_embed="learn")
    with torch.no_grad():  # channel-constant first LayerNorm: RGB -> grey adaptation is then exact
        norm1 = model.tokens_to_token.attention1.norm1
        norm1.weight.copy_(norm1.weight[:9].repeat(3))
        norm1.bias.copy_(norm1.bias[:9].repeat(3))
    model.save_pretrained(tmp_path)
    grey = from_pretrained(tmp_path, num_classes=3, in_chans=1).eval()
    assert grey.cfg.in_chans == 1 and grey.head.out_features == 3
    sd, src = grey.state_dict(), model.state_dict()
    qkv = "tokens_to_token.attention1.attn.qkv.weight"
    summed = src[qkv].reshape(-1, 3, 9).sum(1)  # the colour kernels summed; queries rescaled by sqrt(9 / 27)
    assert torch.allclose(sd[qkv], torch.cat([summed[:16] / math.sqrt(3), summed[16:]]), atol=1e-7)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a = grey.forward_features(x)
        b = model.forward_features(x.expand(2, 3, 32, 32))
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_from_pretrained_adapts_image_size(tmp_path, pos_embed):
    model = _tiny(pos_embed=pos_embed)
    model.save_pretrained(tmp_path)
    bigger = from_pretrained(tmp_path, img_size=48).eval()
    assert bigger.cfg.grid_size == (12, 12) and bigger.pos_embed.shape == (1, 1 + 12 * 12, 32)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # the adapted table is the one the source model uses at 48x48
        assert (bigger(x) - model(x)).abs().max() <= 1e-6


def test_in_chans_cannot_adapt_without_token_dim(tmp_path):
    _tiny(token_dim=None).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot adapt weights from in_chans=3 to 1: with token_dim=None"):
        from_pretrained(tmp_path, in_chans=1)


# ------------------------------------------------------------------------ FLOPs


def _counted_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "kw, size",
    [
        (dict(fused_attn=False), (32, 32)),
        (dict(fused_attn=False, token_heads=2, token_mlp_ratio=2.0), (40, 24)),
        (dict(fused_attn=False, token_dim=None, token_layout="vit_pytorch", pos_embed="learn"), (32, 32)),
        (dict(fused_attn=False, img_size=28, in_chans=1, t2t_layers=T2T_LAYERS_28), (28, 28)),
    ],
)
def test_flops_match_flop_counter(kw, size):
    model = _tiny(**kw)
    x = torch.randn(1, model.cfg.in_chans, *size)
    counted = _counted_flops(model, x)
    assert abs(flops_per_image(model, size) - counted) <= 0.01 * counted


def test_flops_of_a_full_size_model_at_224_match_flop_counter():
    model = create_model("t2t_vit_7", fused_attn=False).eval()
    counted = _counted_flops(model, torch.randn(1, 3, 224, 224))
    assert abs(flops_per_image(model.cfg) - counted) <= 0.01 * counted
