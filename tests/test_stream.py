"""Streaming into training: exact-once epochs, seeded per-epoch order, decode + augment.

The Ray tests use the session's local cluster and a dataset prepared on the local S3 endpoint,
so the read path is the production one: read_parquet over s3:// shards through pyarrow.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.config import load_config
from pipelines.data.shards import read_split
from pipelines.data.stream import (
    batch_seed,
    build_dataset,
    cache_decoded,
    iter_local_batches,
    preprocess_batch,
    stream_spec,
    train_data_config,
)
from pipelines.errors import ConfigError
from pipelines.prepare import prepare

AUG = ["data.augment.random_crop_padding=2", "data.augment.hflip=0.5", "data.augment.auto_augment=trivial"]


def make_cfg(storage_uri, source_dir, *overrides):
    return load_config(None, [f"storage.uri={storage_uri}", f"data.source_dir={source_dir}",
                              "data.shard_rows=40", *AUG, *overrides])


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory, fmnist_idx):
    cfg = make_cfg(f"file://{tmp_path_factory.mktemp('stream')}/art", fmnist_idx.folder)
    return cfg, prepare(cfg)


def ids_of(batches) -> list[int]:
    return [int(i) for b in batches for i in b["row_id"]]


# --------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------


def test_local_iterator_exact_once_and_seeded_order(local_ds):
    cfg, ds = local_ds
    n = ds.count("train")
    assert n % 2 == 1  # uneven on purpose
    e0 = [ids_of(iter_local_batches(ds, "train", cfg, batch_size=16, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(e0[0] + e0[1]) == list(range(n))  # every row exactly once across the two ranks
    assert abs(len(e0[0]) - len(e0[1])) == 1
    again = [ids_of(iter_local_batches(ds, "train", cfg, batch_size=16, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert again == e0  # same (seed, epoch): same order
    e1 = [ids_of(iter_local_batches(ds, "train", cfg, batch_size=16, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(e1[0] + e1[1]) == list(range(n)) and e1 != e0  # next epoch: a different order
    other_seed = make_cfg(cfg.storage.uri, cfg.data.source_dir, "train.seed=1")
    assert ids_of(iter_local_batches(ds, "train", other_seed, batch_size=16, epoch=0, world_size=2)) != e0[0]


def test_eval_batches_carry_the_exact_source_pixels(local_ds, fmnist_idx):
    cfg, ds = local_ds
    source = read_split(ds, "test")
    mean, std = cfg.data.augment.mean[0], cfg.data.augment.std[0]
    for batch in iter_local_batches(ds, "test", cfg, batch_size=25):
        assert batch["image"].shape[1:] == (1, 28, 28) and batch["image"].dtype == torch.float32
        pixels = torch.round((batch["image"] * std + mean) * 255).to(torch.uint8).numpy()[:, 0]
        for row, img, label in zip(batch["row_id"].tolist(), pixels, batch["label"].tolist()):
            index = int(source["source_id"][row].split("/")[1])
            np.testing.assert_array_equal(img, fmnist_idx.test_images[index])
            assert label == fmnist_idx.test_labels[index]


def test_augmentation_is_seeded_by_seed_and_batch(local_ds):
    cfg, ds = local_ds
    rows = read_split(ds, "train", decode=False)
    batch = {"image": rows["image"][:32], "label": rows["label"][:32], "row_id": rows["row_id"][:32]}
    spec = stream_spec(ds, cfg, train=True)
    a = preprocess_batch(batch, spec, limit_threads=False)
    b = preprocess_batch(batch, spec, limit_threads=False)
    np.testing.assert_array_equal(a["image"], b["image"])  # same seed + rows -> same augmentation
    plain = preprocess_batch(batch, stream_spec(ds, cfg, train=False), limit_threads=False)
    assert not np.array_equal(a["image"], plain["image"])  # augmentation does something
    assert a["image"].shape == plain["image"].shape == (32, 1, 28, 28)
    assert batch_seed(0, batch["row_id"]) != batch_seed(1, batch["row_id"])
    assert batch_seed(0, batch["row_id"]) != batch_seed(0, batch["row_id"][::-1])


def test_stream_settings_are_validated(local_ds):
    cfg, ds = local_ds
    with pytest.raises(ConfigError, match=r"data.augment.auto_augment='autoaugment' is not supported; use null, 'trivial' or 'randaugment'"):
        make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.augment.auto_augment=autoaugment")
    bad = make_cfg(cfg.storage.uri, cfg.data.source_dir, "data.augment.mean=[0.5,0.5]")
    with pytest.raises(ConfigError, match=r"data.augment.mean has 2 values; give 1 or 1"):
        stream_spec(ds, bad, train=True)


def test_resize_to_model_size(local_ds):
    cfg, ds = local_ds
    big = make_cfg(cfg.storage.uri, cfg.data.source_dir, "model.args.img_size=32", "data.augment.random_resized_crop=true")
    batch = next(iter(iter_local_batches(ds, "train", big, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)
    batch = next(iter(iter_local_batches(ds, "val", big, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)


# --------------------------------------------------------------------------------------------
# Ray Data / Ray Train
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_ds(s3_endpoint, fmnist_idx):
    cfg = make_cfg(s3_endpoint.uri("stream"), fmnist_idx.folder)
    return cfg, prepare(cfg)


def _epoch_order(dataset) -> list[int]:
    return [int(i) for b in dataset.iter_batches(batch_size=64, batch_format="numpy") for i in b["row_id"]]


@pytest.mark.integration
@pytest.mark.parametrize("cache", [True, False], ids=["decoded-cache", "decode-each-epoch"])
def test_ray_dataset_per_epoch_order_is_seeded(ray_cluster, s3_ds, cache):
    cfg, ds = s3_ds
    cfg = make_cfg(cfg.storage.uri, cfg.data.source_dir, f"data.cache_decoded={str(cache).lower()}")
    assert cache_decoded(ds, "train", cfg) is cache
    n = ds.count("train")
    dataset = build_dataset(ds, "train", cfg)
    dataset.context.execution_options.preserve_order = True  # what train_data_config sets
    e0, e1 = _epoch_order(dataset), _epoch_order(dataset)  # each iteration is the next epoch
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 != e1
    resumed = build_dataset(ds, "train", cfg, start_epoch=1)  # a run resumed at epoch 1
    resumed.context.execution_options.preserve_order = True
    assert _epoch_order(resumed) == e1
    fresh = build_dataset(ds, "train", cfg)
    fresh.context.execution_options.preserve_order = True
    assert _epoch_order(fresh) == e0


@pytest.mark.integration
@pytest.mark.parametrize("cache", [True, False], ids=["decoded-cache", "decode-each-epoch"])
def test_ray_path_matches_the_plain_path(ray_cluster, s3_ds, cache):
    cfg, ds = s3_ds
    cfg = make_cfg(cfg.storage.uri, cfg.data.source_dir, f"data.cache_decoded={str(cache).lower()}")
    ray_rows = {}
    for b in build_dataset(ds, "val", cfg).iter_batches(batch_size=32, batch_format="numpy"):
        for rid, img, label in zip(b["row_id"], b["image"], b["label"]):
            ray_rows[int(rid)] = (img, int(label))
    plain = {int(r): (img.numpy(), int(lab)) for b in iter_local_batches(ds, "val", cfg, batch_size=32)
             for r, img, lab in zip(b["row_id"], b["image"], b["label"])}
    assert sorted(ray_rows) == sorted(plain) == list(range(ds.count("val")))
    for rid, (img, label) in plain.items():
        np.testing.assert_array_equal(ray_rows[rid][0], img)
        assert ray_rows[rid][1] == label


@pytest.mark.integration
def test_equal_split_drops_at_most_world_size_minus_one_rows(ray_cluster, s3_ds):
    import ray

    cfg, ds = s3_ds
    n = ds.count("train")
    splits = build_dataset(ds, "train", cfg).streaming_split(2, equal=True)

    @ray.remote(num_cpus=0.1)
    def consume(it):
        return [int(i) for b in it.iter_batches(batch_size=16, batch_format="numpy") for i in b["row_id"]]

    a, b = ray.get([consume.remote(s) for s in splits])
    assert len(a) == len(b) == n // 2  # equal counts: DDP-safe
    assert len(set(a) | set(b)) == len(a) + len(b)  # no duplicates
    assert n - len(a) - len(b) == n % 2  # the one odd row out


@pytest.mark.integration
def test_two_train_workers_see_every_sample_exactly_once_per_epoch(ray_cluster, s3_ds, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, ds = s3_ds
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, equal_shards=False))  # exactly once
    n = ds.count("train")
    labels = read_split(ds, "train", decode=False)["label"]
    out = tmp_path / "seen"
    out.mkdir()

    def train_loop(config):
        import ray.train

        from pipelines.data.stream import iter_epoch

        torch.set_num_threads(1)
        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            seen = []
            for images, y, row_ids in iter_epoch(shard, 16, with_ids=True):
                assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
                seen += list(zip(row_ids.tolist(), y.tolist()))
            (config["out"] / f"epoch{epoch}-rank{rank}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": build_dataset(ds, "train", cfg)},
        dataset_config=train_data_config(cfg),
        run_config=RunConfig(name="stream-test", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()

    orders = {}
    for epoch in range(2):
        per_rank = [json.loads((out / f"epoch{epoch}-rank{r}.json").read_text()) for r in (0, 1)]
        ids = [rid for seen in per_rank for rid, _ in seen]
        assert Counter(ids) == Counter(range(n))  # nothing lost, nothing duplicated
        for seen in per_rank:
            assert all(labels[rid] == y for rid, y in seen)  # labels travel with their images
        orders[epoch] = per_rank
    assert orders[0] != orders[1]  # a different order next epoch


@pytest.mark.integration
@pytest.mark.parametrize("equal", [True, False], ids=["equal-split", "exact-once-split"])
def test_a_restarted_worker_group_shuffles_the_epoch_it_resumes_at(ray_cluster, s3_ds, equal):
    """Ray Train calls DataConfig.configure each time it (re)starts the worker group, with the
    datasets built when the trainer was built (start epoch 0). A group restarted after a failure
    in epoch 2 must see epoch 2's order, not epoch 0's again."""
    cfg, ds = s3_ds
    cfg = make_cfg(cfg.storage.uri, cfg.data.source_dir, f"data.equal_shards={str(equal).lower()}")

    def group(resume_epoch):
        """The iterator one (re)started single-worker group gets."""
        its = train_data_config(cfg, resume_epoch=resume_epoch).configure(
            {"train": build_dataset(ds, "train", cfg)}, world_size=1, worker_handles=None, worker_node_ids=None)
        return its[0]["train"]

    def order(it):
        return [int(i) for b in it.iter_batches(batch_size=64, batch_format="numpy") for i in b["row_id"]]

    uninterrupted = group(lambda: 0)
    orders = [order(uninterrupted) for _ in range(3)]  # epochs 0, 1, 2
    assert sorted(orders[2]) == list(range(ds.count("train"))) and orders[2] != orders[0]
    assert order(group(lambda: 2)) == orders[2]  # a group restarted in epoch 2 sees epoch 2's order
    assert order(group(lambda: 0)) == orders[0]
