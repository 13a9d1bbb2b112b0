"""Exact mid-epoch resume (``train.checkpoint_every_steps``): a run interrupted inside an epoch
and resumed trains on exactly the samples, in exactly the order, of an uninterrupted run, and
ends with the same weights.

- without Ray: the per-rank order, the seekable stream's skip (before decode), per-sample
  augmentation seeds, the resume position, and the plain worker loop interrupted mid-epoch;
- on a real local Ray cluster (2 DDP workers): a run stopped right after a mid-epoch checkpoint
  and resubmitted sees per rank the sample ids of an uninterrupted run, and the same weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import storage as st
from pipelines.checkpoint import read_state, resume_position
from pipelines.config import load_config, to_dict
from pipelines.data import stream as stream_mod
from pipelines.data.stream import (
    EXACT,
    RAY_DATA,
    SeekableStream,
    preprocess_batch,
    rank_order,
    stream_spec,
    train_order,
)
from pipelines.errors import ConfigError, UserError
from pipelines.prepare import prepare
from pipelines.train_worker import EpochData, LocalSession, read_sample_ids, train_worker
from pipelines.trainer import ResumePoint, check_resume, make_spec, resume_point

AUG = ["data.augment.random_crop_padding=2", "data.augment.hflip=0.5", "data.augment.random_erasing=0.25"]
TINY = ["model.args.embed_dim=32", "model.args.depth=2", "model.args.num_heads=2", "model.args.patch_size=7",
        "model.args.drop_path_rate=0.1", "train.mixup_alpha=0.2", "train.ema_decay=0.9", "train.warmup_epochs=0.5",
        "data.shard_rows=60"]


def make_cfg(storage_uri, source_dir, *overrides):
    return load_config(None, [f"storage.uri={storage_uri}", f"data.source_dir={source_dir}", *AUG, *TINY, *overrides])


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory, fmnist_idx):
    root = tmp_path_factory.mktemp("midepoch")
    cfg = make_cfg(f"file://{root}/store", fmnist_idx.folder)
    return cfg, prepare(cfg)


def _batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["row_id"], y["row_id"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["image"], y["image"])  # bit-identical augmentation


# --------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------


def test_rank_order_is_a_deterministic_equal_partition():
    n, world = 103, 4
    orders = [rank_order(n, 7, 3, r, world) for r in range(world)]
    assert {len(o) for o in orders} == {n // world}  # equal per rank: DDP steps in lockstep
    joined = np.concatenate(orders)
    assert len(set(joined.tolist())) == len(joined)  # no row on two ranks
    for r in range(world):
        assert np.array_equal(rank_order(n, 7, 3, r, world), orders[r])  # a function of its arguments
    assert not np.array_equal(rank_order(n, 7, 4, 0, world), orders[0])  # each epoch its own order
    assert np.array_equal(rank_order(n, 7, 3, 1, world, shuffle=False), np.arange(1, 100, 4))
    with pytest.raises(ValueError, match="rank 4"):
        rank_order(n, 7, 3, 4, world)


def test_seekable_stream_skips_before_decode_and_reproduces_the_tail(local_ds, monkeypatch):
    cfg, ds = local_ds
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_decoded=False))  # decode per batch
    stream = SeekableStream(ds, "train", cfg, batch_size=8, rank=1, world_size=2)
    assert len(stream) == ds.count("train") // 2
    full = list(stream.epoch(2))
    assert [int(i) for b in full for i in b["row_id"]] == stream.row_ids[stream.order(2)].tolist()

    decoded = []
    real = stream_mod.decode_chw
    monkeypatch.setattr(stream_mod, "decode_chw", lambda data: decoded.append(1) or real(data))
    tail = list(stream.epoch(2, start=3 * 8))
    _batches_equal(tail, full[3:])
    assert len(decoded) == len(stream) - 3 * 8  # the skipped rows were never decoded
    assert not torch.equal(next(iter(stream.epoch(3)))["row_id"], full[0]["row_id"])


def test_validation_stream_evaluates_every_row_once_unaugmented(local_ds):
    # data.stream=memory holds "val" in the workers too: across ranks every row exactly once, in
    # row-id order, preprocessed as for evaluation (no augmentation), the same every epoch
    cfg, ds = local_ds
    assert cfg.data.augment.hflip or cfg.data.augment.random_crop_padding  # the train spec would change pixels
    world = 5
    streams = [SeekableStream(ds, "val", cfg, batch_size=5, rank=r, world_size=world, train=False)
               for r in range(world)]
    seen = {r: [b for b in s.epoch(0)] for r, s in enumerate(streams)}
    ids = [np.concatenate([b["row_id"].numpy() for b in seen[r]]) for r in range(world)]
    n = ds.count("val")
    assert n % world  # so the ranks' counts differ
    assert sorted(np.concatenate(ids).tolist()) == sorted(streams[0].row_ids.tolist())
    assert [len(i) for i in ids] == [len(s) for s in streams] == [len(range(r, n, world)) for r in range(world)]
    assert all(np.all(np.diff(i) > 0) for i in ids)
    everything = streams[0]
    rows = {"pixels": everything.images, "label": everything.labels, "row_id": everything.row_ids}
    expected = preprocess_batch(rows, stream_spec(ds, cfg, train=False), limit_threads=False)["image"]
    for r in range(world):
        got = torch.cat([b["image"] for b in seen[r]])
        assert torch.equal(got, torch.from_numpy(expected[r::world]))
        _batches_equal(list(streams[r].epoch(7)), seen[r])


def test_augmentation_is_per_sample_and_per_epoch(local_ds):
    cfg, ds = local_ds
    stream = SeekableStream(ds, "train", cfg, batch_size=4)
    spec = stream_spec(ds, cfg, train=True)
    rows = {"pixels": stream.images[:4], "label": stream.labels[:4], "row_id": stream.row_ids[:4]}
    alone = {k: v[2:3] for k, v in rows.items()}
    together = preprocess_batch(rows, spec, limit_threads=False, epoch=5)["image"]
    # row 2's augmentation does not depend on the rows beside it (nor, hence, on where a resume starts)
    assert np.array_equal(preprocess_batch(alone, spec, limit_threads=False, epoch=5)["image"][0], together[2])
    other_epoch = preprocess_batch(rows, spec, limit_threads=False, epoch=6)["image"]
    assert not np.array_equal(other_epoch, together)  # and changes from epoch to epoch


def test_config_and_resume_position(local_ds, tmp_path):
    cfg, _ = local_ds
    with pytest.raises(ConfigError, match=r"train.checkpoint_every_steps=0 must be at least 1"):
        load_config(None, ["train.checkpoint_every_steps=0"])
    with pytest.raises(ConfigError, match=r"needs data.equal_shards=true"):
        load_config(None, ["train.checkpoint_every_steps=10", "data.equal_shards=false"])
    assert resume_position({"epoch": 2}) == (3, 0)
    assert resume_position({"epoch": 2, "position": {"samples": 48}}) == (2, 48)

    # the newest checkpoint decides; a mid-epoch one resumes inside its own epoch
    exact = load_config(None, [f"storage.uri={tmp_path.as_uri()}", "train.checkpoint_every_steps=5"])
    version = type("V", (), {"version": "v1"})()
    base = st.join_uri(exact.storage.uri, "train", "r")
    for name, state in (("checkpoint_a", {"epoch": 0, "step": 10}),
                        ("checkpoint_b", {"epoch": 1, "step": 15, "position": {"samples": 40}})):
        st.write_json(st.join_uri(base, name, "state", "state.json"),
                      {**state, "config": to_dict(exact), "metrics": {"dataset_version": "v1"}})
    assert resume_point(exact, "r", version) == ResumePoint(1, {}, 40)
    # another checkpoint interval is the same run; no mid-epoch checkpoints is another data order
    assert resume_point(dataclasses.replace(exact, train=dataclasses.replace(exact.train, checkpoint_every_steps=7)),
                        "r", version).changed == {}
    plain = dataclasses.replace(exact, train=dataclasses.replace(exact.train, checkpoint_every_steps=None))
    point = resume_point(plain, "r", version)
    assert point.changed == {"data.order": ("exact", "ray-data")}
    with pytest.raises(UserError, match=r"^training run 'r' \(checkpointed in epoch 1 after 40 samples per worker\) "
                                        r"was started with other settings: data.order 'exact' -> 'ray-data'"):
        check_resume("r", point, extend=False)


def test_data_stream_resolves_per_version_and_is_part_of_the_run(local_ds, tmp_path):
    cfg, version = local_ds
    decoded = version.count("train") * version.channels * 28 * 28

    def order(*overrides):
        return train_order(version, make_cfg(cfg.storage.uri, cfg.data.source_dir, *overrides))

    # auto: in memory while the decoded split fits the cache and the shards are equal
    assert order() == EXACT
    assert order(f"data.cache_max_bytes={decoded}") == EXACT
    assert order(f"data.cache_max_bytes={decoded - 1}") == RAY_DATA
    assert order("data.cache_decoded=false") == RAY_DATA
    assert order("data.equal_shards=false") == RAY_DATA
    assert order("data.stream=ray") == RAY_DATA
    assert order("data.stream=memory", "data.cache_decoded=false") == EXACT  # keeps the PNG bytes instead
    assert order(f"data.cache_max_bytes={decoded - 1}", "train.checkpoint_every_steps=5") == EXACT
    assert make_spec(make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.stream=ray"), version, None).data_order == RAY_DATA

    with pytest.raises(ConfigError, match=r"^data.stream='disk' is not supported; use 'auto', 'ray' or 'memory'$"):
        make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.stream=disk")
    with pytest.raises(ConfigError, match=r"^train.checkpoint_every_steps=5 needs the seekable per-worker order of "
                                          r"data.stream=memory"):
        make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.stream=ray", "train.checkpoint_every_steps=5")
    with pytest.raises(ConfigError, match=r"^data.stream=memory gives every worker the same number of rows"):
        make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.stream=memory", "data.equal_shards=false")
    too_small = make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.stream=memory", "data.cache_max_bytes=1000")
    with pytest.raises(ConfigError, match=r"^data.stream=memory keeps the 'train' split in every worker's memory "
                                          r"\(\d+ MiB > data.cache_max_bytes=1000\).*or set data.stream=ray"):
        stream_mod.check_seekable(version, "train", too_small)

    # a run keeps its data order: a checkpoint records it, and a resume under another order is refused
    run_cfg = make_cfg(f"file://{tmp_path}/store", cfg.data.source_dir)
    base = st.join_uri(run_cfg.storage.uri, "train", "r")
    st.write_json(st.join_uri(base, "checkpoint_a", "state", "state.json"),
                  {"epoch": 0, "step": 10, "config": to_dict(run_cfg),
                   "metrics": {"dataset_version": version.version, "data_order": EXACT}})
    assert resume_point(run_cfg, "r", version) == ResumePoint(1, {})
    streamed = make_cfg(f"file://{tmp_path}/store", cfg.data.source_dir, "data.stream=ray")
    assert resume_point(streamed, "r", version).changed == {"data.order": (EXACT, RAY_DATA)}
    # data.stream=memory is what auto resolved to: the same run
    assert resume_point(make_cfg(f"file://{tmp_path}/store", cfg.data.source_dir, "data.stream=memory"), "r",
                        version).changed == {}


class _Crash(RuntimeError):
    pass


def _crash_after(batches, n: int):
    for i, batch in enumerate(batches):
        if i == n:
            raise _Crash(f"interrupted after {n} batches")
        yield batch


def test_plain_loop_interrupted_mid_epoch_equals_uninterrupted(local_ds, tmp_path):
    """The worker loop without Ray (one rank): mixup, drop-path, EMA and augmentation on."""
    cfg, ds = local_ds
    cfg = load_config(None, [f"storage.uri={cfg.storage.uri}", f"data.source_dir={cfg.data.source_dir}", *AUG, *TINY,
                             "train.epochs=2", "train.batch_size=16", "train.checkpoint_every_steps=4",
                             "train.record_sample_ids=true"])
    stream = SeekableStream(ds, "train", cfg, batch_size=16)
    steps = -(-len(stream) // 16)
    assert steps > 8  # mid-epoch checkpoints at global steps 4 and 8 of epoch 0, and inside epoch 1

    def val():
        return stream_mod.iter_local_batches(ds, "val", cfg, batch_size=16)

    def run(name: str, session: LocalSession, crash_at: int | None = None) -> dict:
        data = EpochData(train=lambda e: _crash_after(stream.epoch(e), crash_at) if crash_at and e == 1 else stream.epoch(e),
                         train_from=stream.epoch, val=val)
        return train_worker(make_spec(cfg, ds, None, run_name=name), data, session)

    full = run("whole", LocalSession(checkpoint_root=str(tmp_path / "whole")))

    first = LocalSession(checkpoint_root=str(tmp_path / "cut"))
    with pytest.raises(_Crash):
        run("cut", first, crash_at=7)  # 7 batches into epoch 1: 2-3 steps after its last mid-epoch checkpoint
    latest = max((tmp_path / "cut").glob("step-*"))
    state = read_state(latest)
    epoch, samples = resume_position(state)
    assert epoch == 1 and 0 < samples < len(stream)
    second = LocalSession(checkpoint_root=str(tmp_path / "cut"), resume_from=str(latest))
    resumed = run("cut", second)
    assert resumed["resumed_at"] == {"epoch": 1, "samples": samples} and resumed["restarts"] == 1

    def ids(name):
        return [i for chunk in read_sample_ids(st.join_uri(cfg.storage.uri, "train", name), 0) for i in chunk["row_ids"]]

    assert ids("cut") == ids("whole")
    assert ids("whole") == [int(i) for e in (0, 1) for i in stream.row_ids[stream.order(e)]]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(tmp_path / "whole/epoch-001" / name)), load_file(str(tmp_path / "cut/epoch-001" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
    # the epoch's train loss covers the steps before the checkpoint too (float summation order aside)
    assert resumed["history"][1]["train_images"] == full["history"][1]["train_images"] == len(stream)
    assert resumed["history"][1]["train_loss"] == pytest.approx(full["history"][1]["train_loss"], rel=1e-9)
    assert resumed["history"][1]["val_acc"] == full["history"][1]["val_acc"]


def test_resume_refuses_another_world_size(local_ds, tmp_path):
    cfg, ds = local_ds
    cfg = load_config(None, [f"storage.uri={cfg.storage.uri}", f"data.source_dir={cfg.data.source_dir}", *TINY,
                             "train.epochs=1", "train.batch_size=16", "train.checkpoint_every_steps=2",
                             "train.limit_train_batches=3"])
    stream = SeekableStream(ds, "train", cfg, batch_size=16)
    data = EpochData(train=stream.epoch, train_from=stream.epoch,
                     val=lambda: stream_mod.iter_local_batches(ds, "val", cfg, batch_size=16))
    train_worker(make_spec(cfg, ds, None), data, LocalSession(checkpoint_root=str(tmp_path)))
    (mid,) = Path(tmp_path).glob("step-*")
    state = read_state(mid)
    assert state["position"]["samples"] == 32 and state["position"]["world_size"] == 1

    session = LocalSession(resume_from=str(mid), world_size=2)  # as rank 0 of a 2-worker group
    with pytest.raises(UserError, match=r"taken in epoch 0 after 32 samples per rank on 1 workers with batches of 16; "
                                        r"this run has 2 workers with batches of 8"):
        train_worker(make_spec(cfg, ds, None), data, session)


# --------------------------------------------------------------------------------------------
# On a real local Ray cluster
# --------------------------------------------------------------------------------------------


def _fail_after_mid_epoch_checkpoint(step: int):
    """A Ray Train callback (it runs in the Train controller) that fails the run right after the
    controller registered the mid-epoch checkpoint of global step ``step`` (a controller error:
    Ray Train ends the run, it does not retry it)."""
    from ray.train import UserCallback

    class FailAt(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0] if metrics else {}
            if row.get("mid_epoch") and int(row["global_step"]) == step:
                raise RuntimeError(f"injected failure after the checkpoint of step {step}")

    return FailAt()


@pytest.mark.integration
def test_ray_run_interrupted_mid_epoch_sees_the_same_samples(ray_cluster, fmnist_idx, tmp_path):
    from pipelines.trainer import fit

    root = f"file://{tmp_path}/store"
    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.epochs=2", "train.batch_size=16",
                 "train.num_workers=2", "train.cpus_per_worker=0.5", "train.checkpoint_every_steps=5",
                 "train.record_sample_ids=true", "train.keep_checkpoints=1"]
    cfg = make_cfg(root, fmnist_idx.folder, *overrides)
    version = prepare(cfg)
    per_rank = version.count("train") // 2
    steps = -(-per_rank // 8)
    assert steps > 10  # mid-epoch checkpoints at global steps 5 and 10 in epoch 0
    in_epoch1 = next(m for m in range(5, 2 * steps, 5) if m > steps + 1)  # one in epoch 1, after its first step

    whole = fit(cfg, version, run_name="whole")
    # the run fails right after a mid-epoch checkpoint; resubmitting it resumes at that checkpoint
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg, version, run_name="cut", callbacks=[_fail_after_mid_epoch_checkpoint(in_epoch1)])
    snapshot = st.read_json(st.join_uri(root, "train", "cut", "checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["metrics"]["global_step"] == in_epoch1
    cut = fit(cfg, version, run_name="cut")
    assert cut.restarts == 1

    def ids(result, rank):
        return [i for c in read_sample_ids(result.run_uri, rank) for i in c["row_ids"]]

    for rank in (0, 1):
        assert len(ids(whole, rank)) == 2 * per_rank
        assert ids(cut, rank) == ids(whole, rank), f"rank {rank}"
    assert not set(ids(whole, 0)[:per_rank]) & set(ids(whole, 1)[:per_rank])  # the ranks share no row in an epoch
    # the resumed runs' weights equal the uninterrupted run's (gloo's 2-rank all-reduce is deterministic)
    a = _latest_weights(whole.latest_checkpoint_uri)
    for result in (cut,):
        assert [h["epoch"] for h in result.history] == [0, 1]
        b = _latest_weights(result.latest_checkpoint_uri)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for e in (0, 1):
            assert result.history[e]["train_loss"] == pytest.approx(whole.history[e]["train_loss"], rel=1e-9)
            assert result.history[e]["val_acc"] == whole.history[e]["val_acc"]

    # MLflow: one row of metrics per epoch, none from the mid-epoch reports; one run for both attempts
    from pipelines import tracking

    client = tracking.client(cfg)
    assert sorted(m.step for m in client.get_metric_history(cut.mlflow_run_id, "val_acc")) == [0, 1]
    assert sorted(m.step for m in client.get_metric_history(cut.mlflow_run_id, "train_loss")) == [0, 1]
    assert "checkpoint_score" not in client.get_run(cut.mlflow_run_id).data.metrics

    # keep_checkpoints=1: Ray Train keeps the best epoch checkpoint and the latest; every mid-epoch
    # one was evicted (a folder the failed attempt wrote after its last registered report may be
    # left on storage, unregistered, as with epoch checkpoints)
    for result in (whole, cut):
        snapshot = st.read_json(st.join_uri(result.run_uri, "checkpoint_manager_snapshot.json"))
        kept = snapshot["checkpoint_results"]
        assert 1 <= len(kept) <= 2 and not any(r["metrics"].get("mid_epoch") for r in kept)
        assert result.best_checkpoint_uri.endswith(max(kept, key=lambda r: r["metrics"]["val_acc"])["checkpoint_dir_name"])


def _latest_weights(checkpoint_uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_bytes

    return load_bytes(st.read_bytes(st.join_uri(checkpoint_uri, "state", "model.safetensors")))
