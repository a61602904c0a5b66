"""Physical removal of channel-group units, with compensation, budgets and the L1 / random baselines.

Methods work in two steps. While choosing, :func:`soft_remove` applies a method's compensation to the
consumer weights and zeroes the consumer inputs of removed units, so the model computes exactly what
the narrower model will (later layers can be chosen on the already-pruned network). At the end,
:func:`remove_units` slices every parameter and buffer and updates module attributes, so the result is
a plain dense model with fewer channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import SrcompressError
from .graph import ChannelGroup, Graph, count_params_after, numel
from .masks import check_exclude_matches, matches_any

Updates = dict[str, torch.Tensor]  # parameter name -> replacement value, in the parameter's current (full) shape


@dataclass
class StructuredSpec:
    """How much to remove and where."""

    amount: float  # fraction removed: of units ("channels"), of parameters or of FLOPs
    target: str = "channels"  # "channels", "params" or "flops"
    allocation: str = "uniform"  # "uniform": every group loses the same fraction; "global": one ranking
    min_keep: float = 0.01  # every group keeps at least this fraction of its units (and at least one)
    round_to: int | None = None  # kept channels per group rounded to a multiple of this
    exclude: tuple[str, ...] = ()
    uniform_widths: bool = False  # equivalent groups (e.g. every FFN) keep the same width
    seed: int = 0
    stop_threshold: float | None = None  # surgery: stop each group where the normalised saliency exceeds this

    def validate(self) -> None:
        if not 0.0 <= self.amount < 1.0:
            raise SrcompressError(f"structured amount {self.amount} is outside [0, 1)", "pass e.g. --sparsity 0.5")
        if self.target not in ("channels", "params", "flops"):
            raise SrcompressError(f"unknown target {self.target!r}", "use --target channels:F, params:F or flops:F")
        if self.allocation not in ("uniform", "global"):
            raise SrcompressError(f"unknown allocation {self.allocation!r}", "use allocation 'uniform' or 'global' (--scope layer or global)")
        if self.round_to is not None and self.round_to < 1:
            raise SrcompressError(f"--round-to {self.round_to} must be positive", "use e.g. --round-to 8")
        if not 0.0 <= self.min_keep <= 1.0:
            raise SrcompressError(f"min density {self.min_keep} is outside [0, 1]", "pass e.g. --min-density 0.01")
        if self.stop_threshold is not None and not self.stop_threshold >= 0:
            raise SrcompressError(f"--saliency-threshold {self.stop_threshold:g} is negative",
                                  "pass a normalised saliency of 0 or more, e.g. 0.1 (read the knee off the report's curve)")


def structured_spec(sparsity, pattern, target, scope, min_density, round_to, hardware, uniform, exclude, seed, threshold=None) -> StructuredSpec:
    """A checked spec from the options of `srcompress prune --structured` (and a recipe's structured stage)."""
    if pattern != "unstructured":
        raise SrcompressError("--pattern does not apply to --structured pruning", "drop --pattern, or drop --structured for a mask pattern")
    kind, amount = "channels", sparsity
    if target:
        if sparsity is not None:
            raise SrcompressError("give either --sparsity or --target, not both", "e.g. --target flops:0.5")
        kind, _, value = target.partition(":")
        try:
            amount = float(value)
        except ValueError:
            raise SrcompressError(f"--target {target!r} is not KIND:FRACTION", "e.g. --target flops:0.5 or params:0.3") from None
        if not 0 <= amount < 1:
            raise SrcompressError(f"--target {target}: the fraction {amount:g} is outside [0, 1)", f"e.g. --target {kind}:0.5")
    if amount is None and threshold is None:
        raise SrcompressError("--sparsity (fraction of channels) or --target is required", "pass e.g. --sparsity 0.5")
    if round_to is None and hardware == "gpu":
        round_to = 8
    spec = StructuredSpec(amount or 0.0, kind, "global" if scope == "global" else "uniform", min_keep=min_density,
                          round_to=round_to, exclude=tuple(exclude), uniform_widths=uniform, seed=seed, stop_threshold=threshold)
    spec.validate()
    return spec


@dataclass
class GroupDecision:
    """What a method chose for one group: unit indices to remove and compensation updates."""

    removed: list[int]
    updates: Updates = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# ----- slicing ------------------------------------------------------------------------------------
def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    table = dict(model.named_parameters(remove_duplicate=False))
    table.update(dict(model.named_buffers(remove_duplicate=False)))
    return table


def soft_remove(graph: Graph, group: ChannelGroup, removed: list[int], updates: Updates | None = None) -> None:
    """Apply ``updates`` in place, then zero the consumer inputs of the removed units."""
    table = _tensor_table(graph.model)
    with torch.no_grad():
        for name, value in (updates or {}).items():
            tensor = table[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"compensation for {name} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
            tensor.copy_(value)
        consumers = set(group.consumers)
        for unit in removed:
            for slot in group.slots[unit]:
                if (slot.tensor, slot.dim) in consumers:
                    table[slot.tensor].index_fill_(slot.dim, torch.as_tensor(slot.positions), 0.0)


def removed_roots(graph: Graph, decisions: dict[int, list[int]]) -> set[int]:
    return {graph.groups[g].units[u] for g, units in decisions.items() for u in units}


def remove_units(graph: Graph, decisions: dict[int, list[int]]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Slice every tensor so the removed units are gone; returns name -> (old shape, new shape)."""
    model = graph.model
    roots = removed_roots(graph, decisions)
    table = _tensor_table(model)
    replacements: dict[int, torch.Tensor] = {}
    changed = {}
    for name, vecs in graph.tensors.items():
        tensor = table.get(name)
        if tensor is None or id(tensor) in replacements:
            continue
        new = tensor.detach()
        for dim, vec in enumerate(vecs):
            if vec is None:
                continue
            keep = [i for i, atom in enumerate(vec) if graph.atoms.find(int(atom)) not in roots]
            if len(keep) < len(vec):
                new = new.index_select(dim, torch.tensor(keep, dtype=torch.long))
        if new.shape != tensor.shape:
            replacements[id(tensor)] = new.clone()
            changed[name] = (tuple(tensor.shape), tuple(new.shape))
    _swap_tensors(model, replacements)
    _fix_modules(graph, {name.rsplit(".", 1)[0] if "." in name else "" for name in changed})
    return changed


def _swap_tensors(model: nn.Module, replacements: dict[int, torch.Tensor]) -> None:
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in replacements:
                if id(param) not in new_params:
                    new_params[id(param)] = nn.Parameter(replacements[id(param)], requires_grad=param.requires_grad)
                module._parameters[key] = new_params[id(param)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) in replacements:
                module._buffers[key] = replacements[id(buffer)]


def _fix_modules(graph: Graph, owners: set[str]) -> None:
    """Update shape attributes of modules whose tensors changed; swap modules that cannot express the new shape."""
    model = graph.model
    modules = dict(model.named_modules())
    for path in sorted(owners, key=len, reverse=True):
        module = modules.get(path)
        if module is None:
            continue
        rule = graph.replaced_modules.get(path)
        if rule is not None and rule.fixup is not None:
            replacement = rule.fixup(module)
            if replacement is not None:
                _set_submodule(model, path, replacement)
            continue
        _fix_attributes(module)
    for path, module in model.named_modules():
        if hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size"):
            query = getattr(module, "query", None) or getattr(module, "q_proj", None)
            if isinstance(query, nn.Linear):
                module.num_attention_heads = query.out_features // module.attention_head_size
                module.all_head_size = query.out_features
        if hasattr(module, "num_heads") and hasattr(module, "head_dim") and isinstance(getattr(module, "q_proj", None), nn.Linear):
            module.num_heads = module.q_proj.out_features // module.head_dim
            k_proj = getattr(module, "k_proj", None)
            if isinstance(k_proj, nn.Linear) and hasattr(module, "num_key_value_heads"):
                module.num_key_value_heads = k_proj.out_features // module.head_dim
                module.num_key_value_groups = module.num_heads // max(module.num_key_value_heads, 1)


def _fix_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        weight = module.weight
        if module.transposed:
            module.in_channels = weight.shape[0]
            module.out_channels = weight.shape[1] * module.groups
        else:
            if module.groups > 1:
                per_group = module.out_channels // module.groups
                module.groups = weight.shape[0] // per_group
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = reference.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // per_group
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# ----- costs and budgets ------------------------------------------------------------------------------
def model_costs(graph: Graph, flops: dict[str, int], roots: set[int]) -> tuple[int, int]:
    """(parameters, conv/linear FLOPs) of the model once ``roots`` are removed."""
    shapes = count_params_after(graph, roots)
    table = _tensor_table(graph.model)
    seen, params = set(), 0
    for name, tensor in graph.model.named_parameters():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        params += numel(shapes.get(name, tuple(tensor.shape)))
    total_flops = 0
    for name, dense in flops.items():
        old = table[name].numel() if name in table else 1
        total_flops += round(dense * numel(shapes.get(name, tuple(table[name].shape))) / max(old, 1)) if name in table else dense
    return params, total_flops


def candidate_groups(graph: Graph, spec: StructuredSpec) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Groups that may be pruned, and excluded group names with the reason."""
    chosen, skipped = [], {}
    names = [[group.name] + [p for p, _ in group.producers] + [p.rsplit(".", 1)[0] for p, _ in group.producers]
             for group in graph.groups]
    check_exclude_matches(spec.exclude, names)
    for group, group_names in zip(graph.groups, names):
        matched = next((g for g in spec.exclude if matches_any(group_names, g)), None)
        if matched:
            skipped[group.name] = f"--exclude {matched}"
        elif group.size < 2:
            skipped[group.name] = "a single unit (never remove a whole group)"
        else:
            chosen.append(group)
    return chosen, skipped


def _bounds(group: ChannelGroup, spec: StructuredSpec) -> tuple[int, int]:
    """Largest number of units removable, and the step kept counts must be a multiple of."""
    floor = max(1, math.ceil(spec.min_keep * group.size))
    step = 1
    if spec.round_to:
        step = spec.round_to // math.gcd(group.unit_width, spec.round_to)
    return group.size - floor, step


def _rounded(group: ChannelGroup, spec: StructuredSpec, remove: int) -> int:
    """Clamp a removal count to the floor and round the kept count to the nearest allowed multiple."""
    most, step = _bounds(group, spec)
    remove = max(0, min(remove, most))
    if step > 1:
        keep = group.size - remove
        keep = max(step, int(round(keep / step)) * step)
        if keep > group.size:
            keep = group.size if group.size % step == 0 or group.size < step else (group.size // step) * step
        remove = group.size - keep
        if remove > most:
            remove = max(0, group.size - math.ceil((group.size - most) / step) * step)
    return remove


def allocate(graph: Graph, groups: list[ChannelGroup], spec: StructuredSpec, flops: dict[str, int],
             scores: dict[int, np.ndarray] | None, comparable: bool = False) -> dict[int, int]:
    """Units to remove per group index so the target is met (uniform fraction or global ranking).

    For global ranking, ``scores`` are unit scores, put on one scale by dividing by each group's mean, or, if
    ``comparable``, costs of successive removals already on one scale (taken as they are, in order).
    """
    spec.validate()
    if not groups:
        return {}
    if spec.stop_threshold is not None:  # the method stops each group at the threshold, up to its floor
        return {g.index: _bounds(g, spec)[0] for g in groups}
    if spec.allocation == "global":
        if scores is None:
            raise SrcompressError("global allocation needs a method that scores units",
                                  "use --scope layer (allocation='uniform') with this method")
        counts = _global_counts(graph, groups, spec, flops, scores, comparable)
    else:
        counts = _uniform_counts(graph, groups, spec, flops)
    if spec.uniform_widths:
        counts = _equalise(groups, counts, spec)
    return counts


def _uniform_counts(graph, groups, spec, flops) -> dict[int, int]:
    def counts_for(fraction: float) -> dict[int, int]:
        return {g.index: _rounded(g, spec, round(fraction * g.size)) for g in groups}

    if spec.target == "channels":
        return counts_for(spec.amount)
    return _bisect(graph, groups, spec, flops, counts_for)


def _global_counts(graph, groups, spec, flops, scores, comparable) -> dict[int, int]:
    normalised = []
    for g in groups:
        s = np.asarray(scores[g.index], dtype=np.float64)
        if comparable:  # successive removals: a later one is never taken before an earlier one
            s = np.maximum.accumulate(s)
        else:
            s = s / (s.mean() if s.mean() > 0 else 1.0)
        normalised += [(value, g.index, unit) for unit, value in enumerate(s)]
    normalised.sort(key=lambda t: (t[0], t[1], t[2]))
    by_index = {g.index: g for g in groups}
    caps = {g.index: _bounds(g, spec)[0] for g in groups}

    def counts_for(fraction: float) -> dict[int, int]:
        take = round(fraction * len(normalised))
        counts = {g.index: 0 for g in groups}
        for _, gi, _ in normalised:
            if take <= 0:
                break
            if counts[gi] < caps[gi]:
                counts[gi] += 1
                take -= 1
        return {gi: _rounded(by_index[gi], spec, c) for gi, c in counts.items()}

    if spec.target == "channels":
        return counts_for(spec.amount)
    return _bisect(graph, groups, spec, flops, counts_for)


def _bisect(graph, groups, spec, flops, counts_for: Callable[[float], dict[int, int]]) -> dict[int, int]:
    """Smallest unit fraction whose removal reaches the parameter or FLOP target."""
    dense_params, dense_flops = model_costs(graph, flops, set())
    dense = dense_params if spec.target == "params" else dense_flops

    def removed_fraction(counts: dict[int, int]) -> float:
        roots = {g.units[u] for g in groups for u in range(g.size - counts[g.index], g.size)}
        params, fl = model_costs(graph, flops, roots)
        return 1 - (params if spec.target == "params" else fl) / max(dense, 1)

    low, high = 0.0, 1.0
    best = counts_for(1.0)
    for _ in range(30):
        mid = (low + high) / 2
        counts = counts_for(mid)
        if removed_fraction(counts) >= spec.amount:
            best, high = counts, mid
        else:
            low = mid
    return best


def _equalise(groups: list[ChannelGroup], counts: dict[int, int], spec: StructuredSpec) -> dict[int, int]:
    """Give equivalent groups (same kind, size and unit width) the same count, so widths stay uniform."""
    classes: dict[tuple, list[ChannelGroup]] = {}
    for g in groups:
        classes.setdefault((g.kind, g.size, g.unit_width), []).append(g)
    out = dict(counts)
    for members in classes.values():
        mean = round(sum(counts[g.index] for g in members) / len(members))
        for g in members:
            out[g.index] = _rounded(g, spec, mean)
    return out


# ----- baseline selection -------------------------------------------------------------------------
def l1_scores(graph: Graph, group: ChannelGroup) -> np.ndarray:
    """L1 norm of each unit's producer weights (filters / neuron rows / head rows)."""
    table = _tensor_table(graph.model)
    producers = set(group.producers)
    scores = np.zeros(group.size)
    for unit, slots in enumerate(group.slots):
        for slot in slots:
            if (slot.tensor, slot.dim) in producers:
                tensor = table[slot.tensor].detach()
                scores[unit] += float(tensor.index_select(slot.dim, torch.as_tensor(slot.positions)).abs().sum())
    return scores


def random_scores(group: ChannelGroup, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + group.index)
    return torch.rand(group.size, generator=gen, dtype=torch.float64).numpy()


def lowest(scores: np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (ties by position)."""
    return sorted(np.argsort(scores, kind="stable")[:count].tolist())
