"""End-to-end CPU latency: dense against each compressed form, measured in the same run, quality beside it.

Models: the MNIST CNN (batch 64), MobileNetV2 (batch 8, 224 px) and MiniLM (8 sentences). Forms:
structured (channels/neurons physically removed), block-sparse (90 % of the FFN weights in 32x32 blocks,
run by ``srcompress.kernels.sparsify``; MiniLM only, the layers where block sparsity applies) and INT8
QDQ ONNX (ONNX Runtime). Runtimes: PyTorch eager and ONNX Runtime CPU. Every figure
is a ratio of medians of interleaved calls, so machine noise hits dense and compressed alike; each runtime is
timed on its own (PyTorch's idle OpenMP threads keep spinning after a call and slowed ONNX Runtime calls between them).

    python -m benchmarks.latency [--quick]
"""

from __future__ import annotations

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
from srcompress.export.onnx import session
from srcompress.export.quantize import quantize_int8
from srcompress.pipeline import prune_model, prune_structured

from .common import interleaved_medians, onnx_file, run_benchmark_cli


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
    medians = interleaved_medians(calls, repeats=repeats, group_of=lambda key: key.split(":")[0])
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


def _onnx_forms(models: dict, example: tuple, batch: tuple, folder: str) -> tuple[dict, dict]:
    """PyTorch and ONNX Runtime callables per model, and each model's fp32 ONNX file."""
    files = {name: onnx_file(model, example, folder) for name, model in models.items()}
    forms = {name: {"torch": _torch_call(model, batch), "ort": _ort_call(session(files[name]), batch)}
             for name, model in models.items()}
    return forms, files


def _int8_session(fp32: Path, calibration):
    """ONNX Runtime session of the INT8 QDQ model (static, calibrated on ``calibration``) next to ``fp32``, in the
    uint8 form ONNX Runtime's CPU kernels run fastest (the s8 TensorRT form runs as dequantize + fp32 on CPU)."""
    int8 = fp32.with_suffix(".int8.onnx")
    quantize_int8(fp32, int8, calibration.batches, activations="u8")
    return session(int8)


def _top1(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]).argmax(1)


def mnist_cnn(quick: bool, folder: str) -> list[dict]:
    dense = assets.pretrained_digit_cnn().eval()
    images, labels = assets.mnist5k("test")
    calibration = load_calibration("mnist5k", 500, seed=0)
    structured = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_structured(structured, (images[:1],), StructuredSpec(0.5), "submodular", calibration=calibration)
    batch = (images[:64],)
    forms, files = _onnx_forms({"dense": dense, "structured": structured}, (images[:2],), batch, folder)
    int8 = _int8_session(files["dense"], calibration)
    forms["int8"] = {"ort": _ort_call(int8, batch)}
    with torch.no_grad():
        predictions = {"dense": dense(images).argmax(1), "structured": structured(images).argmax(1), "int8": _top1(int8, images)}
    dense_accuracy = float((predictions["dense"] == labels).float().mean())
    quality = {form: {"accuracy": float((p == labels).float().mean()), "accuracy_dense": dense_accuracy}
               for form, p in predictions.items()}
    return _compare("mnist_cnn", forms, 20 if quick else 60, quality, {"structured": {"pruning": "submodular, 50 % of channels"}})


def mobilenet_v2(quick: bool, folder: str) -> list[dict]:
    dense = assets.pretrained_mobilenet_v2().eval()
    crops = assets.image_crops("test", 48 if quick else 144)
    structured = copy.deepcopy(dense)
    prune_structured(structured, (crops[:1],), StructuredSpec(0.5), "l1")
    batch = (crops[:8],)
    forms, files = _onnx_forms({"dense": dense, "structured": structured}, (crops[:2],), batch, folder)
    int8 = _int8_session(files["dense"], load_calibration("photos", 32 if quick else 128, seed=0))
    forms["int8"] = {"ort": _ort_call(int8, batch)}
    with torch.no_grad():
        reference = dense(crops).argmax(1)
        predictions = {"structured": structured(crops).argmax(1), "int8": _top1(int8, crops)}
    quality = {form: {"agreement": float((p == reference).float().mean())} for form, p in predictions.items()}
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
    spec = MaskSpec(0.9, pattern=Pattern.parse("block:32x32"), exclude=("*attention*", "*pooler*"))
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
    run_benchmark_cli("latency", __doc__, run, markdown, "fewer repeats and images; L1 instead of submodular for MiniLM")


if __name__ == "__main__":
    main()
