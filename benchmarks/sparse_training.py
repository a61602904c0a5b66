"""Sparse training on MNIST-5k: one-shot + fine-tuning vs. GMP vs. cyclical pruning, equal budgets.

Two models: LeNet-5 trained from scratch, and the pretrained MNIST CNN fine-tuned. Every method of a
model gets the same number of steps, optimizer, learning-rate schedule and batch order (seeded); they
differ only in the sparsity schedule. Accuracy is measured on the held-out MNIST-5k test split (1,000
digits), as mean +- sample std over seeds. Runs go through ``srcompress.train.train_model``, the code
behind ``srcompress train``.

    python -m benchmarks.sparse_training            # full: 3 seeds (about 30 min on the 2-core VM)
    python -m benchmarks.sparse_training --quick    # 1 seed, short budgets (about 2 min)

Writes ``benchmarks/results/sparse_training[_quick].{json,md,png}`` (the plot needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from srcompress import assets
from srcompress.data import Dataset, load_data
from srcompress.errors import SrcompressError
from srcompress.models import LeNet5
from srcompress.train import TrainConfig, accuracy, train_model

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("oneshot", "gmp", "cyclical")
LABELS = {"oneshot": "one-shot + fine-tune", "gmp": "GMP", "cyclical": "cyclical"}
SETTINGS = (("unstructured", 0.8), ("unstructured", 0.9), ("unstructured", 0.95), ("unstructured", 0.98), ("block:16x16", 0.9))
QUICK_SETTINGS = (("unstructured", 0.9), ("unstructured", 0.98), ("block:16x16", 0.9))
ABLATION_SPARSITY = 0.98
ABLATIONS = {  # cyclical variants at the highest sparsity (algorithms.md 3.4 and 3.7)
    "restart floor s_f*c/C": {"floor": True},
    "last cycle twice as long": {"last_cycle": 2.0},
    "2 cycles": {"cycles": 2},
    "optimizer state reset at cycle starts": {"optimizer_state": "reset"},
    "cosine LR restarted every cycle": {"lr_schedule": "cycle"},
}


@dataclass(frozen=True)
class Setup:
    """A model and its training budget, shared by every method."""

    description: str
    build: Callable[[int], nn.Module]
    epochs: int
    lr: float
    oneshot_at: float  # fraction of the budget trained dense before the one-shot prune


def _lenet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet5()


SETUPS = {
    "lenet5": Setup("LeNet-5 (61k parameters) trained from scratch", _lenet, epochs=30, lr=1e-3, oneshot_at=0.5),
    "digit_cnn": Setup("pretrained MNIST CNN (390k parameters) fine-tuned", lambda seed: assets.pretrained_digit_cnn(),
                       epochs=5, lr=1e-3, oneshot_at=0.0),
}


def run_one(setup: Setup, seed: int, train: Dataset, test: Dataset, epochs: int, sparsity: float = 0.0,
            schedule: str = "cyclical", pattern: str = "unstructured", **variant) -> dict:
    model = setup.build(seed)
    options = {"lr_schedule": "cosine", **variant}
    config = TrainConfig(sparsity=sparsity, schedule=schedule, pattern=pattern, scope="global", epochs=epochs, lr=setup.lr,
                         optimizer="adam", batch_size=64, seed=seed, oneshot_at=setup.oneshot_at, **options)
    result = train_model(model, train, config, eval_data=None)
    sparse = result.sparse or {}
    return {"seed": seed, "accuracy": accuracy(model, test), "reached": sparse.get("reached", 0.0),
            "recovered_fraction": sparse.get("recovered_fraction", 0.0), "steps": result.steps, "seconds": result.seconds}


def _stats(runs: list[dict]) -> dict:
    values = [r["accuracy"] for r in runs]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": runs,
            "recovered_fraction": statistics.fmean(r["recovered_fraction"] for r in runs)}


def benchmark_model(name: str, setup: Setup, seeds: list[int], epochs: int, settings, ablations: dict, train: Dataset, test: Dataset) -> dict:
    out = {"description": setup.description, "epochs": epochs, "lr": setup.lr, "oneshot_at": setup.oneshot_at,
           "steps": None, "dense": None, "settings": []}
    if name == "digit_cnn":
        out["pretrained_accuracy"] = accuracy(setup.build(0), test)
    out["dense"] = _stats([run_one(setup, seed, train, test, epochs) for seed in seeds])
    out["steps"] = out["dense"]["runs"][0]["steps"]
    print(f"[{name}] dense: {out['dense']['mean']:.4f} +- {out['dense']['std']:.4f}", flush=True)
    for pattern, sparsity in settings:
        row = {"pattern": pattern, "sparsity": sparsity, "methods": {}}
        for method in METHODS:
            try:
                runs = [run_one(setup, seed, train, test, epochs, sparsity, method, pattern) for seed in seeds]
            except SrcompressError as err:  # e.g. no layer of LeNet-5 divides into 16x16 blocks
                row["not_applicable"] = err.problem
                break
            row["methods"][method] = _stats(runs)
            print(f"[{name}] {pattern} {sparsity:.0%} {method}: {row['methods'][method]['mean']:.4f} +- {row['methods'][method]['std']:.4f} "
                  f"(recovered {row['methods'][method]['recovered_fraction']:.3%})", flush=True)
        out["settings"].append(row)
    out["ablation"] = {}
    for label, variant in ablations.items():
        out["ablation"][label] = _stats([run_one(setup, seed, train, test, epochs, ABLATION_SPARSITY, "cyclical", **variant) for seed in seeds])
        print(f"[{name}] cyclical at {ABLATION_SPARSITY:.0%}, {label}: {_fmt(out['ablation'][label])}", flush=True)
    return out


def _fmt(stat: dict) -> str:
    return f"{stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f}"


def verdicts(model: dict) -> list[str]:
    """Plain statements derived from the numbers: cyclical vs GMP at >= 95 %, and 90 % vs dense."""
    lines = []
    dense = model["dense"]["mean"]
    for row in model["settings"]:
        methods = row["methods"]
        if not methods:
            continue
        label = f"{row['sparsity']:.0%} {row['pattern']}"
        if row["pattern"] == "unstructured" and row["sparsity"] >= 0.95:
            gap = (methods["cyclical"]["mean"] - methods["gmp"]["mean"]) * 100
            if len(methods["gmp"]["runs"]) < 2:
                lines.append(f"{label}: cyclical − GMP = {gap:+.2f} points (one seed: no spread to judge it by).")
                continue
            noise = (methods["cyclical"]["std"] + methods["gmp"]["std"]) * 100
            verdict = "beats" if gap > noise else ("trails" if gap < -noise else "ties with")
            lines.append(f"{label}: cyclical {verdict} GMP ({gap:+.2f} points; the two stds add up to {noise:.2f}).")
        if row["pattern"] == "unstructured" and row["sparsity"] == 0.9:
            for method in METHODS:
                loss = (dense - methods[method]["mean"]) * 100
                lines.append(f"{label} {LABELS[method]}: {abs(loss):.2f} points {'below' if loss > 0 else 'above'} dense "
                             f"({'within' if loss <= 0.5 else 'misses'} the 0.5-point target).")
    return lines


def markdown(payload: dict) -> str:
    parts = [f"Command: `{payload['command']}` ({payload['seconds'] / 60:.1f} min, {payload['environment']['threads']} thread(s)). "
             f"Accuracy (%) on the held-out MNIST-5k test split, mean ± std over seeds {payload['seeds']}; global magnitude scope, "
             "first conv and classifier dense, Adam with a cosine learning rate, batch 64, GMP and cyclical ramps over the first "
             "75 % of steps (cyclical: 3 cycles, each starting with a dense update), masks updated every 1 % of a ramp."]
    for name, model in payload["models"].items():
        extra = f"; pretrained, before fine-tuning: {model['pretrained_accuracy'] * 100:.2f}" if "pretrained_accuracy" in model else ""
        parts.append(f"\n### {model['description']}\n\nBudget: {model['epochs']} epochs = {model['steps']} steps for every method "
                     f"(lr {model['lr']:g}; one-shot prunes after {model['oneshot_at']:.0%} of it). "
                     f"Dense, same budget: {_fmt(model['dense'])}{extra}.\n")
        parts.append("| sparsity | pattern | " + " | ".join(LABELS[m] for m in METHODS) + " | cyclical − GMP | cyclical: kept weights that grew back |")
        parts.append("|---|---|" + "---|" * (len(METHODS) + 2))
        for row in model["settings"]:
            if not row["methods"]:
                parts.append(f"| {row['sparsity']:.0%} | {row['pattern']} | n/a: {row['not_applicable']} |" + " |" * (len(METHODS) + 1))
                continue
            m = row["methods"]
            gap = (m["cyclical"]["mean"] - m["gmp"]["mean"]) * 100
            parts.append(f"| {row['sparsity']:.0%} | {row['pattern']} | " + " | ".join(_fmt(m[k]) for k in METHODS)
                         + f" | {gap:+.2f} | {m['cyclical']['recovered_fraction']:.2%} |")
        parts.append("")
        parts.extend(f"- {line}" for line in verdicts(model))
        if model["ablation"]:
            reference = next(r["methods"] for r in model["settings"] if r["pattern"] == "unstructured" and r["sparsity"] == ABLATION_SPARSITY)
            parts.append(f"\nCyclical variants at {ABLATION_SPARSITY:.0%} unstructured (same budget; GMP {_fmt(reference['gmp'])}, "
                         f"default cyclical {_fmt(reference['cyclical'])}):\n")
            parts.append("| variant | accuracy | − GMP | kept weights that grew back |\n|---|---|---|---|")
            for label, stat in model["ablation"].items():
                parts.append(f"| {label} | {_fmt(stat)} | {(stat['mean'] - reference['gmp']['mean']) * 100:+.2f} | {stat['recovered_fraction']:.2%} |")
    return "\n".join(parts)


def plot(payload: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        rows = [r for r in model["settings"] if r["pattern"] == "unstructured" and r["methods"]]
        xs = [r["sparsity"] * 100 for r in rows]
        for method, marker in zip(METHODS, "osD"):
            ax.errorbar(xs, [r["methods"][method]["mean"] * 100 for r in rows], yerr=[r["methods"][method]["std"] * 100 for r in rows],
                        marker=marker, capsize=3, label=LABELS[method])
        ax.axhline(model["dense"]["mean"] * 100, color="gray", linestyle="--", label="dense (same budget)")
        ax.set_title(model["description"], fontsize=10)
        ax.set_xlabel("sparsity of the pruned layers (%)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 LeNet epochs, 1 CNN epoch, three settings")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core VM)")
    parser.add_argument("--models", default="lenet5,digit_cnn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = load_data("mnist5k:train"), load_data("mnist5k:test")
    seeds = list(range(1 if args.quick else args.seeds))
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    models = {}
    for name in args.models.split(","):
        setup = SETUPS[name]
        epochs = (4 if name == "lenet5" else 1) if args.quick else setup.epochs
        models[name] = benchmark_model(name, setup, seeds, epochs, settings, {} if args.quick else ABLATIONS, train, test)
    payload = {"benchmark": "sparse_training", "command": " ".join(["python -m benchmarks.sparse_training", *sys.argv[1:]]),
               "seeds": seeds, "seconds": time.perf_counter() - started,
               "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "cpu": platform.processor() or platform.machine()},
               "models": models}
    stem = "sparse_training_quick" if args.quick else "sparse_training"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    plot(payload, RESULTS / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
