"""``srcompress bench BUNDLE``: latency of each artifact, dense vs compressed in the same run.

The bundle is verified first (schema, every file's SHA-256). Inputs are the bundle's ``sample_inputs.npz``
(real rows), cycled to each batch size. Calls are interleaved across the artifacts of one runtime so machine
noise hits all of them alike, one runtime at a time; p50/p90/p99 come from ``runs`` timed calls each. The verdict
says plainly when the compressed model is not faster than the dense baseline on a runtime: "faster" needs a p50
speedup of at least ``FASTER`` and a p50 difference larger than the run-to-run spread (interquartile range) of
either artifact; an artifact byte-identical to the baseline (or exported from the same model file, for fp32) is
reported as the same artifact, its difference noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import ui
from ..errors import SrcompressError
from . import manifest as manifest_mod

FASTER = 1.05  # a speedup below this is reported as "not faster"


def _inputs(folder: Path, names: list[str], batch: int) -> list[np.ndarray]:
    with np.load(folder / "sample_inputs.npz", allow_pickle=False) as data:
        arrays = [np.asarray(data[n]) for n in names]
    index = np.arange(batch) % arrays[0].shape[0]
    return [np.ascontiguousarray(a[index]) for a in arrays]


def _runner(folder: Path, artifact: dict, names: list[str], threads: int | None):
    """A zero-argument callable per batch size, or None (with the reason) when the runtime is missing."""
    runtime = artifact["runtime"]
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from .onnx import session

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
        sess = session(folder / artifact["file"], threads, providers)
        label = f"onnxruntime {sess.get_providers()[0].replace('ExecutionProvider', '')}"

        def make(arrays):
            feeds = dict(zip((i.name for i in sess.get_inputs()), arrays))
            return lambda: sess.run(None, feeds)

        return label, make
    if runtime == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        module = torch.export.load(str(folder / artifact["file"])).module()

        def make(arrays):
            tensors = [torch.from_numpy(a) for a in arrays]

            def call():
                with torch.no_grad():
                    return module(*tensors)

            return call

        return "torch eager (torch.export program)", make
    if runtime == "tensorrt":
        return None, "TensorRT engines are benchmarked with trtexec --loadEngine on the device (not from Python here)"
    return None, f"unknown runtime {runtime}"


def interleaved_times(calls: dict[str, Callable[[], object]], runs: int, warmup: int,
                      group_of: Callable[[str], str] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``runs`` times, calls interleaved so machine noise hits all alike.

    With ``group_of`` (name -> runtime) only calls of one group are interleaved, groups one after another:
    PyTorch's idle OpenMP threads keep spinning after a call and slowed ONNX Runtime calls made between them.
    """
    groups: dict[str, dict[str, Callable[[], object]]] = {}
    for name, call in calls.items():
        groups.setdefault(group_of(name) if group_of else "", {})[name] = call
    times = {name: [] for name in calls}
    for group in groups.values():
        for call in group.values():
            for _ in range(warmup):
                call()
        for _ in range(runs):
            for name, call in group.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return times


def _percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "spread_ms": float(np.percentile(ms, 75) - np.percentile(ms, 25))}


def bench_bundle(bundle: Path, batch_sizes: list[int], *, runs: int = 30, warmup: int = 5, threads: int | None = None) -> dict:
    folder = Path(bundle)
    with ui.phase(f"verifying {folder}"):
        manifest = manifest_mod.load_and_verify(folder)
    if "sample_inputs.npz" not in manifest["files"]:
        raise SrcompressError("the bundle has no sample_inputs.npz", "re-export it with srcompress export")
    names = [spec["name"] for spec in manifest["io"]["inputs"]]
    runners, skipped = {}, []
    for artifact in manifest["artifacts"]:
        label, make = _runner(folder, artifact, names, threads)
        if label is None:
            skipped.append({"artifact": artifact["name"], "reason": make})
            continue
        runners[artifact["name"]] = (label, make, artifact)
    rows = []
    for batch in ui.track(batch_sizes, "benchmarking batch sizes"):
        arrays = _inputs(folder, names, batch)
        calls = {name: make(arrays) for name, (label, make, artifact) in runners.items()}
        for name, values in interleaved_times(calls, runs, warmup, group_of=lambda name: runners[name][0]).items():
            label, _, artifact = runners[name]
            rows.append({"artifact": name, "file": artifact["file"], "runtime": label, "precision": artifact["precision"],
                         "role": artifact["role"], "batch": batch, "runs": runs, "warmup": warmup,
                         "throughput_per_s": batch / float(np.median(values)), **_percentiles(values)})
    comparisons, verdicts = _compare(rows, _fingerprints(manifest))
    result = {"bundle": str(folder), "batch_sizes": batch_sizes, "rows": rows, "skipped": skipped,
              "comparisons": comparisons, "verdict": verdicts,
              "method": f"calls interleaved across the artifacts of one runtime, one runtime at a time; {warmup} warm-up and {runs} timed calls each; inputs from "
                        "sample_inputs.npz; other processes on the machine add noise"}
    _write(folder, manifest, result)
    return result


def _fingerprints(manifest: dict) -> dict[str, tuple]:
    """Per artifact file: the SHA-256 of it and of its external-data file, from the manifest's file table; the fp32
    artifacts of a bundle whose model and baseline are one file (same SHA-256) all get that file's hash."""
    files, model = manifest["files"], manifest["model"]
    same_source = model.get("sha256") is not None and model.get("sha256") == model.get("baseline_sha256")
    return {a["file"]: (("model", model["sha256"]) if same_source and a["precision"] == "fp32" else
                        (files[a["file"]]["sha256"], files.get(a["file"] + ".data", {}).get("sha256")))
            for a in manifest["artifacts"] if a["file"] in files}


def _compare(rows: list[dict], fingerprints: dict[str, tuple] | None = None) -> tuple[list[dict], list[str]]:
    """Speedup of every compressed artifact over the baseline on the same runtime and batch size, and the verdicts."""
    fingerprints = fingerprints or {}
    baselines = {(r["runtime"], r["batch"]): r for r in rows if r["role"] == "baseline"}
    if not baselines:
        return [], ["no baseline in this bundle (export with --baseline ORIGINAL.pt): no dense model to compare with"]
    comparisons, verdicts = [], []
    for row in rows:
        base = baselines.get((row["runtime"], row["batch"]))
        if row["role"] != "compressed" or base is None:
            continue
        speedup = base["p50_ms"] / row["p50_ms"]
        spread = max(base["spread_ms"], row["spread_ms"])
        same = fingerprints.get(row["file"]) is not None and fingerprints.get(row["file"]) == fingerprints.get(base["file"])
        where = f"on {row['runtime']} at batch {row['batch']} ({speedup:.2f}x"
        if same:
            verdict = "same artifact"
            verdicts.append(f"{row['artifact']} and {base['artifact']} are the same model (identical SHA-256 of the file or of "
                            f"the model file it was exported from): the difference {where}) is measurement noise")
        elif speedup >= FASTER and base["p50_ms"] - row["p50_ms"] > spread:
            verdict = "faster"
        elif speedup >= FASTER:
            verdict = "within noise"
            verdicts.append(f"{row['artifact']} is NOT measurably faster than the dense baseline {where}, a p50 difference "
                            f"of {base['p50_ms'] - row['p50_ms']:.3f} ms within the run-to-run spread of {spread:.3f} ms)")
        else:
            verdict = "not faster"
            verdicts.append(f"{row['artifact']} is NOT faster than the dense baseline {where}): smaller is not always faster")
        comparisons.append({"artifact": row["artifact"], "runtime": row["runtime"], "batch": row["batch"],
                            "baseline": base["artifact"], "speedup_p50": speedup, "spread_ms": spread, "verdict": verdict})
    if comparisons and not verdicts:
        verdicts.append("every compressed artifact is faster than the dense baseline on its runtime, beyond the run-to-run spread")
    return comparisons, verdicts


def _markdown(result: dict) -> str:
    lines = ["# Latency", "", result["method"], "", "| artifact | runtime | precision | batch | p50 ms | p90 ms | p99 ms | items/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['artifact']} | {r['runtime']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_per_s']:.1f} |")
    if result["comparisons"]:
        lines += ["", "| artifact | runtime | batch | speedup vs dense (p50) | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {c['artifact']} | {c['runtime']} | {c['batch']} | {c['speedup_p50']:.2f}x | {c['verdict']} |"
                  for c in result["comparisons"]]
    lines += ["", "## Verdict", ""] + [f"- {v}" for v in result["verdict"]]
    lines += [f"- skipped {s['artifact']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _write(folder: Path, manifest: dict, result: dict) -> None:
    (folder / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "latency.md").write_text(_markdown(result))
    summary = {"report": "latency.json", "batch_sizes": result["batch_sizes"], "verdict": result["verdict"],
               "p50_ms": {f"{r['artifact']}@{r['batch']}": r["p50_ms"] for r in result["rows"]}}
    manifest["latency"] = summary
    manifest["files"].update(manifest_mod.file_table(folder, ["latency.json", "latency.md"]))
    manifest_mod.write(folder, manifest)


def render(console, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"latency of {result['bundle']}")
    for column in ("artifact", "runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "speedup"):
        table.add_column(column)
    speedups = {(c["artifact"], c["batch"]): c["speedup_p50"] for c in result["comparisons"]}
    for r in result["rows"]:
        s = speedups.get((r["artifact"], r["batch"]))
        table.add_row(r["artifact"], r["runtime"], str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      f"{r['p99_ms']:.3f}", f"{s:.2f}x" if s else "")
    console.print(table)
    for verdict in result["verdict"]:
        console.print(f"verdict: {verdict}")
    for s in result["skipped"]:
        console.print(f"skipped {s['artifact']}: {s['reason']}")
