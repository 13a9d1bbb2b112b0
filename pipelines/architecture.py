"""The model a config asks for: ``model.name`` + ``model.args`` -> a vit_model architecture.

``model.name`` is any vit_model name (``vit_tiny_patch4``, ``hybrid``/``cct_7_3x1_32``,
``t2t_vit_14``, ``swin_micro_patch2_window7_28``, or a bare family name) and ``model.args`` any
argument of that family's config (``depth``, ``drop_path_rate``, ``window_size``, ...), validated
by the family itself: an unknown key or a bad value is one line naming ``model.args.<key>``.
The dataset supplies ``in_chans`` and ``num_classes``, and ``img_size`` unless ``model.args``
sets it.
"""

from __future__ import annotations

import re
from typing import Any

from vit_model import (
    ArchConfig,
    arch_from_dict,
    arch_to_dict,
    build_model,
    config_from_name,
    from_pretrained,
    parse_model_name,
)

from .config import PipelineConfig
from .errors import ConfigError

# arguments the dataset decides, and where they come from
DATASET_ARGS = {"in_chans": "data.channels", "num_classes": "the dataset's class folders"}
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

__all__ = ["DATASET_ARGS", "arch_from_dict", "arch_to_dict", "build_model", "check_model_settings",
           "model_arch", "pretrained_model"]


def _family(cfg: PipelineConfig):
    try:
        return parse_model_name(cfg.model.name)[0]
    except ValueError as exc:
        raise ConfigError(f"model.name={cfg.model.name!r} is not a known model: {str(exc).split('; ', 1)[-1]}") from None


def _args(cfg: PipelineConfig) -> dict[str, Any]:
    """``model.args`` with numbers that YAML read as strings ("1e-3") made numbers."""
    return {k: float(v) if isinstance(v, str) and _FLOAT.match(v) else v for k, v in cfg.model.args.items()}


def known_image_hw(cfg: PipelineConfig) -> tuple[int, int] | None:
    """The input size when the config alone decides it (model.args.img_size, data.image_size, or
    Fashion-MNIST's 28x28); None when only the prepared dataset knows it."""
    size = cfg.model.args.get("img_size") or cfg.data.image_size or (28 if cfg.data.source == "fashion-mnist" else None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def check_model_settings(cfg: PipelineConfig) -> None:
    """Refuse, before any worker starts, a model name or argument no run could build."""
    family = _family(cfg)
    valid = family.config_cls.field_names()
    for key in cfg.model.args:
        if key in DATASET_ARGS:
            raise ConfigError(f"model.args.{key} is set from the dataset ({DATASET_ARGS[key]}); remove it")
        if key not in valid:
            shown = ", ".join(k for k in valid if k not in DATASET_ARGS)
            raise ConfigError(f"model.args.{key} is not an argument of {cfg.model.name} ({family.name} family); "
                              f"valid arguments: {shown}")
    hw = known_image_hw(cfg)
    if hw is not None:
        model_arch(cfg, num_classes=2, channels=cfg.data.channels, image_hw=hw)


def model_arch(cfg: PipelineConfig, num_classes: int, channels: int, image_hw: tuple[int, int] | None) -> ArchConfig:
    """The architecture for ``model.*`` on a dataset (its classes, channels and image size)."""
    args = _args(cfg)
    img_size = args.pop("img_size", None)
    if img_size is None and image_hw:
        img_size = image_hw[0] if image_hw[0] == image_hw[1] else tuple(image_hw)
    try:
        sized = {"img_size": img_size} if img_size is not None else {}  # else the name's own size
        return config_from_name(cfg.model.name, **args, **sized, in_chans=channels, num_classes=num_classes)
    except ValueError as exc:
        message = str(exc)
        named = sorted((m.start(), k) for k in cfg.model.args if (m := re.search(rf"\b{re.escape(k)}\b", message)))
        where = f"model.args.{named[0][1]}" if named else "model.args"
        raise ConfigError(f"{cfg.model.name} cannot be built with these settings ({where}): {message}") from None


def pretrained_model(path: str, arch: ArchConfig):
    """``model.pretrained`` loaded and adapted to ``arch``'s classes, channels, image size and
    regularisation rates (its own architecture otherwise)."""
    rates = {k: v for k, v in arch.to_dict().items() if k.endswith("_rate")}
    return from_pretrained(path, num_classes=arch.num_classes, img_size=arch.img_size, in_chans=arch.in_chans, **rates)
