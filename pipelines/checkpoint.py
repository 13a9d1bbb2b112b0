"""Training state on disk without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory::

    model.safetensors       unwrapped model state dict (timm-style keys, no ``module.`` prefix)
    ema.safetensors         EMA weights (when an EMA is kept)
    optimizer.safetensors   optimizer state tensors, keys ``state.{param_index}.{name}``
    optimizer.json          param_groups and non-tensor state
    scheduler.json          LR scheduler state
    scaler.json             GradScaler state (fp16 only)
    rng.safetensors         torch CPU (and CUDA) generator states as uint8 tensors
    rng.json                python ``random`` and numpy states
    state.json              epoch, step, metrics, config, the position inside an unfinished epoch
                            (mid-epoch checkpoints only), and the size + sha256 of every file above

It is written into a temporary sibling directory and renamed into place, so a reader sees a
whole checkpoint or none; the caller may then copy it to object storage (e.g. Ray Train's
``Checkpoint.from_directory``). Loading reads only safetensors and JSON (no ``torch.load``),
checks every file against the sizes and hashes in ``state.json``, and names the file at fault.

RNG: the saving process's generators are stored. Under DDP only the saving rank is restored
exactly; the other ranks resume with whatever their seeding gives them. The training worker
does not rely on them: it seeds every step from ``(seed, global step, rank)`` and every
sample's augmentation from ``(seed, epoch, row id)``, so a resume draws the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .engine import ModelEma, unwrap_model
from .errors import UserError

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match the model."""


# --------------------------------------------------------------------------------------------
# JSON + tensors encoding of nested state (optimizer, scheduler, RNG)
# --------------------------------------------------------------------------------------------
# Tensors are replaced by {"__tensor__": key} and stored under that key in a safetensors file;
# tuples become {"__tuple__": [...]}; dicts with non-string keys (optimizer "state" is keyed by
# int) become {"__items__": [[key, value], ...]}. Decoding gives back the same Python types.


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{path}.{k}" if path else k, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{path}.{k}" if path else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (only tensors and JSON values)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], file: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint file {file} lacks tensor {key!r}; the checkpoint is incomplete")
            return tensors[key]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors, file) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors, file) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors, file) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    return obj


def _save_tree(directory: Path, name: str, tree: Any) -> None:
    """``name.json`` (+ ``name.safetensors`` when the tree holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    if tensors:
        save_file(_unshared(tensors), str(directory / f"{name}.safetensors"), metadata={"format": "pt"})
    _write_json(directory / f"{name}.json", encoded)


def _load_tree(directory: Path, name: str) -> Any:
    encoded = _read_json(directory / f"{name}.json")
    tensor_file = directory / f"{name}.safetensors"
    tensors = _read_tensors(tensor_file) if tensor_file.exists() else {}
    return _decode(encoded, tensors, tensor_file)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights, views): clone repeats."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({exc})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({exc})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped module's state dict, with any leftover wrapper prefixes stripped."""
    out = {}
    for key, value in unwrap_model(module).state_dict().items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _load_module(module: nn.Module, path: Path) -> None:
    state = _read_tensors(path)
    target = unwrap_model(module)
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"checkpoint file {path} does not fit the model: {str(exc).splitlines()[0]} "
                              "(was it saved from a different model config?)") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint file {path} does not fit the model: missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]} (was it saved from a different model config?)")


def _verify(path: Path, expected: Mapping[str, Any]) -> None:
    """Compare a file with the size and sha256 recorded in state.json."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    size = path.stat().st_size
    if size != expected["bytes"] or _sha256(path) != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its size/sha256 differ from state.json "
                              f"({size} bytes, expected {expected['bytes']}); use an earlier checkpoint")


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": np_kind, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if len(cuda_states) != visible:
            warnings.warn(f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, this process sees "
                          f"{visible}; restoring the first {min(len(cuda_states), visible)}", stacklevel=3)
        for index, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state, device=index)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def save_training_state(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: ModelEma | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int,
    metrics: Mapping[str, Any],
    config_dict: Mapping[str, Any],
    rng: bool = True,
    position: Mapping[str, Any] | None = None,
) -> Path:
    """Write the full training state into ``directory`` atomically; returns its path.

    ``epoch`` and ``step`` are the caller's counters (e.g. the last finished epoch and the global
    step); they come back from :func:`load_training_state` unchanged. ``metrics`` and
    ``config_dict`` must be JSON values (numbers, strings, lists, dicts). ``position`` marks a
    mid-epoch checkpoint: ``epoch`` is then the unfinished epoch and ``position`` says how far
    into it (``samples`` per rank, ``world_size``, ...; see :func:`resume_position`). An existing
    directory of the same name is replaced.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_unshared(_plain_state_dict(model)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if ema is not None:
            save_file(_unshared(_plain_state_dict(ema.module)), str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        _save_tree(tmp, "optimizer", optimizer.state_dict())
        _save_tree(tmp, "scheduler", scheduler.state_dict())
        if scaler is not None:
            _save_tree(tmp, "scaler", scaler.state_dict())
        if rng:
            _save_tree(tmp, "rng", _rng_state())

        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": int(epoch),
            "step": int(step),
            "metrics": _encode(dict(metrics), "metrics", tensors),
            "config": _encode(dict(config_dict), "config", tensors),
            **({"position": _encode(dict(position), "position", tensors)} if position is not None else {}),
            "torch_version": torch.__version__,
            "files": files,
        }
        if tensors:
            raise TypeError(f"metrics/config must hold plain numbers, not tensors: {sorted(tensors)}")
        _write_json(tmp / STATE_FILE, state)
        _fsync(tmp / STATE_FILE)

        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resume_position(state: Mapping[str, Any]) -> tuple[int, int]:
    """``(epoch, samples)``: where a run restored from ``state`` (a checkpoint's state.json)
    continues. After an epoch checkpoint that is the next epoch from its start; after a mid-epoch
    one, the same epoch after the ``samples`` rows each rank had already trained on."""
    position = state.get("position")
    if position:
        return int(state["epoch"]), int(position["samples"])
    return int(state["epoch"]) + 1, 0


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``state.json`` of a checkpoint (epoch, step, metrics, config, files), decoded."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    state = _read_json(path / STATE_FILE)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "files" not in state:
        raise CheckpointError(f"checkpoint file {path / STATE_FILE} is not a version-{FORMAT_VERSION} "
                              "training state written by pipelines.checkpoint")
    state["metrics"] = _decode(state["metrics"], {}, path / STATE_FILE)
    state["config"] = _decode(state["config"], {}, path / STATE_FILE)
    return state


def load_training_state(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: ModelEma | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into the given objects; returns state.json.

    Build the model, optimizer, scheduler, EMA and scaler exactly as for a fresh run (same
    config, same device), then call this. Every file is checked against its recorded sha256
    first; a missing or corrupt file raises :class:`CheckpointError` naming it.
    """
    path = Path(directory)
    state = read_state(path)
    files = state["files"]

    def need(name: str) -> Path:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no {name} (it was saved without it)")
        _verify(path / name, files[name])
        return path / name

    _load_module(model, need("model.safetensors"))
    if ema is not None:
        _load_module(ema.module, need("ema.safetensors"))
    if optimizer is not None:
        need("optimizer.json")
        if "optimizer.safetensors" in files:
            need("optimizer.safetensors")
        try:
            optimizer.load_state_dict(_load_tree(path, "optimizer"))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint file {path / 'optimizer.json'} does not fit the optimizer "
                                  f"({exc})") from None
    if scheduler is not None:
        need("scheduler.json")
        scheduler.load_state_dict(_load_tree(path, "scheduler"))
    if scaler is not None:
        need("scaler.json")
        scaler.load_state_dict(_load_tree(path, "scaler"))
    if restore_rng:
        need("rng.json")
        need("rng.safetensors")
        _restore_rng(_load_tree(path, "rng"))
    return state


def load_model_weights(directory: str | os.PathLike[str], model: nn.Module, *, ema: bool = False) -> dict[str, Any]:
    """Load the model weights (or the EMA weights with ``ema=True``) for evaluation; returns state.json."""
    path = Path(directory)
    state = read_state(path)
    name = "ema.safetensors" if ema else "model.safetensors"
    if name not in state["files"]:
        raise CheckpointError(f"checkpoint {path} has no {name}" + (" (trained without EMA)" if ema else ""))
    _verify(path / name, state["files"][name])
    _load_module(model, path / name)
    return state
