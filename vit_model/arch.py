"""What every family's config shares: a frozen dataclass with timm's field names, validated on
construction, that round-trips through JSON and names the family it builds.

A family config subclasses :class:`ArchConfig` and sets ``family`` (the key in config.json and
in :mod:`vit_model.registry`) and ``STRUCTURAL`` (fields that change parameter shapes, so weights
cannot move between configs that differ in them). ``img_size``, ``in_chans`` and ``num_classes``
are common to all families: weights adapt across them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar


def pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v


def _type_ok(tp: Any, v: Any) -> bool:
    """Whether JSON/YAML value ``v`` fits annotation ``tp`` (int, float, bool, str, None, unions,
    homogeneous or fixed tuples); ints are accepted for floats, bools never for numbers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, v) for a in args)
    if tp is type(None):
        return v is None
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(args[0], x) for x in v)
        return len(v) == len(args) and all(_type_ok(a, x) for a, x in zip(args, v))
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(tp, type):
        return isinstance(v, tp)
    return True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise ValueError with the first failing check's message."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_rates(cfg: Any, names: tuple[str, ...]) -> None:
    check([(0.0 <= getattr(cfg, n) < 1.0, f"{n} must be in [0, 1), got {getattr(cfg, n)}") for n in names])


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Base of every family config (no fields of its own)."""

    family: ClassVar[str] = ""
    STRUCTURAL: ClassVar[tuple[str, ...]] = ()
    ADAPTABLE: ClassVar[tuple[str, ...]] = ("img_size", "in_chans", "num_classes")

    @property
    def img_hw(self) -> tuple[int, int]:
        return pair(self.img_size)  # type: ignore[attr-defined]

    def replace(self, **changes: Any):
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config for ``d``; an unknown key is a ValueError naming it and the valid ones."""
        names = cls.field_names()
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.family} model argument(s) {unknown}; valid arguments: {names}")
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if not _type_ok(hints[k], v):
                raise ValueError(f"{k}={v!r} has the wrong type for a {cls.family} model; expected {_type_name(hints[k])}")
        return cls(**{k: _from_json(v) for k, v in d.items()})

    def structural_differences(self, other: ArchConfig) -> list[str]:
        if type(other) is not type(self):
            return ["family"]
        return [n for n in self.STRUCTURAL if getattr(self, n) != getattr(other, n)]
