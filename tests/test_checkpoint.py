"""Training state round trip through safetensors + JSON, without pickle."""

from __future__ import annotations

import functools
import json
import random
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import tiny_vit as _tiny_vit

from pipelines.checkpoint import (
    CheckpointError,
    load_model_weights,
    load_training_state,
    read_state,
    save_training_state,
)
from pipelines.config import TrainConfig
from pipelines.engine import (
    ModelEma,
    build_mixup,
    build_optimizer,
    build_scheduler,
    seed_everything,
    train_one_epoch,
)
from pipelines.errors import UserError
from vit_model import VisionTransformer, ViTConfig

CPU = torch.device("cpu")
NUM_CLASSES = 10  # tiny_vit's
STEPS = 4  # batches per epoch
tiny_vit = functools.partial(_tiny_vit, dropout=0.1)  # dropout on: a resume must restore the RNG it draws from


def toy_batches(n: int = STEPS * 16, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    images, labels = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, n, batch_size)]


CFG = TrainConfig(epochs=3, lr=3e-3, warmup_epochs=0.5, min_lr=1e-4, mixup_alpha=0.8, cutmix_alpha=1.0,
                  ema_decay=0.9, label_smoothing=0.1, clip_grad_norm=1.0)


def build(seed: int):
    """Model, optimizer, scheduler, EMA and mixup as a fresh run builds them."""
    seed_everything(seed)
    model = tiny_vit()
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG, STEPS)
    return model, opt, sched, ModelEma(model, CFG.ema_decay), build_mixup(CFG, NUM_CLASSES)


def run_epoch(parts, epoch: int) -> list[float]:
    model, opt, sched, ema, mix = parts
    losses: list[float] = []
    train_one_epoch(model, toy_batches(), opt, sched, CFG, device=CPU, epoch=epoch, mixup=mix, ema=ema,
                    on_step=lambda m: losses.append(m["loss"]))
    return losses


def save(parts, directory, epoch: int = 0, **extra):
    model, opt, sched, ema, _ = parts
    return save_training_state(directory, model=model, optimizer=opt, scheduler=sched, ema=ema, epoch=epoch,
                               step=sched.last_epoch, metrics={"val_acc": 0.5, "train_loss": 2.25},
                               config_dict={"train": {"lr": CFG.lr, "crop": (28, 28)}}, **extra)


def scramble_rng():
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)


def assert_same_state(a, b):
    for (name, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for x, y in zip(a[3].state_dict().values(), b[3].state_dict().values(), strict=True):
        assert torch.equal(x, y)
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for idx, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["state"][idx][key]), (idx, key)
    assert a[2].state_dict() == b[2].state_dict()


def test_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    # uninterrupted: epoch 0, then epoch 1
    straight = build(seed=0)
    run_epoch(straight, 0)
    losses_straight = run_epoch(straight, 1)

    # interrupted: epoch 0, save, throw everything away, rebuild from another seed, load, epoch 1
    first = build(seed=0)
    run_epoch(first, 0)
    save(first, tmp_path / "ckpt")
    del first
    scramble_rng()
    resumed = build(seed=123)
    state = load_training_state(tmp_path / "ckpt", model=resumed[0], optimizer=resumed[1], scheduler=resumed[2],
                                ema=resumed[3])
    assert state["epoch"] == 0 and state["step"] == STEPS
    assert state["metrics"] == {"val_acc": 0.5, "train_loss": 2.25}
    assert state["config"] == {"train": {"lr": CFG.lr, "crop": (28, 28)}}
    losses_resumed = run_epoch(resumed, 1)

    assert losses_resumed == losses_straight
    assert_same_state(straight, resumed)

    # the RNG restore matters: without it dropout/mixup draw differently and the weights differ
    scramble_rng()
    no_rng = build(seed=123)
    load_training_state(tmp_path / "ckpt", model=no_rng[0], optimizer=no_rng[1], scheduler=no_rng[2],
                        ema=no_rng[3], restore_rng=False)
    assert run_epoch(no_rng, 1) != losses_straight


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    parts = build(seed=0)
    run_epoch(parts, 0)
    path = save(parts, tmp_path / "ckpt")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.json", "rng.safetensors", "scheduler.json", "state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind
    for p in path.iterdir():
        raw = p.read_bytes()
        assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # pickle / torch.save zip
        if p.suffix == ".json":
            json.loads(raw)
        else:  # safetensors: u64 little-endian header length, then a JSON header, then raw tensor bytes
            (header_len,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + header_len])
            assert header.pop("__metadata__") == {"format": "pt"}
            end = max(meta["data_offsets"][1] for meta in header.values())
            assert 8 + header_len + end == len(raw)
    from safetensors.torch import load_file
    assert set(load_file(path / "model.safetensors")) == set(tiny_vit().state_dict())  # timm-style keys
    assert any(k.startswith("state.0.") for k in load_file(path / "optimizer.safetensors"))


def test_ddp_model_is_saved_without_module_prefix(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, opt, sched, ema, mix = build(seed=0)
        ddp = nn.parallel.DistributedDataParallel(model)
        save((ddp, opt, sched, ema, mix), tmp_path / "ckpt")
    finally:
        dist.destroy_process_group()
    fresh = tiny_vit()
    load_model_weights(tmp_path / "ckpt", fresh)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_load_model_weights_for_evaluation_and_ema(tmp_path):
    parts = build(seed=0)
    run_epoch(parts, 0)
    save(parts, tmp_path / "ckpt")
    model, ema = tiny_vit().eval(), tiny_vit().eval()
    state = load_model_weights(tmp_path / "ckpt", model)
    load_model_weights(tmp_path / "ckpt", ema, ema=True)
    assert state["epoch"] == 0
    x = toy_batches()[0][0]
    torch.testing.assert_close(model(x), parts[0].eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(ema(x), parts[3].module(x), rtol=0, atol=0)
    assert not torch.equal(model(x), ema(x))

    save_training_state(tmp_path / "no_ema", model=parts[0], optimizer=parts[1], scheduler=parts[2], epoch=0,
                        step=0, metrics={}, config_dict={})
    with pytest.raises(CheckpointError, match="no ema.safetensors"):
        load_model_weights(tmp_path / "no_ema", model, ema=True)


def test_saving_again_replaces_the_directory(tmp_path):
    parts = build(seed=0)
    save(parts, tmp_path / "ckpt", epoch=0)
    run_epoch(parts, 0)
    save(parts, tmp_path / "ckpt", epoch=1)
    assert read_state(tmp_path / "ckpt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_grad_scaler_state_round_trips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    parts = build(seed=0)
    save(parts, tmp_path / "ckpt", scaler=scaler)
    restored = torch.amp.GradScaler("cpu")
    load_training_state(tmp_path / "ckpt", model=tiny_vit(), scaler=restored)
    assert restored.state_dict() == scaler.state_dict()
    assert restored.get_scale() == 1024.0


def test_wrong_model_shape_is_a_clear_error(tmp_path):
    parts = build(seed=0)
    save(parts, tmp_path / "ckpt")
    other = VisionTransformer(ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=5, embed_dim=32,
                                        depth=2, num_heads=2))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit the model"):
        load_model_weights(tmp_path / "ckpt", other)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage_header"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    parts = build(seed=0)
    path = save(parts, tmp_path / "ckpt")
    target = path / "model.safetensors"
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_byte":
        raw[-5] ^= 0xFF  # inside tensor data: only the recorded sha256 can notice
    else:
        raw[:16] = b"\xff" * 16
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt") as info:
        load_training_state(path, model=tiny_vit())
    assert isinstance(info.value, UserError)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_model_weights(path, tiny_vit())


def test_unreadable_safetensors_without_a_hash_record_still_names_the_file(tmp_path):
    from pipelines.checkpoint import _read_tensors
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or unreadable"):
        _read_tensors(bad)


def test_missing_or_corrupt_json_names_the_file(tmp_path):
    parts = build(seed=0)
    path = save(parts, tmp_path / "ckpt")
    (path / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.json is missing"):
        load_training_state(path, model=tiny_vit(), optimizer=parts[1])
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json is corrupt"):
        load_training_state(path, model=tiny_vit())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "nowhere", model=tiny_vit())


def test_failed_save_leaves_no_partial_directory(tmp_path):
    parts = build(seed=0)
    with pytest.raises(TypeError, match="cannot store"):
        save_training_state(tmp_path / "ckpt", model=parts[0], optimizer=parts[1], scheduler=parts[2], epoch=0,
                            step=0, metrics={"bad": object()}, config_dict={})
    assert list(tmp_path.iterdir()) == []
