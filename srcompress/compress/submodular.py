"""Submodular structured pruning with few samples (El Halabi, Srinivas & Lacoste-Julien, NeurIPS 2022).

For a group of units, choose the k to keep so the next layers' outputs are reconstructed best:

    F(S) = ||T||^2 - min_X ||T - B_S X||^2,   T = A W  (what the consumer computed in the original model),

where B are the consumer's inputs in the network pruned so far and A those of the original network (the
paper's asymmetric variant; layers are pruned in order, each seeing the already-pruned earlier layers).
F is weakly submodular, so forward greedy selection has a (1 - e^-gamma) guarantee. Everything runs on
second moments: G = B^T B and H = B^T A W, streamed from the calibration set, with incremental
Schur-complement updates (each step costs O(columns^2) per kept unit). A unit is a block of columns (its
channel's kernel taps, or a head's features); a constant-one column is always kept, so least squares
can move a removed unit's mean into the consumer's bias.

Re-weighting then solves the ridge problem min ||B_S X - T||^2 + lambda ||X - W_S||^2: the consumer's new
weights for the kept units. The ridge pulls toward the original weights; its strength is chosen by
cross-validation over calibration folds (from second moments alone), so when samples are scarce compared
with kept columns, where least squares interpolates the calibration set (algorithms.md 8), re-weighting
fades toward plain removal instead of over-fitting.
"""

from __future__ import annotations


import numpy as np
import torch

from ..calib.capture import PrefixCache, ReferenceInputs, capture, consumer_module
from .graph import ChannelGroup, Graph
from .registry import Method
from .structured import GroupDecision, _tensor_table, l1_scores, lowest


def unit_columns(group: ChannelGroup, consumer: tuple[str, int], taps: int) -> list[np.ndarray]:
    """Columns of the consumer's unfolded input that belong to each unit."""
    name, dim = consumer
    columns = []
    for slots in group.slots:
        positions = next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim))
        columns.append((np.asarray(positions)[:, None] * taps + np.arange(taps)[None, :]).ravel())
    return columns


class _Residual:
    """G and H after projecting out the chosen columns (Schur complements), updated per chosen block.

    Directions whose residual variance is below ``floor`` (a fixed fraction of the original mean variance)
    count as already explained: with fewer calibration rows than columns the residual becomes round-off,
    and inverting it would report gains that are noise.
    """

    def __init__(self, gram: np.ndarray, target: np.ndarray, relative_floor: float = 1e-5):
        self.r = gram.copy()
        self.h = target.copy()
        self.floor = relative_floor * max(float(np.trace(gram)) / max(len(gram), 1), 1e-300)

    def _inverse(self, cols: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(self.r[np.ix_(cols, cols)])
        keep = values > self.floor
        return (vectors[:, keep] / values[keep]) @ vectors[:, keep].T

    def add(self, cols: np.ndarray) -> float:
        """Project out the columns ``cols``; returns the objective they add."""
        inverse = self._inverse(cols)
        h_c = self.h[cols]
        gain = float(np.sum(h_c * (inverse @ h_c)))
        coupling = self.r[:, cols] @ inverse
        self.h -= coupling @ h_c
        self.r -= coupling @ self.r[cols]
        return gain

    def gains(self, blocks: list[np.ndarray]) -> np.ndarray:
        width = len(blocks[0])
        if width == 1:
            idx = np.array([b[0] for b in blocks])
            diag = self.r[idx, idx]
            energy = np.einsum("ij,ij->i", self.h[idx], self.h[idx])
            return np.where(diag > self.floor, energy / np.maximum(diag, self.floor), 0.0)
        idx = np.stack(blocks)
        blocks_r = self.r[idx[:, :, None], idx[:, None, :]]
        blocks_h = self.h[idx]
        values, vectors = np.linalg.eigh(blocks_r)
        projected = np.einsum("nij,nik->njk", vectors, blocks_h)  # eigenbasis coordinates of H
        weights = np.where(values > self.floor, 1.0 / np.maximum(values, self.floor), 0.0)
        return np.einsum("nj,njk->n", weights, projected ** 2)


EXHAUSTED = 1e-12  # a gain below this fraction of the whole objective is round-off


def greedy_keep(problems: list[tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]], keep: int) -> tuple[list[int], float, float]:
    """Units to keep, chosen greedily over the summed objective of all consumers.

    Each problem is (G, H, columns per unit, columns always kept: the ones column and inputs of other groups).
    Returns the chosen units (in order), the objective reached and the objective of keeping every unit.
    With fewer calibration rows than kept units the chosen ones can explain everything the data shows; every
    remaining gain is then zero, and the rest are kept in order of what each unit explains on its own.
    """
    states, reached = [], 0.0
    for gram, target, _, fixed in problems:
        state = _Residual(gram, target)
        if len(fixed):
            reached += state.add(fixed)
        states.append(state)
    total = _objective_of_all(problems)
    units = len(problems[0][2])
    remaining = list(range(units))
    solo = sum(state.gains([columns[u] for u in remaining]) for state, (_, _, columns, _) in zip(states, problems))
    chosen = []
    for _ in range(keep):
        gains = np.zeros(len(remaining))
        for state, (_, _, columns, _) in zip(states, problems):
            gains += state.gains([columns[u] for u in remaining])
        if gains.max() <= EXHAUSTED * max(total, 1e-300):
            gains = solo[remaining]
        pick = remaining.pop(int(np.argmax(gains)))
        chosen.append(pick)
        reached += sum(state.add(columns[pick]) for state, (_, _, columns, _) in zip(states, problems))
    return chosen, reached, total


def _objective_of_all(problems) -> float:
    total = 0.0
    for gram, target, columns, fixed in problems:
        cols = np.concatenate(columns + [fixed])
        state = _Residual(gram, target)
        total += state.add(np.sort(cols))
    return total


RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def refit(grams: list[np.ndarray], targets: list[np.ndarray], initial: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares for the kept columns with a ridge toward the original weights, chosen by cross-validation.

    ``grams``/``targets`` are per fold (G_f = B_f^T B_f, H_f = B_f^T T_f). For each ridge strength the fit on
    all folds but one is scored on the held-out fold, using second moments only:
    ||B_f X - T_f||^2 = tr(X^T G_f X) - 2 tr(X^T H_f) + const. Returns the weights fitted on every fold with
    the best strength, and that strength (lambda).
    """
    grams = [g[np.ix_(cols, cols)] for g in grams]
    targets = [t[cols] for t in targets]
    start = initial[cols]
    eye = np.eye(len(cols))

    def solve(gram, target, rho):
        lam = rho * max(float(np.trace(gram)) / len(cols), 1e-300)
        return np.linalg.solve(gram + lam * eye, target + lam * start), lam

    best_rho = RIDGE_GRID[1]
    if len(grams) > 1:
        errors = []
        for rho in RIDGE_GRID:
            error = 0.0
            for f in range(len(grams)):
                fit, _ = solve(sum(g for i, g in enumerate(grams) if i != f), sum(t for i, t in enumerate(targets) if i != f), rho)
                error += float(np.sum(fit * (grams[f] @ fit)) - 2 * np.sum(fit * targets[f]))
            errors.append(error)
        best_rho = RIDGE_GRID[int(np.argmin(errors))]
    return solve(sum(grams), sum(targets), best_rho)


def _fixed_columns(weight: torch.Tensor, unit_cols: list[np.ndarray], ones: list[int]) -> np.ndarray:
    """Columns kept regardless of this group: other groups' live inputs (a concatenation) and the ones column."""
    mine = np.concatenate(unit_cols)
    live = np.flatnonzero(_consumer_matrix(weight).any(axis=1))  # inputs already removed by another group are zero
    return np.array(sorted(set(live.tolist()) - set(mine.tolist())) + ones, dtype=np.int64)


def _consumer_matrix(weight: torch.Tensor) -> np.ndarray:
    """Consumer weight as (input columns, outputs)."""
    return weight.detach().double().reshape(weight.shape[0], -1).T.numpy()


def _reference_inputs(graph: Graph, context) -> ReferenceInputs | None:
    """The original model's inputs at the consumers of every group this run prunes, captured once per run."""
    if getattr(context, "original", None) is None:
        return None
    if "reference_inputs" not in context.cache:
        consumers = sorted({name for g in context.planned for name, dim in g.consumers if dim == 1})
        context.cache["reference_inputs"] = ReferenceInputs(context.original, consumers, context.calibration)
    return context.cache["reference_inputs"]


def submodular_select(graph: Graph, group: ChannelGroup, count: int, context, reweight: bool = True) -> GroupDecision:
    """Keep the units that best reconstruct the consumers' outputs; re-fit the consumers (asymmetric objective)."""
    model = graph.model
    keep = group.size - count
    consumers = [(name, dim) for name, dim in group.consumers if dim == 1]
    supported = consumers and len(consumers) == len(group.consumers) and all(consumer_module(model, n) for n, _ in consumers)
    if not supported:
        removed = lowest(l1_scores(graph, group), count)
        return GroupDecision(removed, info={"fallback": "consumer layer type not supported by submodular capture; pruned by L1"})
    names = [n for n, _ in consumers]
    reference = getattr(context, "original", None)
    early_exit = all(graph.use_count.get(n, 1) == 1 for n in names)
    stats = capture(model, names, context.calibration, reference=reference, early_exit=early_exit,
                    description=f"calibrating {group.name}", cached=_reference_inputs(graph, context),
                    prefix=context.cache.setdefault("prefix", PrefixCache()),
                    changes=tuple(sorted({slot.tensor.rpartition(".")[0] for unit in group.slots for slot in unit})))
    missing = [name for name in names if name not in stats]
    if missing:  # e.g. nn.MultiheadAttention reads out_proj.weight itself instead of calling out_proj
        removed = lowest(l1_scores(graph, group), count)
        return GroupDecision(removed, info={"fallback": f"{missing[0]} is read by its parent module, not called as a layer, "
                                                        "so its inputs cannot be captured; pruned by L1"})
    table = _tensor_table(model)
    ref_table = _tensor_table(reference) if reference is not None else table
    problems, biases, fold_grams, fold_targets = [], [], [], []
    for name in names:
        entry = stats[name]
        weight = ref_table[name]
        info = graph.layers.get(name)
        bias_name = info.bias if info else None
        bias = ref_table[bias_name].detach().double().numpy() if bias_name else np.zeros(weight.shape[0])
        w_full = np.vstack([_consumer_matrix(weight), bias[None, :]])  # (columns + ones, outputs)
        fold_targets.append([c.numpy() @ w_full for c in entry.crosses])
        fold_grams.append([g.numpy() for g in entry.grams])
        target, gram = sum(fold_targets[-1]), sum(fold_grams[-1])
        columns = unit_columns(group, (name, 1), entry.taps)
        ones = [gram.shape[0] - 1] if (bias_name or (info and info.batch_norm)) else []
        problems.append((gram, target, columns, _fixed_columns(table[name], columns, ones)))
        biases.append((bias_name, info, bool(ones)))
    chosen, reached, total = greedy_keep(problems, keep)
    kept = sorted(chosen)
    removed = sorted(set(range(group.size)) - set(kept))
    samples = min(entry.rows for entry in stats.values())
    kept_columns = max(len(np.concatenate([p[2][u] for u in kept] + [p[3]])) for p in problems)
    # A subset cannot explain more than every unit does; a ratio above 1 would only be round-off.
    info = {"objective": min(reached, total) / total if total > 0 else 1.0, "rows": samples, "kept_columns": kept_columns,
            "reweighted": reweight}
    if samples < 2 * kept_columns:
        message = (f"{group.name}: {samples} calibration rows for {kept_columns} kept columns; least squares is "
                   f"ill-posed below 2x (a ridge toward the original weights, chosen by cross-validation, limits over-fitting)")
        info["warning"] = message
    updates = {}
    if reweight:
        for (gram, target, columns, fixed), grams, targets, name, (bias_name, layer_info, has_ones) in zip(
                problems, fold_grams, fold_targets, names, biases):
            current = table[name]
            initial = np.vstack([_consumer_matrix(current), (table[bias_name].detach().double().numpy() if bias_name else np.zeros(current.shape[0]))[None, :]])
            cols = np.sort(np.concatenate([columns[u] for u in kept] + [fixed]))
            solution, lam = refit(grams, targets, initial, cols)
            info.setdefault("ridge", {})[name] = lam
            new = initial.copy()
            new[cols] = solution
            updates[name] = torch.from_numpy(new[:-1].T.copy()).reshape(current.shape).to(current.dtype)
            if has_ones:
                shift = new[-1] - initial[-1]
                if bias_name:
                    updates[bias_name] = torch.from_numpy(new[-1].copy()).to(current.dtype)
                elif layer_info and layer_info.batch_norm:
                    mean_name = layer_info.batch_norm["mean"]
                    updates[mean_name] = table[mean_name].detach() - torch.from_numpy(shift).to(current.dtype)
    return GroupDecision(removed, updates, info)


SUBMODULAR = Method("submodular", "greedy submodular selection of units with least-squares re-weighting (needs calibration data)",
                    kind="structured", needs_data=True, select=submodular_select)
SUBMODULAR_NO_REWEIGHT = Method("submodular-norw", "submodular selection, plain removal without re-weighting (needs calibration data)",
                                kind="structured", needs_data=True,
                                select=lambda graph, group, count, context: submodular_select(graph, group, count, context, reweight=False))
