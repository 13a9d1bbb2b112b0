"""A sweep is resumed only as itself: same settings, and only the tuner.pkl this pipeline wrote."""

from __future__ import annotations

import types

import pytest

from pipelines import storage as st
from pipelines.config import load_config
from pipelines.errors import UserError
from pipelines.tune import _check_sweep, _check_tuner_pickle, _record_tuner_pickle

SPACE = "tune.space={'train.lr': {loguniform: [1.0e-4, 1.0e-2]}}"


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"storage.uri={tmp_path.as_uri()}", SPACE, *overrides])


def _version(name: str):
    """What the sweep guard reads of a dataset version (a Fashion-MNIST-sized train split)."""
    return types.SimpleNamespace(version=name, image_size=(28, 28), channels=1, count=lambda split: 54_000)


def test_a_sweep_resumes_only_with_its_own_settings(tmp_path):
    version = _version("v1")
    cfg = _cfg(tmp_path, "train.epochs=3")
    assert _check_sweep(cfg, "s", version, resume=False, can_restore=False) is False  # new: records its settings
    assert st.read_json(st.join_uri(tmp_path.as_uri(), "tune", "s", "sweep.json"))["settings"]["train.epochs"] == 3
    assert _check_sweep(cfg, "s", version, resume=True, can_restore=True) is True
    with pytest.raises(UserError, match=r"^sweep 's' already exists at .*; pass --resume to continue it"):
        _check_sweep(cfg, "s", version, resume=False, can_restore=True)
    with pytest.raises(UserError, match=r"^sweep 's' was started with other settings: train.epochs 3 -> 4; "):
        _check_sweep(_cfg(tmp_path, "train.epochs=4"), "s", version, resume=True, can_restore=True)
    with pytest.raises(UserError, match=r"dataset.version 'v1' -> 'v2'"):
        _check_sweep(cfg, "s", _version("v2"), resume=True, can_restore=True)
    # streaming the train split instead of holding it in memory is another data order
    with pytest.raises(UserError, match=r"data.order 'exact' -> 'ray-data'"):
        _check_sweep(_cfg(tmp_path, "train.epochs=3", "data.stream=ray"), "s", version, resume=True, can_restore=True)
    with pytest.raises(UserError, match=r"tune.space.train.lr.loguniform"):
        _check_sweep(_cfg(tmp_path, "train.epochs=3", "tune.space={'train.lr': {loguniform: [1.0e-5, 1.0e-2]}}"),
                     "s", version, resume=True, can_restore=True)
    with pytest.raises(UserError, match=r"^no sweep state to resume"):
        _check_sweep(cfg, "other", version, resume=True, can_restore=False)


def test_a_replaced_tuner_pickle_is_never_unpickled(tmp_path):
    cfg = _cfg(tmp_path)
    _check_sweep(cfg, "s", _version("v1"), resume=False, can_restore=False)
    pkl = st.join_uri(tmp_path.as_uri(), "tune", "s", "tuner.pkl")
    st.write_bytes(pkl, b"\x80\x04written by Tune")
    _record_tuner_pickle(cfg, "s")
    _check_tuner_pickle(cfg, "s")  # the one we recorded
    st.write_bytes(pkl, b"\x80\x04something else")
    with pytest.raises(UserError, match=r"^sweep 's': its tuner.pkl is not the one this pipeline wrote"):
        _check_tuner_pickle(cfg, "s")
