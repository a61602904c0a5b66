"""The prune stage as one function: trace, plan, mask, measure, and say whether the request was met."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .compress.layers import trace_layers
from .compress.masks import MaskSpec, apply_masks, compute_masks, plan_layers
from .compress.registry import get_method
from .errors import SrcompressError
from .inputs import set_eval
from .report import FORMS, PruneReport, layer_stats, model_totals

Evaluator = Callable[[nn.Module], dict[str, Any]]


def prune_model(
    model: nn.Module,
    example_inputs: tuple,
    spec: MaskSpec,
    method: str = "magnitude",
    *,
    evaluate: Evaluator | None = None,
    input_source: str = "given",
) -> PruneReport:
    """Prune ``model`` in place with a mask method and report what happened.

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
                 "keep_last": spec.keep_last, "seed": spec.seed},
        layers=rows, before=totals_before, after=totals_after,
        sparsity={"asked": spec.sparsity, "reached": reached, "tolerance": tolerance, "pruned_layers": len(pruned)},
        form=dict(zip(("form", "speed"), FORMS[spec.pattern.kind])),
        changed_weights=changed,
        example_input={"shapes": [list(t.shape) for t in example_inputs], "source": input_source},
    )
    if eval_before is not None:
        report.evaluation = {**{k: v for k, v in eval_before.items() if k != "value"}, "before": eval_before["value"], "after": eval_after["value"]}
    if embeddings:
        report.notes.append(f"{len(embeddings)} embedding table(s) kept dense: {', '.join(sorted(embeddings))}")
    skipped = [p for p in plans if not p.pruned]
    if skipped:
        report.notes.append(f"{len(skipped)} of {len(plans)} layers kept dense (see the note column)")
    _judge(report, plans)
    return report


def _judge(report: PruneReport, plans) -> None:
    sp = report.sparsity
    if not sp["pruned_layers"]:
        reasons = sorted({p.skipped for p in plans})
        report.ok, report.problem = False, f"no layer could be pruned ({'; '.join(reasons)[:200]})"
    elif report.changed_weights == 0:
        report.ok, report.problem = False, (
            f"nothing changed: the pruned layers were already at {sp['reached']:.2%} sparsity" if sp["asked"] > 0
            else "nothing changed: sparsity 0 prunes nothing")
    elif abs(sp["reached"] - sp["asked"]) > sp["tolerance"] + 1e-9:
        report.ok, report.problem = False, (
            f"sparsity reached {sp['reached']:.2%} differs from the {sp['asked']:.2%} asked by more than one pruning unit per layer "
            f"({'capped by --min-density ' + format(report.request['min_density'], 'g') if sp['reached'] < sp['asked'] else 'the layers already held more zeros'})")
