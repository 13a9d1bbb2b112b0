"""register: pyfunc packaging without pickle, the promotion gate, the promotion log.

The integration class registers three small ViTs against a sqlite MLflow store in tmp_path:
A (worse) becomes champion because none exists, B (better) takes the champion alias, C (worse
than B, its folder salted with malicious pickles) only becomes candidate. The models are not
trained: each one's head bias forces its predicted class, and the synthetic test labels are
chosen so that the accuracies are A 0.1 < C 0.3 < B 0.6. The class's tests only read that
model (``vit-test``), so they pass in any order; the CLI test registers under its own name.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import registry_page as page
from pipelines import tracking
from pipelines.config import load_config
from pipelines.errors import RegisterError, UserError
from pipelines.packaging import find_pickles, stage_model_dir
from pipelines.register import gate, register
from pipelines.serving import PreprocessSpec, ViTClassifier, decode_image_bytes
from vit_model import VisionTransformer, ViTConfig, flops_per_image, from_pretrained

MEAN, STD = (0.3,), (0.35,)
CLASSES = ["ankle", "bag", "coat"]  # sorted, as prepare orders ImageFolder classes
ARCH = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_model_dir(path: Path, favourite: int, seed: int) -> Path:
    """A ViT that predicts ``favourite`` for any input, with input-dependent probabilities."""
    torch.manual_seed(seed)
    model = VisionTransformer(ARCH)
    with torch.no_grad():
        model.head.weight.mul_(0.05)
        model.head.bias.zero_()
        model.head.bias[favourite] = 6.0
    meta = {"class_names": CLASSES, "channels": 1, "image_size": [28, 28], "mean": list(MEAN), "std": list(STD),
            "dataset": {"name": "synthetic", "version": "digest-123"}}
    model.save_pretrained(path, meta=meta)
    return path


def synthetic_test_set(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.array([0] * (6 * n // 10) + [1] * (3 * n // 10) + [2] * (n // 10))
    return images, labels


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class _Plant:
    """Unpickling this creates the marker file: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickles(folder: Path, marker: Path) -> None:
    payload = pickle.dumps(_Plant(marker), protocol=4)
    (folder / "evil.pkl").write_bytes(payload)
    (folder / "pytorch_model.bin").write_bytes(payload)


def training_run(cfg, tmp: Path) -> str:
    """A finished MLflow training run with a ``model.name`` param and an ``attention.png`` artifact
    (a small stand-in for the picture evaluate logs)."""
    client = tracking.client(cfg)
    run_id, _ = tracking.start_or_resume_run(cfg, "train-a", "train", mlflow_client=client)
    client.log_param(run_id, "model.name", "vit_tiny_patch7")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp / "attention.png")
    client.log_artifact(run_id, str(tmp / "attention.png"))
    tracking.end_run(client, run_id)
    return run_id


def cfg_for(tmp: Path, *overrides: str):
    return load_config(None, [
        f"storage.uri=file://{tmp / 'store'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "mlflow.experiment_name=register-test", "registry.model_name=vit-test", *overrides,
    ])


# --------------------------------------------------------------------------------------------
# Fast checks (no MLflow store)
# --------------------------------------------------------------------------------------------


def test_gate_rules():
    assert gate("test_acc", "max", 0.0, {"test_acc": 0.5}, None, None)[0]
    assert gate("test_acc", "max", 0.0, {"test_acc": 0.6}, {"test_acc": 0.5}, "1")[0]
    promote, reason = gate("test_acc", "max", 0.05, {"test_acc": 0.54}, {"test_acc": 0.5}, "1")
    assert not promote and "kept champion" in reason and "margin 0.05" in reason
    assert not gate("test_acc", "max", 0.0, {"test_acc": 0.5}, {"test_acc": 0.5}, "1")[0]  # a tie keeps
    assert gate("test_loss", "min", 0.0, {"test_loss": 0.4}, {"test_loss": 0.5}, "1")[0]
    assert not gate("test_loss", "min", 0.0, {"test_loss": float("nan")}, {"test_loss": 0.5}, "1")[0]


def test_find_pickles_tells_pickles_from_safetensors(tmp_path):
    make_model_dir(tmp_path / "m", 0, seed=0)
    assert find_pickles(tmp_path / "m") == []
    (tmp_path / "m" / "weights.data").write_bytes(pickle.dumps({"a": 1}, protocol=2))  # no telltale suffix
    assert [p.name for p in find_pickles(tmp_path / "m")] == ["weights.data"]
    torch.save({"w": torch.zeros(2)}, tmp_path / "m" / "zipped")  # torch's zip format holds data.pkl
    assert [p.name for p in find_pickles(tmp_path / "m")] == ["weights.data", "zipped"]


def _mode_zoo() -> dict[str, bytes]:
    """Encoded images in the modes prepare converts deliberately (RGBA, LA, palette, 16-bit, 1-bit, RGB)."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), "RGB")
    images = {
        "rgba.png": Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA"),
        "la.png": Image.fromarray(rng.integers(0, 256, (9, 7, 2), dtype=np.uint8), "LA"),
        "rgb.png": rgb, "pal.png": rgb.convert("P"), "bits.png": rgb.convert("1"),
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)),
        "big.jpg": Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "RGB"),
    }
    out = {}
    for name, img in images.items():
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_serving_decode_matches_prepare_decode(channels):
    """The packaged model decodes a file to exactly the pixels prepare stores for it."""
    from pipelines.data.validate import DecodeSettings, decode_image

    spec = PreprocessSpec(channels=channels, image_size=(9, 9), mean=MEAN * channels, std=STD * channels)
    settings = DecodeSettings(channels=channels, image_size=9)
    for name, data in _mode_zoo().items():
        np.testing.assert_array_equal(decode_image_bytes(data, spec), decode_image(data, name, settings).pixels)


def test_shipped_serving_code_decodes_without_the_pipeline(tmp_path):
    """Inside a model package serving.py and imaging.py are loaded by path, with no pipelines
    package around them: the copies must decode alone, like the source tree does."""
    import importlib.util
    import sys

    from pipelines.packaging import stage_code

    stage_code(tmp_path / "code")
    spec_ = importlib.util.spec_from_file_location("shipped_serving_test", tmp_path / "code" / "serving.py")
    module = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = module
    try:
        spec_.loader.exec_module(module)
        assert module.imaging.__file__ == str((tmp_path / "code" / "imaging.py").resolve())
        shipped = module.PreprocessSpec(channels=3, image_size=(9, 9), mean=MEAN * 3, std=STD * 3)
        local = PreprocessSpec(channels=3, image_size=(9, 9), mean=MEAN * 3, std=STD * 3)
        for data in _mode_zoo().values():
            np.testing.assert_array_equal(module.decode_image_bytes(data, shipped), decode_image_bytes(data, local))
        with pytest.raises(module.InvalidInput, match="not an image"):
            module.decode_image_bytes(b"not an image", shipped)
    finally:
        sys.modules.pop(spec_.name, None)


def test_decode_resizes_and_reports_bad_bytes():
    spec = PreprocessSpec(channels=1, image_size=(28, 28), mean=MEAN, std=STD)
    big = np.zeros((56, 70, 3), dtype=np.uint8)
    assert decode_image_bytes(png(big), spec).shape == (28, 28)
    with pytest.raises(ValueError, match="not an image"):
        decode_image_bytes(b"definitely not a png", spec)


def test_model_dir_with_only_a_pickle_is_refused_unexecuted(tmp_path):
    folder = make_model_dir(tmp_path / "m", 0, seed=0)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant_pickles(folder, marker)
    with pytest.raises(RegisterError, match="has no model.safetensors"):
        stage_model_dir(str(folder), cfg_for(tmp_path), tmp_path / "stage")
    assert not marker.exists()


def test_meta_class_count_mismatch_is_a_user_error(tmp_path):
    folder = tmp_path / "m"
    VisionTransformer(ARCH).save_pretrained(folder, meta={"class_names": ["a", "b"], "mean": [0.5], "std": [0.5]})
    with pytest.raises(UserError, match="2 class names for a model with 3 classes"):
        stage_model_dir(f"file://{folder}", cfg_for(tmp_path), tmp_path / "stage")


# --------------------------------------------------------------------------------------------
# Against a real MLflow store (sqlite): three registrations
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("registry")
    cfg = cfg_for(tmp)
    data = synthetic_test_set()
    dirs = {k: make_model_dir(tmp / k, fav, seed) for k, fav, seed in (("A", 2, 1), ("B", 0, 2), ("C", 1, 3))}
    marker = tmp / "pwned"
    plant_pickles(dirs["C"], marker)
    train_a = training_run(cfg, tmp)
    results = {
        "A": register(cfg, str(dirs["A"]), run_id=train_a, metrics={"val_acc": 0.1}, test_data=data),
        "B": register(cfg, f"file://{dirs['B']}", run_id="run-b", metrics={"val_acc": 0.6}, test_data=data),
        # C's test data arrives as an iterator of batches, as the CLI streams the test split
        "C": register(cfg, str(dirs["C"]), run_id="run-c", test_data=iter([(data[0][:16], data[1][:16]),
                                                                          (data[0][16:], data[1][16:])])),
    }
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with tracking.fluent_tracking(uri, uri):
        yield {"cfg": cfg, "tmp": tmp, "dirs": dirs, "data": data, "results": results, "marker": marker,
               "client": MlflowClient(uri, uri), "train_a": train_a}


@pytest.mark.integration
class TestRegistry:
    def test_gate_decisions_and_aliases(self, registry):
        r, client = registry["results"], registry["client"]
        assert (r["A"].version, r["A"].decision, r["A"].champion_before, r["A"].champion_after) == ("1", "first", None, "1")
        assert (r["B"].version, r["B"].decision, r["B"].champion_before, r["B"].champion_after) == ("2", "promoted", "1", "2")
        assert (r["C"].version, r["C"].decision, r["C"].champion_before, r["C"].champion_after) == ("3", "kept", "2", "2")
        assert r["B"].candidate_metrics["test_acc"] == pytest.approx(0.6)
        assert r["B"].champion_metrics["test_acc"] == pytest.approx(0.1)
        assert r["C"].candidate_metrics["test_acc"] == pytest.approx(0.3)
        assert r["C"].champion_metrics["test_acc"] == pytest.approx(0.6)
        assert str(client.get_model_version_by_alias("vit-test", "champion").version) == "2"
        assert str(client.get_model_version_by_alias("vit-test", "candidate").version) == "3"

    def test_version_tags(self, registry):
        tags = registry["client"].get_model_version("vit-test", "2").tags
        assert tags["training_run_id"] == "run-b"
        assert tags["dataset_digest"] == "digest-123"  # from the model's meta
        assert float(tags["metric.val_acc"]) == pytest.approx(0.6)
        assert float(tags["gate.test_acc"]) == pytest.approx(0.6)

    def test_promotion_log_records_every_decision(self, registry):
        from pipelines.register import DECISION_TAG, LOG_TAG, read_promotion_log

        client = registry["client"]
        full = read_promotion_log(client, "vit-test")
        assert [(e["candidate_version"], e["decision"]) for e in full] == [("1", "first"), ("2", "promoted"), ("3", "kept")]
        promoted, kept = full[1], full[2]
        assert promoted["reason"].startswith("promoted: candidate test_acc 0.600000 vs champion v1 0.100000")
        assert kept["reason"].startswith("kept champion: candidate test_acc 0.300000 vs champion v2 0.600000")
        assert (kept["champion_before"], kept["champion_after"]) == ("2", "2")
        assert kept["champion_metrics"]["test_acc"] == pytest.approx(0.6) and kept["time"]
        recent = json.loads(client.get_registered_model("vit-test").tags[LOG_TAG])
        assert [e["decision"] for e in recent] == ["first", "promoted", "kept"]
        assert json.loads(client.get_model_version("vit-test", "3").tags[DECISION_TAG]) == kept
        run_log = Path(client.download_artifacts(registry["results"]["C"].run_id, "promotion_log.json",
                                                 str(registry["tmp"] / "runlog")))
        assert json.loads(run_log.read_text()) == full

    def test_version_descriptions(self, registry):
        """Each version's Markdown: its numbers beside the champion's, the decision, what it is now
        (v1 was re-described when v2 took @champion from it), the model, data, runs and picture."""
        from pipelines.register import CARD_TAG

        client, train_a = registry["client"], registry["train_a"]
        exp = client.get_run(train_a).info.experiment_id
        v1, v2, v3 = (client.get_model_version("vit-test", v).description for v in ("1", "2", "3"))
        params = sum(p.numel() for p in VisionTransformer(ARCH).parameters())

        assert v1.startswith("First version: test_acc 0.1000; no champion to beat, so it became champion.\n\n"
                             "**Now:** former champion, replaced by v2.\n\n"
                             "**Gate decision:** first champion — no champion yet: the first registered version becomes champion\n")
        assert "| metric | v1 (this version) |\n|---|---|\n| **`test_acc`** (gate) | 0.1000 |\n" in v1
        assert (f"| family | `vit` |\n| model name | `vit_tiny_patch7` |\n| parameters | {params:,} ({page.si(params)}) |\n"
                f"| FLOPs / image | {page.si(flops_per_image(ARCH), 'FLOPs')} (forward) |\n"
                "| input | 28×28 pixels, 1 channel |\n| classes | 3 |\n") in v1
        assert "| dataset | `synthetic` |\n| version | `digest-123` |\n" in v1
        assert f"| training run | [`{train_a}`](#/experiments/{exp}/runs/{train_a}) |" in v1
        assert f"![attention maps of v1](get-artifact?path=attention.png&run_uuid={train_a})" in v1

        assert v2.startswith("Promoted: test_acc 0.6000 vs 0.1000 of champion v1.\n\n"
                             "**Now:** `@champion` — serves as the champion.\n\n"
                             "**Gate decision:** promoted — promoted: candidate test_acc 0.600000 vs champion v1 0.100000")
        assert ("| metric | v2 (this version) | [v1](#/models/vit-test/versions/1) (champion at the gate) | difference |\n"
                "|---|---|---|---|\n| **`test_acc`** (gate) | 0.6000 | 0.1000 | +0.5000 |\n") in v2
        assert "| training run | `run-b` (not in this tracking store) |" in v2  # a run id from elsewhere: no link
        assert "get-artifact" not in v2  # its training run has no attention picture here

        assert v3.startswith("Not promoted: test_acc 0.3000 vs 0.6000 of champion v2.\n\n"
                             "**Now:** `@candidate` — not promoted; the champion stayed v2.\n\n"
                             "**Gate decision:** not promoted — kept champion: candidate test_acc 0.300000 vs champion v2 0.600000")
        assert "| **`test_acc`** (gate) | 0.3000 | 0.6000 | −0.3000 |\n" in v3
        card = json.loads(client.get_model_version("vit-test", "3").tags[CARD_TAG])
        assert (card["family"], card["num_params"], card["image_size"], card["attention"]) == ("vit", params, [28, 28], None)
        assert card["registration_run"] == {"id": registry["results"]["C"].run_id, "experiment_id": exp}

    def test_model_description(self, registry):
        text = registry["client"].get_registered_model("vit-test").description
        r = registry["results"]
        assert "Image classifier: a vit-family Vision Transformer" in text
        assert 'Load the champion: `mlflow.pyfunc.load_model("models:/vit-test@champion")`.' in text
        assert "### Champion: [v2](#/models/vit-test/versions/2)\n" in text
        assert "| **`test_acc`** (gate) | 0.6000 |\n| `test_count` | 30 |\n" in text
        assert "| dataset | `synthetic` `digest-123` |\n" in text
        assert "Newest version (`@candidate`): [v3](#/models/vit-test/versions/3).\n" in text
        rows = [line for line in text.splitlines() if line.startswith("| 20")]  # the promotions table, newest first
        assert len(rows) == 3 and "### Last promotions (newest first, 3 of 3)" in text
        for row, (key, mine, theirs, decision) in zip(rows, [("C", "0.3000", "0.6000 (v2)", "kept"),
                                                            ("B", "0.6000", "0.1000 (v1)", "promoted"),
                                                            ("A", "0.1000", "—", "first")]):
            version = r[key].version
            assert f" | [v{version}](#/models/vit-test/versions/{version}) | {mine} | {theirs} | **{decision}** | " in row
            assert row.endswith(f" | {r[key].reason} |")

    def test_champion_loads_and_matches_the_checkpoint(self, registry, monkeypatch):
        import mlflow

        def refuse(*args, **kwargs):
            raise AssertionError("loading a packaged model must not unpickle anything")

        images, _ = registry["data"]
        frame = __import__("pandas").DataFrame({"image": [png(im) for im in images[:8]]})
        with monkeypatch.context() as m:  # pickle and torch.load are off limits while loading and predicting
            for target in ("pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load"):
                m.setattr(target, refuse)
            model = mlflow.pyfunc.load_model("models:/vit-test@champion")
            out = model.predict(frame)
        got = np.array(out["probabilities"].tolist())

        ref_model = from_pretrained(registry["dirs"]["B"]).eval()
        x = (torch.from_numpy(images[:8]).float()[:, None] / 255.0 - MEAN[0]) / STD[0]
        with torch.no_grad():
            ref = ref_model(x).softmax(dim=-1).double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
        assert out["label"].tolist() == [0] * 8 and out["label_name"].tolist() == ["ankle"] * 8
        assert (out["error"] == "").all()

    def test_bad_image_gets_an_error_row(self, registry):
        import mlflow
        import pandas as pd

        model = mlflow.pyfunc.load_model("models:/vit-test@candidate")
        out = model.predict(pd.DataFrame({"image": [b"not an image", png(registry["data"][0][0])]}))
        assert out["label"].tolist()[0] == -1 and "not an image" in out["error"].tolist()[0]
        assert out["label_name"].tolist()[1] == "bag"

    def test_artifact_tree_has_no_pickle(self, registry):
        import mlflow
        import yaml
        from safetensors import safe_open

        for alias in ("champion", "candidate"):  # the candidate's source folder was salted with pickles
            root = Path(mlflow.artifacts.download_artifacts(f"models:/vit-test@{alias}",
                                                            dst_path=str(registry["tmp"] / f"dl-{alias}")))
            files = [p for p in root.rglob("*") if p.is_file()]
            names = {p.relative_to(root).as_posix() for p in files}
            assert {"artifacts/model.safetensors", "artifacts/config.json", "artifacts/class_names.json",
                    "artifacts/preprocessing.json", "code/serving.py", "code/imaging.py", "code/vit_model/model.py",
                    "serving_model.py", "MLmodel", "input_example.json"} <= names
            for p in files:
                assert p.suffix not in (".pkl", ".pickle", ".bin", ".pt", ".pth"), p
                if p.suffix == ".safetensors":
                    with safe_open(str(p), framework="pt") as f:  # a real safetensors file, not a pickle
                        assert "head.weight" in f.keys()
                else:
                    assert p.read_bytes()[:1] != b"\x80", f"{p} starts like a pickle"
            flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
            assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
            assert set(flavor["artifacts"]) == {"config", "weights", "class_names", "preprocessing"}
        assert not registry["marker"].exists(), "a planted pickle was executed"

    def test_gate_needs_test_data_once_a_champion_exists(self, registry):
        with pytest.raises(RegisterError, match="has a champion \\(v2\\) but no test data"):
            register(registry["cfg"], str(registry["dirs"]["A"]), test_data=None)

    def test_cli_gates_on_a_prepared_test_split(self, registry, capsys):
        """``python -m pipelines register``: the test split comes from a dataset version on storage;
        C (always "bag") against the champion B (always "ankle") on 6 ankles, 2 bags, 1 coat.

        Under its own model name, with B registered first as its champion: registering into
        ``vit-test`` would change the versions, aliases and log that the other tests check."""
        from pipelines.cli import main
        from pipelines.prepare import prepare

        tmp, model_name = registry["tmp"], "vit-test-cli"
        rng = np.random.default_rng(3)
        for split, counts in (("train", (6, 6, 6)), ("test", (6, 2, 1))):
            for name, count in zip(CLASSES, counts):
                folder = tmp / "imgs" / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
        overrides = [f"storage.uri=file://{tmp / 'store'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                     "mlflow.experiment_name=register-test", f"registry.model_name={model_name}",
                     f"data.source={tmp / 'imgs'}", "data.name=tiny"]
        version = prepare(load_config(None, overrides))
        first = register(load_config(None, overrides), str(registry["dirs"]["B"]), run_id="run-b")
        assert (first.version, first.decision, first.champion_after) == ("1", "first", "1")
        sets = [a for o in overrides + [f"data.version={version.version}"] for a in ("--set", o)]
        capsys.readouterr()
        assert main(["register", *sets, "--model-dir", str(registry["dirs"]["C"]), "--run-id", "run-cli"]) == 0
        out = capsys.readouterr().out
        assert f"registered {model_name} v2 test_acc 0.2222; @candidate -> v2, @champion v1 -> v1 (kept)" in out
        assert "vs champion v1 0.666667" in out
        tags = registry["client"].get_model_version(model_name, "2").tags
        assert tags["dataset_digest"] == version.version and tags["training_run_id"] == "run-cli"
        described = registry["client"].get_model_version(model_name, "2").description  # the gate's dataset version
        assert (f"| dataset | `tiny` |\n| version | `{version.version}` |\n"
                f"| digest (sha256) | `{version.manifest['inputs_sha256']}` |\n| URI | `{version.uri}` |\n") in described

        # a model whose classes are not the test split's is refused before anything is registered
        other = tmp / "other"
        VisionTransformer(ARCH).save_pretrained(other, meta={"class_names": ["x", "y", "z"], "mean": [0.5], "std": [0.5]})
        assert main(["register", *sets, "--model-dir", str(other)]) == 2
        assert "predicts classes ['x', 'y', 'z'] but the test split has ['ankle', 'bag', 'coat']" in capsys.readouterr().err
        assert len(registry["client"].search_model_versions(f"name = '{model_name}'")) == 2

    def test_classifier_from_artifacts_matches_pyfunc(self, registry):
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts("models:/vit-test/2", dst_path=str(registry["tmp"] / "v2")))
        clf = ViTClassifier.from_artifacts(root / "artifacts", device="cpu")
        images = registry["data"][0][:4]
        fast = clf.predict_proba(torch.from_numpy(images)[:, None]).double().numpy()
        slow = np.array(clf.predict(None, __import__("pandas").DataFrame({"image": [png(i) for i in images]}))
                        ["probabilities"].tolist())
        np.testing.assert_allclose(fast, slow, atol=1e-7, rtol=0)
