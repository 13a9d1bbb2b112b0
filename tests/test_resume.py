"""Resume semantics: a resumed run is the same run (same settings, same schedule); --continue
changes hyperparameters explicitly and recomputes the schedule; anything else is refused."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from pipelines import storage as st
from pipelines.config import load_config, to_dict
from pipelines.engine import WarmupCosine, build_optimizer, build_scheduler, continue_schedule
from pipelines.errors import UserError
from pipelines.trainer import ResumePoint, check_resume, resume_point
from vit_model import VisionTransformer, ViTConfig

STEPS = 4  # optimizer steps per epoch


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                       num_heads=2))


def _train_cfg(**overrides):
    settings = dict(epochs=2, lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05) | overrides
    return dataclasses.replace(load_config().train, **settings)


def _steps(model, opt, sched, n):
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(torch.randn(2, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lrs


def test_same_config_resume_continues_the_same_schedule():
    tc = _train_cfg()
    model = _model()
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc, STEPS)
    uninterrupted = _steps(model, opt, sched, 2 * STEPS)

    model = _model()
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc, STEPS)
    first = _steps(model, opt, sched, STEPS)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt2 = build_optimizer(model, tc)  # the worker rebuilds from the config, then restores
    sched2 = build_scheduler(opt2, tc, STEPS)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert first + _steps(model, opt2, sched2, STEPS) == pytest.approx(uninterrupted)


def test_continue_recomputes_the_schedule_for_the_new_hyperparameters():
    tc = _train_cfg()
    model = _model()
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc, STEPS)
    _steps(model, opt, sched, STEPS)  # epoch 0 of a 2-epoch run
    saved_opt, saved_sched, step = opt.state_dict(), sched.state_dict(), sched.last_epoch
    moments = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}

    longer = _train_cfg(epochs=4, lr=2e-3, weight_decay=0.1)
    opt2 = build_optimizer(model, longer)
    sched2 = build_scheduler(opt2, longer, STEPS)
    opt2.load_state_dict(saved_opt)  # what the checkpoint restores: the old lr, wd and schedule
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] < 1e-3 and sched2.lr_lambdas[0].total_steps == 2 * STEPS
    sched2 = continue_schedule(model, opt2, longer, STEPS, step)

    assert {k: v["exp_avg"] for k, v in opt2.state_dict()["state"].items()}.keys() == moments.keys()
    for k, m in moments.items():  # the AdamW moments stay
        torch.testing.assert_close(opt2.state_dict()["state"][k]["exp_avg"], m)
    decays = sorted(g["weight_decay"] for g in opt2.param_groups)
    assert decays == [0.0, 0.1]  # matrices take the new weight decay, norms/biases/pos-embed none
    expected = WarmupCosine(warmup_steps=2, total_steps=4 * STEPS, min_ratio=1e-5 / 2e-3)
    lrs = _steps(model, opt2, sched2, 3 * STEPS)
    assert lrs == pytest.approx([2e-3 * expected(k) for k in range(STEPS, 4 * STEPS)])
    assert lrs[-1] > 1e-5  # not stuck at min_lr, as restoring the old 2-epoch schedule would leave it


def _checkpoint(tmp_path, cfg, run_name: str, epoch: int, dataset_version: str | None) -> None:
    metrics = {"history": []} | ({"dataset_version": dataset_version} if dataset_version else {})
    st.write_json(st.join_uri(cfg.storage.uri, "train", run_name, f"checkpoint_{epoch:06d}", "state", "state.json"),
                  {"epoch": epoch, "config": to_dict(cfg), "metrics": metrics})


def test_resume_point_names_what_changed(tmp_path):
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", "train.epochs=2"])
    version = types.SimpleNamespace(version="v1")
    assert resume_point(cfg, "new-run", version) == ResumePoint(0, {})
    _checkpoint(tmp_path, cfg, "r", 0, "v1")
    _checkpoint(tmp_path, cfg, "r", 1, "v1")
    assert resume_point(cfg, "r", version) == ResumePoint(2, {})
    same_but_operational = load_config(None, [f"storage.uri={tmp_path.as_uri()}", "train.epochs=2",
                                              "train.max_failures=5", "data.cache_decoded=false"])
    assert resume_point(same_but_operational, "r", version).changed == {}
    more = load_config(None, [f"storage.uri={tmp_path.as_uri()}", "train.epochs=4", "model.args.depth=3"])
    point = resume_point(more, "r", types.SimpleNamespace(version="v2"))
    assert point.changed == {"train.epochs": (2, 4), "model.args.depth": (None, 3), "dataset.version": ("v1", "v2")}


def test_check_resume_refuses_changes_unless_continued():
    check_resume("r", ResumePoint(3, {}), extend=False)
    lr = ResumePoint(3, {"train.lr": (1e-3, 2e-3), "train.epochs": (5, 8)})
    with pytest.raises(UserError, match=r"^training run 'r' \(checkpointed at epoch 2\) was started with other "
                                        r"settings: train.lr 0.001 -> 0.002, train.epochs 5 -> 8; .*--continue"):
        check_resume("r", lr, extend=False)
    check_resume("r", lr, extend=True)
    arch = ResumePoint(3, {"model.args.depth": (4, 6), "train.epochs": (5, 8)})
    for extend in (False, True):
        with pytest.raises(UserError, match=r"model.args.depth cannot change within a run: pick a new train.run_name"):
            check_resume("r", arch, extend=extend)


def test_only_checkpoints_ray_registered_count(tmp_path):
    """A checkpoint folder written by a worker group that died before Ray Train registered the
    round is on storage but not resumed from: the snapshot decides."""
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", "train.epochs=3"])
    version = types.SimpleNamespace(version="v1")
    _checkpoint(tmp_path, cfg, "r", 0, "v1")
    _checkpoint(tmp_path, cfg, "r", 1, "v1")  # written, never registered
    snapshot = st.join_uri(tmp_path.as_uri(), "train", "r", "checkpoint_manager_snapshot.json")
    st.write_json(snapshot, {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000"}})
    assert resume_point(cfg, "r", version).epoch == 1
    st.write_json(snapshot, {"latest_checkpoint_result": None})  # nothing registered yet
    assert resume_point(cfg, "r", version).epoch == 0
