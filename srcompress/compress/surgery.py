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

BatchNorm statistics (our extension, still data-free): when the units' producers end in BatchNorm, the
running statistics say the normalised output has mean beta and spread |gamma| over the training data. That
Gaussian pushed through the activations up to the consumer (ReLU6, GELU, pooling...), or summed along a
linear residual stream, gives each unit's input mean and variance. Costs are then measured in that space
(:func:`moment_correlations`, with the regression coefficient as merge factor, for any activation), and a
merge's expected error a_j * (E x_j - c E x_i) goes into the consumer's bias (or its BatchNorm's running mean).
With those statistics the fold is also refined: each removed unit's input is regressed on all survivors, ridge
regression centred on the pairwise fold (:func:`fold_coefficients`; method ``surgery-pairwise`` keeps the
paper's fold). Groups whose path holds anything else (max-pooling, products, no BatchNorm) keep the paper's
rule; the report says which saliency and which fold each group used and which consumers were compensated.

Under global allocation (``--scope global``) every group's merges are ranked together, each costed as a share of
its group's whole input energy at the consumers, so the budget goes where merging loses least.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from .graph import ChannelGroup, Graph
from .registry import Method
from .structured import GroupDecision, _tensor_table

HOMOGENEOUS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
               "max_pool2d_with_indices"}
LINEAR = {"batch_norm", "_native_batch_norm_legit_no_training", "add", "add_", "view", "reshape", "_unsafe_view",
          "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "clone", "unsqueeze", "squeeze", "expand",
          "cat", "dropout", "alias", "detach", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
          "adaptive_avg_pool2d", "adaptive_avg_pool3d", "getitem", "_to_copy", "to", "sub", "sub_"}
# Operators that keep each channel's mean (the expectation passes straight through them).
MEAN_PRESERVING = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "contiguous", "clone", "dropout", "alias",
                   "detach", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                   "adaptive_avg_pool3d", "_to_copy", "to"}
# Elementwise activations whose expectation under a Gaussian input is taken numerically.
ELEMENTWISE = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "gelu_", "silu",
               "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid",
               "hardsigmoid_", "elu", "elu_", "mish", "mish_", "softplus", "clamp", "clamp_"}
# A residual stream: each producer's output is added in, so the expected input is the sum of their betas.
STREAM = MEAN_PRESERVING | {"batch_norm", "add", "add_"}
_GRID = torch.linspace(-8.0, 8.0, 3201, dtype=torch.float64)
_GRID_WEIGHTS = torch.exp(-_GRID ** 2 / 2) / torch.exp(-_GRID ** 2 / 2).sum()
_CURVE_STRIDE = 8  # correlations between units' curves use every 8th grid point


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


def _bn_affine(table: dict[str, torch.Tensor], bn: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of a BatchNorm in float64, ones and zeros where it has no affine parameters."""
    size = table[bn["mean"]].shape
    gamma = table[bn["weight"]].detach().double() if bn["weight"] else torch.ones(size, dtype=torch.float64)
    beta = table[bn["bias"]].detach().double() if bn["bias"] else torch.zeros(size, dtype=torch.float64)
    return gamma, beta


def incoming(graph: Graph, group: ChannelGroup) -> np.ndarray:
    """One row per unit: its producers' weights with BatchNorm folded in, followed by the folded bias."""
    return np.hstack(incoming_blocks(graph, group, with_bias=True))


def incoming_blocks(graph: Graph, group: ChannelGroup, with_bias: bool) -> list[np.ndarray]:
    """Per producer, one row per unit of its BatchNorm-folded weights (and folded bias if ``with_bias``)."""
    table = _tensor_table(graph.model)
    blocks = []
    for name, dim in group.producers:
        info = graph.layers.get(name)
        weight = table[name].detach().double()
        bias = table[info.bias].detach().double() if info and info.bias else torch.zeros(weight.shape[dim], dtype=torch.float64)
        scale = torch.ones(weight.shape[dim], dtype=torch.float64)
        if info and info.batch_norm:
            bn = info.batch_norm
            gamma, beta = _bn_affine(table, bn)
            scale = gamma / torch.sqrt(table[bn["var"]].detach().double() + bn["eps"])
            bias = beta + scale * (bias - table[bn["mean"]].detach().double())
        rows = []
        for slots in group.slots:
            positions = next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim))
            index = torch.as_tensor(positions)
            block = weight.index_select(dim, index).movedim(dim, 0).reshape(len(positions), -1) * scale[index, None]
            rows.append((torch.cat([block, bias[index, None]], dim=1) if with_bias else block).flatten())
        blocks.append(torch.stack(rows).numpy())
    return blocks


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


def _bn_moments(graph: Graph, producer: str, group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean (beta) and spread (|gamma|) of each unit's BatchNorm output after ``producer``, or None."""
    info = graph.layers.get(producer)
    if info is None or info.batch_norm is None or group.unit_width != 1:
        return None
    gamma, beta = _bn_affine(_tensor_table(graph.model), info.batch_norm)
    slots = [next(s for s in unit if (s.tensor, s.dim) == (producer, 0)) for unit in group.slots]
    if any(len(s.positions) != 1 for s in slots):
        return None
    index = torch.as_tensor([int(s.positions[0]) for s in slots])
    return beta[index], gamma[index].abs()


def _through(chain, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor | None:
    """f(mean + spread * t) on the Gaussian grid t, one row per unit, f being the operators after the BatchNorm."""
    samples = mean[:, None] + spread[:, None] * _GRID[None, :]
    for name, target, args, kwargs in chain:
        if name in MEAN_PRESERVING:
            continue
        if name not in ELEMENTWISE or any(isinstance(a, torch.fx.Node) for a in (*args, *kwargs.values())):
            return None
        samples = target(samples.clone(), *args, **kwargs)
    return samples


@dataclass
class InputMoments:
    """A consumer's view of each unit: input mean and variance, and the input on the Gaussian grid if nonlinear."""

    mean: np.ndarray
    variance: np.ndarray
    curves: np.ndarray | None  # (units, grid points) or None along a linear path


def input_moments(graph: Graph, group: ChannelGroup) -> dict[str, InputMoments]:
    """Per consumer weight, each unit's input mean and variance implied by the BatchNorm statistics (data-free).

    Consumers whose input cannot be predicted this way (no BatchNorm, max-pooling, products, grouped
    convolutions, multi-channel units, no bias or BatchNorm to absorb a shift) are left out. Along a
    residual stream the producers' outputs are taken as uncorrelated.
    """
    moments = {}
    for consumer, dim in group.consumers:
        if dim != 1 or not absorbs_shift(graph, consumer):
            continue
        direct = [p for p, _ in group.producers if p in graph.layers and consumer in graph.layers[p].feeds]
        normalised = [_bn_moments(graph, p, group) for p in direct]
        if not direct or any(m is None for m in normalised):
            continue
        chain = graph.layers[direct[0]].chain
        if len(direct) == 1 and chain and chain[0][0] == "batch_norm":
            curves = _through(chain[1:], *normalised[0])
            if curves is not None:
                mean = curves @ _GRID_WEIGHTS
                variance = (curves ** 2 @ _GRID_WEIGHTS - mean ** 2).clamp_min(0.0)
                moments[consumer] = InputMoments(mean.numpy(), variance.numpy(), curves.numpy())
        elif all(graph.layers[p].ops_after - {"output"} <= STREAM for p in direct):
            moments[consumer] = InputMoments(sum(beta for beta, _ in normalised).numpy(),
                                             sum(gamma ** 2 for _, gamma in normalised).numpy(), None)
    return moments


def absorbs_shift(graph: Graph, consumer: str) -> bool:
    """True if a constant added to ``consumer``'s input can be moved into its bias or following BatchNorm."""
    info = graph.layers.get(consumer)
    owner = graph.model.get_submodule(consumer.rpartition(".")[0]) if "." in consumer else graph.model
    if isinstance(owner, nn.modules.conv._ConvNd) and owner.groups != 1:
        return False
    return info is not None and (info.bias is not None or info.batch_norm is not None)


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


def moment_correlations(blocks: list[np.ndarray], curves: np.ndarray | None, mode: str) -> np.ndarray:
    """rho[i, j], the estimated correlation of units i and j at the consumer's input.

    As in the paper it comes from the weights alone (white inputs): the cosine of the folded incoming
    weights, multiplied along chained producers (expansion then depthwise) and taken over all of them together
    for producers added in parallel (a residual stream). Through a nonlinearity it is scaled by the correlation
    the two units' outputs would have if their normalised inputs were identical (or opposite), computed on the
    Gaussian grid.
    """
    if mode == "linear":
        blocks = [np.hstack(blocks)]
    rho = np.ones((len(blocks[0]), len(blocks[0])))
    for block in blocks:
        norms = np.clip(np.linalg.norm(block, axis=1), 1e-300, None)
        rho *= (block @ block.T) / norms[:, None] / norms[None, :]
    rho = np.clip(rho, -1.0, 1.0)
    if curves is not None:
        curves = curves[:, ::_CURVE_STRIDE]
        weights = _GRID_WEIGHTS.numpy()[::_CURVE_STRIDE] / _GRID_WEIGHTS.numpy()[::_CURVE_STRIDE].sum()
        centred = curves - (curves @ weights)[:, None]
        spread = np.sqrt(np.clip((centred ** 2) @ weights, 0.0, None))
        norm = np.where(spread > 0, 1.0 / np.clip(spread, 1e-300, None), 0.0)
        same = (centred * weights) @ centred.T * norm[:, None] * norm[None, :]
        opposite = (centred * weights) @ centred[:, ::-1].T * norm[:, None] * norm[None, :]
        rho = np.where(rho >= 0, rho * same, -rho * opposite)
    return rho


def regression_costs(rho: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D[i, j] = var_j * (1 - rho_ij^2), what is left of input j after regressing it on input i, and the
    regression coefficient C[i, j] = rho_ij * sqrt(var_j / var_i); the last row deletes j outright (C = 0)."""
    var = np.clip(variance, 0.0, None)
    dist = var[None, :] * (1 - rho ** 2)
    coef = rho * np.sqrt(var[None, :] / np.clip(var[:, None], 1e-300, None))
    np.fill_diagonal(dist, np.inf)
    return np.vstack([dist, var[None, :]]), np.vstack([coef, np.zeros((1, len(var)))])


def greedy_merges(u: np.ndarray, a: np.ndarray, mode: str, steps: int, costs=None) -> list[tuple[int, int, float, float]]:
    """(removed j, survivor i or -1, factor c, saliency) for ``steps`` lowest-saliency removals in turn.

    ``a`` (outgoing weights, one row per unit) is updated in place by every merge. ``costs`` (D, C) replaces
    the weight-space :func:`pair_costs` of ``u``.
    """
    n = len(u)
    dist, coef = costs if costs is not None else pair_costs(u, mode)
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


RIDGE = 1.0  # least-squares fold: penalty on leaving the pairwise fold, as a multiple of each survivor's variance


@dataclass
class _Plan:
    """A group's full greedy merge sequence, to the floor, with each merge's saliency on a common scale."""

    mode: str
    merges: list[tuple[int, int, float, float]]
    curve: list[float]  # saliency / (mean <a^2> * mean input energy of a unit)
    moments: dict[str, InputMoments]  # consumers whose input mean is known (their bias takes the merges' error)
    covariance: np.ndarray | None  # units' input covariance at the consumers, when every consumer's is known


def _plan(graph: Graph, group: ChannelGroup, context) -> _Plan:
    mode = activation_mode(graph, group)
    u = incoming(graph, group)
    a = outgoing(graph, group)
    floor = max(1, int(np.ceil(context.spec.min_keep * group.size)))
    moments = input_moments(graph, group)
    covariance = None
    if moments and len(moments) == len(group.consumers):  # costs in the consumers' input units, averaged
        variance = np.mean([m.variance for m in moments.values()], axis=0)
        curves = next((m.curves for m in moments.values() if m.curves is not None), None)
        rho = moment_correlations(incoming_blocks(graph, group, with_bias=False), curves, mode)
        spread = np.sqrt(np.clip(variance, 0.0, None))
        costs, covariance = regression_costs(rho, variance), rho * spread[:, None] * spread[None, :]
        scale = float((a ** 2).mean() * variance.mean()) or 1.0
    else:
        costs = None
        scale = float((a ** 2).mean() * (u ** 2).sum(axis=1).mean()) or 1.0
    merges = greedy_merges(u, a.copy(), mode, group.size - floor, costs)
    return _Plan(mode, merges, [s / scale for _, _, _, s in merges], moments, covariance)


def surgery_select(graph: Graph, group: ChannelGroup, count: int, context, refine: bool = True) -> GroupDecision:
    """Remove ``count`` units of ``group`` by surgery; the full saliency curve (to the floor) goes in ``info``.

    With ``refine`` and a known input covariance the fold is refined by least squares (:func:`fold_coefficients`);
    otherwise each removed unit goes to its one survivor, as in the paper.
    """
    plan = _plan(graph, group, context)
    threshold = getattr(context.spec, "stop_threshold", None)
    if threshold is not None:
        count = next((k for k, s in enumerate(plan.curve) if s > threshold), len(plan.curve))
    chosen = plan.merges[:count]
    covariance = plan.covariance if refine else None
    kept, removed, gamma = fold_coefficients(group.size, chosen, covariance)
    updates = fold_updates(graph, group, kept, removed, gamma, {name: m.mean for name, m in plan.moments.items()})
    return GroupDecision(removed.tolist(), updates,
                         {"mode": plan.mode, "approximate": plan.mode == "approximate",
                          "saliency_curve": [round(v, 8) for v in plan.curve],
                          "merged": sum(1 for _, i, _, _ in chosen if i >= 0),
                          "saliency": "batchnorm statistics" if plan.covariance is not None else "weights",
                          "fold": "least squares" if covariance is not None else "pairwise",
                          "mean_compensated": sorted(plan.moments)})


def surgery_removal_costs(graph: Graph, group: ChannelGroup, context) -> np.ndarray:
    """Each successive merge's saliency as a share of the group's whole input energy at its consumers (the
    curve divided by the unit count), so that groups compare under global allocation; the floor is infinite."""
    curve = np.asarray(_plan(graph, group, context).curve) / group.size
    return np.concatenate([curve, np.full(group.size - len(curve), np.inf)])


def fold_coefficients(size: int, merges, covariance: np.ndarray | None = None,
                      ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept units, removed units, Gamma): removed unit r's outgoing weights go to kept unit k times Gamma[k, r].

    The merges alone give the paper's fold (chains composed: a unit that absorbed others and is then merged
    carries them along). With the units' input ``covariance`` each removed input is further regressed on all
    survivors, ridge regression centred on that fold with a penalty of ``ridge`` times each survivor's
    variance: Gamma = G + (S_kk + ridge diag S_kk)^-1 (S_kr - S_kk G). What a survivor already explains
    exactly (a duplicate, a scaled copy) leaves nothing to refine, so exact merges stay exact.
    """
    removed = np.array(sorted(j for j, _, _, _ in merges), dtype=int)
    kept = np.setdiff1d(np.arange(size), removed)
    compose = np.eye(size)
    for j, i, c, _ in merges:
        if i >= 0:
            compose[i] += c * compose[j]
    gamma = compose[np.ix_(kept, removed)]
    if covariance is None or not len(removed) or not len(kept):
        return kept, removed, gamma
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)  # the estimate need not be positive semidefinite
    covariance = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    among = covariance[np.ix_(kept, kept)]
    system = among + ridge * np.diag(np.diag(among)) + 1e-9 * max(float(np.diag(among).mean()), 1e-300) * np.eye(len(kept))
    return kept, removed, gamma + np.linalg.solve(system, covariance[np.ix_(kept, removed)] - among @ gamma)


def fold_updates(graph: Graph, group: ChannelGroup, kept: np.ndarray, removed: np.ndarray, gamma: np.ndarray,
                 means: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Consumer weights with each removed unit's outgoing slice added to the kept units' (times ``gamma``).

    For consumers in ``means`` the expected error left, slice_r * (E x_r - sum_k gamma[k, r] E x_k), goes
    into the consumer's bias, or is taken off the running mean of the BatchNorm that follows it.
    ``means[name][j]`` is unit j's input mean, one number or one per position the consumer reads it at (a
    flattened feature map).
    """
    table = _tensor_table(graph.model)
    updates = {}
    if not len(removed):
        return updates
    coefficients = torch.from_numpy(gamma)
    for name, dim in group.consumers:
        weight = table[name].detach()
        index = torch.as_tensor(np.array([next(s.positions for s in slots if (s.tensor, s.dim) == (name, dim))
                                          for slots in group.slots]))
        moved = weight.double().movedim(dim, 0).clone()
        slices = moved[index]  # (units, positions, the consumer's other dims...)
        lost = slices[torch.as_tensor(removed)]
        moved[index[torch.as_tensor(kept)]] += torch.tensordot(coefficients, lost, dims=1)
        updates[name] = moved.movedim(0, dim).to(weight.dtype)
        mean = means.get(name)
        if mean is None:
            continue
        residual = torch.as_tensor(mean[removed] - gamma.T @ mean[kept], dtype=torch.float64)
        residual = residual.reshape(len(removed), -1, *[1] * (lost.dim() - 2))  # per unit, per position or one for all
        shift = (lost * residual).movedim(2, 0).reshape(lost.shape[2], -1).sum(1)  # dim 2: the consumer's outputs
        info = graph.layers[name]
        if info.bias is not None:
            updates[info.bias] = table[info.bias].detach() + shift.to(weight.dtype)
        else:
            running = info.batch_norm["mean"]
            updates[running] = table[running].detach() - shift.to(weight.dtype)
    return updates


SURGERY = Method("surgery", "merge near-duplicate units into their most similar survivor (data-free)", kind="structured",
                 select=surgery_select, removal_costs=surgery_removal_costs, default_scope="global", stops_at_threshold=True)
SURGERY_PAIRWISE = Method("surgery-pairwise", "surgery with the paper's fold only: each removed unit into one survivor",
                          kind="structured", select=partial(surgery_select, refine=False), removal_costs=surgery_removal_costs,
                          default_scope="global", stops_at_threshold=True)
