"""Block-sparse Linear speed: srcompress.kernels against dense and torch's own sparse paths.

Without CUDA (the CPU run): ``sparsify()`` of a 4096x4096 Linear pruned to 90 % in whole blocks (srcompress's
block pruner) against the same dense layer, at batch 1, 8 and 64 with blocks 16, 32 and 64. Dense and
sparse are timed alternately in the same process, medians from ``torch.utils.benchmark``.

With CUDA (the GPU sweep of the kernels notes, section 9.2): real layer shapes, M from 1 to 4096, densities
0.5 to 0.05, blocks 16 to 64 and 64x16, bf16/fp16; our Triton kernel against dense ``F.linear`` (cuBLAS),
torch's ``bsr_dense_mm`` as shipped and after its own tuner (``--tune-torch``), and 2:4
``to_sparse_semi_structured`` at 50 %. Timed with ``triton.testing.do_bench`` (median and IQR), M <= 16 also
inside a CUDA graph; the roofline column is the ideal time of the time model over the measured time.

Writes ``benchmarks/results/kernels_<device>[_quick].jsonl`` (one JSON object per case) and ``.md``.

    python benchmarks/kernels.py --quick          # CPU: < 2 min; GPU: the acceptance cases only
    python benchmarks/kernels.py                  # CPU: full; GPU: the whole sweep (filter with the options)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from srcompress.compress.masks import MaskSpec
from srcompress.compress.patterns import Pattern
from srcompress.kernels import sparsify, to_block_sparse
from srcompress.kernels.roofline import hardware_for_device, ideal_time
from srcompress.pipeline import prune_model

RESULTS = Path(__file__).resolve().parent / "results"
BUSY_CPUS = 0.25  # CPU rows measured while other processes used more than this are flagged
GPU_SHAPES = {  # (outputs, inputs) of real layers
    "minilm-ffn-in": (1536, 384), "minilm-ffn-out": (384, 1536),
    "vit-b-mlp-in": (3072, 768), "vit-b-mlp-out": (768, 3072),
    "square-4096": (4096, 4096),
    "llama2-7b-up": (11008, 4096), "llama2-7b-down": (4096, 11008),
    "llama3-8b-up": (14336, 4096), "llama3-8b-down": (4096, 14336),
    "mobilenetv2-expand-1x1": (960, 160), "mobilenetv2-project-1x1": (160, 960), "mobilenetv2-head-1x1": (1280, 320),
}
GPU_TOKENS = (1, 8, 16, 64, 256, 1024, 4096)
GPU_DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)
GPU_BLOCKS = ((16, 16), (32, 32), (64, 64), (64, 16))
GPU_DTYPES = ("bfloat16", "float16")
GRAPH_MAX_TOKENS = 16  # M up to this is also timed inside a CUDA graph (eager calls there are host-bound)


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device == "cuda":
        import triton

        info.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda)
    else:
        info.update(cpu=_cpu_name(), threads=torch.get_num_threads(), cpus=os.cpu_count())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- CPU


def pruned_linear(n: int, k: int, block: int, sparsity: float) -> nn.Sequential:
    """A random-init Linear pruned in whole blocks by srcompress's own block pruner (magnitude, per layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n)).eval()
    report = prune_model(model, (torch.randn(1, k),), MaskSpec(sparsity, Pattern.parse(f"block:{block}x{block}"), scope="layer"))
    if not report.ok:
        raise RuntimeError(f"pruning failed: {report.problem}")
    return model


def cpu_ticks() -> tuple[int, int] | None:
    """Busy clock ticks of the whole machine and of this process (all threads), from /proc; None off Linux."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(values) - values[3] - values[4], int(own[11]) + int(own[12])  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return None


def other_cores(start: tuple[int, int] | None, wall_s: float) -> float | None:
    """Average number of CPUs that other processes (and the hypervisor) used since ``start``."""
    end = cpu_ticks()
    if start is None or end is None:
        return None
    return ((end[0] - start[0]) - (end[1] - start[1])) / (wall_s * os.sysconf("SC_CLK_TCK"))


def median_ms(module: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer("module(x)", globals={"module": module, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def cpu_run(quick: bool) -> list[dict]:
    """Dense vs sparsify()'d layer, alternating in rounds so drift hits both; ratio of the round medians."""
    rounds, min_run_time = (3, 0.2) if quick else (7, 0.5)
    n = k = 4096
    rows = []
    for block in (16, 32, 64):
        dense = pruned_linear(n, k, block, 0.9)
        sparse, report = sparsify(copy.deepcopy(dense), (block, block))
        decision = report.layers[0]
        if not decision.converted:
            raise RuntimeError(f"sparsify() kept the layer dense: {decision.reason}")
        for m in (1, 8, 64):
            x = torch.randn(m, k)
            with torch.inference_mode():
                if not torch.allclose(sparse(x), dense(x), atol=1e-4):
                    raise RuntimeError(f"sparse and dense outputs differ (block {block}, batch {m})")
                times = {"dense": [], "sparse": []}
                ticks, started = cpu_ticks(), time.perf_counter()
                for _ in range(rounds):
                    times["dense"].append(median_ms(dense, x, min_run_time))
                    times["sparse"].append(median_ms(sparse, x, min_run_time))
                others = other_cores(ticks, time.perf_counter() - started)
            dense_ms, sparse_ms = statistics.median(times["dense"]), statistics.median(times["sparse"])
            rows.append({"shape": [n, k], "dtype": "float32", "block": [block, block], "density": round(decision.density, 4),
                         "M": m, "kernel": f"sparsify() -> {sparse[0].path(x)}", "dense_ms": round(dense_ms, 4),
                         "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 2), "rounds": rounds,
                         "dense_ms_rounds": [round(t, 4) for t in times["dense"]],
                         "sparse_ms_rounds": [round(t, 4) for t in times["sparse"]],
                         "other_processes_cpus": None if others is None else round(others, 2)})
            print(f"block {block:2d} batch {m:2d}: dense {dense_ms:7.3f} ms  sparse {sparse_ms:7.3f} ms  "
                  f"{dense_ms / sparse_ms:5.2f}x  (other processes used {others or 0:.2f} CPUs)", file=sys.stderr, flush=True)
    return rows


def cpu_table(rows: list[dict], env: dict, command: str) -> str:
    lines = [f"# CPU block-sparse Linear: sparsify() vs dense ({env['cpu']}, {env['cpus']} CPUs, {env['threads']} threads, "
             f"torch {env['torch']})",
             "", f"`{command}`; 4096x4096 Linear pruned to 90 % in whole blocks; fp32; medians of "
             f"{rows[0]['rounds']} alternating rounds of `torch.utils.benchmark` (each round: median of its blocks).", "",
             "'other CPUs': how many CPUs other processes kept busy meanwhile (from /proc); above "
             f"{BUSY_CPUS} the timings share the machine and are not trustworthy.", "",
             "| block | batch | block density | dense (ms) | sparsify() (ms) | speedup | other CPUs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        others = r["other_processes_cpus"]
        flag = "" if others is None or others <= BUSY_CPUS else " (busy)"
        lines.append(f"| {r['block'][0]}x{r['block'][1]} | {r['M']} | {r['density']:.3f} | {r['dense_ms']:.3f} | "
                     f"{r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {'-' if others is None else f'{others:.2f}'}{flag} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- GPU


def random_block_sparse(n, k, block, density, dtype, gen, device):
    """Exactly round(density x blocks) random whole blocks kept; values ~ N(0, 1/k)."""
    rows, cols = n // block[0], k // block[1]
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=gen)[:round(density * rows * cols)]] = True
    mask = keep.view(rows, cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(n, k, generator=gen) / k**0.5 * mask).to(dtype=dtype, device=device)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (50 %)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(weight.shape)


def gpu_timer(fn, graph: bool = False) -> tuple[float, float, float]:
    """Median and quartiles in microseconds (L2 flushed between reps by do_bench)."""
    import triton.testing

    if graph:
        q = triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=[0.25, 0.5, 0.75])
    else:
        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
    return q[1] * 1e3, q[0] * 1e3, q[2] * 1e3


def gpu_cases(args) -> list[tuple]:
    if args.quick:
        return [("square-4096", (4096, 4096), "bfloat16", (64, 64), 0.1, m) for m in (1, 4096)]
    cases = []
    for name in args.shapes:
        n, k = GPU_SHAPES[name]
        for dtype in args.dtypes:
            for block in args.blocks:
                if n % block[0] or k % block[1]:
                    continue
                for density in args.densities:
                    for m in args.tokens:
                        cases.append((name, (n, k), dtype, block, density, m))
    return cases


def gpu_run(args, device: str = "cuda", timer=gpu_timer) -> list[dict]:
    from torch.sparse._triton_ops import bsr_dense_mm
    from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

    from srcompress.kernels.triton_bsr import bsr_linear

    hw = hardware_for_device(torch.cuda.get_device_name())
    gen = torch.Generator().manual_seed(0)
    rows, dense_cache, two_four_done = [], {}, set()
    for name, (n, k), dtype_name, block, density, m in gpu_cases(args):
        dtype = getattr(torch, dtype_name)
        weight = random_block_sparse(n, k, block, density, dtype, gen, device)
        bsr = to_block_sparse(weight, block)
        x = torch.randn(m, k, generator=gen).to(dtype=dtype, device=device)
        base = {"shape_name": name, "shape": [n, k], "dtype": dtype_name, "M": m}
        sparse = {**base, "block": list(block), "density": density}

        def record(entry, kernel, fn, graph=False, note=""):
            try:
                fn()  # compile / tune outside the timing
                med, q1, q3 = timer(fn, graph)
            except Exception as err:  # noqa: BLE001 - a baseline that cannot run this case is a result too
                rows.append({**entry, "kernel": kernel, "error": str(err).splitlines()[0][:200]})
                return None
            key = (name, dtype_name, m, graph)
            if kernel.startswith("dense"):
                dense_cache[key] = med
            row = {**entry, "kernel": kernel, "median_us": round(med, 3), "iqr_us": round(q3 - q1, 3), "cuda_graph": graph}
            if key in dense_cache:
                row["speedup_vs_dense"] = round(dense_cache[key] / med, 3)
            if hw is not None and "block" in entry:
                row["roofline_eff"] = round(ideal_time(n, k, m, hw, density, block) * 1e6 / med, 3)
            elif hw is not None and kernel.startswith("dense"):
                row["roofline_eff"] = round(ideal_time(n, k, m, hw) * 1e6 / med, 3)
            if note:
                row["note"] = note
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            return med

        graph_too = m <= GRAPH_MAX_TOKENS
        if (name, dtype_name, m, False) not in dense_cache:
            dense_weight = torch.randn(n, k, generator=gen).to(dtype=dtype, device=device)
            record(base, "dense F.linear", lambda: F.linear(x, dense_weight))
            if graph_too:
                record(base, "dense F.linear", lambda: F.linear(x, dense_weight), graph=True)
        record(sparse, "srcompress bsr_linear", lambda: bsr_linear(x, bsr))
        if graph_too:
            record(sparse, "srcompress bsr_linear", lambda: bsr_linear(x, bsr), graph=True)

        # torch computes W @ x.T and needs x.T's column count (M) to be a multiple of 16
        padded = -m % 16
        x_t = F.pad(x, (0, 0, 0, padded)).T.contiguous() if padded else x.T.contiguous()
        torch_bsr = weight.to_sparse_bsr(block)
        note = f"M padded to {m + padded}" if padded else ""
        record(sparse, "torch bsr_dense_mm (shipped)", lambda: bsr_dense_mm(torch_bsr, x_t), note=note)
        if args.tune_torch:
            try:
                tune_bsr_dense_addmm(torch.zeros(n, x_t.shape[1], dtype=dtype, device=device), torch_bsr, x_t, beta=0, store=True)
                record(sparse, "torch bsr_dense_mm (tuned)", lambda: bsr_dense_mm(torch_bsr, x_t), note=note)
            except Exception as err:  # noqa: BLE001
                rows.append({**sparse, "kernel": "torch bsr_dense_mm (tuned)", "error": str(err).splitlines()[0][:200]})

        if density == 0.5 and (name, dtype_name, m) not in two_four_done:
            two_four_done.add((name, dtype_name, m))
            try:
                from torch.sparse import to_sparse_semi_structured

                semi = to_sparse_semi_structured(two_four(torch.randn(n, k, device=device, dtype=dtype)))
                record({**base, "density": 0.5}, "torch 2:4 semi-structured", lambda: F.linear(x, semi))
            except Exception as err:  # noqa: BLE001
                rows.append({**base, "density": 0.5, "kernel": "torch 2:4 semi-structured", "error": str(err).splitlines()[0][:200]})
    return rows


def gpu_table(rows: list[dict], env: dict, command: str) -> str:
    lines = [f"# GPU block-sparse Linear sweep ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']})",
             "", f"`{command}`; medians of `triton.testing.do_bench` (µs); roofline = ideal time (time model, 100 % of "
             "datasheet peak) / measured.", "",
             "| shape | dtype | block | density | M | kernel | graph | median µs | IQR µs | vs dense | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        block = f"{r['block'][0]}x{r['block'][1]}" if "block" in r else "-"
        if "error" in r:
            lines.append(f"| {r['shape_name']} | {r['dtype']} | {block} | {r.get('density', '-')} | {r['M']} | {r['kernel']} | "
                         f"| failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['shape_name']} | {r['dtype']} | {block} | {r.get('density', '-')} | {r['M']} | {r['kernel']}"
                     f"{' (' + r['note'] + ')' if 'note' in r else ''} | {'yes' if r['cuda_graph'] else ''} | {r['median_us']} | "
                     f"{r['iqr_us']} | {r.get('speedup_vs_dense', '-')} | {r.get('roofline_eff', '-')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU: fewer, shorter rounds; GPU: the acceptance cases only")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .jsonl and .md results")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(GPU_SHAPES), default=list(GPU_SHAPES), help="GPU sweep shapes")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(GPU_TOKENS), help="GPU sweep M values")
    parser.add_argument("--densities", nargs="+", type=float, default=list(GPU_DENSITIES))
    parser.add_argument("--blocks", nargs="+", default=[f"{a}x{b}" for a, b in GPU_BLOCKS], help="e.g. 64x64 64x16")
    parser.add_argument("--dtypes", nargs="+", choices=GPU_DTYPES, default=list(GPU_DTYPES))
    parser.add_argument("--tune-torch", action="store_true", help="GPU: also time bsr_dense_mm after tune_bsr_dense_addmm (slow)")
    args = parser.parse_args(argv)
    args.blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(device)
    started = time.perf_counter()
    if device == "cuda":
        args.tune_torch = args.tune_torch or args.quick
        rows, table = gpu_run(args), gpu_table
        stem = "kernels_gpu_" + "".join(c if c.isalnum() else "-" for c in env["gpu"]).strip("-").lower()
    else:
        rows, table = cpu_run(args.quick), cpu_table
        stem = "kernels_cpu"
    stem += "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{stem}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({**env, **row}) + "\n")
    (args.out / f"{stem}.md").write_text(table(rows, env, command.strip()))
    print(table(rows, env, command.strip()))
    print(f"wrote {args.out / stem}.jsonl and .md in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
