"""The training loop in plain PyTorch: optimizer, schedule, mixup, EMA, precision, train, evaluate.

Nothing here knows about Ray or MLflow. A Ray Train worker, a test or a ``torchrun`` script builds
the model and an iterable of batches, then calls::

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = build_grad_scaler(cfg.precision, device)      # None unless fp16 on CUDA
    mixup = build_mixup(cfg, num_classes)                  # None when both alphas are 0
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        train_metrics = train_one_epoch(model, batches, optimizer, scheduler, cfg, device=device,
                                        epoch=epoch, mixup=mixup, ema=ema, scaler=scaler)
        val_metrics = reduce_metrics(evaluate(model, val_batches, device=device, num_classes=C))

A batch is ``(images, labels)`` or ``{"image": images, "label": labels}`` (what Ray Data's
``iter_torch_batches`` yields); images are float ``(B, C, H, W)``, labels integer ``(B,)``.

The schedule is stepped once per optimizer step, so ``scheduler.last_epoch`` is the global step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from .config import PRECISIONS, TTA_MODES, TrainConfig
from .errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor] | Mapping[str, torch.Tensor]
MixFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; raised before the optimizer step."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed + rank``.

    Each rank gets its own stream (different dropout, mixup draws); DDP broadcasts rank 0's
    initial weights, so the ranks still start from the same model. Returns the seed used.
    """
    effective = int(seed) + int(rank)
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)  # also seeds all CUDA devices
    return effective


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP/FSDP-style ``.module`` wrappers and ``torch.compile``."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


class ViewTTA(nn.Module):
    """Test-time augmentation: the mean of the class probabilities over views of each image,
    returned as log-probabilities (so ``argmax``, ``softmax`` and ``cross_entropy`` of the output
    mean what they mean for logits).

    The views are the image and, with ``flip``, its mirror, each at every translation by
    ``(dx, dy)`` with ``|dx|, |dy| <= shift`` pixels: ``(1 + flip) * (2 * shift + 1) ** 2`` forward
    passes. A translated view is a window of the image padded with ``fill`` (per channel, or one
    value for all), the same windows the training's padded random crop
    (``data.augment.random_crop_padding``) draws from when ``fill`` is the normalised value of a zero
    pixel (:func:`zero_pixel_fill`).
    """

    def __init__(self, model: nn.Module, flip: bool = True, shift: int = 0, fill: float | Sequence[float] = 0.0):
        super().__init__()
        if shift < 0:
            raise ValueError(f"shift={shift} must be at least 0")
        self.model, self.flip, self.shift = model, bool(flip), int(shift)
        self.register_buffer("fill", torch.as_tensor(fill, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    def views(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The ``(B, C, H, W)`` views of ``x`` the output averages over, unflipped ones first."""
        s = self.shift
        for image in (x, x.flip(-1)) if self.flip else (x,):
            if s == 0:
                yield image
                continue
            h, w = image.shape[-2:]
            padded = self.fill.to(image.dtype).expand(image.shape[0], image.shape[1], h + 2 * s, w + 2 * s).clone()
            padded[..., s:s + h, s:s + w] = image
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):  # the content moves by (dx, dy): a window at (s - dy, s - dx)
                    yield padded[..., s - dy:s - dy + h, s - dx:s - dx + w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total, count = None, 0
        for view in self.views(x):
            probs = self.model(view).float().softmax(-1)  # (B, C)
            total = probs if total is None else total + probs
            count += 1
        return (total / count).log()


def zero_pixel_fill(mean: Sequence[float], std: Sequence[float]) -> list[float]:
    """Per channel, what a zero (black) pixel becomes after normalisation: ``(0 - mean) / std``,
    in float32 as the data pipeline computes it (so a padded border equals a normalised black pixel)."""
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return ((torch.zeros_like(m) - m) / s).tolist()


def with_tta(model: nn.Module, tta: str, shift: int = 2, fill: float | Sequence[float] = 0.0) -> nn.Module:
    """``model`` wrapped for the test-time augmentation ``tta``: ``none`` (``model`` itself),
    ``hflip`` (image and mirror), ``shift`` (translations by up to ``shift`` pixels, padded with
    ``fill``) or ``hflip+shift`` (both); see :class:`ViewTTA`."""
    if tta not in TTA_MODES:
        raise ValueError(f"infer.tta={tta!r} is not a test-time augmentation; use one of {', '.join(TTA_MODES)}")
    if tta == "none":
        return model
    shifted = tta.endswith("shift")
    return ViewTTA(model, flip=tta.startswith("hflip"), shift=shift if shifted else 0, fill=fill)


def unpack_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` on ``device`` from a tuple/list or an ``{"image", "label"}`` dict."""
    if isinstance(batch, Mapping):
        try:
            images, labels = batch["image"], batch["label"]
        except KeyError:
            raise KeyError(f"a batch dict needs 'image' and 'label' keys, got {sorted(batch)}") from None
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        images, labels = batch
    else:
        raise TypeError(f"a batch is (images, labels) or {{'image', 'label'}}, got {type(batch).__name__}")
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor (normalize in the data pipeline), got {images.dtype}")
    non_blocking = device.type == "cuda"
    return images.to(device, non_blocking=non_blocking), labels.to(device, dtype=torch.long, non_blocking=non_blocking)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay.

    1-D parameters (norm weights, biases) and whatever ``model.no_weight_decay()`` names
    (position embedding, class and register tokens for the ViT).
    """
    model = unwrap_model(model)
    explicit = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n in explicit)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``weight_decay`` for matrices, 0 for :func:`no_weight_decay_names`."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with PyTorch's fused kernel where it runs on these
    parameters' device (CUDA; the CPU from torch 2.4): one kernel for every parameter instead of
    a dozen small ops each. For the recipes' models on one CPU thread the step takes 0.4-0.5 ms
    fused vs 1.6-2.3 ms in the per-parameter loop (``benchmarks/bench_step.py``). The same update
    rule: ``tests/test_engine.py`` checks it against the unfused optimizer."""
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except RuntimeError:  # a torch without this device's fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio``.

    ``lr(step) = base * (step + 1) / warmup_steps``                  for step < warmup_steps,
    ``lr(step) = min + (base - min) * (1 + cos(pi * p)) / 2``       after, with
    ``p = min(1, (step - warmup_steps) / (total_steps - warmup_steps))``.

    A plain-number callable object, so ``LambdaLR.state_dict()`` stores its fields as JSON.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    start_step: int = 0) -> LambdaLR:
    """Per-step warmup (``cfg.warmup_epochs``, may be fractional) + cosine to ``cfg.min_lr``.

    ``start_step > 0`` places the schedule at that step (the next optimizer step uses
    ``lr(start_step)``); the optimizer's groups must then carry ``initial_lr``."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, max(0, round(cfg.warmup_epochs * steps_per_epoch)))
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio), last_epoch=start_step - 1)


def continue_schedule(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                      step: int) -> LambdaLR:
    """After restoring an optimizer from a run with other hyperparameters (``--continue``): the
    current ``lr`` and ``weight_decay`` replace the restored ones (the AdamW moments stay), and
    the schedule is rebuilt for the current ``epochs`` and placed at ``step``."""
    skip = no_weight_decay_names(model)
    no_decay_ids = {id(p) for n, p in unwrap_model(model).named_parameters() if n in skip}
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = cfg.lr
        group["weight_decay"] = 0.0 if all(id(p) in no_decay_ids for p in group["params"]) else cfg.weight_decay
    return build_scheduler(optimizer, cfg, steps_per_epoch, start_step=step)


# --------------------------------------------------------------------------------------------
# Mixup / CutMix, EMA
# --------------------------------------------------------------------------------------------


def build_mixup(cfg: TrainConfig, num_classes: int) -> MixFn | None:
    """torchvision v2 MixUp and/or CutMix on a batch (one of them per batch when both are on).

    Returns ``fn(images, labels) -> (images, soft_targets)`` with targets of shape (B, C) that
    sum to 1, or None when ``mixup_alpha`` and ``cutmix_alpha`` are both 0. Draws come from the
    global torch RNG, so they are reproducible under :func:`seed_everything`.
    """
    from torchvision.transforms import v2  # imported here: only the training path needs it

    choices: list[nn.Module] = []
    if cfg.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


class ModelEma:
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * w``.

    Keeps a copy of the unwrapped module (no DDP wrapper, no gradients, eval mode). Floating
    tensors of the state dict are averaged; integer buffers are copied. ``state_dict()`` is the
    copy's plain state dict, so it saves and loads like model weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """The decay used after optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``,
        so the average forgets the random initial weights within the first few hundred steps
        instead of keeping ``decay ** step`` of them (0.999 ** 422 = 66 % after one Fashion-MNIST
        epoch). Derived from the global step, so a resumed run continues the same sequence.
        ``step=None`` uses ``decay`` itself."""
        return self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay_at(step)
        current = unwrap_model(model).state_dict()
        averaged, latest = [], []
        for name, ema_v in self.module.state_dict().items():
            model_v = current[name].detach()
            if ema_v.is_floating_point():
                averaged.append(ema_v)
                latest.append(model_v if model_v.dtype == ema_v.dtype else model_v.to(ema_v.dtype))
            else:
                ema_v.copy_(model_v)
        # ema += (1 - decay) * (model - ema), all tensors in one multi-tensor op: the recipes'
        # models update in 0.55-0.60 ms vs 0.89-0.97 as one mul_/add_ pair per tensor (bench_step.py)
        torch._foreach_lerp_(averaged, latest, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@functools.cache
def _bf16_autocast_works(device_type: str) -> bool:
    """Whether autocast to bfloat16 is available and actually produces bf16 on this device."""
    if hasattr(torch.amp, "is_autocast_available") and not torch.amp.is_autocast_available(device_type):
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        layer = nn.Linear(8, 8).to(device_type)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = layer(torch.ones(2, 8, device=device_type))
        return out.dtype == torch.bfloat16
    except (RuntimeError, AssertionError):
        return False


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, Arm BF16 (/proc/cpuinfo)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 in hardware (``/proc/cpuinfo`` flags; False where unknown).

    Without it oneDNN emulates bf16 and autocast is slower than fp32 (3.2x on an AVX512 Xeon
    without BF16); with it the matmuls run several times faster (docs/training.md)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return any(flag in CPU_BF16_FLAGS for flag in value.split())
    except OSError:
        pass
    return False


def auto_precision(device: torch.device) -> str:
    """``bf16`` on a CUDA device that supports it and on a CPU with native bf16, else ``fp32``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if _bf16_autocast_works("cuda") else "fp32"
    if device.type == "cpu" and cpu_has_native_bf16() and _bf16_autocast_works("cpu"):
        return "bf16"
    return "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision that will really run: ``auto`` picks :func:`auto_precision`; ``bf16`` falls
    back to ``fp32`` (with a warning) where bf16 autocast is not supported; ``fp16`` without CUDA
    and unknown names raise UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision {precision!r} is not one of {', '.join(PRECISIONS)}; "
                        "set e.g. --set train.precision=bf16")
    if precision == "auto":
        return auto_precision(device)
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.precision 'fp16' needs a CUDA device, but training runs on {device.type}; "
                        "use --set train.precision=bf16 (or fp32)")
    if precision == "bf16" and not _bf16_autocast_works(device.type):
        warnings.warn(f"bf16 autocast is not supported on {device.type}; training in fp32", stacklevel=2)
        return "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32: no-op; bf16: ``torch.autocast(device.type, bfloat16)``; fp16: CUDA float16 autocast."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (CUDA only); None for fp32/bf16, which need none."""
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler("cuda")


# --------------------------------------------------------------------------------------------
# Train and evaluate
# --------------------------------------------------------------------------------------------


_END = object()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    *,
    device: torch.device,
    epoch: int,
    mixup: MixFn | None = None,
    ema: ModelEma | None = None,
    scaler: torch.amp.GradScaler | None = None,
    limit_batches: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``: forward, backward, clip, step, schedule, EMA.

    Returns ``train_loss`` (mean over samples, local to this rank), ``images``, ``steps``,
    ``seconds``, ``images_per_s``, ``data_wait_seconds`` (time blocked waiting for the next batch:
    the input pipeline's share of ``seconds``), ``lr`` (of the last step) and ``grad_norm`` (of the
    last step).
    ``on_step`` gets ``{epoch, step, global_step, loss, lr, grad_norm, images}`` after each step;
    ``before_step`` gets the global step (``scheduler.last_epoch``) before each step's forward pass
    (e.g. to seed that step's dropout/mixup from the step number).

    A NaN/inf loss raises :class:`NonFiniteLossError` before ``optimizer.step()``, so the weights
    and optimizer state keep their last finite values. Without a GradScaler a non-finite gradient
    norm raises too. Under torch.distributed the ranks decide together (one one-element
    all-reduce per step), so a non-finite value on any rank stops every rank at the same step
    instead of leaving the others waiting in the next collective.
    """
    device = torch.device(device)
    precision = resolve_precision(cfg.precision, device)
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else math.inf

    loss_sum, images_seen, steps, data_wait = 0.0, 0, 0, 0.0
    lr, grad_norm = optimizer.param_groups[0]["lr"], 0.0
    t0 = time.perf_counter()
    batch_iter = iter(batches)
    for step in itertools.count():
        if limit_batches is not None and step >= limit_batches:
            break
        waited = time.perf_counter()
        batch = next(batch_iter, _END)  # the time blocked here is the input pipeline's share
        data_wait += time.perf_counter() - waited
        if batch is _END:
            break
        if before_step is not None:
            before_step(scheduler.last_epoch)
        images, labels = unpack_batch(batch, device)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)  # targets: (B,) -> (B, num_classes), rows sum to 1

        with autocast_context(precision, device):
            logits = model(images)
        loss = criterion(logits.float(), targets)  # soft targets are label-smoothed the same way

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # inf = measure only
        loss_value, grad_norm = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()

        finite = math.isfinite(loss_value) and (scaler is not None or math.isfinite(grad_norm))
        if _world_size() > 1:
            # a loss can be inf on one rank with finite (all-reduced) gradients, and under fp16 the
            # GradScaler tolerates inf gradients: decide together, so no rank runs on into a
            # collective that a stopped rank will never join
            finite = _all_ranks_agree(finite)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss_value):
                what = f"loss {loss_value}"
            elif scaler is None and not math.isfinite(grad_norm):
                what = f"gradient norm {grad_norm}"
            else:
                what = "loss on another rank"
            raise NonFiniteLossError(
                f"non-finite {what} at epoch {epoch}, step {step} (global step {scheduler.last_epoch}); "
                "the weights were not updated. Resume from the last good checkpoint with a lower "
                "train.lr, a train.clip_grad_norm, or train.precision=fp32, and check the input data."
            )

        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(optimizer)  # skips the step if the unscaled grads hold inf/NaN
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=scheduler.last_epoch)  # global optimizer steps so far

        batch_size = labels.shape[0]
        loss_sum += loss_value * batch_size
        images_seen += batch_size
        steps += 1
        if on_step is not None:
            on_step({"epoch": epoch, "step": step, "global_step": scheduler.last_epoch, "loss": loss_value,
                     "lr": lr, "grad_norm": grad_norm, "images": batch_size})

    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / images_seen if images_seen else float("nan"),
        "images": images_seen,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": images_seen / seconds if seconds > 0 else 0.0,
        "data_wait_seconds": data_wait,
        "lr": lr,
        "grad_norm": grad_norm,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    num_classes: int,
    precision: str = "fp32",
    limit_batches: int | None = None,
) -> dict[str, Any]:
    """Loss, top-1/top-5 accuracy, per-class accuracy and confusion matrix over ``batches``.

    Runs the unwrapped module (a DDP forward would join collectives that ranks with a different
    number of eval batches never reach). Metrics are local: call :func:`reduce_metrics` under DDP.
    ``confusion[t][p]`` counts samples of true class t predicted as p. ``acc5`` is present only
    when ``num_classes >= 5``; ``per_class_acc[c]`` is None for a class with no samples.
    """
    device = torch.device(device)
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    precision = resolve_precision(precision, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    try:
        for step, batch in enumerate(batches):
            if limit_batches is not None and step >= limit_batches:
                break
            images, labels = unpack_batch(batch, device)
            with autocast_context(precision, device):
                logits = net(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            preds = logits.argmax(dim=-1)
            counts = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
            if counts.numel() != confusion.numel():
                raise ValueError(f"a label is >= num_classes={num_classes}; pass the dataset's class count")
            confusion += counts
            if num_classes >= 5:
                top5 = logits.topk(5, dim=-1).indices  # (B, 5)
                correct5 += (top5 == labels[:, None]).any(dim=-1).sum()
    finally:
        net.train(was_training)

    sums = {
        "loss_sum": loss_sum.item(),
        "correct5": int(correct5.item()),
        "confusion": confusion.view(num_classes, num_classes).cpu().tolist(),
    }
    return _eval_metrics_from_sums(sums, num_classes)


def _eval_metrics_from_sums(sums: dict[str, Any], num_classes: int) -> dict[str, Any]:
    confusion = sums["confusion"]
    per_class_count = [sum(row) for row in confusion]
    count = sum(per_class_count)
    correct1 = sum(confusion[c][c] for c in range(num_classes))
    out: dict[str, Any] = {
        "loss": sums["loss_sum"] / count if count else float("nan"),
        "acc1": correct1 / count if count else float("nan"),
    }
    if num_classes >= 5:
        out["acc5"] = sums["correct5"] / count if count else float("nan")
    out.update({
        "count": count,
        "correct1": correct1,
        "correct5": sums["correct5"],
        "loss_sum": sums["loss_sum"],
        "per_class_acc": [confusion[c][c] / n if n else None for c, n in enumerate(per_class_count)],
        "confusion": confusion,
    })
    return out


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_ranks_agree(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (one one-element all-reduce)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _collective_device() -> torch.device:
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Global metrics on every rank: sums counts across ranks when torch.distributed is up.

    Accepts the dict from :func:`evaluate` (sums loss, counts, confusion matrix and recomputes the
    rates) or from :func:`train_one_epoch` (sample-weighted mean loss, total images and steps,
    slowest rank's seconds and data wait). A no-op copy when torch.distributed is not initialized. Every rank
    must call it (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return dict(metrics)
    device = _collective_device()
    if "confusion" in metrics:
        num_classes = len(metrics["confusion"])
        confusion = torch.tensor(metrics["confusion"], dtype=torch.long, device=device)
        scalars = torch.tensor([metrics["loss_sum"], float(metrics["correct5"])], dtype=torch.float64, device=device)
        dist.all_reduce(confusion)
        dist.all_reduce(scalars)
        sums = {"loss_sum": scalars[0].item(), "correct5": int(round(scalars[1].item())),
                "confusion": confusion.cpu().tolist()}
        return _eval_metrics_from_sums(sums, num_classes)
    if "train_loss" in metrics:
        sums = torch.tensor([metrics["train_loss"] * metrics["images"], metrics["images"], metrics["steps"]],
                            dtype=torch.float64, device=device)
        slowest = torch.tensor([metrics["seconds"], metrics.get("data_wait_seconds", 0.0)], dtype=torch.float64,
                               device=device)
        dist.all_reduce(sums)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss_total, images, steps = sums.tolist()
        seconds, data_wait = slowest.tolist()
        out = {**metrics, "train_loss": loss_total / max(1.0, images), "images": int(images), "steps": int(steps),
               "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0}
        if "data_wait_seconds" in metrics:
            out["data_wait_seconds"] = data_wait
        return out
    raise ValueError(f"reduce_metrics expects evaluate() or train_one_epoch() output, got keys {sorted(metrics)}")
