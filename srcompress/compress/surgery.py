"""Data-free surgery (Srinivas & Babu, BMVC 2015): merge near-duplicate units, no data needed.

Two units with the same incoming weights compute the same activation, so one can be deleted and its
outgoing weights added to the other's without changing the function. For near-duplicates the change is
bounded by the saliency of deleting unit j in favour of survivor i,

    s(i, j) = <a_j^2> * ||u_j - c u_i||^2,

where u are incoming weights (BatchNorm folded in, bias appended as the weight of a constant input),
<a_j^2> is the mean squared outgoing weight of j, and c = 1 (the paper). When the operators between this
layer and the next are positively homogeneous (ReLU, max-pooling, or none at all) a unit that is a positive
multiple of another is redundant too, so c is the least-squares factor <u_i, u_j> / ||u_i||^2 (clamped at
0 for ReLU-like chains) and the merge adds c * a_j. Elsewhere (GELU, ReLU6, attention heads) merging is
the paper's approximation, with c in {0, 1}: the report lists those groups.

Units are removed greedily, lowest saliency first; only the survivor's outgoing weights change, so each
step updates one unit's <a^2> and the best partner of the units that pointed at the removed one.
"""

from __future__ import annotations

import numpy as np
import torch

from .graph import ChannelGroup, Graph
from .registry import Method
from .structured import GroupDecision, _tensor_table

HOMOGENEOUS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
               "max_pool2d_with_indices"}
LINEAR = {"batch_norm", "_native_batch_norm_legit_no_training", "add", "add_", "view", "reshape", "_unsafe_view",
          "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "clone", "unsqueeze", "squeeze", "expand",
          "cat", "dropout", "alias", "detach", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
          "adaptive_avg_pool2d", "adaptive_avg_pool3d", "getitem", "_to_copy", "to", "sub", "sub_"}


def activation_mode(graph: Graph, group: ChannelGroup) -> str:
    """"linear", "homogeneous" (ReLU-like) or "approximate" for the operators after the group's producers."""
    ops = set()
    for name, _ in group.producers:
        info = graph.layers.get(name)
        if info is None:
            return "approximate"
        ops |= info.ops_after
    ops.discard("output")
    if ops <= LINEAR:
        return "linear"
    if ops <= LINEAR | HOMOGENEOUS:
        return "homogeneous"
    return "approximate"


def incoming(graph: Graph, group: ChannelGroup) -> np.ndarray:
    """One row per unit: its producers' weights with BatchNorm folded in, followed by the folded bias."""
    table = _tensor_table(graph.model)
    rows = [[] for _ in range(group.size)]
    for name, dim in group.producers:
        info = graph.layers.get(name)
        weight = table[name].detach().double()
        bias = table[info.bias].detach().double() if info and info.bias else torch.zeros(weight.shape[dim], dtype=torch.float64)
        scale = torch.ones(weight.shape[dim], dtype=torch.float64)
        if info and info.batch_norm:
            bn = info.batch_norm
            gamma = table[bn["weight"]].detach().double() if bn["weight"] else torch.ones_like(scale)
            beta = table[bn["bias"]].detach().double() if bn["bias"] else torch.zeros_like(scale)
            scale = gamma / torch.sqrt(table[bn["var"]].detach().double() + bn["eps"])
            bias = beta + scale * (bias - table[bn["mean"]].detach().double())
        for unit, slots in enumerate(group.slots):
            positions = next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim))
            index = torch.as_tensor(positions)
            block = weight.index_select(dim, index).movedim(dim, 0).reshape(len(positions), -1) * scale[index, None]
            rows[unit].append(torch.cat([block, bias[index, None]], dim=1).flatten())
    return torch.stack([torch.cat(r) for r in rows]).numpy()


def outgoing(graph: Graph, group: ChannelGroup) -> np.ndarray:
    """One row per unit: every consumer weight slice that reads it, flattened."""
    table = _tensor_table(graph.model)
    rows = [[] for _ in range(group.size)]
    for name, dim in group.consumers:
        weight = table[name].detach().double()
        for unit, slots in enumerate(group.slots):
            positions = next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim))
            rows[unit].append(weight.index_select(dim, torch.as_tensor(positions)).flatten())
    return torch.stack([torch.cat(r) for r in rows]).numpy()


def pair_costs(u: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """D[i, j] = ||u_j - C[i, j] u_i||^2 and the merge factor C for deleting j in favour of i.

    A last row (index n) stands for "no partner": deleting j outright (C = 0, D = ||u_j||^2).
    """
    gram = u @ u.T
    sq = np.clip(np.diag(gram), 1e-300, None)
    if mode == "approximate":
        coef = np.ones_like(gram)
        dist = sq[:, None] + sq[None, :] - 2 * gram
    else:
        coef = gram / sq[:, None]
        if mode == "homogeneous":
            coef = np.clip(coef, 0.0, None)
        dist = sq[None, :] - 2 * coef * gram + coef ** 2 * sq[:, None]
    dist = np.clip(dist, 0.0, None)
    np.fill_diagonal(dist, np.inf)
    dist = np.vstack([dist, sq[None, :]])
    coef = np.vstack([coef, np.zeros((1, len(u)))])
    return dist, coef


def greedy_merges(u: np.ndarray, a: np.ndarray, mode: str, steps: int) -> list[tuple[int, int, float, float]]:
    """(removed j, survivor i or -1, factor c, saliency) for ``steps`` lowest-saliency removals in turn.

    ``a`` (outgoing weights, one row per unit) is updated in place by every merge.
    """
    n = len(u)
    dist, coef = pair_costs(u, mode)
    alive = np.ones(n + 1, dtype=bool)  # the last row ("delete outright") never dies
    a2 = (a ** 2).mean(axis=1)
    best = np.argmin(dist, axis=0)
    best_cost = dist[best, np.arange(n)]
    merges = []
    for _ in range(steps):
        saliency = np.where(alive[:n], a2 * best_cost, np.inf)
        j = int(np.argmin(saliency))
        i = int(best[j])
        c = float(coef[i, j])
        merged = i < n and c != 0.0  # a factor of 0 is an outright deletion
        merges.append((j, i if merged else -1, c if merged else 0.0, float(saliency[j])))
        alive[j] = False
        if merged:
            a[i] += c * a[j]
            a2[i] = float((a[i] ** 2).mean())
        stale = np.flatnonzero(alive[:n] & (best == j))
        if len(stale):
            masked = np.where(alive[:, None], dist[:, stale], np.inf)
            best[stale] = np.argmin(masked, axis=0)
            best_cost[stale] = masked[best[stale], np.arange(len(stale))]
    return merges


def surgery_select(graph: Graph, group: ChannelGroup, count: int, context) -> GroupDecision:
    """Remove ``count`` units of ``group`` by surgery; the full saliency curve (to the floor) goes in ``info``."""
    mode = activation_mode(graph, group)
    u = incoming(graph, group)
    a = outgoing(graph, group)
    floor = max(1, int(np.ceil(context.spec.min_keep * group.size)))
    curve_steps = group.size - floor
    merges = greedy_merges(u, a.copy(), mode, curve_steps)
    scale = float((a ** 2).mean() * (u ** 2).sum(axis=1).mean()) or 1.0
    curve = [s / scale for _, _, _, s in merges]
    threshold = getattr(context.spec, "stop_threshold", None)
    if threshold is not None:
        count = next((k for k, s in enumerate(curve) if s > threshold), len(curve))
    chosen = merges[:count]
    updates = _merge_updates(graph, group, chosen)
    return GroupDecision(sorted(j for j, _, _, _ in chosen), updates,
                         {"mode": mode, "approximate": mode == "approximate", "saliency_curve": [round(v, 8) for v in curve],
                          "merged": sum(1 for _, i, _, _ in chosen if i >= 0)})


def _merge_updates(graph: Graph, group: ChannelGroup, merges) -> dict[str, torch.Tensor]:
    """Consumer weights with each removed unit's outgoing slice added (times c) to its survivor's."""
    table = _tensor_table(graph.model)
    updates = {}
    for name, dim in group.consumers:
        tensor = table[name].detach().clone()
        positions = [next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim)) for slots in group.slots]
        for j, i, c, _ in merges:
            if i < 0 or c == 0.0:
                continue
            source = tensor.index_select(dim, torch.as_tensor(positions[j]))
            target = torch.as_tensor(positions[i])
            tensor.index_copy_(dim, target, tensor.index_select(dim, target) + c * source)
        updates[name] = tensor
    return updates


SURGERY = Method("surgery", "merge near-duplicate units into their most similar survivor (data-free)", kind="structured",
                 select=surgery_select)
