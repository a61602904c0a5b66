"""ONNX Runtime CPU latency of dense fp32 vs pruned fp32 vs INT8 QDQ, and INT8 accuracy/agreement (issue 8).

Run: PYTHONPATH=. python -m benchmarks.export  → benchmarks/results/export.json and export.md.
Latencies are medians of interleaved calls in one run (another process may share the CPU); ratios are what count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleaved_medians, write_results
from srcompress import assets
from srcompress.calib.data import load_calibration
from srcompress.compress.structured import StructuredSpec
from srcompress.export.onnx import export_onnx, session
from srcompress.export.quantize import TARGET_ERROR, fidelity, heldout_set, quantize_int8
from srcompress.pipeline import prune_structured


HELDOUT = 512  # held-out samples for fidelity: at 128, one crop is 0.8 points of agreement
FAST_TARGET = 0.01  # --int8-target-error for the speed-first variant (dense models)


def _latency(paths: dict[str, Path], x: np.ndarray, repeats: int = 20) -> dict[str, float]:
    sessions = {name: session(path, threads=2) for name, path in paths.items()}
    return interleaved_medians({name: (lambda s=s: s.run(None, {"x": x})) for name, s in sessions.items()}, repeats=repeats)


def run_model(name: str, dense: torch.nn.Module, pruned: torch.nn.Module, example: torch.Tensor, calib: str, samples: int,
              batch: int, folder: Path) -> dict:
    cal = load_calibration(calib, samples, batch_size=16)
    export_onnx(dense, (example,), folder / f"{name}.dense.onnx", parity_batches=cal.batches[:2])
    export_onnx(pruned, (example,), folder / f"{name}.pruned.onnx", parity_batches=cal.batches[:2])
    out = {"calibration": f"{calib}, {samples} samples", "batch": batch}
    paths = {"dense_fp32": folder / f"{name}.dense.onnx", "pruned_fp32": folder / f"{name}.pruned.onnx"}
    batches, labels, dataset = heldout_set(calib, None, HELDOUT)
    for act in ("s8", "u8"):
        for which, target in (("dense", TARGET_ERROR), ("pruned", TARGET_ERROR), ("dense", FAST_TARGET)):
            label = f"{which}_int8_{act}" + ("" if target == TARGET_ERROR else f"_target{target:g}")
            path = folder / f"{name}.{label}.onnx"
            scheme = quantize_int8(folder / f"{name}.{which}.onnx", path, cal.batches, activations=act, target_error=target)
            paths[label] = path
            fid = fidelity(folder / f"{name}.{which}.onnx", path, batches, labels, dataset)
            fp32_classes = len({int(c) for b in batches for c in session(folder / f"{name}.{which}.onnx").run(None, {"x": b[0].numpy()})[0].argmax(1)})
            out[f"fidelity_{label}"] = {**fid, "fp32_distinct_top1_classes": fp32_classes, "target_error": target,
                                        "calibration_output_error": scheme["calibration_output_error"],
                                        "fp32_layers": len(scheme["fp32_layers"]), "weighted_layers": scheme["weighted_layers"]}
    x = example.repeat(batch, *[1] * (example.dim() - 1))[:batch].numpy()
    medians = _latency(paths, np.ascontiguousarray(x))
    out["median_ms"] = {k: v * 1e3 for k, v in medians.items()}
    out["ratio_vs_dense_fp32"] = {k: medians["dense_fp32"] / v for k, v in medians.items()}
    return out


def main() -> None:
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x, _ = assets.mnist5k("test")
        cnn, cnn_pruned = assets.pretrained_digit_cnn(), assets.pretrained_digit_cnn()
        prune_structured(cnn_pruned, (x[:1],), StructuredSpec(0.5), "l1")
        results["mnist_cnn"] = run_model("cnn", cnn, cnn_pruned, x[:1], "mnist5k", 256, 32, folder)
        crops = assets.image_crops("test", 1)
        mb, mb_pruned = assets.pretrained_mobilenet_v2(), assets.pretrained_mobilenet_v2()
        prune_structured(mb_pruned, (crops,), StructuredSpec(0.5), "l1")
        results["mobilenet_v2"] = run_model("mb", mb, mb_pruned, crops, "photos", 64, 8, folder)
    lines = ["# Export: ONNX Runtime CPU latency and INT8 fidelity", "",
             "Pruned = structured L1, 50 % of channels, no fine-tuning. INT8 = static QDQ, per-channel weights with bias correction, "
             "the most sensitive layers kept fp32 (--int8-fp32-layers auto with the default --int8-target-error 0.0025, or 0.01 "
             "where the name says target0.01); s8 = symmetric int8 activations on weighted-layer "
             "inputs (TensorRT form), u8 = asymmetric uint8 with Relu/Clip folded (ONNX Runtime CPU form). "
             "Median of 20 interleaved calls, 2 threads; the CPU may be shared with other jobs.", ""]
    for model, r in results.items():
        lines += [f"## {model} (batch {r['batch']}, calibration {r['calibration']})", "", "| artifact | median ms | speedup vs dense fp32 |", "|---|---|---|"]
        lines += [f"| {k} | {r['median_ms'][k]:.3f} | {r['ratio_vs_dense_fp32'][k]:.2f}x |" for k in r["median_ms"]]
        lines += ["", "| INT8 variant | dataset | top-1 agreement | accuracy fp32 → int8 | mean cosine | calibration output error | fp32 distinct classes | layers kept fp32 |", "|---|---|---|---|---|---|---|---|"]
        for k, f in r.items():
            if k.startswith("fidelity_"):
                acc = f"{f['accuracy_reference']:.3f} → {f['accuracy']:.3f}" if f.get("accuracy") is not None else "n/a"
                lines.append(f"| {k[9:]} | {f['dataset']} | {f['top1_agreement']:.3f} | {acc} | {f['mean_cosine']:.4f} | {f['calibration_output_error']:.4f} | {f['fp32_distinct_top1_classes']} | {f['fp32_layers']} of {f['weighted_layers']} |")
        lines.append("")
    write_results("export", results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
