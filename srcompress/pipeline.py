"""The prune stage: masks (``prune_model``) or physical removal (``prune_structured``), each measured and judged."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import ui
from .calib.data import first_batches
from .compress.graph import build_graph, check_splits
from .compress.layers import trace_layers
from .compress.masks import MaskSpec, apply_masks, compute_masks, plan_layers
from .compress.registry import get_method
from .compress.structured import (GroupDecision, StructuredSpec, allocate, candidate_groups, lowest, model_costs,
                                  remove_units, removed_roots, soft_remove)
from .errors import SrcompressError
from .inputs import run_model, set_eval
from .io import flatten_outputs
from .report import FORMS, PruneReport, StructuredReport, layer_stats, model_totals

Evaluator = Callable[[nn.Module], dict[str, Any]]


def prune_model(
    model: nn.Module,
    example_inputs: tuple,
    spec: MaskSpec,
    method: str = "magnitude",
    *,
    evaluate: Evaluator | None = None,
    input_source: str = "given",
    calibration: Any = None,
) -> PruneReport:
    """Prune ``model`` in place with a mask method and report what happened (with ``calibration``, also the output
    drift on it: mask methods use no data, so it is held out).

    The report's ``ok`` is False (with ``problem`` saying why) when nothing changed or the sparsity
    reached misses the request by more than one pruning unit per layer.
    """
    chosen = get_method(method)
    if chosen.kind != "mask":
        raise SrcompressError(f"method {method!r} is structured", "run it with --structured")
    spec.validate()
    set_eval(model)
    layers, embeddings = trace_layers(model, example_inputs)
    if not layers:
        raise SrcompressError("the model has no convolution or matrix-multiply weights to prune", "check that this is the right model")
    stats_before = layer_stats(layers)
    totals_before = model_totals(model, stats_before)
    eval_before = evaluate(model) if evaluate else None

    plans = plan_layers(layers, spec)
    probe = DriftProbe(model, calibration)
    masks = compute_masks(plans, spec, chosen.score)
    changed = apply_masks(plans, masks)

    stats_after = layer_stats(layers)
    totals_after = model_totals(model, stats_after)
    eval_after = evaluate(model) if evaluate else None

    rows = []
    for plan, before, after in zip(plans, stats_before, stats_after):
        rows.append({
            "name": plan.layer.name, "op": plan.layer.op, "shape": list(plan.layer.shape), "params": before.params,
            "sparsity_before": before.sparsity, "sparsity_after": after.sparsity, "pattern_after": after.pattern,
            "flops": before.flops, "effective_flops_after": after.effective_flops,
            "units": plan.units, "pruned_units": plan.pruned_units, "skipped": plan.skipped,
        })
    pruned = [(p, a) for p, a in zip(plans, stats_after) if p.pruned]
    pruned_params = sum(a.params for _, a in pruned)
    reached = (1 - sum(a.nonzeros for _, a in pruned) / pruned_params) if pruned_params else 0.0
    tolerance = (spec.pattern.unit_size * len(pruned) / pruned_params) if pruned_params else 0.0
    report = PruneReport(
        request={"method": method, "sparsity": spec.sparsity, "pattern": str(spec.pattern), "scope": spec.scope,
                 "min_density": spec.min_density, "exclude": list(spec.exclude), "keep_first": spec.keep_first,
                 "keep_last": spec.keep_last, "seed": spec.seed, "calibration": probe.request(calibration, used=False)},
        layers=rows, before=totals_before, after=totals_after,
        sparsity={"asked": spec.sparsity, "reached": reached, "tolerance": tolerance, "pruned_layers": len(pruned)},
        form=dict(zip(("form", "speed"), FORMS[spec.pattern.kind])),
        changed_weights=changed,
        example_input={"shapes": [list(t.shape) for t in example_inputs], "source": input_source},
    )
    if eval_before is not None:
        report.evaluation = {**{k: v for k, v in eval_before.items() if k != "value"}, "before": eval_before["value"], "after": eval_after["value"]}
    report.drift = probe.measure(model, seen=False)
    pruned_names = {p.layer.name for p in plans if p.pruned}
    dense_tables, tied_tables = sorted(set(embeddings) - pruned_names), sorted(set(embeddings) & pruned_names)
    if dense_tables:
        report.notes.append(f"{len(dense_tables)} embedding table(s) kept dense: {', '.join(dense_tables)}")
    for name in tied_tables:
        report.notes.append(f"embedding table {name} is also a layer's weight (tied): it was pruned as that layer, "
                            "so the embedding lookups see its zeros too")
    uncovered = _uncovered_weights(model, {layer.name for layer in layers} | set(embeddings))
    if uncovered:
        count = sum(n for _, n in uncovered.values())
        where = ", ".join(f"{name} ({kind})" for name, (kind, _) in list(uncovered.items())[:4])
        report.notes.append(f"{count:,} weights ({count / max(totals_before['params'], 1):.1%} of the model) are in layers mask "
                            f"pruning does not cover and stay dense: {where}")
    skipped = [p for p in plans if not p.pruned]
    if skipped:
        report.notes.append(f"{len(skipped)} of {len(plans)} layers kept dense (see the note column)")
    _judge(report, plans)
    return report


def _uncovered_weights(model: nn.Module, covered: set[str]) -> dict[str, tuple[str, int]]:
    """Modules holding matrix weights that are neither traced conv/linear layers nor embeddings (LSTM, GRU,
    custom layers), with their type and weight count; a weight tied to a covered one is covered."""
    found: dict[str, tuple[str, int]] = {}
    covered_ids = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in covered}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() >= 2 and full not in covered and id(param) not in covered_ids:
                kind, count = found.get(module_name or "model", (type(module).__name__, 0))
                found[module_name or "model"] = (kind, count + param.numel())
    return found


def _judge(report: PruneReport, plans) -> None:
    sp = report.sparsity
    if not sp["pruned_layers"]:
        reasons = sorted({p.skipped for p in plans})
        report.ok, report.problem = False, f"no layer could be pruned ({'; '.join(reasons)[:200]})"
        if any("not divisible" in r for r in reasons):
            report.fix = "pick a --pattern whose block divides the layer shapes listed"
    elif report.changed_weights == 0:
        capped = sp["reached"] + sp["tolerance"] < sp["asked"]
        report.ok, report.problem = False, (
            "nothing changed: sparsity 0 prunes nothing" if sp["asked"] == 0
            else f"nothing changed: --min-density {report.request['min_density']:g} keeps the pruned layers at {sp['reached']:.2%} sparsity"
            if capped else f"nothing changed: the pruned layers were already at {sp['reached']:.2%} sparsity")
    elif abs(sp["reached"] - sp["asked"]) > sp["tolerance"] + 1e-9:
        report.ok, report.problem = False, (
            f"sparsity reached {sp['reached']:.2%} differs from the {sp['asked']:.2%} asked by more than one pruning unit per layer "
            f"({'capped by --min-density ' + format(report.request['min_density'], 'g') if sp['reached'] < sp['asked'] else 'the layers already held more zeros'})")


@dataclass
class StructuredContext:
    """What a structured method may use besides the graph."""

    model: nn.Module
    example_inputs: tuple
    spec: StructuredSpec
    seed: int = 0
    calibration: Any = None  # calibration data for data-driven methods
    original: nn.Module | None = None  # a frozen copy of the model before pruning (targets for data-driven methods)
    planned: list = field(default_factory=list)  # the channel groups this run prunes, in order
    cache: dict = field(default_factory=dict)  # anything a method computes once per run


def prune_structured(
    model: nn.Module,
    example_inputs: tuple,
    spec: StructuredSpec,
    method: str = "l1",
    *,
    evaluate: Evaluator | None = None,
    calibration: Any = None,
    input_source: str = "given",
) -> StructuredReport:
    """Remove whole neurons, channels, channel groups and heads from ``model`` in place and report it.

    The result is a plain dense model with fewer channels. It is run on the example input afterwards;
    if the model's own code cannot run at the new widths (e.g. a hard-coded reshape), this raises.
    """
    chosen = get_method(method, structured=True)
    spec.validate()
    if chosen.needs_data and calibration is None:
        raise SrcompressError(f"method {method!r} needs calibration data", "pass --calib DATA")
    if spec.stop_threshold is not None and not chosen.stops_at_threshold:
        raise SrcompressError(f"method {chosen.name!r} has no saliency to stop at, so --saliency-threshold cannot apply",
                              "use --method surgery, or drop --saliency-threshold and pass --sparsity")
    overlap = _calibration_overlap(calibration, evaluate) if chosen.needs_data else None
    set_eval(model)
    reference = flatten_outputs(run_model(model, example_inputs))
    probe = DriftProbe(model, calibration)
    layers, _ = trace_layers(model, example_inputs)
    flops = {layer.name: layer.flops for layer in layers}
    eval_before = evaluate(model) if evaluate else None
    with ui.phase("tracing the channel graph"):
        graph = build_graph(model, example_inputs)
    groups, skipped = candidate_groups(graph, spec)
    original = copy.deepcopy(model) if chosen.needs_data else None
    context = StructuredContext(model, example_inputs, spec, spec.seed, calibration, original)
    scores, comparable = None, False
    if chosen.unit_score:
        scores = {g.index: np.asarray(chosen.unit_score(graph, g, context)) for g in groups}
    elif chosen.removal_costs and spec.allocation == "global":
        scores, comparable = {g.index: np.asarray(chosen.removal_costs(graph, g, context)) for g in groups}, True
    counts = allocate(graph, groups, spec, flops, scores, comparable)
    context.planned = [g for g in groups if counts.get(g.index, 0)]
    params_before, flops_before = model_costs(graph, flops, set())
    decisions: dict[int, GroupDecision] = {}
    for group in ui.track(context.planned, f"{method}: choosing units"):
        count = counts[group.index]
        decision = chosen.select(graph, group, count, context) if chosen.select else GroupDecision(lowest(scores[group.index], count))
        soft_remove(graph, group, decision.removed, decision.updates)
        decisions[group.index] = decision
    changed = remove_units(graph, {i: d.removed for i, d in decisions.items()})
    _verify(model, example_inputs, reference)
    check_splits(graph, removed_roots(graph, {i: d.removed for i, d in decisions.items()}), example_inputs)
    params_after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layers_after, _ = trace_layers(model, example_inputs)
    flops_after = sum(layer.flops for layer in layers_after)
    eval_after = evaluate(model) if evaluate else None

    total_units = sum(g.size for g in groups)
    removed_units = sum(len(d.removed) for d in decisions.values())
    rows = []
    for group in graph.groups:
        decision = decisions.get(group.index)
        rows.append({
            "name": group.name, "kind": group.kind, "units_before": group.size,
            "units_after": group.size - (len(decision.removed) if decision else 0), "unit_width": group.unit_width,
            "producers": [p for p, _ in group.producers], "consumers": [c for c, _ in group.consumers],
            "skipped": skipped.get(group.name, ""), **({"info": decision.info} if decision and decision.info else {}),
        })
    reached = {"channels": removed_units / max(total_units, 1), "params": 1 - params_after / max(params_before, 1),
               "flops": 1 - flops_after / max(flops_before, 1)}
    steps = sum(_bounds_step(g, spec) for g in groups)
    report = StructuredReport(
        request={"method": chosen.name, "amount": spec.amount, "target": spec.target, "allocation": spec.allocation,
                 "min_keep": spec.min_keep, "round_to": spec.round_to, "exclude": list(spec.exclude),
                 "uniform_widths": spec.uniform_widths, "seed": spec.seed, "stop_threshold": spec.stop_threshold,
                 "calibration": probe.request(calibration, used=chosen.needs_data)},
        groups=rows, before={"params": params_before, "flops": flops_before},
        after={"params": params_after, "flops": flops_after},
        reached=reached, tolerance=steps / max(total_units, 1) if spec.target == "channels" else 0.0,
        unplaced=dict(graph.unplaced), changed_tensors={k: [list(a), list(b)] for k, (a, b) in changed.items()},
        example_input={"shapes": [list(t.shape) for t in example_inputs], "source": input_source},
        hf_config=hf_config_note(model),
    )
    if eval_before is not None:
        report.evaluation = {**{k: v for k, v in eval_before.items() if k != "value"}, "before": eval_before["value"], "after": eval_after["value"]}
    report.drift = probe.measure(model, seen=chosen.needs_data)
    report.notes += [f"{group.name}: {decisions[group.index].info[key]}" if key == "fallback" else decisions[group.index].info[key]
                     for group in context.planned for key in ("fallback", "warning") if key in decisions[group.index].info]
    report.notes += [overlap] if overlap else []
    _judge_structured(report, groups, spec)
    return report


def _calibration_overlap(calibration: Any, evaluate: Any) -> str | None:
    """A data-driven method fits the weights to its calibration inputs: refuse an evaluation made entirely on them
    (it would not be held-out), note a partial overlap. Only evaluators that expose their ``inputs`` can be checked."""
    from .data import held_out_note

    held_out = getattr(evaluate, "inputs", None)
    if calibration is None or held_out is None:
        return None
    seen = torch.cat([batch[0] for batch in calibration.batches])
    return held_out_note(seen, calibration.description, held_out, evaluate.dataset, role="calibration")


class DriftProbe:
    """The model's outputs on its first 64 calibration samples, taken before pruning, to measure afterwards how far
    they moved: for a user's model (no bundled evaluator) the report's quality figure."""

    SAMPLES = 64

    def __init__(self, model: nn.Module, calibration: Any):
        self.batches = first_batches(calibration.batches, self.SAMPLES) if calibration is not None else []
        self.references = [flatten_outputs(run_model(model, batch)) for batch in self.batches]

    @staticmethod
    def request(calibration: Any, used: bool) -> dict[str, Any] | None:
        """The calibration entry of a report's request: what the data was and what it was used for."""
        if calibration is None:
            return None
        return {"description": calibration.description, "samples": len(calibration), **calibration.provenance,
                "used_for": "choosing units" if used else "measuring output drift only"}

    def measure(self, model: nn.Module, seen: bool) -> dict[str, Any] | None:
        """Relative L2 change over all outputs, and top-1 agreement when the first output is class scores; held out
        only if the method did not ``see`` the data. None without calibration data."""
        if not self.batches:
            return None
        change = size = agree = rows = 0.0
        classes = True
        for batch, reference in zip(self.batches, self.references):
            outputs = flatten_outputs(run_model(model, batch))
            change += sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, reference))
            size += sum(float((r.float() ** 2).sum()) for r in reference)
            first, want = outputs[0], reference[0]
            classes = classes and want.dim() == 2 and want.shape[1] > 1 and want.is_floating_point()
            if classes:
                agree += float((first.argmax(1) == want.argmax(1)).sum())
                rows += want.shape[0]
        samples = sum(int(batch[0].shape[0]) for batch in self.batches)
        return {"inputs": f"{samples} calibration samples ({'seen while pruning' if seen else 'not used by the data-free method: held out'})",
                "relative_error": math.sqrt(change / size) if size > 0 else float(change > 0),
                "top1_agreement": agree / rows if classes and rows else None}


def _bounds_step(group, spec: StructuredSpec) -> int:
    return max(1, (spec.round_to // math.gcd(group.unit_width, spec.round_to)) if spec.round_to else 1)


def _verify(model: nn.Module, example_inputs: tuple, reference: list) -> None:
    try:
        outputs = flatten_outputs(run_model(model, example_inputs))
    except SrcompressError as err:
        if isinstance(model, torch.fx.GraphModule):  # a .pt2 program: its graph holds the widths as constants
            raise SrcompressError(
                f"the pruned program no longer runs: {err.problem}; a .pt2 program keeps widths as constants in its graph "
                "(convolution groups, normalized shapes, view sizes) that pruning cannot rewrite",
                "prune the model's nn.Module instead (a pickled model, or a state dict with --arch), or --exclude that group",
            ) from err
        raise SrcompressError(
            f"the pruned model no longer runs: {err.problem}; its code probably hard-codes a width that was pruned",
            "exclude that layer's group with --exclude, or register the module with srcompress.compress.graph.register_module",
        ) from err
    if [tuple(o.shape) for o in outputs] != [tuple(r.shape) for r in reference]:
        raise SrcompressError("the pruned model's outputs changed shape", "report this model; exclude the groups that feed the output")


def _judge_structured(report: StructuredReport, groups, spec: StructuredSpec) -> None:
    reached = report.reached[spec.target]
    if spec.stop_threshold is not None and groups and report.changed_tensors:
        return  # the saliency threshold, not an amount, decided how much went
    if not groups:
        report.ok, report.problem = False, "no channel group can be pruned (see the unplaced layers)"
    elif not report.changed_tensors and spec.stop_threshold is not None:
        report.ok, report.problem = False, f"nothing changed: no merge costs less than the saliency threshold {spec.stop_threshold:g}"
        report.fix = "raise --saliency-threshold (the JSON report has each group's saliency curve)"
    elif not report.changed_tensors:
        report.ok, report.problem = False, "nothing changed: no unit was removed"
    elif spec.target == "channels" and abs(reached - spec.amount) > report.tolerance + 1e-9:
        report.ok, report.problem = False, (f"removed {reached:.2%} of units, not {spec.amount:.2%}: the per-group floor "
                                            f"(--min-density) or --round-to stops it")
    elif spec.target != "channels" and reached + 1e-9 < spec.amount:
        report.ok, report.problem = False, f"removed {reached:.2%} of {spec.target}, short of {spec.amount:.2%}: floors or rounding stop it"


def hf_config_note(model: nn.Module) -> dict[str, Any] | None:
    """For Hugging Face models: can the pruned widths still be written in the model's config?"""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        return None
    ffn = sorted({m.out_features for name, m in model.named_modules() if name.endswith("intermediate.dense") and isinstance(m, nn.Linear)})
    heads = sorted({m.num_attention_heads for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size")})
    notes, expressible = [], True
    if len(ffn) > 1:
        expressible = False
        notes.append(f"FFN widths differ across layers ({ffn[0]}..{ffn[-1]}); use --uniform")
    elif ffn and ffn[0] != getattr(config, "intermediate_size", ffn[0]):
        config.intermediate_size = ffn[0]
        notes.append(f"config.intermediate_size set to {ffn[0]}")
    if heads and heads != [config.num_attention_heads]:
        expressible = False
        notes.append("head counts changed: the config derives head size from hidden_size / num_attention_heads, so it cannot "
                     "express removed heads; reload the saved .pt/.pt2 file instead of from_pretrained")
    return {"config_expressible": expressible, "notes": notes}
