"""Test-time augmentation (infer.tta: hflip, shift, hflip+shift): the views, the arithmetic, the setting,
the cache key, the inference actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.config import config_from_dict
from pipelines.data.augment import _CROP_X, _CROP_Y, _FLIP, NUM_DRAWS, crop_flip
from pipelines.engine import ViewTTA, evaluate, with_tta, zero_pixel_fill
from pipelines.errors import ConfigError
from pipelines.run import step_key


class Columns(torch.nn.Module):
    """Logits that depend on which side of the image is bright: mirroring swaps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 1, 2) -> (B, 2)
        return x.flatten(1) * 2.0


def test_flip_tta_is_the_log_of_the_mean_probabilities():
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 3.0]]]])  # (2, 1, 1, 2)
    out = ViewTTA(Columns())(x)
    # image 0: logits (2, 0), mirrored (0, 2): p = sigmoid(2) = 0.8808 / 0.1192 either way round,
    # so the mean is (0.5, 0.5); image 1: logits (0, 6) and (6, 0): again (0.5, 0.5)
    assert torch.allclose(out.exp(), torch.full((2, 2), 0.5), atol=1e-6)
    x = torch.tensor([[[[1.0, 1.0]]]])  # symmetric image: TTA changes nothing
    assert torch.allclose(ViewTTA(Columns())(x), F.log_softmax(Columns()(x), -1), atol=1e-6)


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
    with pytest.raises(ConfigError, match=r"infer\.tta.*'vflip'.*none.*hflip.*'shift'.*'hflip\+shift'"):
        config_from_dict({"infer": {"tta": "vflip"}})
    with pytest.raises(ConfigError, match=r"infer\.tta_shift=0 must be at least 1"):
        config_from_dict({"infer": {"tta": "shift", "tta_shift": 0}})
    with pytest.raises(ValueError, match=r"infer\.tta='rot90'.*none, hflip, shift, hflip\+shift"):
        with_tta(torch.nn.Identity(), "rot90")


def test_tta_changes_the_evaluate_cache_key_only():
    plain, flipped = config_from_dict({}), config_from_dict({"infer": {"tta": "hflip"}})
    up = {"prepare": {"dataset_uri": "file:///d"}, "search": {"model_uri": "file:///m"}}
    assert step_key("evaluate", plain, up) != step_key("evaluate", flipped, up)
    assert step_key("search", plain, up) == step_key("search", flipped, up)
    one, two = (config_from_dict({"infer": {"tta": "hflip+shift", "tta_shift": k}}) for k in (1, 2))
    assert len({step_key("evaluate", c, up) for c in (flipped, one, two)}) == 3


def test_a_shifted_view_moves_the_image_and_fills_with_the_fill_value():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    views = list(ViewTTA(torch.nn.Identity(), flip=False, shift=1, fill=-7.0).views(x))
    assert len(views) == 9
    assert torch.equal(views[4], x)  # (dx, dy) = (0, 0)
    right = torch.full_like(x, -7.0)  # views[5]: (dx, dy) = (+1, 0): the content one pixel to the right
    right[..., :, 1:] = x[..., :, :-1]
    assert torch.equal(views[5], right)
    up_left = torch.full_like(x, -7.0)  # views[0]: (dx, dy) = (-1, -1)
    up_left[..., :-1, :-1] = x[..., 1:, 1:]
    assert torch.equal(views[0], up_left)
    # per-channel fill
    rgb = torch.zeros(1, 3, 2, 2)
    corner = list(ViewTTA(torch.nn.Identity(), flip=False, shift=1, fill=[1.0, 2.0, 3.0]).views(rgb))[0]
    assert corner[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0] and corner[0, :, 1, 1].tolist() == [1.0, 2.0, 3.0]


def test_flip_and_shift_views_are_the_windows_the_training_crop_draws():
    """hflip+shift with shift = random_crop_padding scores exactly the 2 * (2p + 1)^2 images the
    training's padded crop + flip can produce (pipelines.data.augment.crop_flip, zero fill), after
    the same normalisation."""
    p, mean, std = 2, (0.2860,), (0.3530,)
    pixels = np.random.default_rng(0).integers(0, 256, (1, 1, 6, 5), dtype=np.uint8)
    side = 2 * p + 1
    draws = np.zeros((2 * side * side, NUM_DRAWS))
    for i, (flip, oy, ox) in enumerate((f, oy, ox) for f in (0, 1) for oy in range(side) for ox in range(side)):
        draws[i, _CROP_Y], draws[i, _CROP_X], draws[i, _FLIP] = (oy + 0.5) / side, (ox + 0.5) / side, 0.25 if flip else 0.75
    crops = crop_flip(np.repeat(pixels, len(draws), axis=0), draws, p, 0.5)
    expected = (torch.from_numpy(crops).float() / 255.0 - mean[0]) / std[0]
    x = (torch.from_numpy(pixels).float() / 255.0 - mean[0]) / std[0]
    views = list(ViewTTA(torch.nn.Identity(), flip=True, shift=p, fill=zero_pixel_fill(mean, std)).views(x))
    assert len(views) == len(expected) == 50
    key = lambda t: tuple(t.flatten().tolist())  # noqa: E731
    assert sorted(key(v) for v in views) == sorted(key(e) for e in expected)


def test_shift_tta_matches_a_hand_written_average_on_a_real_model():
    torch.manual_seed(0)
    from vit_model import create_model

    model = create_model("vit_tiny_convstem_28", img_size=28, in_chans=1, num_classes=10, stem_channels=[8, 16],
                         embed_dim=16, depth=1, num_heads=2).eval()
    x = torch.randn(3, 1, 28, 28)
    fill = -0.81
    with torch.no_grad():
        views = []
        for image in (x, x.flip(3)):
            padded = F.pad(image, (1, 1, 1, 1), value=fill)
            views += [padded[..., oy:oy + 28, ox:ox + 28] for oy in range(3) for ox in range(3)]
        expected = (sum(model(v).softmax(-1) for v in views) / len(views)).log()
        got = with_tta(model, "hflip+shift", shift=1, fill=fill)(x)
        assert torch.allclose(got, expected, atol=1e-5)
        only_shift = (sum(model(v).softmax(-1) for v in views[:9]) / 9).log()
        assert torch.allclose(with_tta(model, "shift", shift=1, fill=fill)(x), only_shift, atol=1e-5)


@pytest.mark.parametrize("tta", ["hflip", "hflip+shift"])
def test_batch_predictor_scores_with_tta(tta):
    """The inference actor's class (called directly, as Ray Data's actor would): with infer.tta
    its top-1 and probabilities are those of the averaged probabilities (shifted views: windows of
    the raw pixels padded with black, then normalised)."""
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
    if tta == "hflip":
        views = [x, x.flip(3)]
    else:  # tta_shift=1
        padded = np.pad(pixels, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = [padded[..., oy:oy + 28, ox:ox + 28] for oy in range(3) for ox in range(3)]
        views = [(torch.from_numpy(np.ascontiguousarray(w)).float() / 255.0 - 0.3) / 0.35 for w in windows]
        views += [v.flip(3) for v in views]
    with torch.no_grad():
        probs = sum(net(v).softmax(-1) for v in views) / len(views)
    rows = BatchPredictor(ref, package, top_k=2, tta=tta, tta_shift=1)(batch).to_pylist()
    assert [r["label"] for r in rows] == probs.argmax(-1).tolist()
    got = torch.tensor([r["topk_probs"][0] for r in rows])
    assert torch.allclose(got, probs.max(-1).values, atol=1e-5)
    plain = BatchPredictor(ref, package, top_k=2)(batch).to_pylist()
    assert torch.allclose(torch.tensor([r["topk_probs"][0] for r in plain]), net(x).softmax(-1).max(-1).values.detach(), atol=1e-5)
