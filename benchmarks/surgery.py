"""Data-free surgery against plain removal chosen by L1 norm and at random, with no data and no fine-tuning.

MNIST CNN (pretrained, digit-recognizer-py): accuracy on all 5,000 MNIST-5k digits (nothing is seen while
pruning, so every image is held out) and mean KL divergence from the dense model, at 25/50/75 % and
80-95 % of the fully connected layer's neurons (the paper's MNIST claim is set against the last) and at 10/25/50 % of
the conv channels; and at 50/75 % of all units, each group losing that fraction or under surgery's global allocation
(see below).
MobileNetV2 (ImageNet weights): top-1 agreement and mean KL against the dense model on 144 crops of nine
real photos, at 10/25/50 % of channels, for every channel group and for the block-internal (expansion)
groups only, each group losing that fraction; and for every group under surgery's global allocation
(``--scope global``: the cheapest merges network-wide), where L1 and random remove the same number of units from
each group. Random is the mean of three seeds. On MobileNetV2 ``surgery-pairwise`` (the paper's fold, each removed
channel into one survivor) shows what the least-squares fold adds; on the MNIST CNN no group has BatchNorm
statistics, so surgery there is the paper's fold already. Also times surgery on MobileNetV2's widest group.

Two additions make "does surgery beat L1 here" answerable. Each surgery row carries a paired comparison with L1
on the same images: how many only surgery gets right (agrees with dense) and how many only L1 does, with the
exact two-sided sign-test p-value, and the share of images where surgery's KL is the lower. And
``surgery-measured`` runs the same merge rule with each unit's input mean and covariance *measured* on
calibration images (every 8th MNIST-5k train digit, 500 of the 5,000 evaluated; 64 crops of the nine
calibration photos, none of them evaluated) instead of estimated from weights and BatchNorm statistics. It is
not data-free; it shows how much of the gap to dense is left by the data-free estimates and how much by
merging itself.

    python -m benchmarks.surgery [--quick]
    python -m benchmarks.surgery --diagnostics   # results/surgery_diagnostics.md

``--diagnostics`` shows where surgery loses and why its CLI default is ``--scope global``: each MobileNetV2 channel
group pruned alone by 25 % (surgery against L1), and surgery under both scopes on MiniLM at equal parameter
counts (mean cosine of sentence embeddings to dense).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from srcompress import assets
from srcompress.calib.capture import capture, consumer_module
from srcompress.compress.graph import build_graph
from srcompress.compress.registry import Method, get_method
from srcompress.compress.structured import GroupDecision, StructuredSpec, lowest
from srcompress.compress.surgery import (absorbs_shift, activation_mode, fold_coefficients, fold_updates, greedy_merges, incoming,
                                         outgoing, regression_costs, surgery_select)
from srcompress.pipeline import StructuredContext, prune_structured

from .common import write_results

MOBILENET_INTERNAL_ONLY = ("*.conv.2", "features.1.conv.1", "features.0.0", "features.18.0")


def _prune(dense, inputs, spec, method):
    model = copy.deepcopy(dense)
    return model, prune_structured(model, inputs, spec, method)


def _per_image(model, images, reference, labels=None):
    """Per image: right (correct label, or agrees with dense if no labels), agrees with dense, KL from dense."""
    with torch.no_grad():
        out = model(images).log_softmax(-1)
    agrees = (out.argmax(1) == reference.argmax(1)).numpy()
    right = (out.argmax(1) == labels).numpy() if labels is not None else agrees
    return right, agrees, (reference.exp() * (reference - out)).sum(1).numpy()


def _fidelity(per_image, labelled: bool) -> dict:
    right, agrees, kl = per_image
    return {"accuracy": float(right.mean()) if labelled else None, "agreement": float(agrees.mean()), "kl": float(kl.mean())}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value for ``wins`` against ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n)


def paired(this, l1) -> dict:
    """Paired comparison on the same images: per-image results of one method against L1's."""
    only_this, only_l1 = int((this[0] & ~l1[0]).sum()), int((l1[0] & ~this[0]).sum())
    return {"only_this_right": only_this, "only_l1_right": only_l1, "sign_p": sign_test(only_this, only_l1),
            "kl_lower_share": float((this[2] < l1[2]).mean())}


def following(method, counts: dict[str, int]) -> Method:
    """``method`` removing exactly ``counts[group name]`` units per group under global allocation (so it can be
    compared with surgery at surgery's own allocation): its removal costs are 0 for that many units, then infinite."""
    base = get_method(method, structured=True)

    def removal_costs(graph, group, context):
        take = counts.get(group.name, 0)
        return np.concatenate([np.zeros(take), np.full(group.size - take, np.inf)])

    def select(graph, group, count, context):
        if base.select:
            return base.select(graph, group, count, context)
        return GroupDecision(lowest(base.unit_score(graph, group, context), count))

    return Method(getattr(method, "name", method), base.summary, kind="structured", select=select, removal_costs=removal_costs)


def _sweep(dense, inputs, images, reference, labels, points, methods, seeds):
    """``points``: (setting, excluded groups, amounts, allocation). Under global allocation surgery (first in
    ``methods``) allocates and every other method removes the same number of units from each group."""
    rows = []
    for setting, exclude, amounts, allocation in points:
        for amount in amounts:
            point_rows, per_image, counts = [], {}, None
            for method in methods:
                name = getattr(method, "name", method)
                runs = []
                for seed in (seeds if method == "random" else [0]):
                    spec = StructuredSpec(amount, allocation=allocation, exclude=exclude, seed=seed)
                    model, report = _prune(dense, inputs, spec, following(method, counts) if counts else method)
                    if allocation == "global" and counts is None:
                        counts = {g["name"]: g["units_before"] - g["units_after"] for g in report.groups}
                    per_image[name] = _per_image(model, images, reference, labels)
                    runs.append({**_fidelity(per_image[name], labels is not None),
                                 "params_removed": 1 - report.after["params"] / report.before["params"]})
                row = {"setting": setting, "amount": amount, "allocation": allocation, "method": name}
                for key in runs[0]:
                    values = [r[key] for r in runs if r[key] is not None]
                    row[key] = statistics.mean(values) if values else None
                point_rows.append(row)
            for row in point_rows:
                if row["method"].startswith("surgery"):
                    row["vs_l1"] = paired(per_image[row["method"]], per_image["l1"])
                print(row, flush=True)
            rows += point_rows
    return rows


class InputStatistics:
    """Each capturable conv/linear layer's input mean and covariance over one calibration batch, from the
    calibration capture's second moments (conv inputs as patches: kernel taps averaged per channel)."""

    def __init__(self, model: nn.Module, batch: torch.Tensor):
        names = [f"{n}.weight" for n, _ in model.named_modules() if consumer_module(model, f"{n}.weight") is not None]
        self.moments = {}
        for name, stats in capture(model, names, [(batch,)], folds=1).items():
            second = (stats.gram / stats.rows).numpy()
            mean = second[-1, :-1]  # the ones column is last
            self.moments[name] = (mean, second[:-1, :-1] - np.outer(mean, mean), np.diag(second)[:-1], stats.taps)

    def units(self, weight: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """For the units read at ``index`` (units, positions) of ``weight``'s input: means (units, positions),
        covariance and second moments summed over positions; None if that input was not captured."""
        if weight not in self.moments:
            return None
        mean, cov, second, taps = self.moments[weight]
        columns = index[:, :, None] * taps + np.arange(taps)  # (units, positions, taps)
        total = sum(cov[np.ix_(columns[:, p, t], columns[:, p, t])] for p in range(index.shape[1]) for t in range(taps))
        return mean[columns].mean(2), total / taps, second[columns].sum((1, 2)) / taps


def measured_surgery(stats: InputStatistics) -> Method:
    """Surgery's greedy merging with costs var_j (1 - rho_ij^2), regression merge factors, the least-squares fold
    and mean compensation from measured input statistics (not data-free). Groups whose inputs were not recorded, or that reach a
    consumer other than through its input channels, fall back to data-free surgery."""

    def select(graph, group, count, context):
        measured = {}
        for consumer, dim in group.consumers:
            index = np.array([next(s.positions for s in slots if (s.tensor, s.dim) == (consumer, dim)) for slots in group.slots])
            found = stats.units(consumer, index) if dim == 1 and absorbs_shift(graph, consumer) else None
            if found is None:
                return surgery_select(graph, group, count, context)
            measured[consumer] = found
        cov = np.mean([c for _, c, _ in measured.values()], axis=0)
        second = np.mean([m for _, _, m in measured.values()], axis=0)
        var = np.clip(np.diag(cov), 0.0, None)
        varies = var > 1e-5 * second  # beyond float32 round-off of the second moment: a constant explains nothing
        scale = np.where(varies, 1.0 / np.sqrt(np.where(varies, var, 1.0)), 0.0)
        costs = regression_costs(np.clip(cov * scale[:, None] * scale[None, :], -1.0, 1.0), var)
        merges = greedy_merges(incoming(graph, group), outgoing(graph, group), activation_mode(graph, group), count, costs)
        kept, removed, gamma = fold_coefficients(group.size, merges, cov)
        updates = fold_updates(graph, group, kept, removed, gamma, {name: mean for name, (mean, _, _) in measured.items()})
        return GroupDecision(removed.tolist(), updates)

    return Method("surgery-measured", "surgery with measured input statistics", kind="structured", select=select)


PAPER_FC_AMOUNTS = [0.8, 0.85, 0.9, 0.95]  # fc neurons removed, toward the paper's MNIST point
PAPER_TOLERANCE = 0.01  # "without significantly affecting performance", read as within one accuracy point of dense


def mnist(quick: bool) -> list[dict]:
    dense = assets.pretrained_digit_cnn()
    images, labels = assets.mnist5k("all")
    with torch.no_grad():
        reference = dense(images).log_softmax(-1)
    points = [("fc", ("conv_layers*",), [0.25, 0.5, 0.75] + ([] if quick else PAPER_FC_AMOUNTS), "uniform"),
              ("conv", ("fc_layers*",), [0.1, 0.25, 0.5], "uniform")]
    if not quick:
        points += [("all groups", (), [0.5, 0.75], "uniform"), ("all groups, surgery's allocation", (), [0.5, 0.75], "global")]
    methods = ["surgery", "l1", "random"] + ([] if quick else [measured_surgery(InputStatistics(dense, assets.mnist5k("train")[0][::8]))])
    rows = _sweep(dense, (images[:1],), images, reference, labels, points, methods, [0, 1, 2])
    dense_metrics = _fidelity(_per_image(dense, images, reference, labels), True)
    return [{"setting": "dense", "amount": 0.0, "allocation": "uniform", "method": "dense", **dense_metrics, "params_removed": 0.0}] + rows


def fc_share(model: nn.Module) -> float:
    """Share of the model's parameters in its first fully connected layer (all a fc-only pruning can remove)."""
    fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return sum(p.numel() for p in fc.parameters()) / sum(p.numel() for p in model.parameters())


def dead_fc_units(model: nn.Module, images: torch.Tensor) -> tuple[int, int, int]:
    """(units of the first fc layer that never fire on ``images`` after its ReLU, units, how many of the lowest-L1 units
    in a row are such dead units): up to that count L1's removals are exact, and surgery can at best tie them."""
    fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    seen = []
    handle = fc.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    dead = (torch.cat(seen) <= 0).all(0)
    by_l1 = dead[torch.argsort(fc.weight.detach().abs().sum(1))]
    return int(dead.sum()), len(dead), int(by_l1.cumprod(0).sum())


def dead_fc_sentence(dead: int, units: int, leading: int) -> str:
    return (f"{dead} of the fc layer's {units} neurons ({dead / units:.0%}) never fire on the 5,000 digits, and its "
            f"{leading} lowest-L1 neurons ({leading / units:.0%}) are all among them: up to that fraction L1 only removes "
            f"units whose output is always zero, so its model is exact and surgery can at best tie it; a little beyond, "
            f"L1 still removes mostly dead units. Telling a unit that never fires needs inputs; surgery sees none.")


def paper_comparison(rows: list[dict], share: float) -> str:
    """The paper's MNIST claim (up to 85 % of all parameters from the fc layers, no data, no retraining) set against
    the largest fc pruning each method survives here within PAPER_TOLERANCE of dense accuracy."""
    dense = next(r["accuracy"] for r in rows if r["method"] == "dense")
    fc = [r for r in rows if r["setting"] == "fc"]

    def best(method):
        within = [r for r in fc if r["method"] == method and r["accuracy"] >= dense - PAPER_TOLERANCE]
        return max(within, key=lambda r: r["amount"], default=None)

    lines = [f"Against the paper (Srinivas & Babu 2015: up to 85 % of an MNIST LeNet's parameters removed from its fc layer, "
             f"no data, no retraining). Its 500-unit ip1 holds 93 % of LeNet's 431k parameters, so 85 % of the total is about "
             f"90 % of ip1's neurons. Here the first fc layer holds {share:.1%} of the CNN's parameters, so fc pruning alone "
             f"can remove at most that much. Largest fc pruning within {PAPER_TOLERANCE * 100:.0f} accuracy point of dense "
             f"({dense:.4f}):", ""]
    for method in ("surgery", "l1", "random"):
        row = best(method)
        lines.append(f"- {method}: " + (f"{row['amount']:.0%} of fc neurons, {row['params_removed']:.1%} of all parameters, "
                                         f"accuracy {row['accuracy']:.4f}" if row else "none of the measured points"))
    return "\n".join(lines)


def mobilenet(quick: bool) -> list[dict]:
    dense = assets.pretrained_mobilenet_v2()
    images = assets.image_crops("test", 48 if quick else 144)
    with torch.no_grad():
        reference = dense(images).log_softmax(-1)
    points = [("all groups", (), [0.1, 0.25, 0.5], "uniform"),
              ("block-internal groups", MOBILENET_INTERNAL_ONLY, [0.1, 0.25, 0.5], "uniform"),
              ("all groups, surgery's allocation", (), [0.1, 0.25, 0.5], "global")]
    methods = ["surgery", "l1", "random"] + ([] if quick else ["surgery-pairwise"])
    if not quick:
        calib = assets.image_crops("calib", 64)
        methods.append(measured_surgery(InputStatistics(dense, calib)))
    return _sweep(dense, (images[:1],), images, reference, None, points, methods, [0, 1, 2] if not quick else [0])


def widest_group_seconds() -> dict:
    model = assets.pretrained_mobilenet_v2()
    graph = build_graph(model, (torch.randn(1, 3, 224, 224),))
    group = max(graph.groups, key=lambda g: g.size if g.kind == "channels" and len(g.producers) > 1 else 0)
    context = StructuredContext(model, (), StructuredSpec(0.5))
    start = time.perf_counter()
    surgery_select(graph, group, group.size // 2, context)
    return {"group": group.name, "units": group.size, "seconds": time.perf_counter() - start}


def _agreement_kl(model, images, reference) -> tuple[float, float]:
    _, agrees, kl = _per_image(model, images, reference)
    return float(agrees.mean()), float(kl.mean())


def mobilenet_per_group(amount: float = 0.25) -> list[dict]:
    """Each channel group of MobileNetV2 pruned alone by ``amount`` (all others kept), surgery against L1."""
    dense = assets.pretrained_mobilenet_v2()
    images = assets.image_crops("test", 144)
    with torch.no_grad():
        reference = dense(images).log_softmax(-1)
    graph = build_graph(dense, (images[:1],))
    names = [g.name for g in graph.groups]
    rows = []
    for group in graph.groups:
        row = {"group": group.name, "units": group.size, "producers": len(group.producers),
               "mode": activation_mode(graph, group)}
        for method in ("surgery", "l1"):
            spec = StructuredSpec(amount, exclude=tuple(n for n in names if n != group.name))
            model, _ = _prune(dense, (images[:1],), spec, method)
            row[f"{method}_agreement"], row[f"{method}_kl"] = _agreement_kl(model, images, reference)
        print(row, flush=True)
        rows.append(row)
    return rows


def minilm_scopes() -> list[dict]:
    """Surgery on MiniLM under each scope, at the same fraction of units, and globally at the parameter count the
    layer scope removed."""
    st = assets.minilm()
    dense = st[0].auto_model.eval()
    tokens = assets.minilm_tokens(st, assets.sentences("test"))
    reference = assets.minilm_embed(dense, tokens)
    inputs = (tokens["input_ids"][:2, :16],)
    rows = []

    def run(target, amount, allocation):
        model, report = _prune(dense, inputs, StructuredSpec(amount, target, allocation=allocation), "surgery")
        cosine = (assets.minilm_embed(model, tokens) * reference).sum(-1)
        heads = [(g["units_after"], g["units_before"]) for g in report.groups if g["kind"] == "heads"]
        rows.append({"target": target, "amount": amount, "scope": "layer" if allocation == "uniform" else "global",
                     "mean_cosine": float(cosine.mean()), "params_removed": 1 - report.after["params"] / report.before["params"],
                     "heads_kept": sum(k for k, _ in heads), "heads": sum(n for _, n in heads)})
        print(rows[-1], flush=True)
        return rows[-1]

    for amount in (0.25, 0.5):
        layer = run("channels", amount, "uniform")
        run("channels", amount, "global")
        run("params", layer["params_removed"], "global")
    return rows


def diagnostics() -> None:
    groups, scopes = mobilenet_per_group(), minilm_scopes()
    lines = ["### MobileNetV2: each channel group pruned alone by 25 % (144 crops; agreement / KL against dense)", "",
             "| group | units | producers | mode | surgery agreement | surgery KL | L1 agreement | L1 KL |", "|---" * 8 + "|"]
    lines += [f"| {r['group']} | {r['units']} | {r['producers']} | {r['mode']} | {r['surgery_agreement']:.3f} | {r['surgery_kl']:.3f} | "
              f"{r['l1_agreement']:.3f} | {r['l1_kl']:.3f} |" for r in groups]
    lines += ["", "### MiniLM: surgery under each scope (mean cosine of sentence embeddings to dense)", "",
              "| target | scope | mean cosine | params removed | attention heads kept |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} {r['amount']:.3g} | {r['scope']} | {r['mean_cosine']:.4f} | {r['params_removed']:.1%} | {r['heads_kept']} of {r['heads']} |"
              for r in scopes]
    md = "\n".join(lines)
    print(md)
    write_results("surgery_diagnostics", {"mobilenet_per_group": groups, "minilm_scopes": scopes}, md)


def _table(rows, metrics) -> str:
    lines = ["| setting | removed | method | " + " | ".join(metrics) + " | params removed | vs L1: only this right / only L1 "
             "right (sign-test p), KL lower on |", "|---" * (len(metrics) + 5) + "|"]
    for r in rows:
        cells = [f"{r[m]:.4f}" if isinstance(r[m], float) else "" for m in metrics]
        vs = r.get("vs_l1")
        versus = f"{vs['only_this_right']} / {vs['only_l1_right']} (p {vs['sign_p']:.2f}), {vs['kl_lower_share']:.0%}" if vs else ""
        lines.append(f"| {r['setting']} | {r['amount']:.0%} | {r['method']} | " + " | ".join(cells)
                     + f" | {r['params_removed']:.1%} | {versus} |")
    return "\n".join(lines)


def verdicts(rows: list[dict], metric: str) -> str:
    """Per point, surgery against L1 on ``metric`` (higher is better; with the paired sign test's p) and on KL:
    beats, ties (equal to four decimals) or loses."""
    def word(mine, theirs, higher_better):
        if round(mine, 4) == round(theirs, 4):
            return "ties"
        return "beats" if (mine > theirs) == higher_better else "loses to"

    out = []
    for r in rows:
        if r["method"] != "surgery":
            continue
        l1 = next(x for x in rows if x["method"] == "l1" and (x["setting"], x["amount"]) == (r["setting"], r["amount"]))
        out.append(f"{r['setting']} {r['amount']:.0%}: {word(r[metric], l1[metric], True)} L1 on {metric} "
                   f"({r[metric]:.4f} vs {l1[metric]:.4f}, sign-test p {r['vs_l1']['sign_p']:.2f}), "
                   f"{word(r['kl'], l1['kl'], False)} it on KL")
    return "Surgery against L1, point by point: " + "; ".join(out) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer points and crops (CI)")
    parser.add_argument("--diagnostics", action="store_true", help="per-group fragility on MobileNetV2 and scopes on MiniLM only")
    args = parser.parse_args()
    if args.diagnostics:
        diagnostics()
        return
    mnist_rows, mobilenet_rows, timing = mnist(args.quick), mobilenet(args.quick), widest_group_seconds()
    md = "\n\n".join([
        "### MNIST CNN (accuracy on all 5,000 MNIST-5k digits; KL from dense)", _table(mnist_rows, ["accuracy", "kl"]),
        verdicts(mnist_rows, "accuracy"), dead_fc_sentence(*dead_fc_units(assets.pretrained_digit_cnn(), assets.mnist5k("all")[0])),
        paper_comparison(mnist_rows, fc_share(assets.pretrained_digit_cnn())),
        "### MobileNetV2 (top-1 agreement and KL against dense on real photo crops)", _table(mobilenet_rows, ["agreement", "kl"]),
        verdicts(mobilenet_rows, "agreement"),
        f"Surgery on MobileNetV2's widest group ({timing['group']}, {timing['units']} channels, full saliency curve): "
        f"{timing['seconds']:.2f} s.",
    ])
    print(md)
    write_results("surgery", {"mnist_cnn": mnist_rows, "mobilenet_v2": mobilenet_rows, "widest_group": timing,
                              "quick": args.quick}, md)


if __name__ == "__main__":
    main()
