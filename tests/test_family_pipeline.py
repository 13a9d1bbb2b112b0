"""Every model family through the pipeline's own paths: built from ``model.name`` +
``model.args``, packaged and registered in a real MLflow registry (sqlite), loaded back as a
pyfunc without unpickling, and predicting what the model itself predicts; and one non-ViT family
trained on a real Ray cluster, its MLflow params carrying ``model.args``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipelines import tracking
from pipelines.architecture import model_arch
from pipelines.config import load_config
from pipelines.register import register

# one small 28x28 configuration per family; a family added to vit_model needs an entry here
SMALL = {
    "vit": ("vit_tiny_patch7", ["model.args.embed_dim=16", "model.args.depth=1", "model.args.num_heads=2"]),
    "hybrid": ("cct_7_3x1_28", ["model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2"]),
    "t2t": ("t2t_vit_7_28", ["model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2",
                             "model.args.token_dim=16"]),
    "swin": ("swin_nano_patch2_window7_28", ["model.args.depths=[1,1,1]"]),
}
MEAN, STD = (0.3,), (0.35,)
CLASSES = ["ankle", "bag", "coat"]


def test_every_family_has_a_pipeline_case():
    assert set(SMALL) == set(vit_model.FAMILIES)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
@pytest.mark.parametrize("family", sorted(SMALL))
def test_registered_package_of_every_family_predicts_like_the_model(family, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    name, args = SMALL[family]
    registry_name = f"fam-{family}"
    cfg = load_config(None, [f"storage.uri=file://{tmp_path / 'store'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                             f"registry.model_name={registry_name}", f"model.name={name}", *args])
    arch = model_arch(cfg, num_classes=len(CLASSES), channels=1, image_hw=(28, 28))
    assert arch.family == family
    torch.manual_seed(0)
    model = vit_model.build_model(arch).eval()
    meta = {"class_names": CLASSES, "channels": 1, "image_size": [28, 28], "mean": list(MEAN), "std": list(STD)}
    model.save_pretrained(tmp_path / "model", meta=meta)
    result = register(cfg, str(tmp_path / "model"))
    assert result.decision == "first"

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)

    def refuse(*a, **k):
        raise AssertionError("loading a packaged model must not unpickle anything")

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with tracking.fluent_tracking(uri, uri), monkeypatch.context() as m:
        for target in ("pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load"):
            m.setattr(target, refuse)
        out = mlflow.pyfunc.load_model(f"models:/{registry_name}@champion").predict(
            pd.DataFrame({"image": [_png(im) for im in images]}))
    x = (torch.from_numpy(images).float()[:, None] / 255.0 - MEAN[0]) / STD[0]
    with torch.no_grad():
        ref = model(x).softmax(-1).double().numpy()
    np.testing.assert_allclose(np.array(out["probabilities"].tolist()), ref, atol=1e-6, rtol=0)
    assert (out["error"] == "").all()


@pytest.mark.integration
def test_a_swin_trains_on_ray_and_its_exported_model_reloads(ray_cluster, fmnist_idx, tmp_path):
    """A hierarchical family through Ray Train (2 DDP workers), MLflow params and export."""
    from pipelines.prepare import prepare
    from pipelines.train import train

    store = tmp_path / "store"
    cfg = load_config(None, [
        f"storage.uri=file://{store}", f"data.source_dir={fmnist_idx.folder}", "data.shard_rows=60",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "model.name=swin_nano_patch2_window7_28",
        "model.args.depths=[1,1,1]", "model.args.drop_path_rate=0.0", "train.epochs=1", "train.batch_size=32",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.limit_train_batches=3", "train.run_name=swin",
    ])
    result = train(cfg, version=prepare(cfg))
    assert len(result.history) == 1 and 0.0 <= result.history[0]["val_acc"] <= 1.0

    model = vit_model.from_pretrained(result.model_uri.removeprefix("file://"))
    assert type(model) is vit_model.SwinTransformer
    assert (model.cfg.depths, model.cfg.in_chans, model.cfg.num_classes, model.cfg.img_size) == ((1, 1, 1), 1, 10, 28)

    run = tracking.client(cfg).get_run(result.mlflow_run_id)
    assert run.data.params["model.name"] == "swin_nano_patch2_window7_28"
    assert run.data.params["model.args.depths"] == "[1, 1, 1]"


@pytest.mark.integration
def test_an_optuna_asha_sweep_over_families(ray_cluster, fmnist_idx, tmp_path):
    """``tune.space.model`` picks whole models: each trial's MLflow run and the exported best model
    are of the family its sampled label names (Optuna samples labels; trials expand them)."""
    import json

    from pipelines.prepare import prepare
    from pipelines.tune import model_choices, tune

    sections = [{"name": SMALL[f][0], "args": dict(o.removeprefix("model.args.").split("=") for o in SMALL[f][1])}
                for f in ("vit", "hybrid")]
    for section in sections:
        section["args"] = {k: int(v) for k, v in section["args"].items()}
    cfg = load_config(None, [
        f"storage.uri=file://{tmp_path}/store", f"data.source_dir={fmnist_idx.folder}", "data.shard_rows=60",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.epochs=2", "train.batch_size=32",
        "train.num_workers=1", "train.cpus_per_worker=1", "train.limit_train_batches=3", "train.warmup_epochs=0.2",
        "tune.name=families", "tune.search=optuna", "tune.num_samples=2", "tune.grace_period=1",
        "tune.max_concurrent_trials=1", f"tune.space={json.dumps({'model': {'choice': sections}, 'train.lr': {'loguniform': [1e-3, 3e-3]}})}",
    ])
    result = tune(cfg, version=prepare(cfg))
    labels = model_choices(sections)
    client = tracking.client(cfg)
    assert len(result.trials) == 2
    for trial in result.trials:
        section = labels[trial["config"]["model"]]
        params = client.get_run(trial["run_id"]).data.params
        assert params["model.name"] == section["name"]
        assert params["model.args.embed_dim"] == str(section["args"]["embed_dim"])
    best = labels[result.best_config["model"]]
    model = vit_model.from_pretrained(result.model_uri.removeprefix("file://"))
    assert model.cfg.embed_dim == best["args"]["embed_dim"]
    assert vit_model.registry.family_of(model.cfg) is vit_model.registry.parse_model_name(best["name"])[0]
