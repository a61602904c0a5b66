"""Structured pruning quality: submodular selection against its ablation and the baselines, no fine-tuning.

MNIST CNN (pretrained): held-out accuracy on the 1,000 MNIST-5k test digits after removing 25/50/75 % of
the channels and neurons, calibrated on 5 or 50 training digits per class (50 or 500 digits; the data-free
methods ignore them). Methods: submodular (greedy selection + least-squares re-fit of the next layer),
submodular-norw (same selection, no re-fit), surgery (data-free), l1 and random (baselines).
MiniLM: mean cosine of sentence embeddings against the dense model on held-out sentences after removing half
of every FFN's neurons. MobileNetV2 (full run only): top-1 agreement and KL against dense on held-out photo
crops after removing 25 % of the block-internal channels, calibrated on 128 crops of other photos, and in
distribution (calibrated on one half of each evaluation photo, evaluated on the other half); and the wall time
of submodular pruning of every channel group with 512 calibration crops.

    python -m benchmarks.structured_quality [--quick]
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import torch
import torch.nn.functional as F

from srcompress import assets
from srcompress.calib.data import CalibrationSet, load_calibration
from srcompress.compress.structured import StructuredSpec
from srcompress.pipeline import prune_structured

MNIST_METHODS = ("submodular", "submodular-norw", "surgery", "l1", "random")
MOBILENET_INTERNAL_ONLY = ("*.conv.2", "features.1.conv.1", "features.0.0", "features.18.0")


def _prune(dense, inputs, spec, method, calibration=None):
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few-sample warnings are expected at 5 digits per class
        report = prune_structured(model, inputs, spec, method, calibration=calibration)
    return model, report, time.perf_counter() - started


def mnist(quick: bool) -> list[dict]:
    """Accuracy after pruning, per method, calibration size and amount removed."""
    dense = assets.pretrained_digit_cnn().eval()
    images, labels = assets.mnist5k("test")
    with torch.no_grad():
        dense_accuracy = float((dense(images).argmax(1) == labels).float().mean())
    amounts = (0.75,) if quick else (0.25, 0.5, 0.75)
    per_class = (5,) if quick else (5, 50)
    rows = [{"case": "mnist_cnn/dense", "model": "mnist_cnn", "method": "dense", "amount": 0.0, "accuracy": dense_accuracy}]
    for shots in per_class:
        calibration = load_calibration("mnist5k", 10 * shots, seed=0)
        for amount in amounts:
            for method in MNIST_METHODS:
                model, report, seconds = _prune(dense, (images[:1],), StructuredSpec(amount, seed=0), method, calibration)
                with torch.no_grad():
                    accuracy = float((model(images).argmax(1) == labels).float().mean())
                rows.append({"case": f"mnist_cnn/{method}/{amount:g}/{shots}pc", "model": "mnist_cnn", "method": method,
                             "amount": amount, "per_class": shots, "accuracy": accuracy, "seconds": round(seconds, 2),
                             "params_ratio": report.after["params"] / report.before["params"]})
    return rows


def minilm(quick: bool) -> list[dict]:
    """Embedding cosine against dense after removing half of every FFN's neurons."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = assets.minilm()
    dense = st[0].auto_model.eval()
    tokens = assets.minilm_tokens(st, assets.sentences("test"))
    reference = assets.minilm_embed(dense, tokens)
    calibration = load_calibration("sentences", 128 if quick else 512, model=dense)
    spec = StructuredSpec(0.5, exclude=("*attention*",))
    rows = []
    for method in ("submodular", "submodular-norw", "l1") if not quick else ("l1",):
        model, report, seconds = _prune(dense, (tokens["input_ids"][:2, :16],), spec, method, calibration)
        cosine = (assets.minilm_embed(model, tokens) * reference).sum(-1)
        rows.append({"case": f"minilm/{method}/ffn0.5", "model": "minilm", "method": method, "amount": 0.5,
                     "calibration": len(calibration), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                     "seconds": round(seconds, 1), "params_ratio": report.after["params"] / report.before["params"]})
    return rows


def _mobilenet_row(dense, crops, reference, spec, method, calibration, case: str, setting: str) -> dict:
    model, report, seconds = _prune(dense, (crops[:1],), spec, method, calibration)
    with torch.no_grad():
        out = model(crops).log_softmax(-1)
    return {"case": f"mobilenet_v2/{method}/{case}", "model": "mobilenet_v2", "method": method, "amount": spec.amount,
            "setting": setting, "calibration": len(calibration),
            "agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "kl": float(F.kl_div(out, reference, log_target=True, reduction="batchmean")),
            "seconds": round(seconds, 1), "params_ratio": report.after["params"] / report.before["params"]}


def mobilenet() -> list[dict]:
    """Top-1 agreement and KL against dense with 25 % of the block-internal channels removed.

    Calibrated on other photos (other scenes), and in distribution: calibrated on crops of one half of each
    evaluation photo, evaluated on crops of the other half (same scenes, disjoint pixels), both ways round.
    """
    dense = assets.pretrained_mobilenet_v2().eval()
    spec = StructuredSpec(0.25, exclude=MOBILENET_INTERNAL_ONLY)
    rows = []
    settings = [("internal0.25", "calibrated on 128 crops of nine other photos", assets.image_crops("test", 144),
                 load_calibration("photos", 128, seed=0))]
    for calib_half, eval_half in (("left", "right"), ("right", "left")):
        calib = assets.image_crops("test", 128, seed=1, half=calib_half)
        settings.append((f"internal0.25/{calib_half}-to-{eval_half}",
                         f"calibrated on 128 crops of the {calib_half} halves of the evaluation photos, evaluated on the {eval_half} halves",
                         assets.image_crops("test", 144, half=eval_half), CalibrationSet([(c,) for c in calib.split(32)], f"{calib_half} halves")))
    for case, setting, crops, calibration in settings:
        with torch.no_grad():
            reference = dense(crops).log_softmax(-1)
        for method in ("submodular", "surgery", "l1"):
            rows.append(_mobilenet_row(dense, crops, reference, spec, method, calibration, case, setting))
    # Speed at the scale: every channel group (internal and residual), 512 calibration photos.
    crops = settings[0][2]
    with torch.no_grad():
        reference = dense(crops).log_softmax(-1)
    rows.append(_mobilenet_row(dense, crops, reference, StructuredSpec(0.25), "submodular", load_calibration("photos", 512, seed=0),
                               "all0.25/512", "internal and residual groups, 512 calibration crops of nine other photos"))
    return rows


def run(quick: bool) -> list[dict]:
    return mnist(quick) + minilm(quick) + ([] if quick else mobilenet())


def markdown(rows: list[dict]) -> str:
    lines = []
    mnist_rows = [r for r in rows if r["model"] == "mnist_cnn" and r["method"] != "dense"]
    if mnist_rows:
        dense = next(r["accuracy"] for r in rows if r["case"] == "mnist_cnn/dense")
        lines += [f"MNIST CNN, held-out accuracy (dense {dense:.1%}); calibration: digits per class",
                  "", "| removed | digits/class | " + " | ".join(MNIST_METHODS) + " |", "|---" * (len(MNIST_METHODS) + 2) + "|"]
        for key in sorted({(r["amount"], r["per_class"]) for r in mnist_rows}):
            cells = {r["method"]: f"{r['accuracy']:.1%}" for r in mnist_rows if (r["amount"], r["per_class"]) == key}
            lines.append(f"| {key[0]:.0%} | {key[1]} | " + " | ".join(cells.get(m, "") for m in MNIST_METHODS) + " |")
    for r in rows:
        if r["model"] == "minilm":
            lines.append(f"\nMiniLM, half of every FFN removed, {r['method']}: mean cosine {r['mean_cosine']:.3f} "
                         f"(min {r['min_cosine']:.3f}), {r['calibration']} calibration sentences, {r['seconds']} s")
        if r["model"] == "mobilenet_v2":
            scope = "25 % of every channel group removed" if r["case"].endswith("/512") else "25 % of block-internal channels removed"
            lines.append(f"\nMobileNetV2, {scope}, {r['setting']}, {r['method']}: top-1 agreement {r['agreement']:.1%}, "
                         f"KL {r['kl']:.3f}, {r['seconds']} s")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Quality vs budget: MNIST accuracy per method and calibration size; MobileNetV2 agreement and MiniLM cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    mnist_rows = [r for r in rows if r["model"] == "mnist_cnn" and r["method"] != "dense"]
    for method in MNIST_METHODS:
        for shots, style in ((5, "-"), (50, "--")):
            points = sorted((r["amount"], r["accuracy"]) for r in mnist_rows if r["method"] == method and r["per_class"] == shots)
            if points and (shots == 5 or method.startswith("submodular")):  # data-free methods ignore the calibration size
                label = f"{method} ({shots} digits/class)" if method.startswith("submodular") else method
                left.plot(*zip(*points), style, marker="o", label=label)
    left.set(xlabel="fraction of channels/neurons removed", ylabel="held-out accuracy", title="MNIST CNN, no fine-tuning")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    names = {"internal0.25": "internal 25 %, other photos", "internal0.25/left-to-right": "internal 25 %, left -> right halves",
             "internal0.25/right-to-left": "internal 25 %, right -> left halves", "all0.25/512": "all groups 25 %, 512 photos"}
    bars = [(f"MobileNetV2 {names.get(r['case'].split('/', 2)[2], r['case'])} {r['method']}", r["agreement"])
            for r in rows if r["model"] == "mobilenet_v2"]
    bars += [(f"MiniLM FFN 50% {r['method']} (cosine)", r["mean_cosine"]) for r in rows if r["model"] == "minilm"]
    if bars:
        right.barh([b[0] for b in bars], [b[1] for b in bars])
        right.set(xlabel="agreement with dense (MobileNetV2) / cosine (MiniLM)", xlim=(0, 1))
        right.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from .common import run_benchmark_cli

    run_benchmark_cli("structured_quality", __doc__, run, markdown, "75 % only, 5 digits per class, fewer sentences, no MobileNetV2",
                      plot)


if __name__ == "__main__":
    main()
