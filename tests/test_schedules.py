"""Sparsity schedule values: one-shot, the cubic GMP ramp, and cyclical ramps with dense restarts."""

import pytest

from srcompress.compress.schedules import Cyclical, Gradual, OneShot, from_description, make_schedule
from srcompress.errors import SrcompressError


def test_oneshot_values():
    s = OneShot(0.9, steps=100, at=40)
    assert [s.sparsity(t) for t in (0, 39, 40, 99, 150)] == [0.0, 0.0, 0.9, 0.9, 0.9]
    assert [t for t in range(100) if s.is_update(t)] == [0, 40]
    assert not any(s.is_restart(t) for t in range(100))


def test_gmp_cubic_ramp_values():
    s = Gradual(0.8, steps=200, interval=10, begin=20, end=120, initial=0.1)
    assert s.sparsity(0) == 0.0 and s.sparsity(19) == 0.0
    assert s.sparsity(20) == pytest.approx(0.1)
    # p = 0.5 at step 70: s = 0.8 + (0.1 - 0.8) * 0.5^3
    assert s.sparsity(70) == pytest.approx(0.8 - 0.7 * 0.125)
    assert s.sparsity(79) == s.sparsity(70)  # constant between updates
    assert s.sparsity(80) == pytest.approx(0.8 - 0.7 * 0.4 ** 3)
    assert s.sparsity(120) == 0.8 and s.sparsity(199) == 0.8
    values = [s.sparsity(t) for t in range(200)]
    assert values == sorted(values)
    assert [t for t in range(200) if s.is_update(t)] == [0, *range(20, 121, 10)]


def test_gmp_default_end_is_three_quarters():
    s = Gradual(0.9, steps=400)
    assert s.end == 300 and s.sparsity(299) < 0.9 and s.sparsity(300) == 0.9


def test_cyclical_values_and_restarts():
    s = Cyclical(0.9, steps=400, interval=10, cycles=3, prune_fraction=0.75)
    assert s.bounds() == [0, 100, 200, 300]
    for c, start in enumerate((0, 100, 200)):
        assert s.sparsity(start) == 0.0  # every cycle starts with a dense update
        assert s.cycle(start) == c and s.cycle(start + 99) == c
        # tau = 0.5 in the middle of the cycle
        assert s.sparsity(start + 50) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
        assert s.sparsity(start + 90) == pytest.approx(0.9 - 0.9 * 0.1 ** 3)
        assert s.sparsity(start + 99) == s.sparsity(start + 90)
    assert [t for t in range(400) if s.is_restart(t)] == [100, 200]
    assert s.sparsity(300) == 0.9 and s.sparsity(399) == 0.9
    assert [t for t in range(400) if s.is_update(t)] == [*range(0, 300, 10), 300]
    assert all(s.sparsity(t) < 0.9 for t in range(300))


def test_cyclical_floor_restarts_from_a_rising_floor():
    s = Cyclical(0.9, steps=300, interval=10, cycles=3, prune_fraction=1.0, floor=True)
    assert s.sparsity(100) == 0.0 and s.sparsity(200) == 0.0  # still one dense update per cycle
    assert s.sparsity(110) == pytest.approx(0.9 + (0.3 - 0.9) * 0.9 ** 3)
    assert s.sparsity(210) == pytest.approx(0.9 + (0.6 - 0.9) * 0.9 ** 3)
    assert s.sparsity(10) == pytest.approx(0.9 - 0.9 * 0.9 ** 3)
    assert s.sparsity(300) == 0.9


def test_uneven_cycles_cover_the_pruning_phase():
    s = Cyclical(0.5, steps=101, interval=1, cycles=3, prune_fraction=1.0)
    bounds = s.bounds()
    assert bounds[0] == 0 and bounds[-1] == 101 and len(bounds) == 4
    assert [s.cycle(t) for t in (0, bounds[1] - 1, bounds[1], 100)] == [0, 0, 1, 2]


def test_make_schedule_and_round_trip():
    s = make_schedule("cyclical", 0.95, 1000, cycles=4)
    assert isinstance(s, Cyclical) and s.interval == 1 and s.cycles == 4
    g = make_schedule("gmp", 0.9, 10000)
    assert g.interval == 75 and g.end == 7500
    for schedule in (s, g, make_schedule("oneshot", 0.8, 50, oneshot_at=10)):
        assert from_description(schedule.describe()) == schedule


@pytest.mark.parametrize("build", [
    lambda: OneShot(1.0, 10),
    lambda: OneShot(0.5, 10, at=10),
    lambda: Gradual(0.5, 10, begin=5, end=5),
    lambda: Gradual(0.5, 0),
    lambda: Cyclical(0.9, 10, cycles=8),
    lambda: Cyclical(0.9, 100, interval=50, cycles=3),
    lambda: make_schedule("sawtooth", 0.9, 100),
])
def test_bad_schedules_are_one_line_errors(build):
    with pytest.raises(SrcompressError) as err:
        build()
    assert "\n" not in str(err.value) and ";" in str(err.value)


def test_longer_last_cycle():
    s = Cyclical(0.9, steps=400, interval=5, cycles=3, prune_fraction=0.75, last_cycle=2.0)
    assert s.bounds() == [0, 75, 150, 300]
    assert s.sparsity(150) == 0.0 and s.sparsity(225) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert s.sparsity(75 + 35) == pytest.approx(0.9 - 0.9 * (1 - 35 / 75) ** 3)


def test_one_cycle_is_gmp():
    cyclical = Cyclical(0.95, steps=500, interval=4, cycles=1, prune_fraction=0.8)
    gmp = Gradual(0.95, steps=500, interval=4, end=400)
    assert [cyclical.sparsity(t) for t in range(500)] == [gmp.sparsity(t) for t in range(500)]
