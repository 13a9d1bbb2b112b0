"""One table of model families and the functions that dispatch on it.

Every family registers a :class:`Family`: its config class, its model class, how its names map
to config fields, the names it offers and its FLOPs count. Everything generic —
:func:`create_model`, loading a saved model, the pipeline's ``model.name`` + ``model.args`` —
goes through this table, so a new family is one module and one entry here.

    >>> cfg = config_from_name("swin_tiny_patch4_window7_224", num_classes=10)
    >>> model = build_model(cfg)
    >>> create_model("t2t_vit_14", num_classes=10)          # same thing in one call
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .arch import ArchConfig
from .config import ViTConfig
from .config import available_models as vit_names
from .config import match_name as vit_match_name
from .hybrid import NAME_HELP as HYBRID_NAME_HELP
from .hybrid import HybridConfig, HybridViT, hybrid_flops
from .hybrid import available_models as hybrid_names
from .hybrid import match_name as hybrid_match_name
from .model import VisionTransformer, vit_flops
from .swin import NAME_HELP as SWIN_NAME_HELP
from .swin import SwinConfig, SwinTransformer, swin_flops
from .swin import available_models as swin_names
from .swin import match_name as swin_match_name
from .t2t import NAME_HELP as T2T_NAME_HELP
from .t2t import T2TConfig, T2TViT, t2t_flops
from .t2t import available_models as t2t_names
from .t2t import match_name as t2t_match_name


@dataclass(frozen=True)
class Family:
    name: str  # config.json "family"
    config_cls: type[ArchConfig]
    model_cls: type[nn.Module]
    match_name: Callable[[str], dict[str, Any] | None]  # a model name -> config fields, None if not ours
    names: Callable[[], list[str]]  # the names this family offers
    flops: Callable[[Any, tuple[int, int] | None], float]  # forward FLOPs per image
    name_help: str  # how names look, for error messages


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family




def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(cfg: ArchConfig) -> Family:
    return get_family(cfg.family)


def parse_model_name(name: str) -> tuple[Family, dict[str, Any]]:
    """(family, config fields) for a model name or a bare family name (its defaults)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in FAMILIES:
        return FAMILIES[name], {}
    for family in FAMILIES.values():
        fields = family.match_name(name)
        if fields is not None:
            return family, dict(fields)
    forms = "; ".join(f"{f.name}: {f.name_help}" for f in FAMILIES.values())
    raise ValueError(f"unknown model name {name!r}; names look like {forms} (or a bare family name: {sorted(FAMILIES)})")


def config_from_name(name: str, **overrides: Any) -> ArchConfig:
    """The named model's config with any of its family's arguments overridden."""
    family, fields = parse_model_name(name)
    fields.update(overrides)  # an explicit None is a value (e.g. t2t token_dim=None)
    return family.config_cls.from_dict(fields)


def build_model(cfg: ArchConfig) -> nn.Module:
    """A freshly initialised model of architecture ``cfg`` (any family)."""
    return family_of(cfg).model_cls(cfg)


def arch_to_dict(cfg: ArchConfig) -> dict[str, Any]:
    """``{"family": ..., "config": {...}}``: the JSON form of an architecture (config.json's)."""
    return {"family": cfg.family, "config": cfg.to_dict()}


def arch_from_dict(doc: dict[str, Any]) -> ArchConfig:
    """Inverse of :func:`arch_to_dict`; a document without ``family`` is a ViT (format 1 files)."""
    return get_family(doc.get("family", "vit")).config_cls.from_dict(doc["config"])


def flops_per_image(cfg: ArchConfig | nn.Module, img_hw: tuple[int, int] | None = None) -> float:
    """Forward FLOPs (2 x multiply-adds of matmuls and convolutions) per image, any family."""
    cfg = getattr(cfg, "cfg", cfg)
    return family_of(cfg).flops(cfg, img_hw)


def available_models(family: str | None = None) -> list[str]:
    fams = [get_family(family)] if family else list(FAMILIES.values())
    return [n for f in fams for n in f.names()]


# The built-in families, in the order names are matched.
for _family in (
    Family("vit", ViTConfig, VisionTransformer, vit_match_name, vit_names, vit_flops,
           "vit_<tiny|small|medium|base|large|huge>_patch<P>[_<img>] or <Ti|S|M|B|L|H>/<P>"),
    Family("hybrid", HybridConfig, HybridViT, hybrid_match_name, hybrid_names, hybrid_flops, HYBRID_NAME_HELP),
    Family("t2t", T2TConfig, T2TViT, t2t_match_name, t2t_names, t2t_flops, T2T_NAME_HELP),
    Family("swin", SwinConfig, SwinTransformer, swin_match_name, swin_names, swin_flops, SWIN_NAME_HELP),
):
    register_family(_family)
