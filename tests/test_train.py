"""Training on a real local Ray cluster, S3 endpoint and MLflow store (tiny model, tiny data).

- a 1-epoch run on 2 workers: metrics, checkpoints and the model on S3; one MLflow run with its
  params, metrics, artifacts and dataset input;
- a resubmitted run resumes; a NaN stops it with the last good checkpoint intact;
- a worker killed mid-epoch: the run finishes from the last checkpoint, one MLflow run;
- the plain worker loop without Ray gives the same losses as one Ray worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipelines import storage as st
from pipelines import tracking
from pipelines.checkpoint import load_training_state, read_state
from pipelines.config import load_config
from pipelines.data.stream import iter_local_batches
from pipelines.errors import UserError
from pipelines.prepare import prepare
from pipelines.train import train
from pipelines.train_worker import EpochData, LocalSession, build_model, train_worker
from pipelines.trainer import TrainingStopped, make_spec

pytestmark = pytest.mark.integration

TINY = ["model.args.embed_dim=32", "model.args.depth=2", "model.args.num_heads=2", "model.args.patch_size=7", "train.batch_size=32",
        "train.cpus_per_worker=0.5", "train.num_workers=2", "train.warmup_epochs=0.5", "data.shard_rows=60"]


def make_cfg(storage_uri, fmnist_idx, tmp_path, *extra):
    return load_config(None, [f"storage.uri={storage_uri}", f"data.source_dir={fmnist_idx.folder}",
                              f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *TINY, *extra])


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint, fmnist_idx):
    root = s3_endpoint.uri("train")
    cfg = load_config(None, [f"storage.uri={root}", f"data.source_dir={fmnist_idx.folder}", "data.shard_rows=60"])
    return root, prepare(cfg)


def _runs(cfg, run_name):
    client = tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'")


def test_one_epoch_two_workers_then_resume_then_nan(ray_cluster, s3_dataset, fmnist_idx, tmp_path):
    root, version = s3_dataset
    cfg = make_cfg(root, fmnist_idx, tmp_path, "train.epochs=1", "train.run_name=r1")
    result = train(cfg, version=version)

    # metrics and checkpoint on storage (S3)
    assert result.restarts == 0 and len(result.history) == 1
    row = result.history[0]
    n_train, n_val = version.count("train"), version.count("val")
    assert row["train_images"] == n_train - n_train % 2  # equal shards: at most world_size - 1 rows dropped
    assert row["val_images"] == n_val - n_val % 2 and 0.0 <= row["val_acc"] <= 1.0
    assert result.best_checkpoint_uri.startswith("s3://") and result.model_uri.startswith(root)
    state = st.read_json(st.join_uri(result.best_checkpoint_uri, "state", "state.json"))
    assert state["epoch"] == 0
    assert st.exists(st.join_uri(result.model_uri, "model.safetensors"))
    assert st.exists(st.join_uri(result.model_uri, "config.json"))

    # exactly one MLflow run with params, metrics, artifacts and the dataset input
    client, runs = _runs(cfg, "r1")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "32" and run.data.params["model.args.embed_dim"] == "32"
    for key in ("train_loss", "val_loss", "val_acc", "lr", "images_per_s", "epoch_seconds"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "confusion_matrix.png", "config.yaml", "train_result.json"} <= artifacts
    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.name == "fashion-mnist" and ds_input.dataset.digest == version.version[:36]
    assert version.uri in ds_input.dataset.source
    assert run.data.tags["pipeline.model_uri"] == result.model_uri

    # resubmitting the same run name with other settings is refused before anything starts ...
    cfg2 = make_cfg(root, fmnist_idx, tmp_path, "train.epochs=2", "train.run_name=r1")
    with pytest.raises(UserError, match=r"^training run 'r1' \(checkpointed at epoch 0\) was started with other "
                                        r"settings: train.epochs 1 -> 2; .*--continue"):
        train(cfg2, version=version)
    # ... and continued explicitly with --continue: from epoch 1, in the same MLflow run
    result2 = train(cfg2, version=version, extend=True)
    assert [h["epoch"] for h in result2.history] == [0, 1] and result2.restarts == 1
    assert result2.history[0] == result.history[0]
    _, runs = _runs(cfg, "r1")
    assert len(runs) == 1 and runs[0].data.tags["pipeline.continued.epoch_1"] == '{"train.epochs": 2}'

    # a non-finite loss (an absurd learning rate, continued into epoch 2) stops the run; epoch 1's checkpoint stays good
    cfg3 = make_cfg(root, fmnist_idx, tmp_path, "train.epochs=3", "train.run_name=r1", "train.lr=1e30")
    with pytest.raises(TrainingStopped, match=r"training 'r1' stopped: non-finite .* at epoch 2.*last good checkpoint is s3://"):
        train(cfg3, version=version, extend=True)
    client, runs = _runs(cfg, "r1")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "non-finite" in runs[0].data.tags["pipeline.stopped"]
    latest = max(d for d in st.list_dirs(st.join_uri(root, "train", "r1")) if d.startswith("checkpoint_"))
    local = tmp_path / "latest"
    for entry in st.list_files(st.join_uri(root, "train", "r1", latest, "state")):
        (local / entry.uri.rsplit("/", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        (local / entry.uri.rsplit("/", 1)[-1]).write_bytes(st.read_bytes(entry.uri))
    assert read_state(local)["epoch"] == 1
    spec = make_spec(cfg3, version, None)
    load_training_state(local, model=build_model(spec), restore_rng=False)  # hashes verify, weights load


@pytest.mark.slow  # ~60-70 s; covered by `python benchmarks/bench_faults.py --kinds train_worker` (random kills)
def test_worker_killed_mid_epoch_resumes_from_checkpoint(ray_cluster, fmnist_idx, tmp_path):
    root = f"file://{tmp_path}/store"
    # long enough (5 epochs of 30 steps) that the kill lands inside the run even when epochs are
    # fast (decoded cache) or the machine is busy; the kill follows the first checkpoint at once
    # Ray Data streaming (the path of splits too big for the workers' memory): a restarted worker
    # group re-plans the epoch it resumes at; data.stream=memory's resume: test_midepoch_resume.py
    cfg = make_cfg(root, fmnist_idx, tmp_path, "train.epochs=5", "train.run_name=killed", "train.max_failures=2",
                   "train.batch_size=8", "data.stream=ray")
    version = prepare(cfg)
    ckpt_root = tmp_path / "store" / "train" / "killed"
    killed = {}

    def train_worker_pids() -> list[int]:
        """Ray Train worker processes of this test's cluster (children of its raylet)."""
        import psutil
        import ray._private.worker as ray_worker

        raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
        return [p.pid for p in psutil.Process(raylet).children(recursive=True)
                if "RayTrainWorker" in " ".join(p.cmdline())]

    done = threading.Event()

    def killer():
        while not done.is_set() and not killed:
            # the snapshot appears once Ray Train has registered the first epoch's checkpoint
            if (ckpt_root / "checkpoint_manager_snapshot.json").is_file():
                time.sleep(0.2)  # into epoch 1
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["pid"] = pids[-1]
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = train(cfg, version=version)
    finally:
        done.set()
        thread.join(timeout=5)
    assert killed, "no worker was killed (the run finished before the first checkpoint was seen)"
    assert result.restarts >= 1  # the worker group restarted from a checkpoint
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3, 4]
    _, runs = _runs(cfg, "killed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.parametrize("stream", ["memory", "ray"])
def test_plain_loop_matches_one_ray_worker(ray_cluster, fmnist_idx, tmp_path, stream):
    root = f"file://{tmp_path}/store"
    cfg = make_cfg(root, fmnist_idx, tmp_path, "train.epochs=1", "train.num_workers=1", "data.shuffle=false",
                   "train.run_name=parity", "train.cpus_per_worker=1.0", f"data.stream={stream}")
    version = prepare(cfg)
    result = train(cfg, version=version)

    spec = make_spec(cfg, version, None)
    data = EpochData(
        train=lambda epoch: iter_local_batches(version, "train", cfg, batch_size=cfg.train.batch_size, epoch=epoch),
        val=lambda: iter_local_batches(version, "val", cfg, batch_size=cfg.train.batch_size),
    )
    session = LocalSession()
    summary = train_worker(spec, data, session)
    (plain,) = summary["history"]
    (ray_row,) = result.history
    assert plain["train_images"] == ray_row["train_images"]
    assert plain["train_loss"] == pytest.approx(ray_row["train_loss"], rel=1e-5, abs=1e-6)
    assert plain["val_loss"] == pytest.approx(ray_row["val_loss"], rel=1e-5, abs=1e-6)
    assert plain["val_acc"] == ray_row["val_acc"]
