"""The plain-PyTorch training loop: optimizer groups, schedule, mixup, EMA, precision, train, evaluate."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from helpers import tiny_vit

from pipelines.config import TrainConfig
from pipelines.engine import (
    ModelEma,
    NonFiniteLossError,
    _bf16_autocast_works,
    auto_precision,
    autocast_context,
    build_grad_scaler,
    build_mixup,
    build_optimizer,
    build_scheduler,
    cpu_has_native_bf16,
    evaluate,
    no_weight_decay_names,
    param_groups,
    reduce_metrics,
    resolve_precision,
    seed_everything,
    train_one_epoch,
    unwrap_model,
)
from pipelines.errors import UserError
from vit_model import VisionTransformer

CPU = torch.device("cpu")
NUM_CLASSES = 10  # tiny_vit's


def toy_batches(n: int = 256, batch_size: int = 32, seed: int = 1, dicts: bool = False) -> list:
    """A learnable problem: each class is a fixed random template plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(NUM_CLASSES, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    images = templates[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    out = []
    for i in range(0, n, batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        out.append({"image": x, "label": y} if dicts else (x, y))
    return out


def cfg_for(**overrides) -> TrainConfig:
    base = dict(epochs=3, lr=3e-3, weight_decay=0.05, warmup_epochs=0.5, min_lr=1e-4, label_smoothing=0.1,
                clip_grad_norm=1.0, precision="fp32", seed=0)
    base.update(overrides)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def test_no_decay_group_holds_exactly_norms_biases_and_tokens():
    model = tiny_vit(reg_tokens=1)
    model.head.weight.requires_grad_(False)  # frozen parameters belong to no group
    names = [n for n, _ in model.named_parameters()]
    expected_no_decay = {n for n in names
                         if n.endswith(".bias") or ".norm" in n or n.startswith("norm.")
                         or n in {"cls_token", "pos_embed", "reg_token"}}
    expected_no_decay.discard("head.weight")
    expected_decay = set(names) - expected_no_decay - {"head.weight"}
    assert {"cls_token", "pos_embed", "reg_token", "blocks.0.norm1.weight", "head.bias"} <= expected_no_decay
    assert no_weight_decay_names(model) == expected_no_decay

    cfg = cfg_for(weight_decay=0.07)
    opt = build_optimizer(model, cfg)
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert groups == {0.07: expected_decay, 0.0: expected_no_decay}
    assert all(g["lr"] == cfg.lr for g in opt.param_groups)


def test_optimizer_steps_equal_the_unfused_adamw():
    """build_optimizer takes the fused kernel where the device has one (the CPU from torch 2.4):
    five steps on the same gradients must land where PyTorch's per-parameter AdamW lands with the
    same groups (gradients drawn per step, not backpropagated: the key bias of attention gets
    ~1e-10 gradients that Adam's normalisation turns into rounding-level sign noise)."""
    torch.manual_seed(0)
    model = tiny_vit()
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    cfg = cfg_for(weight_decay=0.07, lr=3e-3)
    opt = build_optimizer(model, cfg)
    ref_opt = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=cfg.lr, foreach=False)
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert (model.head.weight - start.head.weight).abs().max() > 1e-3  # the steps moved the weights


def _lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def test_scheduler_matches_closed_form_warmup_then_cosine():
    cfg = cfg_for(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1.5)
    steps_per_epoch, warmup, total = 10, 15, 40
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 15, rel=1e-12)  # first step
    assert lrs[warmup - 1] == pytest.approx(1e-3, rel=1e-12)  # end of warmup
    assert lrs[warmup] == pytest.approx(1e-3, rel=1e-12)  # cosine starts at the peak
    assert lrs[total] == pytest.approx(1e-5, rel=1e-12)  # end of schedule
    for step in (0, 7, 14, 15, 22, 33, 39, 40):
        assert lrs[step] == pytest.approx(_lr_at(step, 1e-3, 1e-5, warmup, total), rel=1e-12)
    assert sched.last_epoch == total + 1


def test_scheduler_state_is_json_and_resumes():
    cfg = cfg_for(epochs=2, warmup_epochs=0.5)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 8)
    for _ in range(5):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))  # plain numbers only
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 8)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(6):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------
# Mixup, label smoothing, EMA
# --------------------------------------------------------------------------------------------


def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one():
    assert build_mixup(cfg_for(mixup_alpha=0.0, cutmix_alpha=0.0), NUM_CLASSES) is None
    mix = build_mixup(cfg_for(mixup_alpha=0.8, cutmix_alpha=1.0), NUM_CLASSES)
    torch.manual_seed(0)
    x, y = toy_batches(64, 16)[0]
    for _ in range(10):
        images, targets = mix(x, y)
        assert images.shape == x.shape
        assert targets.shape == (16, NUM_CLASSES)
        assert (targets >= 0).all()
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))


def test_mixup_mixes_images_with_the_label_weights():
    mix = build_mixup(cfg_for(mixup_alpha=1.0), NUM_CLASSES)
    torch.manual_seed(3)
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    images, targets = mix(x, y)
    lam = targets[0, 0].item()  # sample i is lam * x[i] + (1 - lam) * x[i - 1]
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, 0))
    torch.testing.assert_close(targets[1, 0], torch.tensor(1 - lam))


class LogitsTable(nn.Module):
    """A "model" whose output is its parameter: the gradient train_one_epoch leaves on it is d loss / d logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def _one_step(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, mixup=None):
    """One train_one_epoch step on one batch: (epoch metrics, the step's loss, d loss / d logits)."""
    model = LogitsTable(logits)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 1)
    steps = []
    out = train_one_epoch(model, [(images, labels)], opt, sched, cfg, device=CPU, epoch=0, mixup=mixup,
                          on_step=steps.append)
    assert len(steps) == 1
    return out, steps[0]["loss"], model.logits.grad  # the step changes the weights, not .grad (no clipping)


def test_loss_is_label_smoothed_cross_entropy_computed_by_hand():
    """Logits (0, 0, ln 2) give p = (1/4, 1/4, 1/2). Label smoothing 0.3 over 3 classes is
    t * 0.7 + 0.1: hard label 2 -> (0.1, 0.1, 0.8), loss 0.2 ln 4 + 0.8 ln 2 = 1.2 ln 2; a mixed
    row (1/2, 0, 1/2) -> (0.45, 0.1, 0.45), loss 0.55 ln 4 + 0.45 ln 2 = 1.55 ln 2. The batch loss
    is the mean, and d loss / d logits = (p - t) / batch size."""
    ln2 = math.log(2.0)
    logits = torch.tensor([[0.0, 0.0, ln2], [0.0, 0.0, ln2]])
    images, labels = torch.zeros(2, 1, 28, 28), torch.tensor([2, 2])
    cfg = cfg_for(label_smoothing=0.3, clip_grad_norm=None)

    out, loss, grad = _one_step(logits, images, labels, cfg)  # no mixup: integer labels, smoothed
    assert loss == pytest.approx(1.2 * ln2, rel=1e-6)
    assert out["train_loss"] == pytest.approx(1.2 * ln2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.15, 0.15, -0.3], [0.15, 0.15, -0.3]]) / 2)

    seen = []

    def mix(x, y):  # a mixup that hands back known soft targets
        seen.append(y.clone())
        return x, torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.5]])

    out, loss, grad = _one_step(logits, images, labels, cfg, mixup=mix)
    assert len(seen) == 1 and torch.equal(seen[0], labels)
    assert loss == pytest.approx((1.2 + 1.55) / 2 * ln2, rel=1e-6)
    assert out["train_loss"] == pytest.approx((1.2 + 1.55) / 2 * ln2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.15, 0.15, -0.3], [-0.2, 0.15, 0.05]]) / 2)


def test_label_smoothing_applies_to_soft_targets():
    """train_one_epoch with the real MixUp/CutMix: the loss is the cross-entropy against the mixed
    targets smoothed as t * (1 - eps) + eps / C, as written out here."""
    eps = 0.1
    cfg = cfg_for(label_smoothing=eps, clip_grad_norm=None, mixup_alpha=0.8, cutmix_alpha=1.0)
    real_mix = build_mixup(cfg, NUM_CLASSES)
    seen = []

    def mix(x, y):
        x, targets = real_mix(x, y)
        seen.append(targets)
        return x, targets

    torch.manual_seed(0)
    logits = torch.randn(8, NUM_CLASSES)
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
    out, loss, grad = _one_step(logits, images, labels, cfg, mixup=mix)
    (soft,) = seen
    assert (soft.max(dim=1).values < 1).all()  # really mixed: no row is one-hot
    smoothed = soft * (1 - eps) + eps / NUM_CLASSES
    log_p = logits.log_softmax(dim=1)
    expected = -(smoothed * log_p).sum(dim=1).mean().item()
    assert loss == pytest.approx(expected, rel=1e-6) and out["train_loss"] == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad, (logits.softmax(dim=1) - smoothed) / 8)
    assert expected != pytest.approx(-(soft * log_p).sum(dim=1).mean().item(), rel=1e-3)  # smoothing matters here


def test_ema_update_equals_formula_and_skips_integer_buffers():
    model = tiny_vit()
    model.register_buffer("counter", torch.tensor(0))
    ema = ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.counter += 5
    ema.update(model)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[name], 0.9 * before[name] + 0.1 * value)
    assert ema.state_dict()["counter"].item() == 5
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    with pytest.raises(ValueError):
        ModelEma(model, decay=1.0)



def test_ema_decay_warms_up_with_the_global_step():
    model = tiny_vit()
    ema = ModelEma(model, decay=0.999)
    # (1 + t) / (10 + t): 2/11 after the first step, 0.5 at step 8, capped by decay from t = 8990
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(8) == pytest.approx(0.5)
    assert ema.decay_at(8989) < 0.999 and ema.decay_at(9000) == 0.999 and ema.decay_at(None) == 0.999
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[name], (2 / 11) * before[name] + (9 / 11) * value)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _train(cfg: TrainConfig, batches: list, epochs: int, mixup: bool = False, dropout: float = 0.0):
    seed_everything(cfg.seed)
    model = tiny_vit(dropout=dropout)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(batches))
    mix = build_mixup(cfg, NUM_CLASSES) if mixup else None
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    losses: list[float] = []
    results = []
    for epoch in range(epochs):
        results.append(train_one_epoch(model, batches, opt, sched, cfg, device=CPU, epoch=epoch, mixup=mix,
                                       ema=ema, on_step=lambda m: losses.append(m["loss"])))
    return model, opt, losses, results, ema


def test_training_learns_the_toy_problem():
    batches = toy_batches()
    cfg = cfg_for(epochs=3, lr=1e-2)
    seed_everything(0)
    before = evaluate(tiny_vit(), batches, device=CPU, num_classes=NUM_CLASSES)
    model, _, losses, results, _ = _train(cfg, batches, epochs=3)
    after = evaluate(model, batches, device=CPU, num_classes=NUM_CLASSES)
    assert len(losses) == 3 * len(batches)
    assert results[-1]["train_loss"] < 0.6 * results[0]["train_loss"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["acc1"] > 0.8
    r = results[0]
    assert r["images"] == 256 and r["steps"] == 8
    assert r["train_loss"] == pytest.approx(sum(losses[:8]) / 8)  # equal batches: sample mean = step mean
    assert r["lr"] > 0 and r["seconds"] > 0 and r["images_per_s"] > 0


def test_dict_batches_and_limit_batches():
    batches = toy_batches(dicts=True)
    cfg = cfg_for()
    seed_everything(0)
    model = tiny_vit()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 3)
    steps = []
    out = train_one_epoch(model, batches, opt, sched, cfg, device=CPU, epoch=0, limit_batches=3,
                          on_step=steps.append)
    assert out["steps"] == 3 and out["images"] == 96
    assert [s["global_step"] for s in steps] == [1, 2, 3]
    assert sched.last_epoch == 3


def test_same_seed_and_data_give_identical_runs():
    batches = toy_batches(128)
    cfg = cfg_for(epochs=2, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9)
    model_a, _, losses_a, _, ema_a = _train(cfg, batches, epochs=2, mixup=True, dropout=0.1)
    model_b, _, losses_b, _, ema_b = _train(cfg, batches, epochs=2, mixup=True, dropout=0.1)
    assert losses_a == losses_b
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(ema_a.state_dict().values(), ema_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # and a different seed really changes the run (dropout, mixup and init draw from it)
    _, _, losses_c, _, _ = _train(cfg_for(epochs=2, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9, seed=1),
                                  batches, epochs=2, mixup=True, dropout=0.1)
    assert losses_c != losses_a


def test_nan_input_raises_before_the_optimizer_step():
    batches = toy_batches(96)
    bad_x, bad_y = batches[1]
    bad_x = bad_x.clone()
    bad_x[0, 0, 0, 0] = float("nan")
    batches[1] = (bad_x, bad_y)
    cfg = cfg_for()
    seed_everything(0)
    model = tiny_vit()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(batches))
    snapshot = {}

    def after_step(m):
        snapshot["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        snapshot["exp_avg"] = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]

    with pytest.raises(NonFiniteLossError, match=r"loss nan at epoch 4, step 1 \(global step 1\)"):
        train_one_epoch(model, batches, opt, sched, cfg, device=CPU, epoch=4, on_step=after_step)
    assert set(snapshot) == {"weights", "exp_avg"}  # the first step ran
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot["weights"][name]), name
    for p, exp_avg in zip(model.parameters(), snapshot["exp_avg"], strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], exp_avg)
        assert opt.state[p]["step"].item() == 1
    assert sched.last_epoch == 1


def test_loss_made_nan_by_a_hook_raises_and_keeps_initial_weights():
    batches = toy_batches(64)
    cfg = cfg_for(clip_grad_norm=None)
    seed_everything(0)
    model = tiny_vit()
    model.head.register_forward_hook(lambda mod, inp, out: out * float("inf"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(batches))
    with pytest.raises(NonFiniteLossError, match="epoch 0, step 0"):
        train_one_epoch(model, batches, opt, sched, cfg, device=CPU, epoch=0)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert not opt.state


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def test_precision_names_are_checked():
    with pytest.raises(UserError, match="needs a CUDA device"):
        autocast_context("fp16", CPU)
    with pytest.raises(UserError, match="not one of fp32, bf16, fp16"):
        autocast_context("fp8", CPU)
    with pytest.raises(UserError):
        train_one_epoch(tiny_vit(), toy_batches(32), *_opt_sched(), cfg_for(precision="half"), device=CPU, epoch=0)
    assert build_grad_scaler("fp32", CPU) is None
    assert build_grad_scaler("bf16", CPU) is None
    with autocast_context("fp32", CPU):
        assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


def _opt_sched():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param])
    return opt, build_scheduler(opt, cfg_for(), 1)


def test_bf16_autocast_on_cpu_runs_or_falls_back_with_a_warning():
    cfg = cfg_for(precision="bf16")
    if _bf16_autocast_works("cpu"):
        with autocast_context("bf16", CPU):
            assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
        seed_everything(0)
        model = tiny_vit()
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, 4)
        out = train_one_epoch(model, toy_batches(128), opt, sched, cfg, device=CPU, epoch=0)
        assert math.isfinite(out["train_loss"]) and out["steps"] == 4
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        metrics = evaluate(model, toy_batches(64), device=CPU, num_classes=NUM_CLASSES, precision="bf16")
        assert metrics["count"] == 64
    else:  # pragma: no cover - depends on the CPU build
        with pytest.warns(UserWarning, match="bf16 autocast is not supported"):
            ctx = autocast_context("bf16", CPU)
        with ctx:
            assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


@pytest.mark.parametrize("text, native", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n", False),  # AVX512 without BF16: emulated
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16\n", True),  # Zen 4 / Cooper Lake
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids AMX
    ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm v8.6
    ("Features\t: fp asimd\n", False),
    ("model name\t: a CPU that lists no flags\n", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it():
    expected = "bf16" if cpu_has_native_bf16() and _bf16_autocast_works("cpu") else "fp32"
    assert auto_precision(CPU) == resolve_precision("auto", CPU) == expected
    assert build_grad_scaler("auto", CPU) is None
    with autocast_context("auto", CPU):
        assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """Returns row ``i`` of a fixed table for an image whose pixels all equal ``i``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.anchor = nn.Parameter(torch.zeros(()))  # so .train()/.eval() has something to flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()] + 0 * self.anchor


def test_evaluate_matches_a_hand_computation():
    # 6 classes; rows are samples. argmax / rank of the true label worked out by hand:
    table = torch.tensor([
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true 0 -> pred 0  (top1 ok)
        [0.0, 1.0, 5.0, 0.0, 0.0, 0.0],  # true 1 -> pred 2  (true is 2nd: top5 ok)
        [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],  # true 2 -> pred 2  (top1 ok)
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # true 5 -> pred 0  (true is 6th: top5 miss)
        [0.0, 0.0, 0.0, 0.0, 9.0, 0.0],  # true 4 -> pred 4  (top1 ok)
        [1.0, 0.0, 0.0, 0.0, 7.0, 0.0],  # true 0 -> pred 4  (true is 2nd: top5 ok)
        [0.0, 0.0, 8.0, 0.0, 0.0, 0.0],  # true 2 -> pred 2  (top1 ok)
    ])
    labels = torch.tensor([0, 1, 2, 5, 4, 0, 2])
    ids = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1)
    batches = [(ids[:4], labels[:4]), {"image": ids[4:], "label": labels[4:]}]
    model = FixedLogits(table).train()
    m = evaluate(model, batches, device=CPU, num_classes=6)
    assert model.training  # mode restored

    assert m["count"] == 7
    assert m["correct1"] == 4 and m["acc1"] == pytest.approx(4 / 7)
    assert m["correct5"] == 6 and m["acc5"] == pytest.approx(6 / 7)
    assert m["loss"] == pytest.approx(F.cross_entropy(table, labels).item(), rel=1e-6)
    expected_confusion = [[0] * 6 for _ in range(6)]
    for t, p in [(0, 0), (1, 2), (2, 2), (5, 0), (4, 4), (0, 4), (2, 2)]:
        expected_confusion[t][p] += 1
    assert m["confusion"] == expected_confusion
    assert m["per_class_acc"] == [0.5, 0.0, 1.0, None, 1.0, 0.0]
    assert reduce_metrics(m) == m  # no process group: unchanged

    small = evaluate(FixedLogits(table[:, :3]), [(ids[:3], labels[:3])], device=CPU, num_classes=3)
    assert "acc5" not in small and small["acc1"] == pytest.approx(2 / 3)

    with pytest.raises(ValueError, match="num_classes"):
        evaluate(FixedLogits(table), [(ids, labels)], device=CPU, num_classes=5)


def test_ddp_single_process_unwraps_and_reduces(tmp_path):
    """A real gloo process group (world size 1): DDP-wrapped model, EMA and metric reduction."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        seed_everything(0)
        model = nn.parallel.DistributedDataParallel(tiny_vit())
        assert isinstance(unwrap_model(model), VisionTransformer)
        cfg = cfg_for(ema_decay=0.5)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, 2)
        ema = ModelEma(model, cfg.ema_decay)
        assert set(ema.state_dict()) == set(tiny_vit().state_dict())  # no "module." prefix
        train_metrics = train_one_epoch(model, toy_batches(64), opt, sched, cfg, device=CPU, epoch=0, ema=ema)
        reduced = reduce_metrics(train_metrics)
        assert reduced["images"] == 64 and reduced["train_loss"] == pytest.approx(train_metrics["train_loss"])
        eval_metrics = evaluate(model, toy_batches(64), device=CPU, num_classes=NUM_CLASSES)
        assert reduce_metrics(eval_metrics) == eval_metrics  # world size 1: the sums are the local sums
    finally:
        dist.destroy_process_group()
