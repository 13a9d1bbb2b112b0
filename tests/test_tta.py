"""Horizontal-flip test-time augmentation (infer.tta): the arithmetic, the setting, the cache key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.config import config_from_dict
from pipelines.engine import FlipTTA, evaluate, with_tta
from pipelines.errors import ConfigError
from pipelines.run import step_key


class Columns(torch.nn.Module):
    """Logits that depend on which side of the image is bright: mirroring swaps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 1, 2) -> (B, 2)
        return x.flatten(1) * 2.0


def test_flip_tta_is_the_log_of_the_mean_probabilities():
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 3.0]]]])  # (2, 1, 1, 2)
    out = FlipTTA(Columns())(x)
    # image 0: logits (2, 0), mirrored (0, 2): p = sigmoid(2) = 0.8808 / 0.1192 either way round,
    # so the mean is (0.5, 0.5); image 1: logits (0, 6) and (6, 0): again (0.5, 0.5)
    assert torch.allclose(out.exp(), torch.full((2, 2), 0.5), atol=1e-6)
    x = torch.tensor([[[[1.0, 1.0]]]])  # symmetric image: TTA changes nothing
    assert torch.allclose(FlipTTA(Columns())(x), F.log_softmax(Columns()(x), -1), atol=1e-6)


def test_flip_tta_matches_a_hand_written_average_on_a_real_model():
    torch.manual_seed(0)
    from vit_model import create_model

    model = create_model("vit_tiny_patch7", img_size=28, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = ((model(x).softmax(-1) + model(torch.flip(x, dims=[3])).softmax(-1)) / 2).log()
        got = with_tta(model, "hflip")(x)
        assert torch.allclose(got, expected, atol=1e-6)
        # engine.evaluate's loss is the cross entropy of the averaged probabilities
        labels = torch.tensor([0, 3, 5, 9])
        metrics = evaluate(with_tta(model, "hflip"), [(x, labels)], device=torch.device("cpu"), num_classes=10)
    assert metrics["loss"] == pytest.approx(F.nll_loss(expected, labels).item(), rel=1e-5)
    assert metrics["acc1"] == pytest.approx((expected.argmax(-1) == labels).float().mean().item())
    assert with_tta(model, "none") is model


def test_unknown_tta_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"infer\.tta.*'vflip'.*none.*hflip"):
        config_from_dict({"infer": {"tta": "vflip"}})


def test_tta_changes_the_evaluate_cache_key_only():
    plain, flipped = config_from_dict({}), config_from_dict({"infer": {"tta": "hflip"}})
    up = {"prepare": {"dataset_uri": "file:///d"}, "search": {"model_uri": "file:///m"}}
    assert step_key("evaluate", plain, up) != step_key("evaluate", flipped, up)
    assert step_key("search", plain, up) == step_key("search", flipped, up)


def test_batch_predictor_scores_with_flip_tta():
    """The inference actor's class (called directly, as Ray Data's actor would): with infer.tta=hflip
    its top-1 and probabilities are those of the averaged probabilities."""
    import json

    import numpy as np
    from safetensors.torch import save

    from pipelines.inference.actors import BatchPredictor
    from pipelines.inference.model import ResolvedModel
    from vit_model import arch_to_dict, create_model

    torch.manual_seed(1)
    net = create_model("vit_tiny_patch7", img_size=28, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2).eval()
    package = {"config": json.dumps(arch_to_dict(net.cfg)), "weights": save(net.state_dict())}
    ref = ResolvedModel(name="m", version="1", requested_uri="models:/m/1", download_uri="file:///x", tracking_uri="",
                        class_names=("a", "b", "c"), channels=1, image_size=(28, 28), mean=(0.3,), std=(0.35,),
                        max_pixels=10**6, alpha_background=255)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    batch = {"input_id": np.array([str(i) for i in range(5)], dtype=object), "source": np.array([""] * 5, dtype=object),
             "true_label": np.full(5, -1), "pixels": pixels, "error": np.array([""] * 5, dtype=object)}
    x = (torch.from_numpy(pixels).float() / 255.0 - 0.3) / 0.35
    with torch.no_grad():
        probs = (net(x).softmax(-1) + net(x.flip(3)).softmax(-1)) / 2
    rows = BatchPredictor(ref, package, top_k=2, tta="hflip")(batch).to_pylist()
    assert [r["label"] for r in rows] == probs.argmax(-1).tolist()
    got = torch.tensor([r["topk_probs"][0] for r in rows])
    assert torch.allclose(got, probs.max(-1).values, atol=1e-5)
    plain = BatchPredictor(ref, package, top_k=2)(batch).to_pylist()
    assert torch.allclose(torch.tensor([r["topk_probs"][0] for r in plain]), net(x).softmax(-1).max(-1).values.detach(), atol=1e-5)
