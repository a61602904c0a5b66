"""All benchmark suites in one command, with regression gates against stored baselines.

Suites: structured (submodular vs baselines), surgery (data-free), sparse_training (one-shot/GMP/cyclical),
kernels (block-sparse Linear vs dense) and latency (dense vs compressed models end to end). ``--quick`` is
the CPU cut used by CI (under 10 minutes on 2 cores); ``--full`` runs every point. Writes, into ``--out``:
``results.jsonl`` (one row per measurement, with the environment), ``summary.md`` and PNG plots.

``--check`` compares the gated figures with ``benchmarks/baselines/<device>.json`` and exits 1 when a quality
figure drops more than its absolute tolerance or a speedup falls more than its relative tolerance below the
baseline. A speedup below its floor is measured once more (its suite reruns) and counts at the better of the two
measurements, since machine noise only ever slows a run. ``--update-baseline`` stores this run's gated figures as
the new baseline.

    python -m benchmarks.run --quick --check          # the CPU gate that .ci/run runs
    python -m benchmarks.run --full --out benchmarks/results/full
    python -m benchmarks.run --quick --check --device cuda   # GPU CI (baseline: benchmarks/baselines/cuda.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "baselines"

# (case, metric, kind): "quality" figures may drop by an absolute tolerance, "ratio" figures by a relative one.
GATES = {
    "structured": [("mnist_cnn/submodular/0.75/5pc", "accuracy", "quality"),
                   ("mnist_cnn/submodular-norw/0.75/5pc", "accuracy", "quality"),
                   ("mnist_cnn/surgery/0.75/5pc", "accuracy", "quality"),
                   ("mnist_cnn/l1/0.75/5pc", "accuracy", "quality"),
                   ("minilm/l1/ffn0.5", "mean_cosine", "quality")],
    "surgery": [("mnist_cnn/surgery/fc/0.75", "accuracy", "quality"),
                ("mnist_cnn/surgery/conv/0.5", "accuracy", "quality")],
    "sparse_training": [("digit_cnn/cyclical/unstructured/0.9", "accuracy", "quality"),
                        ("digit_cnn/gmp/unstructured/0.9", "accuracy", "quality")],
    "kernels": [("cpu/16x16/M1", "speedup", "ratio"),
                ("cuda/bsr/square-4096/64x64/d0.1/M4096/bfloat16", "speedup_vs_dense", "ratio"),
                ("cuda/bsr/square-4096/64x64/d0.1/M1/bfloat16/graph", "speedup_vs_dense", "ratio")],
    "latency": [("mnist_cnn/structured/ort", "speedup", "ratio"), ("mnist_cnn/structured/ort", "accuracy", "quality"),
                ("mobilenet_v2/structured/ort", "speedup", "ratio"), ("minilm/structured/torch", "speedup", "ratio")],
}
TOLERANCE = {"quality": 0.01, "ratio": 0.35}


# ------------------------------------------------------------------ suites (each: quick -> rows)

def structured_suite(quick: bool, only: str | None) -> list[dict]:
    from . import structured_quality as sq

    parts = [("mnist_cnn", sq.mnist), ("minilm", sq.minilm)] + ([] if quick else [("mobilenet_v2", lambda q: sq.mobilenet())])
    return [row for name, fn in parts if not only or only in name for row in fn(quick)]


def surgery_suite(quick: bool, only: str | None) -> list[dict]:
    from . import surgery

    rows = []
    for model, fn in (("mnist_cnn", surgery.mnist), ("mobilenet_v2", surgery.mobilenet)):
        if (quick and model == "mobilenet_v2") or (only and only not in model):
            continue
        for row in fn(quick):
            setting = row["setting"].split()[0]
            suffix = "/global" if row.get("allocation") == "global" else ""
            rows.append({**row, "case": f"{model}/{row['method']}/{setting}/{row['amount']:g}{suffix}", "model": model})
    return rows


def sparse_training_suite(quick: bool, only: str | None) -> list[dict]:
    from . import sparse_training as st

    train, test = st.load_data("mnist5k:train"), st.load_data("mnist5k:test")
    rows = []
    for name in ("digit_cnn",) if quick else ("lenet5", "digit_cnn"):
        if only and only not in name:
            continue
        setup = st.SETUPS[name]
        settings = (("unstructured", 0.9),) if quick else st.SETTINGS
        result = st.benchmark_model(name, setup, [0] if quick else [0, 1, 2], 1 if quick else setup.epochs, settings, {}, train, test)
        rows.append({"case": f"{name}/dense", "model": name, "method": "dense", "accuracy": result["dense"]["mean"]})
        for setting in result["settings"]:
            for method, stats in setting["methods"].items():
                rows.append({"case": f"{name}/{method}/{setting['pattern']}/{setting['sparsity']:g}", "model": name,
                             "method": method, "pattern": setting["pattern"], "sparsity": setting["sparsity"],
                             "accuracy": stats["mean"], "std": stats["std"], "epochs": result["epochs"]})
    return rows


def kernels_suite(quick: bool, only: str | None, device: str = "cpu") -> list[dict]:
    from . import kernels

    if device == "cuda":
        args = argparse.Namespace(quick=quick, tune_torch=quick, shapes=list(kernels.GPU_SHAPES), tokens=list(kernels.GPU_TOKENS),
                                  densities=list(kernels.GPU_DENSITIES), blocks=list(kernels.GPU_BLOCKS), dtypes=list(kernels.GPU_DTYPES))
        return [{**r, "case": gpu_kernel_case(r)} for r in kernels.gpu_run(args)]
    return [{**r, "case": f"cpu/{r['block'][0]}x{r['block'][1]}/M{r['M']}"} for r in kernels.cpu_run(quick)]


def gpu_kernel_case(row: dict) -> str:
    """Gate key of one GPU sweep row, e.g. ``cuda/bsr/square-4096/64x64/d0.1/M1/bfloat16/graph``."""
    kernel = {"srcompress bsr_linear": "bsr", "dense F.linear": "dense"}.get(row["kernel"], row["kernel"])
    block = f"/{row['block'][0]}x{row['block'][1]}" if "block" in row else ""
    density = f"/d{row['density']}" if "density" in row else ""
    return f"cuda/{kernel}/{row['shape_name']}{block}{density}/M{row['M']}/{row['dtype']}{'/graph' if row.get('cuda_graph') else ''}"


def latency_suite(quick: bool, only: str | None) -> list[dict]:
    from . import latency

    return latency.run(quick, only=only)


SUITES: dict[str, Callable] = {"structured": structured_suite, "surgery": surgery_suite,
                               "sparse_training": sparse_training_suite, "kernels": kernels_suite, "latency": latency_suite}


# ------------------------------------------------------------------ gates

def gated_figures(rows: list[dict], suites: list[str]) -> dict[str, dict]:
    """The gated figures present in ``rows``, keyed 'suite|case|metric'."""
    found = {}
    for suite in suites:
        for case, metric, kind in GATES.get(suite, []):
            row = next((r for r in rows if r["suite"] == suite and r["case"] == case), None)
            if row is not None and row.get(metric) is not None:
                found[f"{suite}|{case}|{metric}"] = {"value": float(row[metric]), "kind": kind, "tolerance": TOLERANCE[kind]}
    return found


def check(rows: list[dict], baseline: dict, suites: list[str], only: str | None = None,
          remeasured: list[dict] | None = None) -> list[str]:
    """Failures: gated figures below baseline beyond tolerance, and gated figures this run should have made but did not.
    A ratio (timing) figure also in ``remeasured`` counts at the better of its two measurements: noise only slows."""
    current = gated_figures(rows, suites)
    for key, again in gated_figures(remeasured or [], suites).items():
        if again["kind"] == "ratio" and key in current:
            current[key]["value"] = max(current[key]["value"], again["value"])
    failures = []
    for key, base in baseline["gates"].items():
        suite, case, metric = key.split("|")
        if suite not in suites or (only and only not in case):
            continue
        if key not in current:
            failures.append(f"{key}: not measured in this run (baseline {base['value']:.4g})")
            continue
        value = current[key]["value"]
        floor = base["value"] - base["tolerance"] if base["kind"] == "quality" else base["value"] * (1 - base["tolerance"])
        if value < floor:
            how = f"-{base['tolerance']:g} absolute" if base["kind"] == "quality" else f"-{base['tolerance']:.0%}"
            failures.append(f"{key}: {value:.4g} is below the baseline {base['value']:.4g} ({how} allowed, floor {floor:.4g})")
    return failures


# ------------------------------------------------------------------ outputs

def environment(device: str) -> dict:
    import numpy

    from .kernels import _cpu_name

    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    for name in ("onnxruntime", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def summary(rows: list[dict], env: dict, command: str, failures: list[str] | None, seconds: float) -> str:
    from . import latency, structured_quality

    by_suite = {s: [r for r in rows if r["suite"] == s] for s in SUITES}
    parts = [f"Command: `{command}` on {env['cpu']} ({env['cpus']} CPUs{', ' + env['gpu'] if env['gpu'] else ''}), "
             f"torch {env['torch']}, {seconds / 60:.1f} min."]
    if by_suite["structured"]:
        parts += ["## Structured pruning quality (no fine-tuning)", structured_quality.markdown(by_suite["structured"])]
    if by_suite["surgery"]:
        lines = ["| model | setting | removed | method | accuracy / agreement | KL |", "|---|---|---|---|---|---|"]
        for r in by_suite["surgery"]:
            figure = r["accuracy"] if r.get("accuracy") is not None else r["agreement"]
            lines.append(f"| {r['model']} | {r['setting']} | {r['amount']:.0%} | {r['method']} | {figure:.4f} | {r['kl']:.4f} |")
        parts += ["## Data-free surgery vs L1 and random", "\n".join(lines)]
    if by_suite["sparse_training"]:
        lines = ["| model | method | pattern | sparsity | accuracy | epochs |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r.get('pattern', '')} | {r.get('sparsity', 0):.0%} | {r['accuracy']:.4f} | "
                  f"{r.get('epochs', '')} |" for r in by_suite["sparse_training"]]
        parts += ["## Sparse training on MNIST-5k", "\n".join(lines)]
    cpu_kernels = [r for r in by_suite["kernels"] if not r["case"].startswith("cuda/")]
    gpu_kernels = [r for r in by_suite["kernels"] if r["case"].startswith("cuda/")]
    if cpu_kernels:
        lines = ["| case | dense (ms) | block-sparse (ms) | speedup | other CPUs busy |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r.get('dense_ms', '')} | {r.get('sparse_ms', '')} | {r.get('speedup', '')}x | "
                  f"{r.get('other_processes_cpus', '')} |" for r in cpu_kernels]
        parts += ["## Block-sparse Linear (90 % of 4096x4096 in blocks) vs dense", "\n".join(lines)]
    if gpu_kernels:
        lines = ["| case | kernel | median (us) | vs dense |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['kernel']} | {r.get('median_us', r.get('error', ''))} | "
                  f"{r['speedup_vs_dense']}x |" if "speedup_vs_dense" in r else
                  f"| {r['case']} | {r['kernel']} | {r.get('median_us', r.get('error', ''))} | |" for r in gpu_kernels]
        parts += ["## Block-sparse Linear on GPU (4096x4096, density 0.1, 64x64 blocks)", "\n".join(lines)]
    if by_suite["latency"]:
        parts += ["## End-to-end latency, dense vs compressed (same run)", latency.markdown(by_suite["latency"])]
    if failures is not None:
        parts += ["## Regression gate", "\n".join(f"- FAIL {f}" for f in failures) if failures else "All gated figures within tolerance."]
    return "\n\n".join(parts) + "\n"


def plots(rows: list[dict], out: Path) -> list[str]:
    """accuracy vs removed fraction per method; kernel speedup per block size; per-layer sparsity of a pruned CNN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    mnist = [r for r in rows if r["suite"] in ("structured", "surgery") and r.get("model") == "mnist_cnn" and r.get("amount")]
    if mnist:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (suite, method, extra) in sorted({(r["suite"], r["method"], r.get("per_class") or r.get("setting")) for r in mnist}):
            points = sorted((r["amount"], r["accuracy"]) for r in mnist
                            if (r["suite"], r["method"], r.get("per_class") or r.get("setting")) == (suite, method, extra))
            label = f"{method} ({extra}{' digits/class' if suite == 'structured' else ' only'})"
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("fraction of channels/neurons removed")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("MNIST CNN, structured pruning without fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        written.append(_save(fig, out, "accuracy_vs_sparsity.png"))
    kern = [r for r in rows if r["suite"] == "kernels" and r.get("speedup")]
    if kern:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_density = len({r.get("density") for r in kern}) > 2
        for block in sorted({tuple(r["block"]) for r in kern}):
            pts = sorted((r["density"] if by_density else r["M"], r["speedup"]) for r in kern if tuple(r["block"]) == block)
            ax.plot(*zip(*pts), marker="o", label=f"{block[0]}x{block[1]} blocks")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("block density" if by_density else "batch rows (M), density 0.1")
        ax.set_ylabel("speedup vs dense")
        ax.set_title("Block-sparse Linear vs dense")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out, "kernel_speedup.png"))
    written.append(_layer_sparsity_plot(out, plt))
    return written


def _save(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def _layer_sparsity_plot(out: Path, plt) -> str:
    from srcompress import assets
    from srcompress.compress.masks import MaskSpec
    from srcompress.pipeline import prune_model

    model = assets.pretrained_digit_cnn()
    images, _ = assets.mnist5k("test")
    report = prune_model(model, (images[:1],), MaskSpec(0.9, scope="global"))
    names = [layer["name"].removesuffix(".weight") for layer in report.layers]
    values = [layer["sparsity_after"] for layer in report.layers]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title("MNIST CNN, 90 % global magnitude: sparsity per layer")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    return _save(fig, out, "layer_sparsity.png")


def update_readme(text: str, out: Path, images: list[str]) -> None:
    """Replace the README's text between the results markers with this run's summary and plots."""
    readme = HERE.parent / "README.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"README.md has no {start} ... {end} section to replace")
    folder = out.relative_to(HERE.parent).as_posix()
    body = text.replace("\n## ", "\n### ") + "\n" + "\n".join(f"![{name}]({folder}/{name})" for name in images)
    head, rest = content.split(start, 1)
    readme.write_text(head + start + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])


# ------------------------------------------------------------------ main

def run_suites(suites: list[str], quick: bool, only: str | None, device: str) -> list[dict]:
    rows = []
    for suite in suites:
        began = time.perf_counter()
        fn = SUITES[suite]
        produced = fn(quick, only, device) if suite == "kernels" else fn(quick, only)
        rows += [{"suite": suite, **row} for row in produced]
        print(f"[run] {suite}: {len(produced)} rows in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the CPU cut CI runs (default)")
    mode.add_argument("--full", action="store_true", help="every point, every seed (long)")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--only", default=None, help="run only the parts whose model name contains this text (e.g. mnist_cnn)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/run-<quick|full>-<device>)")
    parser.add_argument("--check", action="store_true", help="fail (exit 1) when a gated figure regresses against the baseline")
    parser.add_argument("--baseline", type=Path, default=None, help="baseline file (default: benchmarks/baselines/<device>.json)")
    parser.add_argument("--update-baseline", action="store_true", help="store this run's gated figures as the baseline")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--readme", action="store_true",
                        help="write into benchmarks/results/latest-<device>/ and replace README.md's Results section with this run")
    args = parser.parse_args(argv)
    quick = not args.full
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; run on a GPU machine or use --device cpu", file=sys.stderr)
        return 2
    suites = args.suite or list(SUITES)
    baseline_path = args.baseline or BASELINES / f"{args.device}.json"
    baseline = None
    if args.check:
        if not baseline_path.exists():
            print(f"error: no baseline at {baseline_path}; create one with --update-baseline on a quiet machine", file=sys.stderr)
            return 2
        baseline = json.loads(baseline_path.read_text())
    out = args.out or HERE / "results" / (f"latest-{args.device}" if args.readme else f"run-{'quick' if quick else 'full'}-{args.device}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = run_suites(suites, quick, args.only, args.device)
    seconds = time.perf_counter() - started
    failures = check(rows, baseline, suites, args.only) if baseline is not None else None
    slow = sorted({f.split("|")[0] for f in failures or [] if baseline["gates"].get(f.split(":")[0], {}).get("kind") == "ratio"})
    if slow:
        print(f"[run] timing figures below their floor; measuring {', '.join(slow)} once more", file=sys.stderr, flush=True)
        failures = check(rows, baseline, suites, args.only, remeasured=run_suites(slow, quick, args.only, args.device))
    with open(out / "results.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "environment": env, "command": command}) + "\n")
    text = summary(rows, env, command, failures, seconds)
    (out / "summary.md").write_text(text)
    plots_written = [] if args.no_plots else plots(rows, out)
    if args.readme:
        update_readme(text, out, plots_written)
    if args.update_baseline:
        BASELINES.mkdir(parents=True, exist_ok=True)
        payload = {"device": args.device, "environment": env, "command": command, "gates": gated_figures(rows, suites)}
        baseline_path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"[run] baseline written: {baseline_path}", file=sys.stderr)
    print(text)
    if failures:
        print(f"[run] regression gate FAILED: {len(failures)} figure(s) below baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
