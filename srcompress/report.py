"""What a model holds (per-layer statistics) and what a pruning run did (the report), as JSON and tables."""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .compress.layers import Layer
from .compress.patterns import detect_pattern

FORMS = {
    "unstructured": (
        "zeros baked into dense weights (unstructured)",
        "no speedup and no smaller file on dense runtimes (PyTorch, ONNX Runtime, TensorRT); "
        "for speed use a block pattern with srcompress's kernels or structured pruning",
    ),
    "nm": (
        "N:M semi-structured zeros in dense weights",
        "can be faster only on NVIDIA Ampere or newer GPUs (TensorRT with sparse weights enabled, or "
        "torch.sparse.to_sparse_semi_structured) and only for large layers; no gain on CPU or ONNX Runtime",
    ),
    "block": (
        "whole zero blocks in dense weights",
        "can be faster with srcompress.kernels.sparsify (Triton on CUDA, torch BSR on CPU) for wide "
        "Linear layers; dense speed on ONNX Runtime and TensorRT",
    ),
}


@dataclass
class LayerStats:
    name: str
    op: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    sparsity: float
    pattern: str
    flops: int
    effective_flops: int


def layer_stats(layers: list[Layer]) -> list[LayerStats]:
    stats = []
    for layer in layers:
        weight = layer.param.detach()
        nonzeros = int(torch.count_nonzero(weight))
        density = nonzeros / max(layer.numel, 1)
        stats.append(LayerStats(layer.name, layer.op, layer.shape, layer.numel, nonzeros, 1 - density,
                                detect_pattern(layer, weight), layer.flops, round(layer.flops * density)))
    return stats


def model_totals(model: torch.nn.Module, stats: list[LayerStats]) -> dict[str, Any]:
    """Parameter, non-zero and FLOP totals; ``sparse_layers_sparsity`` covers layers holding zeros."""
    params = nonzeros = 0
    seen = set()
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        params += param.numel()
        nonzeros += int(torch.count_nonzero(param.detach()))
    sparse = [s for s in stats if s.nonzeros < s.params]
    sparse_params = sum(s.params for s in sparse)
    return {
        "params": params,
        "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / max(params, 1),
        "layers": len(stats),
        "layer_params": sum(s.params for s in stats),
        "layer_nonzeros": sum(s.nonzeros for s in stats),
        "sparse_layers": len(sparse),
        "sparse_layers_sparsity": (1 - sum(s.nonzeros for s in sparse) / sparse_params) if sparse_params else 0.0,
        "flops": sum(s.flops for s in stats),
        "effective_flops": sum(s.effective_flops for s in stats),
    }


def provenance(seed: int | None = None, input_sha256: str | None = None) -> dict[str, Any]:
    from . import __version__

    return {
        "srcompress": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "seed": seed,
        "input_sha256": input_sha256,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class PruneReport:
    """Everything a prune run did; ``to_json`` is what ``--json`` prints."""

    request: dict[str, Any]
    layers: list[dict[str, Any]]
    before: dict[str, Any]
    after: dict[str, Any]
    sparsity: dict[str, Any]
    form: dict[str, str]
    changed_weights: int
    example_input: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None  # how far the outputs moved on calibration data (pipeline.DriftProbe)
    files: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    problem: str = ""
    fix: str = ""  # when not ok: what to change, if the cause suggests more than the usual options

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def render_stats(console: Console, stats: list[LayerStats], totals: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_lines=False)
    for column, justify in (("layer", "left"), ("op", "left"), ("shape", "left"), ("params", "right"), ("zeros", "right"),
                            ("sparsity", "right"), ("pattern", "left"), ("FLOPs", "right"), ("eff. FLOPs", "right")):
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column != "layer")
    for s in stats:
        table.add_row(s.name, s.op, "x".join(map(str, s.shape)), _count(s.params), _count(s.params - s.nonzeros),
                      f"{s.sparsity:.2%}", s.pattern, _count(s.flops), _count(s.effective_flops))
    console.print(table)
    console.print(
        f"parameters {_count(totals['params'])} (non-zero {_count(totals['nonzeros'])}, sparsity {totals['sparsity']:.2%}); "
        f"{totals['sparse_layers']}/{totals['layers']} layers hold zeros, at {totals['sparse_layers_sparsity']:.2%} together; "
        f"conv/linear FLOPs {_count(totals['flops'])} dense, {_count(totals['effective_flops'])} effective"
    )


def render_prune(console: Console, report: PruneReport) -> None:
    table = Table(title=f"srcompress prune: {report.request['method']} {report.request['pattern']} "
                        f"at {report.request['sparsity']:.1%} ({report.request['scope']} scope)")
    for column, justify in (("layer", "left"), ("shape", "left"), ("params", "right"), ("sparsity", "right"),
                            ("pattern", "left"), ("FLOPs", "right"), ("eff. FLOPs", "right"), ("kept dense", "left")):
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column not in ("layer", "kept dense"))
    for row in report.layers:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), _count(row["params"]),
                      f"{row['sparsity_before']:.1%}→{row['sparsity_after']:.1%}", row["pattern_after"],
                      _count(row["flops"]), _count(row["effective_flops_after"]), row["skipped"])
    console.print(table)
    b, a = report.before, report.after
    console.print(f"parameters: {_count(b['params'])} total, non-zero {_count(b['nonzeros'])} -> {_count(a['nonzeros'])}")
    console.print(f"conv/linear FLOPs per example: {_count(b['flops'])} dense, effective {_count(b['effective_flops'])} -> {_count(a['effective_flops'])}")
    sp = report.sparsity
    console.print(f"sparsity of pruned layers: asked {sp['asked']:.2%}, reached {sp['reached']:.2%} "
                  f"(tolerance {sp['tolerance']:.3%}); whole model {a['sparsity']:.2%}")
    console.print(f"output form: {report.form['form']}. Speed: {report.form['speed']}.")
    if report.evaluation:
        ev = report.evaluation
        console.print(f"{ev['metric']} on {ev['dataset']}: before {ev['before']:.2%}, after {ev['after']:.2%} "
                      f"({(ev['after'] - ev['before']) * 100:+.2f} points)")
    render_drift(console, report.drift)
    if report.files.get("output"):
        f = report.files
        sizes = f"{_count(f['output_bytes'])}B" + (f", input {_count(f['input_bytes'])}B" if f.get("input_bytes") else "")
        console.print(f"wrote {f['output']} ({f['format']}, {sizes})")
    for note in report.notes:
        console.print(f"note: {note}")


STRUCTURED_FORM = ("physically narrower layers: a plain dense model with fewer channels",
                   "smaller on disk and in memory, and faster on every runtime when the removed layers dominate run time; "
                   "measure it on the target with `srcompress bench`, since narrow or oddly sized layers can gain nothing")


@dataclass
class StructuredReport:
    """What a structured prune removed; ``to_json`` is what ``--json`` prints."""

    request: dict[str, Any]
    groups: list[dict[str, Any]]
    before: dict[str, Any]
    after: dict[str, Any]
    reached: dict[str, float]
    tolerance: float
    unplaced: dict[str, str]
    changed_tensors: dict[str, Any]
    example_input: dict[str, Any]
    hf_config: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=lambda: dict(zip(("form", "speed"), STRUCTURED_FORM)))
    evaluation: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None  # how far the outputs moved on calibration data (pipeline.DriftProbe)
    files: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    problem: str = ""
    fix: str = ""  # when not ok: what to change, if the cause suggests more than the usual options

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render_drift(console, drift: dict[str, Any] | None) -> None:
    if not drift:
        return
    agreement = f", top-1 agreement {drift['top1_agreement']:.1%}" if drift.get("top1_agreement") is not None else ""
    console.print(f"output drift on {drift['inputs']}: {drift['relative_error']:.2%} relative change{agreement}")


def sparkline(values: list[float], width: int = 24) -> str:
    """A log-scale sparkline of a curve, so the knee of a saliency curve is visible in a terminal."""
    import math

    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, math.ceil(len(values) / width))
    points = [math.log10(max(v, 1e-12)) for v in values[::step]]
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    return "".join(bars[min(len(bars) - 1, int((p - low) / span * len(bars)))] for p in points)


def render_structured(console: Console, report: StructuredReport) -> None:
    req = report.request
    asked = (f"saliency threshold {req['stop_threshold']:g}" if req.get("stop_threshold") is not None else
             f"{req['amount']:.0%} of {req['target']} ({req['allocation']} allocation)")
    table = Table(title=f"srcompress prune --structured: {req['method']}, {asked}")
    curves = any("saliency_curve" in row.get("info", {}) for row in report.groups)
    objectives = any("objective" in row.get("info", {}) for row in report.groups)
    columns = [("group", "left"), ("kind", "left"), ("units", "right"), ("width", "right")]
    columns += [("saliency curve (log, to the floor)", "left"), ("at cut", "right")] if curves else []
    columns += [("objective kept", "right")] if objectives else []
    for column, justify in columns + [("note", "left")]:
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column not in ("group", "note"))
    for row in report.groups:
        cells = [row["name"], row["kind"], f"{row['units_before']}→{row['units_after']}", str(row["unit_width"])]
        if curves:
            info = row.get("info", {})
            curve = info.get("saliency_curve", [])
            removed = row["units_before"] - row["units_after"]
            cut = f"{curve[removed - 1]:.3g}" if 0 < removed <= len(curve) else ""
            cells += [sparkline(curve), cut]
        if objectives:
            objective = row.get("info", {}).get("objective")
            cells.append(f"{objective:.4f}" if objective is not None else "")
        info = row.get("info", {})
        note = row["skipped"] or info.get("fallback", "") or (info.get("warning", "").split(":", 1)[-1].strip()[:60] if info.get("warning") else "")
        note = note or ("approximate (activation not positively homogeneous)" if info.get("approximate") else "")
        table.add_row(*cells, note)
    console.print(table)
    b, a = report.before, report.after
    console.print(f"parameters {_count(b['params'])} → {_count(a['params'])} ({a['params'] / max(b['params'], 1):.1%}); "
                  f"conv/linear FLOPs per example {_count(b['flops'])} → {_count(a['flops'])} ({a['flops'] / max(b['flops'], 1):.1%})")
    r = report.reached
    console.print(f"removed {r['channels']:.1%} of units, {r['params']:.1%} of parameters, {r['flops']:.1%} of FLOPs")
    console.print(f"output form: {report.form['form']}. Speed: {report.form['speed']}.")
    if report.unplaced:
        console.print(f"{len(report.unplaced)} layer(s) keep their output channels:")
        for name, why in report.unplaced.items():
            console.print(f"  {name}: {why}")
    if report.hf_config:
        state = "expressible" if report.hf_config["config_expressible"] else "NOT expressible"
        console.print(f"Hugging Face config: pruned widths are {state}. " + " ".join(report.hf_config["notes"]))
    if report.evaluation:
        ev = report.evaluation
        console.print(f"{ev['metric']} on {ev['dataset']}: before {ev['before']:.2%}, after {ev['after']:.2%} "
                      f"({(ev['after'] - ev['before']) * 100:+.2f} points)")
    render_drift(console, report.drift)
    if report.files.get("output"):
        f = report.files
        console.print(f"wrote {f['output']} ({f['format']}, {_count(f['output_bytes'])}B)")
    for note in report.notes:
        console.print(f"note: {note}")
