"""Attention pictures: the rollout against a hand-computed example, the heatmap of every
registered family, evaluate's ``attention.png`` in a real MLflow run, and ``infer.explain``
writing one overlay per row through real Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipelines import storage as st
from pipelines import tracking
from pipelines.attention import ATTENTION_PNG, attention_png, fixed_sample
from pipelines.config import load_config
from pipelines.data.shards import read_split
from pipelines.plots import overlay_png, overlay_rgb
from vit_model.explain import attention_heatmap, attention_rollout, explain
from vit_model.swin import SwinBlock, window_attention_to_dense, window_token_index

# --------------------------------------------------------------------------------------------
# The rollout itself
# --------------------------------------------------------------------------------------------

# Two layers, two heads, two tokens; maps are (B=1, heads=2, T=2, T=2).
LAYER1 = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]],
                        [[0.5, 0.5], [0.1, 0.9]]]])
LAYER2 = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]],
                        [[0.2, 0.8], [0.6, 0.4]]]])


def test_rollout_matches_a_two_layer_example_by_hand():
    # layer 1: mean over heads          = [[0.5, 0.5], [0.3, 0.7]]
    #          + identity               = [[1.5, 0.5], [0.3, 1.7]]   (rows sum to 2)
    #          rows normalised  Â1      = [[0.75, 0.25], [0.15, 0.85]]
    # layer 2: mean over heads          = [[0.2, 0.8], [0.6, 0.4]]
    #          + identity, normalised Â2 = [[0.6, 0.4], [0.3, 0.7]]
    # rollout  R = Â2 @ Â1:
    #   R[0,0] = 0.6*0.75 + 0.4*0.15 = 0.45 + 0.06  = 0.51
    #   R[0,1] = 0.6*0.25 + 0.4*0.85 = 0.15 + 0.34  = 0.49
    #   R[1,0] = 0.3*0.75 + 0.7*0.15 = 0.225 + 0.105 = 0.33
    #   R[1,1] = 0.3*0.25 + 0.7*0.85 = 0.075 + 0.595 = 0.67
    expected = torch.tensor([[[0.51, 0.49], [0.33, 0.67]]])
    torch.testing.assert_close(attention_rollout([LAYER1, LAYER2]), expected)
    # the order matters: Â1 @ Â2 = [[0.525, 0.475], [0.345, 0.655]] is not the rollout
    assert not torch.allclose(attention_rollout([LAYER2, LAYER1]), expected)


def test_rollout_options_by_hand():
    # no residual: R = A2 @ A1 with head means A1 = [[0.5, 0.5], [0.3, 0.7]], A2 = [[0.2, 0.8], [0.6, 0.4]]
    #   R = [[0.2*0.5 + 0.8*0.3, 0.2*0.5 + 0.8*0.7], [0.6*0.5 + 0.4*0.3, 0.6*0.5 + 0.4*0.7]]
    #     = [[0.34, 0.66], [0.42, 0.58]]
    torch.testing.assert_close(attention_rollout([LAYER1, LAYER2], add_residual=False),
                               torch.tensor([[[0.34, 0.66], [0.42, 0.58]]]))
    # max over heads of layer 1 = [[0.5, 0.5], [0.5, 0.9]]; + I = [[1.5, 0.5], [0.5, 1.9]];
    # normalised = [[0.75, 0.25], [0.5/2.4, 1.9/2.4]]
    torch.testing.assert_close(attention_rollout([LAYER1], head_fusion="max"),
                               torch.tensor([[[0.75, 0.25], [0.5 / 2.4, 1.9 / 2.4]]]))
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        attention_rollout([LAYER1], head_fusion="median")
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])


def test_rollout_rows_sum_to_one_and_discard_keeps_the_diagonal():
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 7, 7).softmax(-1) for _ in range(4)]
    for kwargs in ({}, {"add_residual": False}, {"discard_ratio": 0.5}, {"head_fusion": "min"}):
        r = attention_rollout(maps, **kwargs)
        assert r.shape == (2, 7, 7) and (r >= 0).all()
        torch.testing.assert_close(r.sum(-1), torch.ones(2, 7))
    # discarding every off-diagonal entry but the diagonal leaves the identity
    torch.testing.assert_close(attention_rollout(maps[:1], discard_ratio=6 / 7 + 1e-6), torch.eye(7).expand(2, 7, 7))


# --------------------------------------------------------------------------------------------
# Swin: window attention back on the grid
# --------------------------------------------------------------------------------------------


def test_window_token_index_of_a_shifted_window_by_hand():
    # 4x4 grid, 2x2 windows shifted by (1, 1): after torch.roll by -1, rolled position (y, x) holds
    # original ((y+1) % 4, (x+1) % 4). Window 0 holds rolled (0,0),(0,1),(1,0),(1,1) = original
    # (1,1),(1,2),(2,1),(2,2) = indices 5, 6, 9, 10; window 3 (rolled rows/cols 2-3) holds
    # original (3,3),(3,0),(0,3),(0,0) = 15, 12, 3, 0.
    idx = window_token_index((4, 4), (2, 2), (1, 1))
    assert idx.shape == (4, 4)
    assert idx[0].tolist() == [5, 6, 9, 10] and idx[3].tolist() == [15, 12, 3, 0]
    assert sorted(idx.flatten().tolist()) == list(range(16))
    # a 3x3 grid in 2x2 windows is padded to 4x4: padding positions are -1
    padded = window_token_index((3, 3), (2, 2), (0, 0))
    assert (padded == -1).sum() == 7 and sorted(padded[padded >= 0].tolist()) == list(range(9))


def test_dense_window_attention_reproduces_the_block_output():
    # With the output projection set to the identity, the block's shifted-window attention output
    # at each token equals the dense (T, T) matrix applied to the values on the unshifted grid.
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window=(4, 4), shift=(2, 2), resolution=(8, 8)).eval()
    with torch.no_grad():
        block.attn.proj.weight.copy_(torch.eye(8))
        block.attn.proj.bias.zero_()
        block.attn.relative_position_bias_table.normal_()
        x = block.norm1(torch.randn(1, 8, 8, 8))
        y, attn = block._window_attention(x, return_attention=True)
        v = block.attn.qkv(x)[..., 16:].reshape(1, 64, 2, 4).transpose(1, 2)  # (1, heads, T, Dh), grid order
    dense = window_attention_to_dense(attn, (8, 8), (4, 4), (2, 2))
    assert dense.shape == (1, 2, 64, 64)
    torch.testing.assert_close(dense.sum(-1), torch.ones(1, 2, 64))  # no padding: every row is complete
    expected = (dense @ v).transpose(1, 2).reshape(1, 8, 8, 8)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Every family
# --------------------------------------------------------------------------------------------

# tiny 28x28 grey models; a registered family without an entry fails test_every_family_is_covered
TINY = {
    "vit": [("vit_tiny_patch7", dict(img_size=28, in_chans=1, embed_dim=16, depth=2, num_heads=2)),
            ("vit_tiny_patch7", dict(img_size=28, in_chans=1, embed_dim=16, depth=2, num_heads=2, reg_tokens=2,
                                     global_pool="avg"))],
    "hybrid": [("vit_tiny_convstem_28", dict(embed_dim=16, depth=2, num_heads=2)),
               ("vit_tiny_convstem_28", dict(embed_dim=16, depth=2, num_heads=2, class_token=False, global_pool="avg")),
               ("cct_7_3x1_28", dict(embed_dim=16, depth=2, num_heads=2))],
    "t2t": [("t2t_vit_7_28", dict(embed_dim=16, depth=2, num_heads=2, token_dim=8))],
    "swin": [("swin_nano_patch2_window7_28", dict(in_chans=1, depths=(1, 1, 1), drop_path_rate=0.0)),
             # one stage of 14x14 tokens in 4x4 windows: padded to 16x16, every second block shifted
             ("swin_nano_patch2_window7_28", dict(in_chans=1, depths=(2,), num_heads=(2,), window_size=4,
                                                          drop_path_rate=0.0))],
}
CASES = [(family, name, args) for family, cases in TINY.items() for name, args in cases]


def test_every_family_is_covered():
    assert set(TINY) == set(vit_model.FAMILIES)


@pytest.mark.parametrize(("family", "name", "args"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_heatmap_of_every_family(family, name, args):
    torch.manual_seed(0)
    model = vit_model.create_model(name, num_classes=3, **args)
    assert model.cfg.family == family
    x = torch.randn(2, model.cfg.in_chans, 28, 28)
    model.train()  # explain runs in eval mode and restores the mode
    out = explain(model, x)
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))  # the same forward, not another model
    heat = out.heatmap
    assert heat.shape == (2, 28, 28) and torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 and heat.flatten(1).amax(1).eq(1).all()  # min-max per image
    torch.testing.assert_close(attention_heatmap(model, x), heat)


def test_class_token_row_is_what_a_token_pooled_vit_reads():
    # One block, one head: the heatmap of a token-pooled ViT is the class token's row of
    # (A + I) / 2 over the patch columns, upsampled. Checked through the per-token grid.
    torch.manual_seed(0)
    model = vit_model.create_model("vit_tiny_patch14", img_size=28, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                   num_heads=1).eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        _, maps = model.forward_features(x, return_attention=True)
        rel = model.attention_relevance(x)
    a = maps[0][0, 0]  # (5, 5): class token + 2x2 patches
    expected = ((a + torch.eye(5)) / 2)[0, 1:].reshape(1, 2, 2)
    torch.testing.assert_close(rel.grid, expected)
    assert rel.extent == (28, 28)


def test_a_model_without_the_hook_is_refused():
    with pytest.raises(TypeError, match="has no attention_relevance"):
        explain(torch.nn.Linear(2, 2), torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------
# The picture: overlays, the fixed sample, evaluate's attention.png
# --------------------------------------------------------------------------------------------

MEAN, STD = (0.3,), (0.35,)


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=("PNG",))
    img.load()
    return img


def test_overlay_blends_the_heatmap_colour_over_the_image():
    image = np.zeros((1, 4, 4), dtype=np.float32)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    rgb = overlay_rgb(image, heat)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    # jet: 0 -> dark blue (0, 0, 0.5), 1 -> dark red (0.5, 0, 0); half of it over black
    assert tuple(rgb[1, 1]) == (0, 0, 64) and tuple(rgb[0, 0]) == (64, 0, 0)
    png = _png(overlay_png(image, heat))
    assert png.size == (112, 112) and png.mode == "RGB"  # 4 px enlarged x28
    with pytest.raises(ValueError, match="overlay needs an image"):
        overlay_rgb(np.zeros((2, 4, 4)), heat)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fmnist_idx):
    from pipelines.prepare import prepare

    tmp = tmp_path_factory.mktemp("explain")
    cfg = load_config(None, [f"storage.uri=file://{tmp / 'store'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'm.db'}",
                             "mlflow.experiment_name=explain-test", f"data.source_dir={fmnist_idx.folder}",
                             "data.shard_rows=10", f"data.augment.mean=[{MEAN[0]}]", f"data.augment.std=[{STD[0]}]"])
    return cfg, prepare(cfg), tmp


def test_fixed_sample_is_the_first_rows_of_each_class(dataset):
    cfg, version, _ = dataset
    sample = fixed_sample(version, "val", cfg, per_class=2)
    # the same choice made independently: the split in stored order (shards as the manifest lists
    # them, rows in file order), first two rows of each class
    stored = [(label, row) for s in version.shards("val")
              for label, row in zip(*[read_split_shard_column(version, s, c) for c in ("label", "row_id")])]
    expected = [row for c in range(version.num_classes) for row in [r for label, r in stored if label == c][:2]]
    assert sample.row_ids.tolist() == expected and len(expected) > version.num_classes  # several classes, 2 each
    assert sample.labels.tolist() == sorted(sample.labels.tolist())
    # pixels are the stored images; inputs are them normalised
    pixels = read_split(version, "val", cfg.storage)
    by_row = dict(zip(pixels["row_id"].tolist(), pixels["image"]))
    for i, row in enumerate(sample.row_ids.tolist()):
        np.testing.assert_allclose(sample.pixels[i, 0], by_row[row] / 255.0, atol=1e-6)
        torch.testing.assert_close(sample.inputs[i], (torch.from_numpy(sample.pixels[i]) - MEAN[0]) / STD[0])
    assert fixed_sample(version, "val", cfg).row_ids.tolist() == expected  # deterministic


def read_split_shard_column(version, shard, column):
    from pipelines.data.shards import read_shard_table

    return read_shard_table(st.join_uri(version.uri, shard.path), None, [column]).column(column).to_pylist()


@pytest.mark.parametrize(("family", "name", "args"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_the_picture_is_drawn_for_every_family(dataset, family, name, args):
    cfg, version, _ = dataset
    torch.manual_seed(0)
    model = vit_model.create_model(name, num_classes=version.num_classes, **args).eval()
    sample = fixed_sample(version, "val", cfg)
    png = attention_png(model, sample, version.classes, title=f"{family} test")
    img = _png(png)
    assert img.size[0] > 400 and img.size[1] > 400


@pytest.mark.integration
def test_evaluate_logs_attention_png_to_the_training_run(dataset):
    from pipelines.evaluate import evaluate

    cfg, version, tmp = dataset
    torch.manual_seed(0)
    model = vit_model.create_model("vit_tiny_patch7", img_size=28, in_chans=1, num_classes=version.num_classes,
                                   embed_dim=16, depth=1, num_heads=2)
    model_dir = tmp / "store" / "train" / "r1" / "model"
    model.save_pretrained(model_dir, meta={"class_names": version.classes, "channels": 1, "image_size": [28, 28],
                                           "mean": list(MEAN), "std": list(STD),
                                           "dataset": {"uri": version.uri, "version": version.version}})
    client = tracking.client(cfg)
    run_id = client.create_run(tracking.experiment_id(cfg, client)).info.run_id

    result = evaluate(cfg, model_uri=f"file://{model_dir}", run_id=run_id, version=version)

    root = {a.path for a in client.list_artifacts(run_id)}
    assert {ATTENTION_PNG, "test_confusion_matrix.png", "evaluation-test.json"} <= root
    logged = _png(Path(client.download_artifacts(run_id, ATTENTION_PNG, str(tmp))).read_bytes())
    beside = _png(st.read_bytes(result.attention_uri))
    assert result.attention_uri == f"file://{model_dir}/{ATTENTION_PNG}"
    assert logged.size == beside.size and np.array_equal(np.asarray(logged), np.asarray(beside))
    assert st.read_json(result.result_uri)["attention_uri"] == result.attention_uri


# --------------------------------------------------------------------------------------------
# infer.explain: one overlay per row, through real Ray
# --------------------------------------------------------------------------------------------


def test_explain_file_uri_quotes_each_part_of_the_id():
    from pipelines.inference.actors import explain_file_uri

    assert explain_file_uri("s3://b/job/_attempt-x/explain", "test/17") == "s3://b/job/_attempt-x/explain/test/17.png"
    assert explain_file_uri("file:///o/explain", "a b/c.jpg") == "file:///o/explain/a%20b/c.jpg.png"
    assert explain_file_uri("file:///o/explain", "../x.png") == "file:///o/explain/%2E%2E/x.png.png"


def test_infer_explain_must_be_a_boolean():
    from pipelines.errors import ConfigError

    assert load_config(None, []).infer.explain is False
    assert load_config(None, ["infer.explain=true"]).infer.explain is True
    with pytest.raises(ConfigError, match="config key 'infer.explain' must be true or false, got 'yes please'"):
        load_config(None, ["infer.explain=yes please"])


@pytest.mark.integration
def test_infer_explain_writes_one_overlay_per_row(dataset, ray_cluster):
    from pipelines.infer import infer
    from pipelines.inference.writer import load_manifest, load_predictions
    from pipelines.register import register

    cfg, version, tmp = dataset
    torch.manual_seed(0)
    model = vit_model.create_model("vit_tiny_convstem_28", num_classes=version.num_classes, embed_dim=16, depth=1,
                                   num_heads=2)
    model.save_pretrained(tmp / "infer-model", meta={"class_names": version.classes, "channels": 1,
                                                     "image_size": [28, 28], "mean": list(MEAN), "std": list(STD)})
    assert register(cfg, str(tmp / "infer-model")).decision == "first"
    model_uri = f"models:/{cfg.registry.model_name}@champion"

    # a dataset split: every row gets its overlay, at explain/<split>/<row id>.png in the attempt folder
    on = load_config(None, [f"storage.uri={cfg.storage.uri}", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
                            f"registry.model_name={cfg.registry.model_name}", "mlflow.experiment_name=explain-test",
                            "infer.split=val", "infer.batch_size=8", "infer.explain=true"])
    result = infer(on, input_uri=version.uri, model_uri=model_uri, job_name="explained")
    n = version.count("val")
    assert result.output_count == n
    table = load_predictions(st.join_uri(cfg.storage.uri, "predictions", "explained"), cfg.storage)
    manifest = load_manifest(st.join_uri(cfg.storage.uri, "predictions", "explained"), cfg.storage)
    assert manifest["schema"][-1] == "explain_uri" and manifest["explain"] == f"{manifest['data']}/explain"
    ids, uris = table.column("input_id").to_pylist(), table.column("explain_uri").to_pylist()
    assert uris == [st.join_uri(result.output_uri, "explain", f"{i}.png") for i in ids]
    files = st.list_files(st.join_uri(result.output_uri, "explain"), cfg.storage)
    assert len(files) == n and all(f.relpath.endswith(".png") for f in files)
    # each overlay is the stored image under the model's heatmap
    pixels = read_split(version, "val", cfg.storage)
    row = int(ids[0].split("/")[1])
    image = pixels["image"][pixels["row_id"].tolist().index(row)]
    x = (torch.from_numpy(image).float()[None, None] / 255.0 - MEAN[0]) / STD[0]
    expected = overlay_png(image[None].astype(np.float32) / 255.0, attention_heatmap(model, x)[0].numpy())
    assert np.array_equal(np.asarray(_png(st.read_bytes(uris[0]))), np.asarray(_png(expected)))

    # raw images with an unreadable one: rows that could not be scored get no overlay
    images = tmp / "raw"
    (images / "sub dir").mkdir(parents=True)
    Image.fromarray(pixels["image"][0]).save(images / "sub dir" / "one.png")
    Image.fromarray(pixels["image"][1]).save(images / "two.png")
    (images / "broken.png").write_bytes(b"not a png")
    result = infer(on, input_uri=str(images), model_uri=model_uri, job_name="explained-raw")
    rows = load_predictions(st.join_uri(cfg.storage.uri, "predictions", "explained-raw"), cfg.storage).to_pylist()
    by_id = {r["input_id"]: r for r in rows}
    assert by_id["broken.png"]["error"] and by_id["broken.png"]["explain_uri"] == ""
    assert by_id["sub dir/one.png"]["explain_uri"] == st.join_uri(result.output_uri, "explain", "sub%20dir", "one.png.png")
    assert _png(st.read_bytes(by_id["two.png"]["explain_uri"])).size == (112, 112)

    # off (the default): no column, no folder
    off = load_config(None, [f"storage.uri={cfg.storage.uri}", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
                             "mlflow.experiment_name=explain-test", "infer.split=val", "infer.batch_size=8"])
    result = infer(off, input_uri=version.uri, model_uri=model_uri, job_name="plain")
    table = load_predictions(st.join_uri(cfg.storage.uri, "predictions", "plain"), cfg.storage)
    assert "explain_uri" not in table.column_names
    assert not st.exists(st.join_uri(result.output_uri, "explain"), cfg.storage)


def test_swin_head_fusion_is_applied_to_the_window_attention():
    # max / min over heads must differ from the mean on a stage with several heads
    torch.manual_seed(0)
    model = vit_model.create_model("swin_nano_patch2_window7_28", in_chans=1, num_classes=3, depths=(2,),
                                   num_heads=(2,), window_size=4, drop_path_rate=0.0).eval()
    x = torch.randn(1, 1, 28, 28)
    grids = {f: model.attention_relevance(x, head_fusion=f).grid for f in ("mean", "max", "min")}
    assert not torch.allclose(grids["mean"], grids["max"]) and not torch.allclose(grids["mean"], grids["min"])
    with torch.no_grad():
        _, maps = model.forward_features(x, return_attention=True)
    blocks = model.layers[-1].blocks
    dense = [window_attention_to_dense(a, (14, 14), b.window, b.shift).amax(1, keepdim=True) for a, b in zip(maps, blocks)]
    expected = attention_rollout(dense).mean(dim=1).reshape(1, 14, 14)  # mean row: global average pooling
    torch.testing.assert_close(grids["max"], expected)
