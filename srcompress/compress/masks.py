"""Masks from scores: which layers take part, how many units each loses, and exact top-k selection.

Counts are exact (``round(sparsity x units)``) and ties are broken by position, so the same scores
always give the same mask. Masks are applied by zeroing weights in place: nothing but plain weights
remains in the model.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SrcompressError
from .layers import Layer
from .patterns import Pattern

ScoreFn = Callable[[Layer, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class MaskSpec:
    """What to prune: target sparsity, pattern, allocation and which layers stay dense."""

    sparsity: float
    pattern: Pattern = field(default_factory=lambda: Pattern("unstructured"))
    scope: str = "layer"  # "layer": every layer at the target; "global": one ranking across layers
    min_density: float = 0.01  # no layer keeps fewer than this fraction of its units
    exclude: tuple[str, ...] = ()
    keep_first: bool = True  # first conv stays dense
    keep_last: bool = True  # last layer (classifier) stays dense
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SrcompressError(f"sparsity {self.sparsity} is outside [0, 1)", "pass e.g. --sparsity 0.9")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None and not math.isclose(self.sparsity, fixed, abs_tol=1e-9):
            raise SrcompressError(
                f"pattern {self.pattern} always gives sparsity {fixed:g}, not {self.sparsity:g}",
                f"pass --sparsity {fixed:g} with --pattern {self.pattern}, or choose another pattern",
            )
        if self.scope not in ("layer", "global"):
            raise SrcompressError(f"unknown scope {self.scope!r}", "use --scope layer or --scope global")
        if not 0.0 <= self.min_density <= 1.0:
            raise SrcompressError(f"min density {self.min_density} is outside [0, 1]", "pass e.g. --min-density 0.01")


@dataclass
class LayerPlan:
    """Decision for one layer: skipped (with the reason) or pruned by so many units."""

    layer: Layer
    skipped: str = ""  # reason it stays dense; empty when pruned
    units: int = 0
    pruned_units: int = 0

    @property
    def pruned(self) -> bool:
        return not self.skipped


def plan_layers(layers: list[Layer], spec: MaskSpec) -> list[LayerPlan]:
    """Mark each layer as taking part or staying dense, with the reason."""
    names = [[layer.name, layer.module_name] for layer in layers]
    check_exclude_matches(spec.exclude, names)
    plans = []
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        reason = ""
        matched = next((g for g in spec.exclude if matches_any(names[index], g)), None)
        if matched:
            reason = f"--exclude {matched}"
        elif index == 0 and spec.keep_first and layer.op.startswith("conv") and len(layers) > 1:
            reason = "first conv (--prune-first)"
        elif index == last and spec.keep_last and len(layers) > 1:
            reason = "last layer (--prune-last)"
        elif layer.is_output and spec.keep_last and len(layers) > 1:
            reason = "output layer (--prune-last)"
        else:
            reason = spec.pattern.unsupported_reason(layer) or ""
        plans.append(LayerPlan(layer, skipped=reason))
    return plans


def matches_any(names: list[str], glob: str) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for name in names)


def check_exclude_matches(globs: tuple[str, ...], names: list[list[str]]) -> None:
    """An --exclude glob that matches nothing is a typo, not a request: refuse it, naming a few real names.
    ``names`` holds, per layer or group, the names a glob may match."""
    for glob in globs:
        if not any(matches_any(group, glob) for group in names):
            examples = ", ".join(group[0] for group in names[:4])
            raise SrcompressError(f"--exclude {glob!r} matches no prunable layer", f"names look like {examples}; fix the glob (e.g. 'fc.*')")


def _element_scores(plan: LayerPlan, score: ScoreFn, gen: torch.Generator, channels_last: bool) -> torch.Tensor:
    layer = plan.layer
    matrix = layer.to_matrix(layer.param.detach(), channels_last=channels_last).float()
    scores = score(layer, matrix, gen)
    if scores.shape != matrix.shape:
        raise RuntimeError(f"score function returned shape {tuple(scores.shape)} for {layer.name}, expected {tuple(matrix.shape)}")
    return scores


def compute_masks(plans: list[LayerPlan], spec: MaskSpec, score: ScoreFn) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (in each parameter's own layout) for the layers that take part."""
    spec.validate()
    gen = torch.Generator().manual_seed(spec.seed)
    active = [p for p in plans if p.pruned]
    pattern = spec.pattern
    masks: dict[str, torch.Tensor] = {}
    if pattern.kind == "nm":
        for plan in active:
            scores = _element_scores(plan, score, gen, channels_last=True)
            keep = pattern.nm_keep(scores)
            plan.units = keep.numel() // pattern.m
            plan.pruned_units = int((~keep).sum()) // pattern.m
            masks[plan.layer.name] = plan.layer.from_matrix(keep, channels_last=True)
        return masks

    unit_scores = [pattern.unit_scores(_element_scores(p, score, gen, channels_last=False)) for p in active]
    caps = [math.floor((1.0 - spec.min_density) * len(u) + 1e-9) for u in unit_scores]
    if spec.scope == "layer":
        counts = [min(round(spec.sparsity * len(u)), cap) for u, cap in zip(unit_scores, caps)]
        pruned_sets = [torch.argsort(u, stable=True)[:k] for u, k in zip(unit_scores, counts)]
    else:
        pruned_sets = _global_selection(unit_scores, caps, spec.sparsity)
    for plan, units, pruned in zip(active, unit_scores, pruned_sets):
        keep_units = torch.ones(len(units), dtype=torch.bool)
        keep_units[pruned] = False
        plan.units, plan.pruned_units = len(units), len(pruned)
        keep = pattern.unit_mask_to_matrix(keep_units, plan.layer.matrix_shape())
        masks[plan.layer.name] = plan.layer.from_matrix(keep)
    return masks


def _global_selection(unit_scores: list[torch.Tensor], caps: list[int], sparsity: float) -> list[torch.Tensor]:
    """Lowest-scoring units across all layers, at most ``caps[i]`` from layer i (ties by position)."""
    sizes = [len(u) for u in unit_scores]
    if not sizes:
        return []
    target = round(sparsity * sum(sizes))
    scores = torch.cat(unit_scores)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.argsort(scores, stable=True)
    owner_sorted = owner[order]
    allowed = torch.zeros(len(order), dtype=torch.bool)
    for i, cap in enumerate(caps):
        positions = torch.nonzero(owner_sorted == i).flatten()
        allowed[positions[:cap]] = True
    chosen = order[torch.nonzero(allowed).flatten()[:target]]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    chosen_owner = owner[chosen]
    return [chosen[chosen_owner == i] - offsets[i] for i in range(len(sizes))]


def apply_masks(plans: list[LayerPlan], masks: dict[str, torch.Tensor]) -> int:
    """Zero the masked weights in place; returns how many weights changed from non-zero to zero."""
    changed = 0
    with torch.no_grad():
        for plan in plans:
            mask = masks.get(plan.layer.name)
            if mask is None:
                continue
            param = plan.layer.param
            changed += int(((param != 0) & ~mask).sum())
            param.mul_(mask.to(param.dtype))
    return changed
