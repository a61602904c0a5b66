"""End-to-end CPU latency: dense against each compressed form, measured in the same run, quality beside it.

Models: the MNIST CNN (batch 64), MobileNetV2 (batch 8, 224 px) and MiniLM (8 sentences). Forms:
structured (channels/neurons physically removed), block-sparse (90 % of the FFN weights in 32x32 blocks,
run by ``srcompress.kernels.sparsify``; MiniLM only, the layers where block sparsity applies) and INT8
QDQ ONNX (ONNX Runtime). Runtimes: PyTorch eager and ONNX Runtime CPU. Every figure
is a ratio of medians of interleaved calls, so machine noise hits dense and compressed alike.

    python -m benchmarks.latency [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from srcompress import assets
from srcompress.calib.data import load_calibration
from srcompress.compress.masks import MaskSpec
from srcompress.compress.patterns import Pattern
from srcompress.compress.structured import StructuredSpec
from srcompress.pipeline import prune_model, prune_structured

from .common import interleaved_medians, onnx_session


def _torch_call(model, inputs):
    def call():
        with torch.inference_mode():
            model(*inputs)
    return call


def _ort_call(session, inputs):
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def _compare(case: str, forms: dict, repeats: int, quality: dict, extra: dict | None = None) -> list[dict]:
    """Time every form's callables together and return one row per (runtime, form) with the speedup vs dense."""
    calls = {f"{runtime}:{form}": fn for form, runtimes in forms.items() for runtime, fn in runtimes.items()}
    medians = interleaved_medians(calls, repeats=repeats)
    rows = []
    for key, seconds in medians.items():
        runtime, form = key.split(":")
        if form == "dense":
            continue
        dense = medians[f"{runtime}:dense"]
        rows.append({"case": f"{case}/{form}/{runtime}", "model": case, "form": form, "runtime": runtime,
                     "dense_ms": round(dense * 1e3, 3), "compressed_ms": round(seconds * 1e3, 3),
                     "speedup": round(dense / seconds, 3), **quality.get(form, {}), **(extra or {}).get(form, {})})
    return rows


def _int8(model, inputs, calibration, folder):
    """ONNX Runtime session of the model's INT8 QDQ export (static, calibrated on ``calibration``)."""
    from srcompress.export.onnx import export_onnx
    from srcompress.export.quantize import quantize_int8
    import onnxruntime as ort

    fp32 = Path(folder) / f"m{id(model)}.onnx"
    export_onnx(model, inputs, fp32)
    int8 = Path(folder) / f"m{id(model)}.int8.onnx"
    quantize_int8(fp32, int8, calibration.batches)
    return ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])


def mnist_cnn(quick: bool, folder: str) -> list[dict]:
    dense = assets.pretrained_digit_cnn().eval()
    images, labels = assets.mnist5k("test")
    calibration = load_calibration("mnist5k", 500, seed=0)
    structured = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_structured(structured, (images[:1],), StructuredSpec(0.5), "submodular", calibration=calibration)
    batch = (images[:64],)

    def accuracy(fn):
        return float((fn(images).argmax(1) == labels).float().mean())

    with torch.no_grad():
        quality = {"dense": {"accuracy": accuracy(dense)}, "structured": {"accuracy": accuracy(structured)}}
    forms = {name: {"torch": _torch_call(m, batch), "ort": _ort_call(onnx_session(m, (images[:2],), folder), batch)}
             for name, m in (("dense", dense), ("structured", structured))}
    session = _int8(dense, (images[:2],), calibration, folder)
    forms["int8"] = {"ort": _ort_call(session, batch)}
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    quality["int8"] = {"accuracy": float((torch.from_numpy(logits).argmax(1) == labels).float().mean())}
    for form in quality:
        quality[form]["accuracy_dense"] = quality["dense"]["accuracy"]
    return _compare("mnist_cnn", forms, 20 if quick else 60, quality, {"structured": {"pruning": "submodular, 50 % of channels"}})


def mobilenet_v2(quick: bool, folder: str) -> list[dict]:
    dense = assets.pretrained_mobilenet_v2().eval()
    crops = assets.image_crops("test", 48 if quick else 144)
    structured = copy.deepcopy(dense)
    prune_structured(structured, (crops[:1],), StructuredSpec(0.5), "l1")
    batch = (crops[:8],)
    with torch.no_grad():
        reference = dense(crops).argmax(1)
        quality = {"structured": {"agreement": float((structured(crops).argmax(1) == reference).float().mean())}}
    forms = {name: {"torch": _torch_call(m, batch), "ort": _ort_call(onnx_session(m, (crops[:2],), folder), batch)}
             for name, m in (("dense", dense), ("structured", structured))}
    session = _int8(dense, (crops[:2],), load_calibration("photos", 32 if quick else 128, seed=0), folder)
    forms["int8"] = {"ort": _ort_call(session, batch)}
    logits = session.run(None, {session.get_inputs()[0].name: crops.numpy()})[0]
    quality["int8"] = {"agreement": float((torch.from_numpy(logits).argmax(1) == reference).float().mean())}
    return _compare("mobilenet_v2", forms, 10 if quick else 30, quality, {"structured": {"pruning": "L1, 50 % of channels"}})


def minilm(quick: bool, folder: str) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from srcompress.kernels import sparsify

    st = assets.minilm()
    dense = st[0].auto_model.eval()
    tokens = assets.minilm_tokens(st, assets.sentences("test"))
    reference = assets.minilm_embed(dense, tokens)
    structured = copy.deepcopy(dense)
    if quick:
        prune_structured(structured, (tokens["input_ids"][:2, :16],), StructuredSpec(0.5, exclude=("*attention*",)), "l1")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune_structured(structured, (tokens["input_ids"][:2, :16],), StructuredSpec(0.5, exclude=("*attention*",)),
                             "submodular", calibration=load_calibration("sentences", 512, model=dense))
    blocky = copy.deepcopy(dense)
    spec = MaskSpec(0.9, pattern=Pattern.parse("block:32x32"), exclude=("*attention*", "*pooler*", "*embeddings*"))
    prune_model(blocky, (tokens["input_ids"][:2, :16],), spec)
    converted = 0
    for layer in blocky.encoder.layer:  # only the block-pruned FFN layers; sparsify's own rule models a GPU
        for parent in (layer.intermediate, layer.output):
            parent.dense, report = sparsify(parent.dense, (32, 32), force=True)
            converted += len(report.converted)

    def cosine(model):
        return float((assets.minilm_embed(model, tokens) * reference).sum(-1).mean())

    quality = {"structured": {"mean_cosine": cosine(structured)}, "block-sparse": {"mean_cosine": cosine(blocky)}}
    batch = (tokens["input_ids"][:8], tokens["attention_mask"][:8])
    forms = {"dense": {"torch": _torch_call(dense, batch)}, "structured": {"torch": _torch_call(structured, batch)},
             "block-sparse": {"torch": _torch_call(blocky, batch)}}
    extra = {"structured": {"pruning": f"{'L1' if quick else 'submodular'}, 50 % of FFN neurons"},
             "block-sparse": {"pruning": f"90 % of FFN weights in 32x32 blocks, {converted} layers on the CPU BSR path",
                              "converted_layers": converted}}
    return _compare("minilm", forms, 10 if quick else 30, quality, extra)


def run(quick: bool, only: str | None = None) -> list[dict]:
    torch.manual_seed(0)
    np.random.seed(0)
    parts = {"mnist_cnn": mnist_cnn, "mobilenet_v2": mobilenet_v2, "minilm": minilm}
    with tempfile.TemporaryDirectory(prefix="srcompress-latency-") as folder:
        return [row for name, fn in parts.items() if not only or only in name for row in fn(quick, folder)]


def markdown(rows: list[dict]) -> str:
    lines = ["| model | form | runtime | dense (ms) | compressed (ms) | speedup | quality | how |", "|---" * 8 + "|"]
    for r in rows:
        quality = ", ".join(f"{k} {r[k]:.3f}" for k in ("accuracy", "agreement", "mean_cosine") if k in r)
        if "accuracy_dense" in r:
            quality += f" (dense {r['accuracy_dense']:.3f})"
        verdict = "" if r["speedup"] >= 1.05 else " (not faster)"
        lines.append(f"| {r['model']} | {r['form']} | {r['runtime']} | {r['dense_ms']} | {r['compressed_ms']} | "
                     f"{r['speedup']:.2f}x{verdict} | {quality} | {r.get('pruning', '')} |")
    return "\n".join(lines)


def main() -> None:
    from .common import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images; L1 instead of submodular for MiniLM")
    args = parser.parse_args()
    rows = run(args.quick)
    text = markdown(rows)
    print(text)
    write_results("latency" + ("_quick" if args.quick else ""), {"rows": rows, "quick": args.quick}, text)


if __name__ == "__main__":
    main()
