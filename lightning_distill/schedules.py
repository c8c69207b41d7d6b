"""Value schedules for loss hyper-parameters (``alpha``, ``temperature``, term weights), read from Trainer counters.

A schedule is a small immutable (frozen, hashable, picklable) dataclass. ``unit="epoch"`` reads
``trainer.current_epoch`` (completed epochs), ``unit="step"`` reads ``trainer.global_step`` (optimizer steps).
Every schedule here is monotone between its two endpoints, so :meth:`Schedule.bounds` is exact.

Values are validated once, when a schedule is built (its fields in ``__post_init__``, its range by
:func:`check_schedule`); being immutable, a schedule changes only by building another one
(``dataclasses.replace``), which validates again. Evaluating a schedule on a training step checks nothing more
than that the counter is not negative, and a :class:`Constant` returns its value at once.

Example::

    >>> s = as_schedule({"type": "linear_warmup", "value": 1.0, "warmup": 4}, "alpha")
    >>> s(step=123, epoch=2), as_schedule(s.to_config(), "alpha") == s
    (0.5, True)
"""

from __future__ import annotations

import importlib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

from lightning_distill.losses.functional._common import is_real_number

__all__ = [
    "Constant",
    "Cosine",
    "LinearWarmup",
    "Schedule",
    "ScheduleUnit",
    "as_schedule",
    "check_schedule",
    "checked_schedule",
]

ScheduleUnit = Literal["epoch", "step"]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _interpolate(start: float, end: float, weight: float) -> float:
    """``start + (end - start) * weight``, exact at ``weight`` 0 and 1 and never outside the endpoints."""
    if weight <= 0.0:
        return start
    if weight >= 1.0:
        return end
    return min(max(start + (end - start) * weight, min(start, end)), max(start, end))


@dataclass(frozen=True)
class Schedule(ABC):
    """Base class: a value as a function of ``t``, the epoch or optimizer-step counter (``t >= 0``).

    Subclasses are frozen dataclasses that implement :meth:`value_at` and :meth:`bounds`; the fields they name in
    ``_floats`` (finite numbers) and ``_ints`` (positive ints) are checked and normalized. ``unit`` is keyword-only.

    Example::

        >>> s = LinearWarmup(2.0, warmup=10, unit="step")
        >>> s(step=5, epoch=0), s.bounds(), s.is_constant
        (1.0, (0.0, 2.0), False)
    """

    unit: ScheduleUnit = field(default="epoch", kw_only=True)
    config_type: ClassVar[str] = ""  # short ``"type"`` name in ``to_config``; empty: the dotted class path
    _floats: ClassVar[tuple[str, ...]] = ()  # fields checked finite and stored as float
    _ints: ClassVar[tuple[str, ...]] = ()  # fields checked positive and stored as int

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if self.unit not in get_args(ScheduleUnit):
            raise ValueError(f"{cls}.unit must be 'epoch' or 'step', got {self.unit!r}")
        for name in self._floats:
            object.__setattr__(self, name, _finite(getattr(self, name), f"{cls}.{name}"))
        for name in self._ints:
            object.__setattr__(self, name, _positive_int(getattr(self, name), f"{cls}.{name}"))

    @abstractmethod
    def value_at(self, t: int) -> float:
        """Return the value at ``t`` (in :attr:`unit`; ``t >= 0``)."""

    @abstractmethod
    def bounds(self) -> tuple[float, float]:
        """Return ``(min, max)`` of the values the schedule ever takes."""

    def __call__(self, *, step: int, epoch: int) -> float:
        """Return the value at ``trainer.global_step`` (``unit="step"``) or ``trainer.current_epoch`` (``"epoch"``)."""
        t = step if self.unit == "step" else epoch
        if t < 0:
            raise ValueError(f"{self!r}: the {self.unit} counter must be >= 0, got {t!r}")
        return self.value_at(t)

    @property
    def is_constant(self) -> bool:
        """Whether the schedule always takes the same value."""
        low, high = self.bounds()
        return low == high

    def to_config(self) -> dict[str, Any]:
        """Return ``{"type": ..., **fields}`` in plain Python types; :func:`as_schedule` builds it back."""
        cls = type(self)
        kind = cls.config_type if _TYPES.get(cls.config_type) is cls else f"{cls.__module__}.{cls.__qualname__}"
        return {"type": kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class Constant(Schedule):
    """The same value at every ``t``.

    Example::

        >>> Constant(0.5)(step=100, epoch=3), Constant(0.5).to_config()
        (0.5, {'type': 'constant', 'unit': 'epoch', 'value': 0.5})
    """

    value: float
    config_type: ClassVar[str] = "constant"
    _floats: ClassVar[tuple[str, ...]] = ("value",)

    def __call__(self, *, step: int, epoch: int) -> float:
        """Return the constant, whatever the counters (validated when built; nothing is checked per step)."""
        return self.value

    def value_at(self, t: int) -> float:
        """Return the constant."""
        return self.value

    def bounds(self) -> tuple[float, float]:
        """Return ``(value, value)``."""
        return self.value, self.value


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """Linear ramp ``start + (value - start) * min(t / warmup, 1)``: ``start`` at ``t = 0``, ``value`` from ``warmup``.

    Decoupled KD (Zhao et al., 2022) warms its loss weight up this way: ``LinearWarmup(8.0, warmup=20)``.

    Example::

        >>> s = LinearWarmup(8.0, warmup=20)
        >>> [s.value_at(t) for t in (0, 5, 20, 100)]
        [0.0, 2.0, 8.0, 8.0]
    """

    value: float
    warmup: int
    start: float = 0.0
    config_type: ClassVar[str] = "linear_warmup"
    _floats: ClassVar[tuple[str, ...]] = ("value", "start")
    _ints: ClassVar[tuple[str, ...]] = ("warmup",)

    def value_at(self, t: int) -> float:
        """Return the ramp's value at ``t``."""
        return _interpolate(self.start, self.value, t / self.warmup)

    def bounds(self) -> tuple[float, float]:
        """Return ``(min(start, value), max(start, value))``."""
        return min(self.start, self.value), max(self.start, self.value)


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half-cosine from ``start`` (``t = 0``) to ``end`` (``t >= length``).

    ``start + (end - start) * (1 - cos(pi * min(t / length, 1))) / 2``.

    Example::

        >>> s = Cosine(4.0, 1.0, length=10)
        >>> [round(s.value_at(t), 4) for t in (0, 5, 10, 11)]
        [4.0, 2.5, 1.0, 1.0]
    """

    start: float
    end: float
    length: int
    config_type: ClassVar[str] = "cosine"
    _floats: ClassVar[tuple[str, ...]] = ("start", "end")
    _ints: ClassVar[tuple[str, ...]] = ("length",)

    def value_at(self, t: int) -> float:
        """Return the cosine's value at ``t``."""
        progress = min(t / self.length, 1.0)
        return _interpolate(self.start, self.end, (1.0 - math.cos(math.pi * progress)) / 2.0)

    def bounds(self) -> tuple[float, float]:
        """Return ``(min(start, end), max(start, end))``."""
        return min(self.start, self.end), max(self.start, self.end)


_TYPES: dict[str, type[Schedule]] = {
    key: cls for cls in (Constant, LinearWarmup, Cosine) for key in (cls.config_type, cls.__name__)
}
_ACCEPTED = (
    "a number, a Schedule, {'type': 'constant' | 'linear_warmup' | 'cosine' | '<module>.<Class>', **fields} "
    "or {'class_path': '<module>.<Class>', 'init_args': {...}}"
)


def _schedule_class(path: Any, name: str) -> type[Schedule]:
    cls = _TYPES.get(path) if isinstance(path, str) else None
    if cls is None and isinstance(path, str) and "." in path:
        module, _, qualname = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), qualname, None)
        except ImportError:
            pass
    if not isinstance(cls, type) or not issubclass(cls, Schedule) or cls is Schedule:
        raise ValueError(f"Unknown schedule type {path!r} for {name}: expected {sorted(_TYPES)} or a Schedule path")
    return cls


def as_schedule(value: float | Schedule | Mapping[str, Any], name: str) -> Schedule:
    """Return ``value`` as a :class:`Schedule`: a number becomes :class:`Constant`, a config mapping is built.

    Args:
        value: A number (not ``bool``), a :class:`Schedule`, a :meth:`Schedule.to_config` mapping
            ``{"type": ..., **fields}`` or a jsonargparse-style ``{"class_path": ..., "init_args": {...}}``.
        name: The hyper-parameter's name, for error messages.

    Raises:
        TypeError: If ``value`` is none of the above, or a mapping has fields the schedule does not take.
        ValueError: If a mapping names an unknown schedule type or a field is invalid.

    Example::

        >>> as_schedule(2, "temperature")
        Constant(unit='epoch', value=2.0)
        >>> as_schedule({"class_path": "lightning_distill.schedules.Cosine",
        ...              "init_args": {"start": 4.0, "end": 1.0, "length": 10}}, "temperature")
        Cosine(unit='epoch', start=4.0, end=1.0, length=10)
    """
    if isinstance(value, Schedule):
        return value
    if is_real_number(value):  # a Python or NumPy number, or a 0-d tensor
        return Constant(float(value))  # type: ignore[arg-type]
    if isinstance(value, Mapping) and ("type" in value or "class_path" in value):
        if "class_path" in value:
            path, kwargs = value["class_path"], value.get("init_args") or {}
            extra = set(value) - {"class_path", "init_args"}
        else:
            path, kwargs, extra = value["type"], {k: v for k, v in value.items() if k != "type"}, set()
        if extra or not isinstance(kwargs, Mapping):
            raise TypeError(f"Invalid schedule config for {name}: {dict(value)!r}; accepted: {_ACCEPTED}")
        try:
            return _schedule_class(path, name)(**kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Invalid schedule config for {name}: {dict(value)!r}: {err}") from err
    raise TypeError(f"{name} must be {_ACCEPTED}; got {value!r} of type {type(value).__name__}")


def check_schedule(
    schedule: Schedule, name: str, low: float, high: float | None, low_inclusive: bool = True
) -> Schedule:
    """Check that every value of ``schedule`` is finite and lies in ``[low, high]`` and return it.

    Args:
        schedule: The schedule to check.
        name: The hyper-parameter's name, for error messages.
        low: Smallest allowed value.
        high: Largest allowed value; ``None`` for no upper bound.
        low_inclusive: If false, ``low`` itself is rejected (``(low, high]``, e.g. a temperature must be ``> 0``).

    Raises:
        ValueError: If a bound of the schedule is not finite or lies outside the range; the message names both.

    Example::

        >>> check_schedule(Cosine(4.0, 1.0, length=10), "temperature", 0.0, None, low_inclusive=False)
        Cosine(unit='epoch', start=4.0, end=1.0, length=10)
        >>> check_schedule(Constant(0.0), "temperature", 0.0, None, low_inclusive=False)
        Traceback (most recent call last):
        ...
        ValueError: temperature must be finite and in (0.0, inf), but Constant(unit='epoch', value=0.0) reaches 0.0
    """
    allowed = f"{'[' if low_inclusive else '('}{low}, {'inf)' if high is None else f'{high}]'}"
    for end in schedule.bounds():
        if (
            not math.isfinite(end)
            or end < low
            or (end == low and not low_inclusive)
            or (high is not None and end > high)
        ):
            raise ValueError(f"{name} must be finite and in {allowed}, but {schedule!r} reaches {end}")
    return schedule


def checked_schedule(
    value: float | Schedule | Mapping[str, Any],
    name: str,
    check: Callable[[float], float],
    low: float,
    high: float | None,
    low_inclusive: bool = True,
) -> Schedule:
    """Return a hyper-parameter as a validated schedule; a plain number goes through ``check`` (and its message).

    Example::

        >>> checked_schedule(0.5, "alpha", float, 0.0, 1.0)
        Constant(unit='epoch', value=0.5)
    """
    if is_real_number(value):
        return Constant(check(value))  # type: ignore[arg-type]
    return check_schedule(as_schedule(value, name), name, low, high, low_inclusive=low_inclusive)
