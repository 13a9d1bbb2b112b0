"""prepare -> read back: pixels, labels, counts, hashes; the bad-file zoo; no-op reruns; crashes."""

from __future__ import annotations

import numpy as np
import pytest
from data_zoo import MAX_PIXELS, make_split_tree, make_zoo

from pipelines import cli
from pipelines import prepare as prepare_mod
from pipelines import storage as st
from pipelines.config import load_config
from pipelines.data.shards import MANIFEST, find_version, list_versions, read_split, verify
from pipelines.errors import DataError


def config(storage_uri: str, *overrides: str, source: str = "fashion-mnist"):
    return load_config(None, [f"storage.uri={storage_uri}", f"data.source={source}", *overrides])


def fmnist_config(storage_uri: str, fmnist_idx, *overrides: str):
    return config(storage_uri, f"data.source_dir={fmnist_idx.folder}", "data.shard_rows=50", *overrides)


def check_fmnist_round_trip(ds, fmnist_idx, storage=None):
    m = ds.manifest
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == len(fmnist_idx.train_images)
    assert m["splits"]["test"]["count"] == len(fmnist_idx.test_images)
    assert m["images"] == {**m["images"], "channels": 1, "mode": "L", "sizes": {"28x28": 300}}
    seen = set()
    for split in ("train", "val", "test"):
        data = read_split(ds, split, storage)
        info = m["splits"][split]
        assert len(data["label"]) == info["count"] == sum(s["rows"] for s in info["shards"])
        assert all(s["rows"] <= 50 for s in info["shards"]) and len(info["shards"]) >= 1
        np.testing.assert_array_equal(data["row_id"], np.arange(info["count"]))
        for k, name in enumerate(ds.classes):
            assert info["label_counts"][name] == int((data["label"] == k).sum())
        src_images = fmnist_idx.test_images if split == "test" else fmnist_idx.train_images
        src_labels = fmnist_idx.test_labels if split == "test" else fmnist_idx.train_labels
        for sid, img, label in zip(data["source_id"], data["image"], data["label"]):
            index = int(sid.split("/")[1])
            np.testing.assert_array_equal(img, src_images[index], err_msg=sid)
            assert label == src_labels[index], sid
            seen.add(sid)
    assert len(seen) == 300  # every source image exactly once across splits
    assert verify(ds, storage) == []


def test_fashion_mnist_round_trip_local(tmp_path, fmnist_idx):
    cfg = fmnist_config(f"file://{tmp_path}/art", fmnist_idx)
    ds = prepare_mod.prepare(cfg)
    assert ds.uri == f"file://{tmp_path}/art/datasets/fashion-mnist/{ds.version}"
    assert (tmp_path / "art/datasets/fashion-mnist" / ds.version / MANIFEST).is_file()
    assert (tmp_path / "art/datasets/fashion-mnist" / ds.version / "train/part-00000.parquet").is_file()
    assert not ds.reused
    check_fmnist_round_trip(ds, fmnist_idx)
    # the val split is a seeded, stratified carve-out of train: 10% of each class
    m = ds.manifest
    for name in ds.classes:
        n = m["splits"]["train"]["label_counts"][name] + m["splits"]["val"]["label_counts"][name]
        assert m["splits"]["val"]["label_counts"][name] == round(n * 0.1)


@pytest.mark.integration
def test_fashion_mnist_round_trip_s3(s3_endpoint, fmnist_idx):
    root = s3_endpoint.uri("prepare")
    ds = prepare_mod.prepare(fmnist_config(root, fmnist_idx))
    assert ds.uri == f"{root}/datasets/fashion-mnist/{ds.version}"
    check_fmnist_round_trip(ds, fmnist_idx)
    assert find_version(root, "fashion-mnist").uri == ds.uri


def test_version_is_a_content_hash(tmp_path, fmnist_idx):
    base = f"file://{tmp_path}/art"
    a = prepare_mod.prepare(fmnist_config(base, fmnist_idx))
    again = prepare_mod.prepare(fmnist_config(base, fmnist_idx))
    assert again.reused and again.uri == a.uri and again.manifest == a.manifest  # a no-op
    other = prepare_mod.prepare(fmnist_config(base, fmnist_idx, "data.split_seed=1"))
    assert other.version != a.version  # an output-changing setting makes a new version
    same = prepare_mod.prepare(fmnist_config(base, fmnist_idx, "data.strict=true", "data.read_threads=2"))
    assert same.version == a.version and same.reused  # settings that do not change the output
    assert {v.version for v in list_versions(base, "fashion-mnist")} == {a.version, other.version}


def test_rerun_leaves_files_untouched(tmp_path, fmnist_idx):
    base = f"file://{tmp_path}/art"
    ds = prepare_mod.prepare(fmnist_config(base, fmnist_idx))
    folder = tmp_path / "art/datasets/fashion-mnist" / ds.version
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert prepare_mod.prepare(fmnist_config(base, fmnist_idx)).reused
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_killed_before_manifest_leaves_no_visible_version(tmp_path, fmnist_idx, monkeypatch):
    base = f"file://{tmp_path}/art"
    cfg = fmnist_config(base, fmnist_idx)
    real_write_json = st.write_json

    def killed(uri, obj, storage=None):
        if str(uri).endswith(MANIFEST):
            raise KeyboardInterrupt("killed")
        return real_write_json(uri, obj, storage)

    monkeypatch.setattr(st, "write_json", killed)
    monkeypatch.setattr(st, "delete_tree", lambda *a, **k: None)  # a real kill runs no cleanup
    with pytest.raises(KeyboardInterrupt):
        prepare_mod.prepare(cfg)
    monkeypatch.undo()

    leftovers = list((tmp_path / "art/datasets/fashion-mnist").rglob("*.parquet"))
    assert leftovers, "the shards were written before the kill"
    assert list_versions(base, "fashion-mnist") == []
    with pytest.raises(DataError, match="no complete version of dataset 'fashion-mnist'"):
        find_version(base, "fashion-mnist")

    leftovers[0].write_bytes(b"garbage from some other writer")
    (leftovers[0].parent / ".part-00009.parquet.tmp-1-abc").write_bytes(b"half a file")
    ds = prepare_mod.prepare(cfg)  # the rerun overwrites the leftovers and publishes
    assert not ds.reused
    check_fmnist_round_trip(ds, fmnist_idx)
    assert [v.uri for v in list_versions(base, "fashion-mnist")] == [ds.uri]


def test_cli_prints_summary_and_ends_with_the_uri(tmp_path, fmnist_idx, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"storage:\n  uri: file://{tmp_path}/art\ndata:\n  source_dir: {fmnist_idx.folder}\n")
    assert cli.main(["prepare", "--config", str(cfg_file), "--set", "data.shard_rows=100", "--verify"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    ds = find_version(f"file://{tmp_path}/art", "fashion-mnist")
    assert out[-1] == ds.uri
    assert out[0] == f"dataset fashion-mnist version {ds.version}: written in {ds.manifest['prepare_seconds']}s"
    assert any(line.startswith("  verified: ") for line in out)
    assert cli.main(["prepare", "--config", str(cfg_file), "--set", "data.shard_rows=100"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"dataset fashion-mnist version {ds.version}: already complete, nothing to do"
    assert out[-1] == ds.uri


# --------------------------------------------------------------------------------------------
# ImageFolder sources
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def zoo(tmp_path):
    return make_zoo(tmp_path / "zoo")


def zoo_config(tmp_path, zoo, *overrides):
    return config(f"file://{tmp_path}/art", "data.val_fraction=0", "data.test_fraction=0",
                  f"data.max_image_pixels={MAX_PIXELS}", "data.name=zoo", *overrides, source=str(zoo.root))


def test_bad_file_zoo_is_reported_and_skipped(tmp_path, zoo, capsys):
    ds = prepare_mod.prepare(zoo_config(tmp_path, zoo))
    m = ds.manifest
    invalid = {bad["source_id"]: bad["reason"] for bad in m["invalid"]}
    assert set(invalid) == set(zoo.bad)
    for sid, reason in zoo.bad.items():
        assert invalid[sid].startswith(reason), (sid, invalid[sid])
    assert m["ignored"] == [{"path": "README.txt", "reason": "not inside a class folder"}]  # hidden files skipped silently
    assert ds.classes == ["cat", "dog"]
    assert m["splits"]["train"]["count"] == len(zoo.good)
    assert m["images"]["exif_transposed"] == 1
    assert m["images"]["source_modes"] == {
        mode: sum(1 for v in zoo.modes.values() if v == mode) for mode in set(zoo.modes.values())
    }
    assert m["images"]["conversions"]["RGB->L"] == 2 and m["images"]["conversions"]["CMYK->L"] == 1
    assert m["duplicates"] == {"groups": 1, "extra_copies": 1, "cross_split_groups": 0,
                               "examples": [["dog/rgb.png", "dog/rgb_copy.png"]]}
    assert m["label_histogram"] == {
        "cat": sum(r.startswith("cat/") for r in zoo.good), "dog": sum(r.startswith("dog/") for r in zoo.good)
    }
    data = read_split(ds, "train")
    for sid, img, label in zip(data["source_id"], data["image"], data["label"]):
        np.testing.assert_array_equal(img, zoo.good[sid], err_msg=sid)
        assert ds.classes[label] == sid.split("/")[0]

    prepare_mod.run_cli(zoo_config(tmp_path, zoo), None)
    out = capsys.readouterr().out
    assert f"  invalid (skipped): {len(zoo.bad)}" in out
    for sid in zoo.bad:
        assert f"    {sid}: {invalid[sid]}" in out


def test_strict_fails_listing_every_bad_file(tmp_path, zoo):
    with pytest.raises(DataError) as err:
        prepare_mod.prepare(zoo_config(tmp_path, zoo, "data.strict=true"))
    msg = str(err.value)
    assert msg.startswith(f"{len(zoo.bad)} invalid image(s) in file://{zoo.root} with data.strict=true: ")
    assert msg.endswith("; fix or remove them, or set data.strict=false to skip them")
    for sid, reason in zoo.bad.items():
        assert f"{sid} ({reason}" in msg
    assert "\n" not in msg
    assert list_versions(f"file://{tmp_path}/art", "zoo") == []
    assert not (tmp_path / "art/datasets/zoo").exists() or not any((tmp_path / "art/datasets/zoo").rglob("*.parquet"))


@pytest.mark.integration
def test_split_folders_local_and_s3_source(tmp_path, s3_endpoint):
    tree = make_split_tree(tmp_path / "tree")
    local = prepare_mod.prepare(config(f"file://{tmp_path}/art", source=str(tmp_path / "tree")))
    # the same tree uploaded to S3, prepared from there into S3 storage
    src = s3_endpoint.uri("tree")
    for rel in tree:
        st.write_bytes(st.join_uri(src, rel), (tmp_path / "tree" / rel).read_bytes())
    remote = prepare_mod.prepare(config(s3_endpoint.uri("art"), source=src))
    assert remote.version == local.version  # content-addressed: same bytes, same version
    for ds in (local, remote):
        assert ds.classes == ["ants", "bees", "wasps"]
        assert {s: ds.count(s) for s in ("train", "val", "test")} == {"train": 18, "val": 6, "test": 6}
        for split in ("train", "val", "test"):
            data = read_split(ds, split)
            for sid, img, label in zip(data["source_id"], data["image"], data["label"]):
                assert sid.startswith(f"{split}/")
                np.testing.assert_array_equal(img, tree[sid])
                assert ds.classes[label] == sid.split("/")[1]


def test_seeded_split_ratio(tmp_path):
    make_split_tree(tmp_path / "flat", per_class=(10,), splits=("",))  # root/<class>/<i>.png
    def split_of(seed):
        ds = prepare_mod.prepare(config(f"file://{tmp_path}/art", "data.val_fraction=0.2", "data.test_fraction=0.2",
                                        f"data.split_seed={seed}", source=str(tmp_path / "flat")))
        return ds, {sid: split for split in ("train", "val", "test") for sid in read_split(ds, split)["source_id"]}

    ds, a = split_of(0)
    for name in ds.classes:  # stratified: exact per-class counts
        assert [ds.manifest["splits"][s]["label_counts"][name] for s in ("train", "val", "test")] == [6, 2, 2]
    assert split_of(0)[1] == a  # seeded: reproducible
    assert split_of(1)[1] != a
