"""Weights I/O: exact round trips, adaptation, and refusal of pickles that carry code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import timm  # a declared test dependency (pyproject [test]): missing is an error, not a skip
import torch
from safetensors.torch import save_file

from vit_model import (
    UnsafeCheckpointError,
    VisionTransformer,
    ViTConfig,
    create_model,
    from_pretrained,
    load_state_dict,
)

SMALL = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=2, num_heads=4)


def _model(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{**SMALL, **kw})).eval()


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model(reg_tokens=2, init_values=0.1, img_size=(32, 48))
    model.save_pretrained(tmp_path, meta={"class_names": list("abcde"), "mean": [0.5], "std": [0.25]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, meta = from_pretrained(tmp_path, return_meta=True)
    assert loaded.cfg == model.cfg
    assert meta["class_names"] == list("abcde")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(model(x), loaded.eval()(x))


def test_timm_state_dict_loads_as_identity(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).eval()
    save_file(ref.state_dict(), tmp_path / "timm.safetensors")
    ours = from_pretrained(tmp_path / "timm.safetensors").eval()  # architecture inferred from shapes
    assert (ours.cfg.embed_dim, ours.cfg.num_heads, ours.cfg.depth, ours.cfg.num_classes) == (192, 3, 12, 7)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


def test_adapt_to_new_classes_size_and_channels(tmp_path):
    src = _model()
    src.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, num_classes=3, img_size=48, in_chans=1).eval()
    assert model.cfg.num_classes == 3 and model.cfg.grid_size == (6, 6) and model.cfg.in_chans == 1
    assert model.pos_embed.shape == (1, 1 + 36, 64)
    sd, src_sd = model.state_dict(), src.state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], src_sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], src_sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    # backbone output on a resized grid equals the source model run with resampled embeddings
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        a = model.forward_features(x)
        b = src.forward_features(x.expand(2, 3, 48, 48))
    assert (a - b).abs().max() <= 1e-4
    # creating a named model from pretrained weights adapts them the same way
    m2 = create_model("vit_tiny_patch8", pretrained=str(tmp_path), embed_dim=64, depth=2, num_heads=4,
                      img_size=48, in_chans=1, num_classes=3)
    assert torch.equal(m2.state_dict()["pos_embed"], sd["pos_embed"])


class _Payload:
    """Pickles to a call that writes a marker file when (and only when) it is unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pth"
    sd = _model().state_dict()
    with open(bad, "wb") as f:
        pickle.dump({"model": sd, "x": _Payload(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pth.*it was not executed"):
        from_pretrained(bad)
    assert not marker.exists()
    # the same payload inside a Hugging Face-style directory
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "intermediate_size": 256}))
    os.replace(bad, hf_dir / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        from_pretrained(hf_dir)
    assert not marker.exists()


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Guards the test above: the planted payload does execute if anything unpickles it."""
    marker = tmp_path / "PWNED"
    data = pickle.dumps(_Payload(str(marker)))
    pickle.loads(data)
    assert marker.read_text() == "pwned"


def test_plain_torch_save_state_dict_still_loads(tmp_path):
    model = _model()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth")
    sd = load_state_dict(tmp_path / "ddp.pth")
    assert set(sd) == set(model.state_dict())


def test_missing_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope\.safetensors' does not exist"):
        from_pretrained(tmp_path / "nope.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"unrecognised ViT state dict \(first keys: foo.weight\)"):
        from_pretrained(tmp_path / "other.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        from_pretrained(tmp_path / "d")
