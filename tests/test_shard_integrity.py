"""A shard replaced or truncated after prepare is caught the first time a run reads its split."""

from __future__ import annotations

import shutil

import pytest

from pipelines import storage as st
from pipelines.config import load_config
from pipelines.data.shards import read_split
from pipelines.data.stream import build_dataset, iter_local_batches
from pipelines.errors import DataError
from pipelines.prepare import prepare


@pytest.fixture()
def tampered(tmp_path, fmnist_idx):
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}/art", f"data.source_dir={fmnist_idx.folder}",
                             "data.shard_rows=40"])
    version = prepare(cfg)
    shards = [st.local_path(u) for u in version.shard_uris("train")]
    assert len(shards) >= 2
    return cfg, version, shards


def test_truncated_shard_is_refused(tampered):
    cfg, version, shards = tampered
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^shard .*{shards[1].rsplit('/', 1)[1]} does not match its dataset manifest "
                                        r"\(sha256 .*\): it was replaced or truncated after prepare"):
        list(iter_local_batches(version, "train", cfg, batch_size=16))
    with pytest.raises(DataError, match="does not match its dataset manifest"):
        read_split(version, "train")


def test_replaced_shard_is_refused_before_ray_reads_it(tampered):
    cfg, version, shards = tampered
    shutil.copyfile(shards[0], shards[1])  # a valid Parquet file, just not the one prepare wrote
    with pytest.raises(DataError, match=rf"shard .*{shards[1].rsplit('/', 1)[1]} does not match"):
        build_dataset(version, "train", cfg)  # checked on the driver, before any Ray task


def test_intact_shards_pass(tampered):
    cfg, version, _ = tampered
    rows = sum(len(b["row_id"]) for b in iter_local_batches(version, "train", cfg, batch_size=64))
    assert rows == version.count("train")
