"""The benchmark regression gate: it passes on the stored baseline and fails when a method degrades."""

import json
from pathlib import Path

import pytest

from benchmarks import run
from srcompress.compress import registry

BASELINE = Path(run.BASELINES) / "cpu.json"


def rows_from(baseline: dict, scale: dict | None = None) -> list[dict]:
    rows = {}
    for key, gate in baseline["gates"].items():
        suite, case, metric = key.split("|")
        value = gate["value"] * (scale or {}).get(key, 1.0)
        rows.setdefault((suite, case), {"suite": suite, "case": case})[metric] = value
    return list(rows.values())


def test_check_passes_at_baseline_and_fails_below_tolerance():
    baseline = json.loads(BASELINE.read_text())
    suites = list(run.SUITES)
    assert run.check(rows_from(baseline), baseline, suites) == []
    ratio = next(k for k, g in baseline["gates"].items() if g["kind"] == "ratio")
    quality = next(k for k, g in baseline["gates"].items() if g["kind"] == "quality")
    assert run.check(rows_from(baseline, {ratio: 0.9}), baseline, suites) == []  # within the 35 % ratio tolerance
    failures = run.check(rows_from(baseline, {ratio: 0.5, quality: 0.9}), baseline, suites)
    assert len(failures) == 2 and ratio in failures[0] + failures[1] and quality in failures[0] + failures[1]
    missing = [r for r in rows_from(baseline) if r["case"] != quality.split("|")[1]]
    assert any("not measured" in f for f in run.check(missing, baseline, suites))


def test_a_slow_timing_counts_at_its_better_measurement_and_quality_is_not_remeasured():
    baseline = json.loads(BASELINE.read_text())
    suites = list(run.SUITES)
    ratio = next(k for k, g in baseline["gates"].items() if g["kind"] == "ratio")
    quality = next(k for k, g in baseline["gates"].items() if g["kind"] == "quality")
    slow = rows_from(baseline, {ratio: 0.5})
    assert run.check(slow, baseline, suites, remeasured=rows_from(baseline)) == []
    assert len(run.check(slow, baseline, suites, remeasured=rows_from(baseline, {ratio: 0.6}))) == 1
    worse = rows_from(baseline, {quality: 0.9})
    assert len(run.check(worse, baseline, suites, remeasured=rows_from(baseline))) == 1


def test_baseline_covers_every_gate():
    baseline = json.loads(BASELINE.read_text())
    cpu_gates = {f"{s}|{c}|{m}" for s, gates in run.GATES.items() for c, m, _ in gates if not c.startswith("cuda/")}
    assert cpu_gates == set(baseline["gates"])


def test_the_quick_gpu_sweep_yields_every_cuda_gate():
    """The GPU gates name cases the quick GPU sweep really produces (checked without a GPU, on its case list)."""
    from argparse import Namespace

    from benchmarks import kernels

    rows = []
    for name, (n, k), dtype, block, density, m in kernels.gpu_cases(Namespace(quick=True)):
        for graph in (False, True) if m <= kernels.GRAPH_MAX_TOKENS else (False,):
            rows.append({"shape_name": name, "dtype": dtype, "M": m, "block": list(block), "density": density,
                         "kernel": "srcompress bsr_linear", "cuda_graph": graph})
    cases = {run.gpu_kernel_case(r) for r in rows}
    assert len(cases) == len(rows)  # eager and graph rows of one case no longer share a key
    assert {c for c, _, _ in run.GATES["kernels"] if c.startswith("cuda/")} <= cases


@pytest.mark.parametrize("degraded", [False, True])
def test_gate_catches_a_degraded_method(degraded, tmp_path, monkeypatch):
    """The real MNIST structured suite against the stored baseline; 'submodular' secretly made random fails it."""
    if degraded:
        monkeypatch.setitem(registry.METHODS, "submodular", registry.METHODS["random-channels"])
    code = run.main(["--quick", "--suite", "structured", "--only", "mnist_cnn", "--check", "--no-plots", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert code == (1 if degraded else 0), summary
    assert ("FAIL structured|mnist_cnn/submodular/0.75/5pc|accuracy" in summary) == degraded
