"""Data-free surgery against plain removal chosen by L1 norm and at random, with no data and no fine-tuning.

MNIST CNN (pretrained, digit-recognizer-py): accuracy on all 5,000 MNIST-5k digits (nothing is seen while
pruning, so every image is held out) and mean KL divergence from the dense model, at 25/50/75/90 % of the
fully connected layer's neurons and at 10/25/50 % of the conv channels.
MobileNetV2 (ImageNet weights): top-1 agreement and mean KL against the dense model on 144 crops of nine
real photos, at 10/25/50 % of channels, for every channel group and for the block-internal (expansion)
groups only. Random is the mean of three seeds. Also times surgery on MobileNetV2's widest group.

    python -m benchmarks.surgery [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from srcompress import assets
from srcompress.compress.graph import build_graph
from srcompress.compress.structured import StructuredSpec
from srcompress.compress.surgery import surgery_select
from srcompress.pipeline import StructuredContext, prune_structured

from .common import write_results

MOBILENET_INTERNAL_ONLY = ("*.conv.2", "features.1.conv.1", "features.0.0", "features.18.0")


def _prune(dense, inputs, spec, method):
    model = copy.deepcopy(dense)
    return model, prune_structured(model, inputs, spec, method)


def _fidelity(model, images, reference, labels=None):
    with torch.no_grad():
        out = model(images).log_softmax(-1)
    kl = float(F.kl_div(out, reference, log_target=True, reduction="batchmean"))
    agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
    accuracy = float((out.argmax(1) == labels).float().mean()) if labels is not None else None
    return {"accuracy": accuracy, "agreement": agree, "kl": kl}


def _sweep(dense, inputs, images, reference, labels, points, methods, seeds):
    rows = []
    for setting, exclude, amounts in points:
        for amount in amounts:
            for method in methods:
                runs = []
                for seed in (seeds if method == "random" else [0]):
                    model, report = _prune(dense, inputs, StructuredSpec(amount, exclude=exclude, seed=seed), method)
                    runs.append({**_fidelity(model, images, reference, labels),
                                 "params_removed": 1 - report.after["params"] / report.before["params"]})
                row = {"setting": setting, "amount": amount, "method": getattr(method, "name", method)}
                for key in runs[0]:
                    values = [r[key] for r in runs if r[key] is not None]
                    row[key] = statistics.mean(values) if values else None
                rows.append(row)
                print(row, flush=True)
    return rows


def mnist(quick: bool) -> list[dict]:
    dense = assets.pretrained_digit_cnn()
    images, labels = assets.mnist5k("all")
    with torch.no_grad():
        reference = dense(images).log_softmax(-1)
    points = [("fc", ("conv_layers*",), [0.25, 0.5, 0.75] + ([] if quick else [0.9])),
              ("conv", ("fc_layers*",), [0.1, 0.25, 0.5])]
    rows = _sweep(dense, (images[:1],), images, reference, labels, points, ["surgery", "l1", "random"], [0, 1, 2])
    dense_metrics = _fidelity(dense, images, reference, labels)
    return [{"setting": "dense", "amount": 0.0, "method": "dense", **dense_metrics, "params_removed": 0.0}] + rows


def mobilenet(quick: bool) -> list[dict]:
    dense = assets.pretrained_mobilenet_v2()
    images = assets.image_crops("test", 48 if quick else 144)
    with torch.no_grad():
        reference = dense(images).log_softmax(-1)
    points = [("all groups", (), [0.1, 0.25, 0.5]), ("block-internal groups", MOBILENET_INTERNAL_ONLY, [0.1, 0.25, 0.5])]
    methods = ["surgery", "l1", "random"]
    return _sweep(dense, (images[:1],), images, reference, None, points, methods, [0, 1, 2] if not quick else [0])


def widest_group_seconds() -> dict:
    model = assets.pretrained_mobilenet_v2()
    graph = build_graph(model, (torch.randn(1, 3, 224, 224),))
    group = max(graph.groups, key=lambda g: g.size if g.kind == "channels" and len(g.producers) > 1 else 0)
    context = StructuredContext(model, (), StructuredSpec(0.5))
    start = time.perf_counter()
    surgery_select(graph, group, group.size // 2, context)
    return {"group": group.name, "units": group.size, "seconds": time.perf_counter() - start}


def _table(rows, metrics) -> str:
    lines = ["| setting | removed | method | " + " | ".join(metrics) + " | params removed |", "|---" * (len(metrics) + 4) + "|"]
    for r in rows:
        cells = [f"{r[m]:.4f}" if isinstance(r[m], float) else "" for m in metrics]
        lines.append(f"| {r['setting']} | {r['amount']:.0%} | {r['method']} | " + " | ".join(cells) + f" | {r['params_removed']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer points and crops (CI)")
    args = parser.parse_args()
    mnist_rows, mobilenet_rows, timing = mnist(args.quick), mobilenet(args.quick), widest_group_seconds()
    md = "\n\n".join([
        "### MNIST CNN (accuracy on all 5,000 MNIST-5k digits; KL from dense)", _table(mnist_rows, ["accuracy", "kl"]),
        "### MobileNetV2 (top-1 agreement and KL against dense on real photo crops)", _table(mobilenet_rows, ["agreement", "kl"]),
        f"Surgery on MobileNetV2's widest group ({timing['group']}, {timing['units']} channels, full saliency curve): "
        f"{timing['seconds']:.2f} s.",
    ])
    print(md)
    write_results("surgery", {"mnist_cnn": mnist_rows, "mobilenet_v2": mobilenet_rows, "widest_group": timing,
                              "quick": args.quick}, md)


if __name__ == "__main__":
    main()
