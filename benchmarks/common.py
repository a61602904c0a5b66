"""Shared benchmark plumbing: environment record, timing in one run, ONNX Runtime sessions, result files."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import numpy

    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3,
                        group_of: Callable[[str], str] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (within each group) so noise hits all alike."""
    from srcompress.export.bench import interleaved_times

    times = interleaved_times(functions, repeats, warmup, group_of)
    return {name: statistics.median(values) for name, values in times.items()}


def onnx_file(model: torch.nn.Module, inputs: tuple, folder: str | None = None) -> Path:
    """Export with srcompress's own exporter (dynamic batch, checker, parity against PyTorch); returns the path."""
    from srcompress.export.onnx import export_onnx

    folder = folder or tempfile.mkdtemp(prefix="srcompress-bench-")
    path = Path(folder) / f"m{id(model)}.onnx"
    export_onnx(model.eval(), inputs, path)
    return path


def onnx_session(model: torch.nn.Module, inputs: tuple, folder: str | None = None):
    """An ONNX Runtime CPU session of the exported model."""
    from srcompress.export.onnx import session

    return session(onnx_file(model, inputs, folder))


def write_results(name: str, payload: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return RESULTS / f"{name}.json"


def run_benchmark_cli(name: str, doc: str, run: Callable[[bool], list[dict]], markdown: Callable[[list[dict]], str],
                      quick_help: str, plot: Callable[[list[dict], Path], None] | None = None) -> None:
    """``python -m benchmarks.<name> [--quick]``: run, print the Markdown, write ``results/<name>[_quick].json/.md``
    (and ``.png`` with ``plot``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run(args.quick)
    text = markdown(rows)
    print(text)
    written = write_results(name + ("_quick" if args.quick else ""), {"rows": rows, "quick": args.quick}, text)
    if plot is not None:
        plot(rows, written.with_suffix(".png"))
