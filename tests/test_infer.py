"""infer: one row per input (also when an actor is killed), error rows, accuracy equal to evaluate's.

The integration tests share one setup (module fixture): a small Fashion-MNIST dataset version
prepared onto the S3 endpoint, a sqlite MLflow store whose artifacts also live on S3, and one
registered ViT (28x28, 1 channel, patch 2: slow enough, ~20 ms per image on one thread, that a
job on a few hundred images lasts seconds) promoted to ``@champion``. The model is not trained:
the assertions compare inference with evaluation of the same weights, not with a quality bar.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import cli
from pipelines import infer as infer_mod
from pipelines import storage as st
from pipelines.config import load_config
from pipelines.errors import ConfigError, InferError
from pipelines.infer import infer
from pipelines.inference.model import parse_model_uri
from pipelines.inference.writer import load_manifest, load_predictions
from vit_model import VisionTransformer, ViTConfig

MODEL_NAME = "vit-infer-test"
ARCH = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4)
MEAN, STD = (0.2860,), (0.3530,)


def make_config(storage_uri: str, tracking_uri: str, *overrides: str):
    return load_config(None, [
        f"storage.uri={storage_uri}", f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment_name=infer-test",
        f"registry.model_name={MODEL_NAME}", "infer.batch_size=16", "infer.num_actors=1", *overrides,
    ])


# --------------------------------------------------------------------------------------------
# Fast checks (no Ray, no registry)
# --------------------------------------------------------------------------------------------


def test_parse_model_uri():
    assert parse_model_uri("models:/vit@champion") == ("vit", None, "champion")
    assert parse_model_uri("models:/vit/12") == ("vit", "12", None)
    for bad in ("vit@champion", "models:/vit", "models:/vit/latest", "runs:/abc/model", "models:/a/1/2"):
        with pytest.raises(ConfigError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
            parse_model_uri(bad)


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="infer.batch_size=0 must be at least 1"):
        make_config(f"file://{tmp_path}/store", f"sqlite:///{tmp_path}/mlflow.db", "infer.batch_size=0")
    cfg = make_config(f"file://{tmp_path}/store", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match="job name 'no/slash'"):
        infer(cfg, input_uri=str(tmp_path), model_uri="models:/x@champion", job_name="no/slash")
    code = cli.main(["infer", "--set", f"storage.uri=file://{tmp_path}/store", "--input", str(tmp_path),
                     "--model", "not-a-model-uri"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'not-a-model-uri' is not of the form" in err


def test_missing_alias_names_the_fix(tmp_path):
    cfg = make_config(f"file://{tmp_path}/store", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(InferError, match=r"has no alias @champion of 'nothing-here'.*pipelines register"):
        infer(cfg, input_uri=str(tmp_path), model_uri="models:/nothing-here@champion")


# --------------------------------------------------------------------------------------------
# Shared setup: dataset version + registered champion on S3
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_endpoint, ray_cluster, fmnist_idx):
    from pipelines.prepare import prepare
    from pipelines.register import register

    tmp = tmp_path_factory.mktemp("infer")
    root = s3_endpoint.uri("infer")
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = make_config(root, tracking_uri, "data.source=fashion-mnist", f"data.source_dir={fmnist_idx.folder}",
                      "data.shard_rows=50")
    version = prepare(cfg)

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**ARCH))
    with torch.no_grad():
        model.head.weight.mul_(50.0)  # spread the logits so the untrained model predicts several classes
    meta = {"class_names": version.classes, "channels": 1, "image_size": [28, 28], "mean": list(MEAN),
            "std": list(STD), "dataset": {"uri": version.uri, "version": version.version}}
    model_dir = tmp / "model"
    model.save_pretrained(model_dir, meta=meta)
    registered = register(cfg, str(model_dir))
    assert registered.champion_after == registered.version
    return {"cfg": cfg, "root": root, "tmp": tmp, "version": version, "model_dir": model_dir,
            "model_version": registered.version, "tracking_uri": tracking_uri}


def read_ids(job_uri: str, storage) -> list[str]:
    return load_predictions(job_uri, storage, columns=["input_id"]).column("input_id").to_pylist()


# --------------------------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_dataset_version_rows_and_accuracy_equal_evaluate(setup):
    from mlflow import MlflowClient

    from pipelines.data.stream import iter_local_batches
    from pipelines.evaluate import eval_config, score
    from vit_model import from_pretrained

    cfg, version = setup["cfg"], setup["version"]
    result = infer(cfg, input_uri=version.uri, model_uri=f"models:/{MODEL_NAME}@champion", job_name="test-split")

    n = version.count("test")
    assert (result.input_count, result.output_count, result.error_count) == (n, n, 0)
    assert result.model_uri == f"models:/{MODEL_NAME}/{setup['model_version']}"  # the alias, pinned
    job_uri = st.join_uri(setup["root"], "predictions", "test-split")
    table = load_predictions(job_uri, cfg.storage)
    ids = table.column("input_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"test/{i}" for i in range(n)}
    assert set(table.column("model_version").to_pylist()) == {setup["model_version"]}
    assert set(table.column("model_name").to_pylist()) == {MODEL_NAME}
    assert all(len(k) == 3 and len(p) == 3 for k, p in zip(table.column("topk_labels").to_pylist(),
                                                              table.column("topk_probs").to_pylist()))

    # evaluate's scoring of the same weights on the same split: the same correct count, row by row
    model, meta = from_pretrained(setup["model_dir"], return_meta=True)
    model.eval()
    ecfg = eval_config(cfg, meta)
    reference = score(model, version, "test", ecfg, batch_size=cfg.infer.batch_size)
    assert result.correct == reference["correct1"]
    assert result.accuracy == pytest.approx(reference["acc1"], abs=0)
    expected = {}
    with torch.no_grad():
        for batch in iter_local_batches(version, "test", ecfg, batch_size=64, train=False):
            for rid, label in zip(batch["row_id"].tolist(), model(batch["image"]).argmax(-1).tolist()):
                expected[f"test/{rid}"] = label
    got = dict(zip(ids, table.column("label").to_pylist()))
    assert got == expected
    assert len(set(expected.values())) > 1  # the check is not vacuous: several classes predicted

    manifest = load_manifest(job_uri, cfg.storage)
    assert manifest["input_count"] == manifest["output_count"] == n
    assert manifest["model"]["uri"] == result.model_uri and manifest["input_digest"] == result.input_digest
    assert manifest["data"] == result.output_uri.rsplit("/", 1)[1]
    assert sum(f["rows"] for f in manifest["files"]) == n

    client = MlflowClient(setup["tracking_uri"])
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.task"] == "infer"
    assert run.data.params["model_version"] == setup["model_version"]
    assert run.data.params["model_uri_requested"] == f"models:/{MODEL_NAME}@champion"
    assert run.data.metrics["output_count"] == n and run.data.metrics["images_per_s"] > 0


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
def test_raw_images_on_s3_with_bad_files_via_cli(setup, capsys):
    cfg = setup["cfg"]
    rng = np.random.default_rng(3)
    good = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG", quality=90)
    full_png = _png(good)
    files = {
        "a/good.png": full_png,
        "a/b/photo.jpg": jpeg.getvalue(),  # RGB, 40x30: converted to gray and resized like prepare does
        "c/UPPER.PNG": _png(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8), "RGBA"),
        "a/truncated.png": full_png[: len(full_png) // 2],
        "a/b/empty.png": b"",
        "c/d/text.jpg": b"this is not a jpeg at all",
        "notes.txt": b"not an input",  # no image extension: skipped
        ".cache/hidden.png": full_png,  # hidden folder: skipped
    }
    prefix = s3_prefix = st.join_uri(setup["root"], "raw-images")
    for rel, data in files.items():
        st.write_bytes(st.join_uri(s3_prefix, rel), data, cfg.storage)

    argv = ["infer", "--set", f"storage.uri={setup['root']}", "--set", f"mlflow.tracking_uri={setup['tracking_uri']}",
            "--set", "mlflow.experiment_name=infer-test", "--set", "infer.batch_size=4",
            "--input", prefix, "--model", f"models:/{MODEL_NAME}@champion", "--job", "raw-zoo"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    job_uri = st.join_uri(setup["root"], "predictions", "raw-zoo")
    manifest = load_manifest(job_uri, cfg.storage)
    assert out[-1] == st.join_uri(job_uri, manifest["data"])  # the last line is the output URI
    assert any("6/6 rows, 3 error(s)" in line for line in out)

    table = load_predictions(job_uri, cfg.storage).to_pylist()
    rows = {r["input_id"]: r for r in table}
    assert sorted(rows) == sorted(["a/good.png", "a/b/photo.jpg", "c/UPPER.PNG", "a/truncated.png",
                                   "a/b/empty.png", "c/d/text.jpg"])
    assert rows["a/truncated.png"]["error"].startswith("truncated or corrupt image data")
    assert rows["a/b/empty.png"]["error"] == "empty file (0 bytes)"
    assert rows["c/d/text.jpg"]["error"].startswith("not an image")
    for rel in ("a/truncated.png", "a/b/empty.png", "c/d/text.jpg"):
        r = rows[rel]
        assert (r["label"], r["label_name"], r["topk_labels"], r["topk_probs"]) == (-1, "", [], [])
        assert r["source"] == st.join_uri(prefix, rel)
    for rel in ("a/good.png", "a/b/photo.jpg", "c/UPPER.PNG"):
        r = rows[rel]
        assert r["error"] == "" and r["label_name"] == setup["version"].classes[r["label"]]
        assert r["topk_labels"][0] == r["label_name"] and r["true_label"] == -1
        assert r["topk_probs"] == sorted(r["topk_probs"], reverse=True) and 0 < sum(r["topk_probs"]) <= 1.0001
    assert manifest["input"]["kind"] == "images" and manifest["input"]["skipped_files"] == 2
    assert manifest["error_count"] == 3

    # the good PNG's prediction equals a plain forward pass on its normalised pixels
    from vit_model import from_pretrained

    model = from_pretrained(setup["model_dir"]).eval()
    x = (torch.from_numpy(good).float().div(255.0) - MEAN[0]) / STD[0]
    with torch.no_grad():
        assert model(x[None, None]).argmax(-1).item() == rows["a/good.png"]["label"]


def _alive_actor_pids(name_part: str) -> dict[str, int]:
    """{actor id: pid} of live actors of *this test's* cluster whose class name contains ``name_part``.

    ``ray.util.state.list_actors`` is asked at this cluster's own dashboard address (never an
    auto-detected one: other Ray clusters may run on the machine). The test cluster runs
    without a dashboard; then the same rows come from its GCS actor table."""
    import ray

    dashboard = ray._private.worker.get_dashboard_url()
    if dashboard:
        from ray.util.state import list_actors

        actors = list_actors(address=f"http://{dashboard}", filters=[("state", "=", "ALIVE")], timeout=5)
        return {a.actor_id: a.pid for a in actors if name_part in (a.class_name or "") and a.pid}
    table = ray._private.state.actors()
    return {aid: a["Pid"] for aid, a in table.items()
            if a["State"] == "ALIVE" and name_part in a["ActorClassName"] and a.get("Pid")}


def _restarts(actor_id: str) -> int:
    import ray

    return int(ray._private.state.actors(actor_id=actor_id).get("NumRestarts", 0))


@pytest.mark.integration
def test_actor_killed_mid_job_still_one_row_per_input(setup):
    """SIGKILL a model actor while it works: Ray restarts it and retries its tasks; the output
    still holds every input exactly once."""
    cfg = load_config(None, [
        f"storage.uri={setup['root']}", f"mlflow.tracking_uri={setup['tracking_uri']}",
        "mlflow.experiment_name=infer-test", "infer.batch_size=4", "infer.num_actors=2", "infer.split=train",
    ])
    version = setup["version"]
    done = threading.Event()
    killed: dict[str, int] = {}

    def busy(pids: dict[str, int], window: float = 0.3) -> tuple[str, int] | None:
        """The actor that used the most CPU during ``window`` seconds, if it was working."""
        import psutil

        def cpu(pid: int) -> float:
            try:
                t = psutil.Process(pid).cpu_times()
                return t.user + t.system
            except psutil.Error:
                return float("nan")

        before = {aid: cpu(pid) for aid, pid in pids.items()}
        time.sleep(window)
        used = {aid: cpu(pid) - before[aid] for aid, pid in pids.items()}
        aid = max(used, key=lambda a: used[a] if used[a] == used[a] else -1.0)
        return (aid, pids[aid]) if used[aid] > 0.05 else None

    def killer() -> None:
        deadline = time.monotonic() + 180
        while not done.is_set() and time.monotonic() < deadline:
            alive = _alive_actor_pids("BatchPredictor")
            target = busy(alive) if alive else None  # an actor in the middle of a batch, not an idle one
            if target is not None and not done.is_set():
                os.kill(target[1], signal.SIGKILL)
                killed[target[0]] = target[1]
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = infer(cfg, input_uri=version.uri, model_uri=f"models:/{MODEL_NAME}@champion", job_name="killed")
    finally:
        done.set()
        thread.join(timeout=10)
    assert killed, "the job finished before an actor could be killed; make it longer"
    assert _restarts(next(iter(killed))) >= 1  # Ray restarted the killed actor: it died mid-job

    n = version.count("train")
    assert (result.input_count, result.output_count, result.error_count) == (n, n, 0)
    ids = read_ids(st.join_uri(setup["root"], "predictions", "killed"), cfg.storage)
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"train/{i}" for i in range(n)}


@pytest.mark.integration
def test_partial_job_is_never_complete_and_a_rerun_completes(setup, monkeypatch):
    cfg, version = setup["cfg"], setup["version"]
    job_uri = st.join_uri(setup["root"], "predictions", "partial")

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash while publishing")

    monkeypatch.setattr(infer_mod, "publish_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(cfg, input_uri=version.uri, model_uri=f"models:/{MODEL_NAME}@champion", job_name="partial")
    assert not st.exists(st.join_uri(job_uri, "manifest.json"), cfg.storage)
    with pytest.raises(InferError, match="no complete inference job"):
        load_predictions(job_uri, cfg.storage)
    leftovers = st.list_dirs(job_uri, cfg.storage)
    assert len(leftovers) == 1 and leftovers[0].startswith("_attempt-")  # rows written, never published
    written = [f for f in st.list_files(job_uri, cfg.storage) if f.relpath.endswith(".parquet")]
    assert written and sum(pq.read_metadata(io.BytesIO(st.read_bytes(f.uri, cfg.storage))).num_rows
                           for f in written) == version.count("test")

    monkeypatch.undo()
    result = infer(cfg, input_uri=version.uri, model_uri=f"models:/{MODEL_NAME}@champion", job_name="partial")
    n = version.count("test")
    assert result.output_count == n
    ids = read_ids(job_uri, cfg.storage)
    assert len(ids) == len(set(ids)) == n
    manifest = load_manifest(job_uri, cfg.storage)
    assert st.list_dirs(job_uri, cfg.storage) == [manifest["data"]] != leftovers  # the failed attempt is gone


@pytest.mark.integration
def test_an_error_inside_the_actors_is_its_one_line_and_nothing_is_published(setup, monkeypatch):
    """The actors read the shard rows themselves: a shard that holds fewer rows than at job start
    (simulated by the driver expecting 7 more) fails the job with the actor's one-line DataError,
    not a Ray traceback, and no manifest is published."""
    import dataclasses

    from pipelines.errors import DataError

    cfg, version = setup["cfg"], setup["version"]
    real = infer_mod.resolve_input

    def grown(*args, **kwargs):
        got = real(*args, **kwargs)
        return dataclasses.replace(got, shard_rows=(got.shard_rows[0] + 7,) + got.shard_rows[1:])

    monkeypatch.setattr(infer_mod, "resolve_input", grown)
    with pytest.raises(DataError, match=r"^shard s3://\S+/part-00000\.parquet has 50 rows, the job asked for rows "
                                        r"48-57: it changed after the job started; run the job again$"):
        infer(cfg, input_uri=version.uri, model_uri=f"models:/{MODEL_NAME}@champion", job_name="changed")
    assert not st.exists(st.join_uri(setup["root"], "predictions", "changed", "manifest.json"), cfg.storage)


def test_user_error_behind_follows_ray_and_exception_chains():
    """The unwrapping :func:`infer` uses: the innermost UserError of a cause chain, else None."""
    from pipelines.errors import DataError, user_error_behind

    class TaskError(RuntimeError):  # like ray.exceptions.RayTaskError: the cause as an attribute
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    inner = DataError("shard x has 3 rows")
    try:
        try:
            raise inner
        except DataError as e:
            raise RuntimeError("UDF failed to process a data block.") from e
    except RuntimeError as wrapped:
        assert user_error_behind(TaskError(wrapped)) is inner
    assert user_error_behind(TaskError(RuntimeError("boom"))) is None
    assert user_error_behind(inner) is inner
    appended = DataError("shard x has 3 rows\nFailed to apply UDF transform after 1/1 attempts")
    assert str(user_error_behind(TaskError(appended))) == "shard x has 3 rows"


def test_verify_output_drops_rows_written_twice_and_refuses_gaps(tmp_path):
    """The exactly-once check on its own: duplicates (a retried task's second copy) are removed
    from the files, a missing input is an error."""
    import pyarrow as pa

    from pipelines.inference.actors import OUTPUT_SCHEMA
    from pipelines.inference.writer import verify_output

    def rows(ids, label=1):
        n = len(ids)
        return pa.Table.from_pydict({
            "input_id": ids, "source": ids, "label": [label] * n, "label_name": ["b"] * n,
            "topk_labels": [["b"]] * n, "topk_probs": [[0.9]] * n, "error": [""] * n, "model_name": ["m"] * n,
            "model_version": ["1"] * n, "true_label": [1] * n}, schema=OUTPUT_SCHEMA)

    data = tmp_path / "job" / "_attempt-x"
    data.mkdir(parents=True)
    pq.write_table(rows(["a", "b", "c"]), data / "part-0.parquet")
    pq.write_table(rows(["c", "d", "d"]), data / "part-1.parquet")  # "c" again, "d" twice in one file
    pq.write_table(rows(["a"]), data / "part-2.parquet")  # nothing new: the file goes away
    storage = load_config(None, []).storage
    checked = verify_output(f"file://{data}", ["a", "b", "c", "d"], storage)
    assert (checked.output_count, checked.duplicates_removed, checked.correct, checked.labelled) == (4, 3, 4, 4)
    assert [f["path"] for f in checked.files] == ["part-0.parquet", "part-1.parquet"]
    assert not (data / "part-2.parquet").exists()
    assert pq.read_table(data / "part-1.parquet").column("input_id").to_pylist() == ["d"]
    with pytest.raises(InferError, match=r"1 input\(s\) have no prediction row \(e.g. \['e'\]\)"):
        verify_output(f"file://{data}", ["a", "b", "c", "d", "e"], storage)


def test_shard_slices_cover_every_row_once_in_batches():
    """The dataset path's work items: consecutive ranges of at most one batch, per shard, in order."""
    from pipelines.inference.actors import shard_slices
    from pipelines.inference.inputs import InferInput

    inputs = InferInput(uri="file:///d", kind="dataset", input_ids=(), shard_uris=("a", "b", "c"), shard_rows=(5, 0, 4))
    assert [(i["shard"], i["start"], i["stop"]) for i in shard_slices(inputs, 2)] == [
        ("a", 0, 2), ("a", 2, 4), ("a", 4, 5), ("c", 0, 2), ("c", 2, 4)]
    assert [(i["start"], i["stop"]) for i in shard_slices(inputs, 1024)] == [(0, 5), (0, 4)]


def test_read_shard_rows_reads_only_the_asked_rows_across_row_groups(tmp_path):
    """Any row range of a shard whose row groups do not line up with the batches: exactly the rows
    of a whole-file read, sliced; a range past the end (the shard changed) is a one-line DataError."""
    import pyarrow as pa

    from pipelines.errors import DataError
    from pipelines.inference.actors import SHARD_COLUMNS, read_shard_rows

    n = 10
    table = pa.table({"image": [bytes([i]) * 3 for i in range(n)], "label": list(range(n)),
                      "row_id": list(range(100, 100 + n)), "source_id": [f"s{i}" for i in range(n)],
                      "extra": [0] * n})
    pq.write_table(table, tmp_path / "part-00000.parquet", row_group_size=3)  # groups of 3, 3, 3, 1 rows
    uri = f"file://{tmp_path}/part-00000.parquet"
    storage = load_config(None, []).storage
    whole = table.select(SHARD_COLUMNS)
    for start, stop in [(0, 10), (0, 1), (2, 7), (3, 6), (5, 9), (9, 10), (4, 5)]:
        assert read_shard_rows(uri, start, stop, storage).to_pylist() == whole.slice(start, stop - start).to_pylist()
    with pytest.raises(DataError, match=r"part-00000.parquet has 10 rows, the job asked for rows 8-12"):
        read_shard_rows(uri, 8, 12, storage)


def test_evaluation_transform_at_the_stored_size_does_not_import_torchvision():
    """Inference actors decode with the evaluation transform; at the stored size it is no op, and
    importing torchvision for it cost each actor ~1 s before its first batch."""
    import subprocess
    import sys

    code = ("import sys; from pipelines.config import AugmentConfig; "
            "from pipelines.data.stream import StreamSpec, build_transform; "
            "spec = StreamSpec(size=(28, 28), channels=1, train=False, augment=AugmentConfig(), seed=0, deterministic=True); "
            "assert build_transform(spec, (28, 28)) is None; assert 'torchvision' not in sys.modules, 'imported'; "
            "assert build_transform(spec, (32, 32)) is not None; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.integration
def test_unschedulable_actor_pool_is_refused_not_left_waiting(ray_cluster, tmp_path):
    from pipelines.inference.actors import check_resources

    store, db = f"file://{tmp_path}/store", f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match=r"needs 5 CPUs; the Ray cluster has 4"):  # the fixture's 4 CPUs
        check_resources(make_config(store, db, "infer.num_actors=4"))
    with pytest.raises(ConfigError, match=r"infer.use_gpu=true .* needs 1 GPU\(s\); the Ray cluster has 0"):
        check_resources(make_config(store, db, "infer.use_gpu=true"))


@pytest.mark.integration
def test_unschedulable_actor_pool_on_a_connected_cluster_is_a_warning(ray_cluster, tmp_path, caplog):
    """strict=False (a cluster we connected to, which may have an autoscaler): the same check
    logs a warning on the module's logger instead of refusing."""
    from pipelines.infer import check_resources

    store, db = f"file://{tmp_path}/store", f"sqlite:///{tmp_path}/mlflow.db"
    logger = check_resources.__module__  # the module that defines it logs
    with caplog.at_level(logging.WARNING, logger=logger):
        check_resources(make_config(store, db, "infer.num_actors=4"), strict=False)  # needs 5 CPUs of 4
        check_resources(make_config(store, db), strict=False)  # 1 actor fits: nothing to say
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [(
        logger, logging.WARNING,
        "infer.num_actors=4 x infer.cpus_per_actor=1 plus 1 CPU for writing needs 5 CPUs; the Ray cluster has 4. "
        "Lower them or add CPUs (ray.num_cpus) (waiting for the autoscaler, if the cluster has one)",
    )]
