from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

import lightning_distill.schedules as schedules
from lightning_distill.schedules import (
    Constant,
    Cosine,
    LinearWarmup,
    Schedule,
    as_schedule,
    check_schedule,
)

ALL = [
    Constant(0.25),
    Constant(3.0, unit="step"),
    LinearWarmup(8.0, warmup=20),
    LinearWarmup(0.2, warmup=4, start=1.0, unit="step"),
    Cosine(4.0, 1.0, length=10),
    Cosine(0.0, 1.0, length=3, unit="step"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Closed-form values
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_constant_values(unit):
    s = Constant(0.7, unit=unit)
    assert [s.value_at(t) for t in (0, 1, 10**9)] == [0.7, 0.7, 0.7]
    assert s.bounds() == (0.7, 0.7)
    assert s.is_constant


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_linear_warmup_values(unit):
    s = LinearWarmup(8.0, warmup=20, unit=unit)  # DKD's warm-up
    assert s.value_at(0) == 0.0
    assert s.value_at(5) == pytest.approx(2.0)
    assert s.value_at(10) == pytest.approx(4.0)
    assert s.value_at(19) == pytest.approx(7.6)
    assert s.value_at(20) == 8.0
    assert s.value_at(1000) == 8.0
    assert s.bounds() == (0.0, 8.0)
    assert not s.is_constant


def test_linear_warmup_from_start_and_decreasing():
    s = LinearWarmup(1.0, warmup=4, start=3.0)
    assert [s.value_at(t) for t in (0, 1, 2, 4, 9)] == pytest.approx([3.0, 2.5, 2.0, 1.0, 1.0])
    assert s.bounds() == (1.0, 3.0)
    assert LinearWarmup(2.0, warmup=3, start=2.0).is_constant


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_cosine_values(unit):
    s = Cosine(4.0, 1.0, length=10, unit=unit)
    for t in (0, 2, 5, 7, 10, 11, 500):
        expected = 4.0 + (1.0 - 4.0) * (1 - math.cos(math.pi * min(t / 10, 1))) / 2
        assert s.value_at(t) == pytest.approx(expected)
    assert s.value_at(0) == 4.0 and s.value_at(10) == 1.0 and s.value_at(11) == 1.0  # endpoints exact
    assert s.value_at(5) == pytest.approx(2.5)
    assert s.bounds() == (1.0, 4.0)
    assert Cosine(0.0, 1.0, length=4).value_at(1) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_endpoints_exact_despite_rounding():
    # 0.1 + (0.3 - 0.1) * 1.0 == 0.30000000000000004 in floating point: the schedules return `end` itself.
    assert LinearWarmup(0.3, warmup=7, start=0.1).value_at(7) == 0.3
    assert Cosine(0.1, 0.3, length=7).value_at(7) == 0.3


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_values_stay_within_bounds_and_are_monotone(s):
    low, high = s.bounds()
    values = [s.value_at(t) for t in range(40)]
    assert all(low <= v <= high for v in values)
    assert values == sorted(values) or values == sorted(values, reverse=True)
    assert {s.value_at(0), s.value_at(10**6)} == {low, high}


# ---------------------------------------------------------------------------------------------------------------------
# __call__
# ---------------------------------------------------------------------------------------------------------------------
def test_call_picks_the_counter_of_the_unit():
    by_epoch, by_step = LinearWarmup(1.0, warmup=10), LinearWarmup(1.0, warmup=10, unit="step")
    assert by_epoch(step=1000, epoch=5) == pytest.approx(0.5)
    assert by_step(step=5, epoch=1000) == pytest.approx(0.5)
    assert by_epoch(step=0, epoch=2) == pytest.approx(0.2)
    assert by_step(step=2, epoch=0) == pytest.approx(0.2)
    assert Cosine(2.0, 0.0, length=4, unit="step")(step=4, epoch=0) == 0.0


def test_call_rejects_negative_counter():
    with pytest.raises(ValueError, match=r"epoch counter must be >= 0, got -1"):
        LinearWarmup(1.0, warmup=2)(step=3, epoch=-1)
    with pytest.raises(ValueError, match=r"step counter must be >= 0, got -2"):
        Cosine(1.0, 0.0, length=3, unit="step")(step=-2, epoch=0)


def test_a_constant_returns_its_value_without_checking_anything():
    assert Constant(0.25)(step=-1, epoch=-1) == 0.25


def test_values_are_validated_when_built_or_replaced_never_when_evaluated(monkeypatch):
    built = [Constant(0.5), LinearWarmup(2.0, warmup=4, unit="step"), Cosine(4.0, 1.0, length=10)]

    def no_check(*args: object) -> None:
        raise AssertionError("validated while evaluating")

    monkeypatch.setattr(schedules, "_finite", no_check)
    monkeypatch.setattr(schedules, "_positive_int", no_check)
    monkeypatch.setattr(schedules, "check_schedule", no_check)
    for schedule in built:
        for t in range(12):
            schedule(step=t, epoch=t)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"Constant\.value must be a finite number, got nan"):
        dataclasses.replace(built[0], value=float("nan"))


def test_call_is_keyword_only():
    with pytest.raises(TypeError):
        Constant(1.0)(1, 2)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# Immutability and round trips
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", ALL, ids=repr)
def test_frozen_hashable_picklable(s):
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.unit = "step"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s
    assert hash(pickle.loads(pickle.dumps(s))) == hash(s)


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_to_config_round_trip(s):
    config = s.to_config()
    assert config["type"] in ("constant", "linear_warmup", "cosine")
    assert all(type(v) in (str, int, float) for v in config.values())  # plain types only
    assert as_schedule(config, "x") == s
    assert type(as_schedule(config, "x")) is type(s)
    assert pickle.loads(pickle.dumps(config)) == config
    assert as_schedule(pickle.loads(pickle.dumps(config)), "x") == s


def test_to_config_contents():
    assert LinearWarmup(8, warmup=20).to_config() == {
        "type": "linear_warmup",
        "unit": "epoch",
        "value": 8.0,
        "warmup": 20,
        "start": 0.0,
    }
    assert type(LinearWarmup(8, warmup=20).to_config()["value"]) is float  # ints are normalized to float
    assert Cosine(1, 0, length=3, unit="step").to_config() == {
        "type": "cosine",
        "unit": "step",
        "start": 1.0,
        "end": 0.0,
        "length": 3,
    }


def test_equality_normalizes_numbers():
    assert Constant(1) == Constant(1.0)
    assert Constant(1.0) != Constant(1.0, unit="step")
    assert Constant(1.0) != LinearWarmup(1.0, warmup=1, start=1.0)


@dataclass(frozen=True)
class _Step(Schedule):
    """A user-defined schedule: ``low`` before ``at``, ``high`` from then on."""

    low: float
    high: float
    at: int
    _floats: ClassVar[tuple[str, ...]] = ("low", "high")
    _ints: ClassVar[tuple[str, ...]] = ("at",)

    def value_at(self, t: int) -> float:
        return self.low if t < self.at else self.high

    def bounds(self) -> tuple[float, float]:
        return min(self.low, self.high), max(self.low, self.high)


def test_user_subclass_round_trips_by_dotted_path_and_is_validated():
    s = _Step(0.0, 1.0, at=3, unit="step")
    config = s.to_config()
    assert config["type"] == f"{__name__}._Step"
    assert as_schedule(config, "x") == s
    assert as_schedule({"class_path": config["type"], "init_args": {"low": 0, "high": 1, "at": 3}}, "x") == _Step(
        0.0, 1.0, at=3
    )
    with pytest.raises(ValueError, match=r"_Step\.at must be a positive int, got 0"):
        _Step(0.0, 1.0, at=0)
    with pytest.raises(ValueError, match=r"_Step\.high must be a finite number, got nan"):
        _Step(0.0, math.nan, at=1)


# ---------------------------------------------------------------------------------------------------------------------
# as_schedule
# ---------------------------------------------------------------------------------------------------------------------
def test_as_schedule_numbers_and_passthrough():
    assert as_schedule(0.5, "alpha") == Constant(0.5)
    c = as_schedule(2, "temperature")
    assert c == Constant(2.0) and type(c.value) is float  # type: ignore[attr-defined]
    s = Cosine(4.0, 1.0, length=10)
    assert as_schedule(s, "temperature") is s


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"type": "constant", "value": 3}, Constant(3.0)),
        ({"type": "linear_warmup", "value": 8.0, "warmup": 20}, LinearWarmup(8.0, warmup=20)),
        ({"type": "cosine", "start": 4, "end": 1, "length": 10, "unit": "step"}, Cosine(4.0, 1.0, 10, unit="step")),
        ({"type": "LinearWarmup", "value": 1.0, "warmup": 5}, LinearWarmup(1.0, warmup=5)),
        ({"type": "lightning_distill.schedules.Cosine", "start": 1, "end": 0, "length": 2}, Cosine(1.0, 0.0, 2)),
        (
            {"class_path": "lightning_distill.schedules.LinearWarmup", "init_args": {"value": 1.0, "warmup": 5}},
            LinearWarmup(1.0, warmup=5),
        ),
        ({"class_path": "LinearWarmup", "init_args": {"value": 1.0, "warmup": 5}}, LinearWarmup(1.0, warmup=5)),
        ({"class_path": "lightning_distill.schedules.Constant", "init_args": {"value": 2}}, Constant(2.0)),
    ],
)
def test_as_schedule_builds_configs(config, expected):
    assert as_schedule(config, "x") == expected


@pytest.mark.parametrize("bad", [True, False, "0.5", None, [0.5], (1.0,), {"value": 1.0}, object()])
def test_as_schedule_rejects_other_types(bad):
    with pytest.raises(TypeError, match=r"alpha must be a number, a Schedule.*class_path.*got " + re.escape(repr(bad))):
        as_schedule(bad, "alpha")


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"type": "exponential", "value": 1.0}, ValueError, r"Unknown schedule type 'exponential' for alpha"),
        ({"type": "os.system"}, ValueError, r"Unknown schedule type 'os\.system'"),
        ({"type": "no_such_module.Thing"}, ValueError, r"Unknown schedule type 'no_such_module\.Thing'"),
        ({"type": "lightning_distill.schedules.Schedule"}, ValueError, r"Unknown schedule type '.*\.Schedule'"),
        ({"type": 3}, ValueError, r"Unknown schedule type 3"),
        ({"type": "linear_warmup", "value": 1.0}, TypeError, r"alpha.*missing 1 required .*'warmup'"),
        ({"type": "constant", "value": 1.0, "warmup": 3}, TypeError, r"alpha.*unexpected keyword argument 'warmup'"),
        ({"type": "constant", "value": "high"}, ValueError, r"alpha.*Constant\.value must be a finite number.*'high'"),
        ({"type": "cosine", "start": 1, "end": 0, "length": 0}, ValueError, r"Cosine\.length .*positive int, got 0"),
        ({"class_path": "Constant", "init_args": [1.0]}, TypeError, r"Invalid schedule config for alpha.*\[1\.0\]"),
        ({"class_path": "Constant", "init_args": {"value": 1}, "x": 2}, TypeError, r"Invalid schedule config.*'x'"),
    ],
)
def test_as_schedule_rejects_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        as_schedule(config, "alpha")


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Constant(math.nan), r"Constant\.value must be a finite number, got nan"),
        (lambda: Constant(math.inf), r"Constant\.value must be a finite number, got inf"),
        (lambda: Constant(True), r"Constant\.value must be a finite number, got True"),
        (lambda: Constant("1.0"), r"Constant\.value must be a finite number, got '1\.0'"),
        (lambda: Constant(None), r"Constant\.value must be a finite number, got None"),
        (lambda: Constant(1.0, unit="batch"), r"Constant\.unit must be 'epoch' or 'step', got 'batch'"),
        (lambda: LinearWarmup(1.0, warmup=0), r"LinearWarmup\.warmup must be a positive int, got 0"),
        (lambda: LinearWarmup(1.0, warmup=-3), r"LinearWarmup\.warmup must be a positive int, got -3"),
        (lambda: LinearWarmup(1.0, warmup=2.5), r"LinearWarmup\.warmup must be a positive int, got 2\.5"),
        (lambda: LinearWarmup(1.0, warmup=5.0), r"LinearWarmup\.warmup must be a positive int, got 5\.0"),
        (lambda: LinearWarmup(1.0, warmup=True), r"LinearWarmup\.warmup must be a positive int, got True"),
        (lambda: LinearWarmup(1.0, warmup=5, start=-math.inf), r"LinearWarmup\.start must be .*finite.*got -inf"),
        (lambda: LinearWarmup(1.0, warmup=5, unit="Epoch"), r"LinearWarmup\.unit .*got 'Epoch'"),
        (lambda: Cosine(math.nan, 1.0, length=3), r"Cosine\.start must be a finite number, got nan"),
        (lambda: Cosine(1.0, False, length=3), r"Cosine\.end must be a finite number, got False"),
        (lambda: Cosine(1.0, 0.0, length=0), r"Cosine\.length must be a positive int, got 0"),
        (lambda: Cosine(1.0, 0.0, length="10"), r"Cosine\.length must be a positive int, got '10'"),
        (lambda: Cosine(1.0, 0.0, length=3, unit=None), r"Cosine\.unit must be 'epoch' or 'step', got None"),
    ],
)
def test_bad_arguments_raise_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unit_is_keyword_only_and_base_is_abstract():
    with pytest.raises(TypeError):
        Cosine(1.0, 0.0, 3, "step")  # type: ignore[misc]
    with pytest.raises(TypeError, match="abstract"):
        Schedule()  # type: ignore[abstract]


# ---------------------------------------------------------------------------------------------------------------------
# check_schedule
# ---------------------------------------------------------------------------------------------------------------------
def test_check_schedule_accepts_and_returns_the_schedule():
    s = Cosine(4.0, 1.0, length=10)
    assert check_schedule(s, "temperature", 0.0, None, low_inclusive=False) is s
    assert check_schedule(LinearWarmup(1.0, warmup=5), "alpha", 0.0, 1.0) is not None  # endpoints inclusive
    assert check_schedule(Constant(1.0), "alpha", 0.0, 1.0) == Constant(1.0)
    assert check_schedule(Constant(0.0), "alpha", 0.0, 1.0) == Constant(0.0)
    assert check_schedule(Constant(1e9), "weight", 0.0, None) == Constant(1e9)


@pytest.mark.parametrize(
    ("schedule", "low", "high", "inclusive", "match"),
    [
        (LinearWarmup(2.0, warmup=5), 0.0, None, False, r"temp must be finite and in \(0\.0, inf\).*reaches 0\.0"),
        (Constant(0.0), 0.0, None, False, r"temp must be finite and in \(0\.0, inf\), but Constant\(.*\) reaches 0\.0"),
        (Constant(-0.5), 0.0, None, False, r"reaches -0\.5"),
        (LinearWarmup(1.5, warmup=5), 0.0, 1.0, True, r"\[0\.0, 1\.0\], but LinearWarmup\(.*warmup=5.*\) reaches 1\.5"),
        (Cosine(-0.1, 1.0, length=4), 0.0, 1.0, True, r"\[0\.0, 1\.0\], but Cosine\(.*\) reaches -0\.1"),
        (Cosine(1.0, 0.0, length=4), 0.0, 1.0, False, r"\(0\.0, 1\.0\], but Cosine\(.*\) reaches 0\.0"),
    ],
)
def test_check_schedule_rejects(schedule, low, high, inclusive, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(schedule, "temp", low, high, low_inclusive=inclusive)


def test_check_schedule_rejects_non_finite_bounds_of_user_schedules():
    @dataclass(frozen=True)
    class Unchecked(Schedule):
        top: float

        def value_at(self, t: int) -> float:
            return self.top

        def bounds(self) -> tuple[float, float]:
            return self.top, self.top

    with pytest.raises(ValueError, match=r"w must be finite.*Unchecked\(.*top=inf\) reaches inf"):
        check_schedule(Unchecked(math.inf), "w", 0.0, None)
    with pytest.raises(ValueError, match=r"reaches nan"):
        check_schedule(Unchecked(math.nan), "w", 0.0, None)


# ---------------------------------------------------------------------------------------------------------------------
# jsonargparse
# ---------------------------------------------------------------------------------------------------------------------
def test_jsonargparse_parses_class_path_into_a_schedule():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--alpha", type=float | Schedule, default=0.5)
    config = {"class_path": "lightning_distill.schedules.LinearWarmup", "init_args": {"value": 1.0, "warmup": 5}}
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    namespace = parser.parse_object({"alpha": config})
    alpha = instantiate(namespace).alpha  # parsing alone gives a Namespace(class_path=..., init_args=...)
    assert alpha == LinearWarmup(1.0, warmup=5)
    # the dumped config is a class_path/init_args mapping that as_schedule accepts back
    dumped = namespace.as_dict()["alpha"]
    assert as_schedule(dumped, "alpha") == alpha
    assert instantiate(parser.parse_object({"alpha": 0.3})).alpha == 0.3
    assert instantiate(parser.parse_object({})).alpha == 0.5
