"""What every family's config shares: a frozen dataclass with timm's field names, validated on
construction, that round-trips through JSON and names the family it builds.

A family config subclasses :class:`ArchConfig` and sets ``family`` (the key in config.json and
in :mod:`vit_model.registry`) and ``STRUCTURAL`` (fields that change parameter shapes, so weights
cannot move between configs that differ in them). ``img_size``, ``in_chans`` and ``num_classes``
are common to all families: weights adapt across them.
"""

from __future__ import annotations

import dataclasses
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
        return cls(**{k: _from_json(v) for k, v in d.items()})

    def structural_differences(self, other: ArchConfig) -> list[str]:
        if type(other) is not type(self):
            return ["family"]
        return [n for n in self.STRUCTURAL if getattr(self, n) != getattr(other, n)]
