"""Sparsity schedules: the fraction of weights to prune as a function of the training step.

Each schedule is a small frozen object. Masks are recomputed only at *update steps*; between two of
them the sparsity in force is the value at the last update (``sparsity(step)`` already returns that).

* ``OneShot``: dense, then the target from ``at`` on.
* ``Gradual``: the cubic ramp of Zhu & Gupta (2017), ``s = s_f + (s_i - s_f)(1 - p)^3`` with
  ``p = (t - begin)/(end - begin)`` clipped to [0, 1], updated every ``interval`` steps.
* ``Cyclical``: the same ramp repeated over ``cycles`` cycles that fill the first ``prune_fraction``
  of training (Srinivas et al. 2022); every cycle after the first starts with one fully dense update,
  so pruned weights receive gradients again and those that matter grow back. With ``floor`` the ramp
  of cycle c then restarts from ``s_f * c / cycles`` instead of 0. After the cycles, the mask is fixed
  at the target for the rest of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import SrcompressError

KINDS = ("oneshot", "gmp", "cyclical")


def _check_common(target: float, steps: int, interval: int) -> None:
    if not 0.0 <= target < 1.0:
        raise SrcompressError(f"target sparsity {target} is outside [0, 1)", "pass e.g. --sparsity 0.9")
    if steps < 1:
        raise SrcompressError(f"a schedule needs at least one training step, not {steps}", "train for at least one batch")
    if interval < 1:
        raise SrcompressError(f"mask update interval {interval} is below 1", "pass e.g. --update-every 10")


def check_cycles(cycles: int, prune_fraction: float, last_cycle: float) -> None:
    """The cyclical options that do not depend on the number of steps."""
    if cycles < 1:
        raise SrcompressError(f"cycles must be at least 1, not {cycles}", "pass e.g. --cycles 3")
    if not 0.0 < prune_fraction <= 1.0:
        raise SrcompressError(f"prune fraction {prune_fraction} is outside (0, 1]", "pass e.g. --prune-fraction 0.75")
    if not last_cycle > 0:
        raise SrcompressError(f"last-cycle length {last_cycle} is not positive", "pass e.g. --last-cycle 2")


def _cubic(start: float, target: float, progress: float, exponent: float) -> float:
    return target + (start - target) * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


@dataclass(frozen=True)
class Schedule:
    """Base: ``sparsity(step)``, whether a step recomputes masks, and whether it starts a new cycle."""

    target: float
    steps: int
    interval: int = 1

    kind = "schedule"

    def anchor(self, step: int) -> int:
        """The update step whose sparsity is in force at ``step``."""
        raise NotImplementedError

    def value(self, anchor: int) -> float:
        raise NotImplementedError

    def sparsity(self, step: int) -> float:
        return self.value(self.anchor(step))

    def is_update(self, step: int) -> bool:
        return self.anchor(step) == step

    def cycle(self, step: int) -> int:
        return 0

    def is_restart(self, step: int) -> bool:
        """True on the first step of every cycle after the first: masks are lifted there."""
        return False

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class OneShot(Schedule):
    at: int = 0

    kind = "oneshot"

    def __post_init__(self):
        _check_common(self.target, self.steps, self.interval)
        if not 0 <= self.at < self.steps:
            raise SrcompressError(f"one-shot step {self.at} is outside the {self.steps} training steps", "prune at a step inside training")

    def anchor(self, step: int) -> int:
        return self.at if step >= self.at else 0

    def value(self, anchor: int) -> float:
        return self.target if anchor >= self.at else 0.0


@dataclass(frozen=True)
class Gradual(Schedule):
    """Gradual magnitude pruning; ``end`` defaults to 3/4 of training."""

    begin: int = 0
    end: int | None = None
    initial: float = 0.0
    exponent: float = 3.0

    kind = "gmp"

    def __post_init__(self):
        _check_common(self.target, self.steps, self.interval)
        if self.end is None:
            object.__setattr__(self, "end", max(self.begin + 1, round(0.75 * self.steps)))
        if not 0 <= self.begin < self.end <= self.steps:
            raise SrcompressError(f"GMP ramp [{self.begin}, {self.end}] does not fit in {self.steps} steps", "use 0 <= begin < end <= steps")
        if not 0.0 <= self.initial <= self.target:
            raise SrcompressError(f"initial sparsity {self.initial} is not in [0, target]", "lower it")

    def anchor(self, step: int) -> int:
        if step < self.begin:
            return 0
        if step >= self.end:
            return self.end
        return self.begin + (step - self.begin) // self.interval * self.interval

    def value(self, anchor: int) -> float:
        if anchor < self.begin:
            return 0.0
        return _cubic(self.initial, self.target, (anchor - self.begin) / (self.end - self.begin), self.exponent)


@dataclass(frozen=True)
class Cyclical(Schedule):
    """``cycles`` cubic ramps over the first ``prune_fraction`` of training, then the target fixed."""

    cycles: int = 3
    prune_fraction: float = 0.75
    floor: bool = False
    last_cycle: float = 1.0  # length of the last cycle relative to the others (a longer final ramp)
    exponent: float = 3.0

    kind = "cyclical"

    def __post_init__(self):
        _check_common(self.target, self.steps, self.interval)
        check_cycles(self.cycles, self.prune_fraction, self.last_cycle)
        shortest = min(b - a for a, b in zip(self.bounds(), self.bounds()[1:]))
        if shortest < max(2, self.interval):
            raise SrcompressError(f"{self.cycles} cycles of {shortest} steps are too short for updates every {self.interval} steps",
                                  "train for more steps, use fewer cycles or update masks more often")

    @property
    def prune_end(self) -> int:
        return round(self.prune_fraction * self.steps)

    def bounds(self) -> list[int]:
        """Cycle start steps, then the end of the pruning phase."""
        units = self.cycles - 1 + self.last_cycle
        return [round((c if c < self.cycles else units) * self.prune_end / units) for c in range(self.cycles + 1)]

    def cycle(self, step: int) -> int:
        bounds = self.bounds()
        return next((c for c in range(self.cycles) if step < bounds[c + 1]), self.cycles - 1)

    def anchor(self, step: int) -> int:
        bounds = self.bounds()
        if step >= bounds[-1]:
            return bounds[-1]
        start = bounds[self.cycle(step)]
        return start + (step - start) // self.interval * self.interval

    def value(self, anchor: int) -> float:
        bounds = self.bounds()
        if anchor >= bounds[-1]:
            return self.target
        c = self.cycle(anchor)
        if anchor == bounds[c]:
            return 0.0  # the first update of every cycle is dense
        start = self.target * c / self.cycles if self.floor else 0.0
        return _cubic(start, self.target, (anchor - bounds[c]) / (bounds[c + 1] - bounds[c]), self.exponent)

    def is_restart(self, step: int) -> bool:
        return step in self.bounds()[1:-1]


def make_schedule(kind: str, target: float, steps: int, *, interval: int | None = None, cycles: int = 3,
                  prune_fraction: float = 0.75, floor: bool = False, last_cycle: float = 1.0, oneshot_at: int = 0) -> Schedule:
    """A schedule by name (``oneshot``, ``gmp`` or ``cyclical``); ``interval`` defaults to 1% of the pruning phase."""
    end = max(1, round(prune_fraction * steps))
    if interval is None:
        interval = max(1, end // (100 * (cycles if kind == "cyclical" else 1)))
    if kind == "oneshot":
        return OneShot(target, steps, interval, at=oneshot_at)
    if kind == "gmp":
        if not 0.0 < prune_fraction <= 1.0:
            raise SrcompressError(f"prune fraction {prune_fraction} is outside (0, 1]", "pass e.g. --prune-fraction 0.75")
        return Gradual(target, steps, interval, end=end)
    if kind == "cyclical":
        return Cyclical(target, steps, interval, cycles=cycles, prune_fraction=prune_fraction, floor=floor, last_cycle=last_cycle)
    raise SrcompressError(f"unknown schedule {kind!r}", f"use one of {', '.join(KINDS)}")


def from_description(description: dict) -> Schedule:
    """Rebuild a schedule from ``describe()`` (checkpoints store it)."""
    fields = dict(description)
    kind = fields.pop("kind")
    classes = {"oneshot": OneShot, "gmp": Gradual, "cyclical": Cyclical}
    if kind not in classes:
        raise SrcompressError(f"unknown schedule {kind!r} in checkpoint", "start the run again without --resume")
    return classes[kind](**fields)

