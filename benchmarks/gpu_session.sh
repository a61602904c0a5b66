#!/usr/bin/env bash
# One GPU session's checks, in order of value: host overhead per call, compiled-kernel tests, the acceptance
# cases, a short sweep; on request also the tuning-timer comparison and the GPU gate baseline. Usage (repository
# root, CUDA machine with torch + triton):
#   OUT=folder bash benchmarks/gpu_session.sh [overhead] [tests] [quick] [sweep] [graphtune] [baseline]
# (default: the first four). graphtune: does timing the small-M tuning candidates inside a CUDA graph pick a
# faster config for graph replay than the eager do_bench the tuner uses? baseline: writes $OUT/cuda.json, to be
# copied to benchmarks/baselines/cuda.json.
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SRCOMPRESS_CACHE_DIR="${TMPDIR:-/tmp}/srcompress-cache" PYTHONPATH="$PWD"
steps="${*:-overhead tests quick sweep}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [[ $steps == *overhead* ]]; then
timeout 90 python3 - <<'PY' 2>&1 | tee "$OUT/overhead.log"
# Microseconds of host time per call (GPU work is smaller, so the loop is host-bound): where eager time goes.
import time, torch, torch.nn.functional as F
from srcompress.kernels import to_block_sparse, autotune
from srcompress.kernels.triton_bsr import bsr_linear, launch, _check
gen = torch.Generator().manual_seed(0)
keep = (torch.rand(64, 64, generator=gen) < 0.1).repeat_interleave(64, 0).repeat_interleave(64, 1)
dense = (torch.randn(4096, 4096, generator=gen) / 64).to(torch.bfloat16).cuda()
bsr = to_block_sparse(dense * keep.cuda(), (64, 64))
for m in (1, 4096):
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(m, 4096, dtype=torch.bfloat16, device="cuda")
    bsr_linear(x, bsr)
    config = autotune.choose_config(x, bsr, None, None, True, True)
    def per_call(fn, n=1000):
        for _ in range(20): fn()
        torch.cuda.synchronize(); start = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); return round((time.perf_counter() - start) / n * 1e6, 1)
    print(f"M={m} {config}")
    for name, fn in (("bsr_linear", lambda: bsr_linear(x, bsr)), ("_check", lambda: _check(x, bsr, None, None, None)),
                     ("choose_config", lambda: autotune.choose_config(x, bsr, None, None, True, True)),
                     ("launch", lambda: launch(x, bsr, None, None, config, True, y)), ("F.linear dense", lambda: F.linear(x, dense))):
        print(f"  {name}: {per_call(fn)} us/call")
PY
fi
if [[ $steps == *tests* ]]; then
timeout 250 python3 -m pytest -v -m gpu tests/test_kernels.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [[ $steps == *quick* ]]; then
mkdir -p "$OUT/quick"
timeout 150 python3 benchmarks/kernels.py --quick --out "$OUT/quick" 2>&1 | tee "$OUT/quick.log" | tail -20
fi
if [[ $steps == *sweep* ]]; then
mkdir -p "$OUT/sweep"
timeout 150 python3 benchmarks/kernels.py --out "$OUT/sweep" --shapes square-4096 llama2-7b-up minilm-ffn-in \
    --tokens 1 16 256 4096 --densities 0.1 0.3 --blocks 64x64 32x32 --dtypes bfloat16 2>&1 | tee "$OUT/sweep.log" | tail -5
fi
if [[ $steps == *graphtune* ]]; then
timeout 240 python3 - <<'PY' 2>&1 | tee "$OUT/graphtune.log"
# Per small-M case: the config eager timing picks vs the one graph timing picks, both replayed in a CUDA graph.
import torch, triton.testing as tt
from srcompress.kernels import to_block_sparse, autotune
from srcompress.kernels.triton_bsr import launch
from triton.runtime.errors import OutOfResources
sms = torch.cuda.get_device_properties(0).multi_processor_count
gen = torch.Generator().manual_seed(0)
for n, k in ((4096, 4096), (11008, 4096)):
    keep = (torch.rand(n // 64, k // 64, generator=gen) < 0.1).repeat_interleave(64, 0).repeat_interleave(64, 1)
    bsr = to_block_sparse(((torch.randn(n, k, generator=gen) / 64) * keep).to(torch.bfloat16).cuda(), (64, 64))
    for m in (1, 16):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        timed = []
        for config in autotune.candidates(m, bsr, sms):
            run = lambda c=config: launch(x, bsr, None, None, c, True, y)
            try:
                run()
                timed.append((tt.do_bench(run, warmup=5, rep=20, return_mode="median"), tt.do_bench_cudagraph(run, rep=50), config))
            except OutOfResources:
                continue
        eager_pick, graph_pick = min(timed, key=lambda t: t[0]), min(timed, key=lambda t: t[1])
        print(f"{n}x{k} M={m}: {len(timed)} candidates; eager-timed pick {eager_pick[2]} replays in {eager_pick[1] * 1e3:.1f} us;"
              f" graph-timed pick {graph_pick[2]} replays in {graph_pick[1] * 1e3:.1f} us"
              f" (eager {graph_pick[0] * 1e3:.1f} us vs {eager_pick[0] * 1e3:.1f} us)", flush=True)
PY
fi
if [[ $steps == *baseline* ]]; then
timeout 300 python3 -m benchmarks.run --quick --device cuda --suite kernels --no-plots --out "$OUT/baseline" \
    --baseline "$OUT/cuda.json" --update-baseline 2>&1 | tail -25 | tee "$OUT/baseline.log"
fi
