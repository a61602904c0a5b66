"""Structured engine figures: MobileNetV2 with half its channels removed (L1) and MiniLM with half its FFN neurons.

MobileNetV2: parameters, conv/linear FLOPs and ONNX Runtime CPU latency (batch 8, 224 px) as ratios
against the dense model measured in the same run, plus top-1 agreement on real photo crops.
MiniLM: mean cosine similarity of sentence embeddings against the dense model on held-out real sentences.

    python -m benchmarks.structured_engine
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from srcompress import assets
from srcompress.compress.structured import StructuredSpec
from srcompress.pipeline import prune_structured

from .common import interleaved_medians, onnx_session, write_results


def mobilenet(repeats: int) -> dict:
    dense = assets.pretrained_mobilenet_v2()
    pruned = copy.deepcopy(dense)
    report = prune_structured(pruned, (torch.randn(1, 3, 224, 224),), StructuredSpec(0.5), "l1")
    crops = assets.image_crops("test", 144)
    with torch.no_grad():
        agree = float((dense(crops).argmax(1) == pruned(crops).argmax(1)).float().mean())
    batch = crops[:8].numpy()
    sessions = {"dense": onnx_session(dense, (crops[:2],)), "pruned": onnx_session(pruned, (crops[:2],))}
    feeds = {name: {s.get_inputs()[0].name: batch} for name, s in sessions.items()}
    latency = interleaved_medians({name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}, repeats)
    return {
        "params_dense": report.before["params"], "params_pruned": report.after["params"],
        "params_ratio": report.after["params"] / report.before["params"],
        "flops_dense": report.before["flops"], "flops_pruned": report.after["flops"],
        "flops_ratio": report.after["flops"] / report.before["flops"],
        "ort_ms_dense": latency["dense"] * 1e3, "ort_ms_pruned": latency["pruned"] * 1e3,
        "ort_speedup": latency["dense"] / latency["pruned"], "top1_agreement": agree, "crops": len(crops),
    }


def minilm() -> dict:
    model = assets.minilm()
    dense = model[0].auto_model.eval()
    pruned = copy.deepcopy(dense)
    texts = assets.sentences("test")
    tokens = assets.minilm_tokens(model, texts)
    example = (tokens["input_ids"][:2, :16],)
    report = prune_structured(pruned, example, StructuredSpec(0.5, exclude=("*attention*",)), "l1")
    cosine = (assets.minilm_embed(dense, tokens) * assets.minilm_embed(pruned, tokens)).sum(-1)
    return {"sentences": len(texts), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "params_ratio": report.after["params"] / report.before["params"],
            "ffn_widths": sorted({row["units_after"] for row in report.groups if row["kind"] == "neurons"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mb, lm = mobilenet(args.repeats), minilm()
    md = "\n".join([
        "| MobileNetV2, 50 % channels removed (L1) | dense | pruned | ratio |", "|---|---|---|---|",
        f"| parameters | {mb['params_dense']:,} | {mb['params_pruned']:,} | {mb['params_ratio']:.3f} |",
        f"| conv/linear FLOPs | {mb['flops_dense']:,} | {mb['flops_pruned']:,} | {mb['flops_ratio']:.3f} |",
        f"| ONNX Runtime CPU, batch 8, 224 px (median ms) | {mb['ort_ms_dense']:.1f} | {mb['ort_ms_pruned']:.1f} | speedup {mb['ort_speedup']:.2f}x |",
        f"| top-1 agreement with dense ({mb['crops']} photo crops) | | {mb['top1_agreement']:.1%} | |",
        "",
        f"MiniLM, 50 % of FFN neurons removed (L1): mean cosine {lm['mean_cosine']:.4f} (min {lm['min_cosine']:.4f}) "
        f"on {lm['sentences']} held-out sentences; parameters x{lm['params_ratio']:.3f}.",
    ])
    print(md)
    write_results("structured_engine", {"mobilenet_v2": mb, "minilm": lm}, md)


if __name__ == "__main__":
    main()
