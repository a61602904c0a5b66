"""Block-sparse kernels: BSR format, Triton kernels under TRITON_INTERPRET=1, SparseLinear/sparsify, export.

The correctness matrix of the kernels notes (section 9.1): fp32 over every M x shape x block, every density
with two blocks, fp16/bf16 over every M x shape with two blocks, then the structure cases, split-K and
persistent schedules, bounds canaries and properties. The reference is fp64 ``F.linear``.
GPU tests (compiled kernels) are marked ``gpu`` and need CUDA with TRITON_INTERPRET=0.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from srcompress.compress.layers import trace_layers  # noqa: E402
from srcompress.compress.masks import MaskSpec, apply_masks, compute_masks, plan_layers  # noqa: E402
from srcompress.compress.patterns import Pattern  # noqa: E402
from srcompress.compress.scores import magnitude_score  # noqa: E402
from srcompress.errors import SrcompressError  # noqa: E402
from srcompress.kernels import (BlockSparseWeight, SparseConv1x1, SparseLinear, predicted_speedup, sparsify,  # noqa: E402
                                to_block_sparse)
from srcompress.kernels import autotune, triton_bsr  # noqa: E402
from srcompress.kernels.roofline import HARDWARE, ideal_time  # noqa: E402
from srcompress.kernels.sparse_linear import choose_block  # noqa: E402
from srcompress.kernels.triton_bsr import KernelConfig, bsr_linear  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to the output scale
CUDA_COMPILED = torch.cuda.is_available() and not triton_bsr.INTERPRETED


def block_sparse(n, k, block, density, seed=0, dtype=torch.float32, empty_rows=()):
    """A weight whose non-zeros fill round(density x blocks) random whole blocks ('one': a single block)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = n // block[0], k // block[1]
    count = 1 if density == "one" else round(density * rows * cols)
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=gen)[:count]] = True
    keep = keep.view(rows, cols)
    keep[list(empty_rows)] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    return (weight * mask).to(dtype)


def inputs(m, k, seed=1, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(x, weight, bias=None, activation=None):
    x, weight, bias = (None if t is None else t.detach().double() for t in (x, weight, bias))
    y = F.linear(x, weight, bias)
    return F.relu(y) if activation == "relu" else F.gelu(y) if activation == "gelu" else y


def assert_close(y, ref, dtype):
    assert not torch.isnan(y).any()
    tol = TOLERANCE[dtype] * max(1.0, float(ref.abs().max()))
    err = float((y.double() - ref).abs().max())
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def run_case(m, n, k, block, density, dtype=torch.float32, activation=None, config=None, deterministic=True):
    weight = block_sparse(n, k, block, density, dtype=dtype)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(2)) / 4).to(dtype)
    x = inputs(m, k, dtype=dtype)
    y = bsr_linear(x, to_block_sparse(weight, block), bias, activation, config=config, deterministic=deterministic)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, reference(x, weight, bias, activation), dtype)
    return y


# ---------------------------------------------------------------- BSR format


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 16), (32, 64)])
@pytest.mark.parametrize("density", [0.0, "one", 0.1, 0.5, 1.0])
def test_round_trip_and_format_invariants(block, density):
    weight = block_sparse(128, 256, block, density, seed=3, empty_rows=(1,))
    bsr = to_block_sparse(weight, block)
    assert torch.equal(bsr.to_dense(), weight)
    crow, col = bsr.crow.long(), bsr.col.long()
    assert bsr.crow.dtype == bsr.col.dtype == torch.int32
    assert crow[0] == 0 and crow[-1] == bsr.nnzb and bool((crow.diff() >= 0).all())
    assert bool(((col >= 0) & (col < 256 // block[1])).all())
    for r in range(len(crow) - 1):
        assert bool((col[crow[r]:crow[r + 1]].diff() > 0).all())  # sorted, no duplicates
    tiles = weight.reshape(128 // block[0], block[0], 256 // block[1], block[1]).abs().sum(dim=(1, 3))
    assert bsr.sparsity == pytest.approx(float((tiles == 0).float().mean()))
    assert bsr.max_row_blocks == int(crow.diff().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
        torch_bsr = weight.to_sparse_bsr(block)
    assert torch.equal(bsr.values, torch_bsr.values()) and torch.equal(col, torch_bsr.col_indices())


def test_nan_and_negative_zero_blocks():
    weight = torch.zeros(32, 64)
    weight[0, 40] = float("nan")
    weight[20, 3] = -0.0
    bsr = to_block_sparse(weight, (16, 16))
    assert bsr.nnzb == 1 and bsr.col.tolist() == [2]


@pytest.mark.parametrize("cap", [None, 1, 2, 3, 100])
def test_schedule_covers_each_row_once_longest_first(cap):
    bsr = to_block_sparse(block_sparse(256, 512, (32, 32), 0.3, seed=4, empty_rows=(0, 5)), (32, 32))
    s = bsr.schedule(cap)
    crow = bsr.crow.long()
    lengths = (s.end - s.start).long()
    assert s.count == int(s.row_ptr[-1]) and sorted(s.order.tolist()) == list(range(s.count))
    assert bool((lengths[s.order.long()].diff() <= 0).all())  # longest first
    for r in range(bsr.block_grid[0]):
        segs = range(int(s.row_ptr[r]), int(s.row_ptr[r + 1]))
        assert len(segs) >= 1 and all(int(s.row[i]) == r for i in segs)
        covered = [p for i in segs for p in range(int(s.start[i]), int(s.end[i]))]
        assert covered == list(range(int(crow[r]), int(crow[r + 1])))
        assert all(int(lengths[i]) <= (cap or bsr.max_row_blocks) for i in segs)
    order = bsr.row_order().long()
    assert bool((crow.diff()[order].diff() <= 0).all())
    assert bsr.schedule(cap) is s  # cached


def test_cached_metadata_follows_module_to():
    layer = SparseLinear(nn.Parameter(block_sparse(64, 64, (32, 32), 0.5)), None, (32, 32))
    before = layer.sparse.schedule(1)
    layer.double()
    assert layer.sparse.dtype == torch.float64 and layer.weight.dtype == torch.float64
    assert torch.equal(layer.sparse.schedule(1).start, before.start)
    assert layer.sparse.schedule(1).start.dtype == torch.int32


def test_state_dict_and_pickle_round_trip(tmp_path):
    model = nn.Sequential(make_linear(64, 128, (32, 32), 0.5), nn.ReLU())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    model, _ = sparsify(model, (32, 32), force=True)
    assert set(model.state_dict()) == set(state)  # same keys as the dense model
    x = inputs(3, 128)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), model(x))
    state["0.weight"][:, :64] = 0
    loaded.load_state_dict(state)
    assert loaded[0].sparse.nnzb == int((state["0.weight"].reshape(2, 32, 4, 32) != 0).any(3).any(1).sum())
    assert torch.allclose(loaded(x), F.relu(F.linear(x, state["0.weight"], state["0.bias"])), atol=1e-6)


@pytest.mark.parametrize("shape, block, message", [
    ((100, 64), (16, 16), "not divisible by block 16x16"),
    ((64, 64), (8, 8), "powers of two of at least 16"),
    ((96, 96), (48, 48), "powers of two of at least 16"),
    ((64,), (16, 16), "must be 2-D"),
])
def test_conversion_errors_name_problem_and_fix(shape, block, message):
    with pytest.raises(SrcompressError, match=message):
        to_block_sparse(torch.ones(shape), block)


# ---------------------------------------------------------------- kernel correctness matrix


SHAPES = [(64, 64), (128, 256), (256, 128), (384, 1536)]
BLOCKS = [(16, 16), (32, 32), (64, 16), (32, 64)]
ROWS = [1, 3, 16, 33, 128]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matrix_fp32_every_shape_and_block(m, n, k, block):
    run_case(m, n, k, block, 0.1)


@pytest.mark.parametrize("block", [(32, 32), (64, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", [0.0, "one", 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_matrix_every_density(m, density, block):
    run_case(m, 128, 256, block, density)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [(32, 32), (64, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matrix_half_precision(m, n, k, block, dtype):
    run_case(m, n, k, block, 0.1, dtype=dtype)


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_fused_bias_and_activation(m, activation):
    weight = block_sparse(128, 128, (32, 32), 0.4)
    bsr = to_block_sparse(weight, (32, 32))
    x = inputs(m, 128)
    for bias in (None, torch.randn(128)):
        assert_close(bsr_linear(x, bsr, bias, activation), reference(x, weight, bias, activation), torch.float32)


SPLIT_CONFIGS = [
    KernelConfig(block_m=16),
    KernelConfig(block_m=32, split_blocks=1),
    KernelConfig(block_m=16, split_blocks=2, group_m=2),
    KernelConfig(block_m=16, split_blocks=3, programs=5),  # persistent: 5 programs stride over the work list
    KernelConfig(programs=2, chunk_k=16),
]


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: f"split{c.split_blocks}-prog{c.programs}")
def test_split_k_persistent_and_grouped_schedules(config, m, deterministic):
    weight = block_sparse(128, 512, (32, 32), 0.3, empty_rows=(2,))
    bias = torch.randn(128)
    x = inputs(m, 512)
    y = bsr_linear(x, to_block_sparse(weight, (32, 32)), bias, "relu", config=config, deterministic=deterministic)
    assert_close(y, reference(x, weight, bias, "relu"), torch.float32)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("config", [None, KernelConfig(block_m=16, split_blocks=1)])
def test_bit_identical_reruns(m, config):
    bsr = to_block_sparse(block_sparse(128, 256, (32, 32), 0.5), (32, 32))
    x = inputs(m, 256)
    first = bsr_linear(x, bsr, torch.ones(128), config=config)
    assert torch.equal(first, bsr_linear(x, bsr, torch.ones(128), config=config))


def test_linearity():
    weight = block_sparse(256, 128, (64, 16), 0.2)
    bsr = to_block_sparse(weight, (64, 16))
    x1, x2 = inputs(20, 128, seed=5), inputs(20, 128, seed=6)
    combined = bsr_linear(2.5 * x1 + x2, bsr)
    assert_close(combined, 2.5 * bsr_linear(x1, bsr).double() + bsr_linear(x2, bsr).double(), torch.float32)


def test_empty_rows_and_empty_matrix_give_the_bias():
    bias = torch.randn(128)
    weight = block_sparse(128, 256, (32, 32), 0.5, empty_rows=(0, 3))
    for m in (2, 20):
        y = bsr_linear(inputs(m, 256), to_block_sparse(weight, (32, 32)), bias, "gelu")
        assert torch.allclose(y[:, :32], F.gelu(bias[:32]).expand(m, 32), atol=1e-6)
        assert torch.allclose(y[:, 96:], F.gelu(bias[96:]).expand(m, 32), atol=1e-6)
    empty = to_block_sparse(torch.zeros(128, 256), (32, 32))
    assert empty.nnzb == 0
    assert torch.equal(bsr_linear(inputs(7, 256), empty, bias, "relu"), F.relu(bias).expand(7, 128))
    assert torch.equal(bsr_linear(inputs(7, 256), empty), torch.zeros(7, 128))


def test_one_full_row_and_shuffled_block_order():
    weight = block_sparse(128, 256, (32, 32), 0.2, seed=7)
    weight[32:64] = torch.randn(32, 256) / 16  # block row 1 is full
    bsr = to_block_sparse(weight, (32, 32))
    gen = torch.Generator().manual_seed(8)
    crow = bsr.crow.long()
    perm = torch.cat([crow[r] + torch.randperm(int(crow[r + 1] - crow[r]), generator=gen) for r in range(len(crow) - 1)])
    shuffled = BlockSparseWeight(bsr.crow, bsr.col[perm], bsr.values[perm], bsr.shape)
    assert not torch.equal(shuffled.col, bsr.col)
    x = inputs(33, 256)
    for m in (3, 33):
        assert_close(bsr_linear(x[:m], shuffled), reference(x[:m], weight), torch.float32)


@pytest.mark.parametrize("m, config", [(3, None), (20, None), (20, KernelConfig(block_m=16, split_blocks=1))])
def test_bounds_canaries(m, config):
    """Inputs, values and bias sit inside NaN-filled buffers and the output inside a sentinel-filled one:
    any read outside the views poisons the result, any write outside them changes a sentinel."""
    n, k = 128, 256
    weight = block_sparse(n, k, (32, 32), 0.3)
    plain = to_block_sparse(weight, (32, 32))
    x_buffer = torch.full((m + 4, k + 48), float("nan"))
    x = x_buffer[2:m + 2, 16:16 + k]
    x.copy_(inputs(m, k))
    values_buffer = torch.full((plain.nnzb + 2, 32, 32), float("nan"))
    values_buffer[1:-1] = plain.values
    guarded = BlockSparseWeight(plain.crow, plain.col, values_buffer[1:-1], plain.shape)
    bias_buffer = torch.full((n + 64,), float("nan"))
    bias = bias_buffer[32:32 + n]
    bias.copy_(torch.randn(n))
    out_buffer = torch.full((m + 4, n + 64), -7.0)
    out = out_buffer[2:m + 2, 32:32 + n]
    result = bsr_linear(x, guarded, bias, config=config, out=out)
    assert result is out
    assert_close(out, reference(x, weight, bias), torch.float32)
    out_buffer[2:m + 2, 32:32 + n] = -7.0
    assert bool((out_buffer == -7.0).all())


def test_int64_offsets_path(monkeypatch):
    monkeypatch.setattr(triton_bsr, "INT32_LIMIT", 0)
    for m, config in ((2, None), (20, None), (20, KernelConfig(block_m=16, split_blocks=1)), (3, KernelConfig(split_blocks=1))):
        for deterministic in (True, False):
            run_case(m, 128, 256, (32, 32), 0.3, activation="relu", config=config, deterministic=deterministic)


def test_leading_dims_and_strided_input():
    weight = block_sparse(64, 128, (32, 32), 0.5)
    bsr = to_block_sparse(weight, (32, 32))
    x3 = torch.randn(2, 9, 128)
    assert_close(bsr_linear(x3, bsr), reference(x3, weight), torch.float32)
    transposed = torch.randn(128, 17).T  # last-dim stride 17
    assert_close(bsr_linear(transposed, bsr), reference(transposed, weight), torch.float32)
    assert bsr_linear(torch.randn(0, 128), bsr).shape == (0, 64)


def test_kernel_input_errors():
    bsr = to_block_sparse(block_sparse(64, 128, (32, 32), 0.5), (32, 32))
    cases = [
        (lambda: bsr_linear(torch.ones(2, 128, dtype=torch.int64), bsr), "int64 is not supported"),
        (lambda: bsr_linear(torch.ones(2, 128, dtype=torch.bfloat16), bsr), "bfloat16 but the block-sparse weight is torch.float32"),
        (lambda: bsr_linear(torch.ones(2, 64), bsr), "does not end in the weight's 128 inputs"),
        (lambda: bsr_linear(torch.ones(2, 128), bsr, torch.ones(32)), "bias of shape"),
        (lambda: bsr_linear(torch.ones(2, 128), bsr, activation="tanh"), "cannot be fused"),
        (lambda: bsr_linear(torch.ones(2, 128), bsr, out=torch.empty(2, 32)), "out of shape"),
    ]
    for call, message in cases:
        with pytest.raises(SrcompressError, match=message):
            call()


def test_every_tuning_candidate_computes_the_same_result():
    """The GPU tuner times these configs; each must be valid, so run them all under the interpreter."""
    weight = block_sparse(128, 256, (32, 32), 0.3)
    bsr = to_block_sparse(weight, (32, 32))
    for m in (2, 40):
        x = inputs(m, 256)
        ref = reference(x, weight)
        configs = autotune.candidates(m, bsr, multiprocessors=4)
        assert len(configs) > 4
        for config in configs:
            assert_close(bsr_linear(x, bsr, config=config), ref, torch.float32)


# ---------------------------------------------------------------- autotune cache


def test_tune_cache_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "cache" / "bsr_autotune.json"
    cache = autotune.TuneCache(path)
    config = KernelConfig(block_m=128, split_blocks=4, num_warps=8)
    cache.put("Fake GPU|triton 0.0|kernels abc", "m64|4096x4096|b64x64|nnzb512|bfloat16|det", config)
    other = autotune.TuneCache(path)
    other.put("Fake GPU|triton 0.0|kernels abc", "m1|4096x4096|b64x64|nnzb512|bfloat16|det", KernelConfig(chunk_k=16))
    reread = autotune.TuneCache(path)
    assert reread.get("Fake GPU|triton 0.0|kernels abc", "m64|4096x4096|b64x64|nnzb512|bfloat16|det") == config
    assert reread.get("Fake GPU|triton 0.0|kernels abc", "m1|4096x4096|b64x64|nnzb512|bfloat16|det") == KernelConfig(chunk_k=16)
    assert reread.get("Other GPU|triton 0.0|kernels abc", "m64|4096x4096|b64x64|nnzb512|bfloat16|det") is None
    assert json.loads(path.read_text())["version"] == autotune.CACHE_VERSION
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable kernel tuning cache"):
        assert autotune.TuneCache(path).devices == {}
    path.write_text(json.dumps({"version": 999, "devices": {"x": {"y": {}}}}))
    assert autotune.TuneCache(path).devices == {}


def test_shape_key_buckets_and_interpreter_config(tmp_path, monkeypatch):
    bsr = to_block_sparse(block_sparse(128, 256, (32, 32), 0.3), (32, 32))
    assert autotune.shape_key(33, bsr, torch.bfloat16, True) == autotune.shape_key(64, bsr, torch.bfloat16, True)
    assert autotune.shape_key(65, bsr, torch.bfloat16, True) != autotune.shape_key(64, bsr, torch.bfloat16, True)
    assert autotune.shape_key(64, bsr, torch.float16, True) != autotune.shape_key(64, bsr, torch.bfloat16, True)
    assert autotune.shape_key(64, bsr, torch.float16, False) != autotune.shape_key(64, bsr, torch.float16, True)
    monkeypatch.setenv("SRCOMPRESS_CACHE_DIR", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "bsr_autotune.json"
    assert triton_bsr.INTERPRETED
    x = inputs(40, 256)
    assert autotune.choose_config(x, bsr, None, None, True, autotune=True) == autotune.fixed_config(40)
    assert not autotune.cache_path().exists()  # the interpreter never tunes nor writes


def test_heuristic_splits_small_grids_only():
    bsr = to_block_sparse(block_sparse(1024, 1024, (64, 64), 0.1), (64, 64))
    decode = autotune.heuristic_config(1, bsr, multiprocessors=132)
    assert decode.split_blocks is not None and bsr.schedule(decode.split_blocks).count > 16
    assert autotune.heuristic_config(4096, bsr, multiprocessors=132).split_blocks is None


# ---------------------------------------------------------------- time model


def test_time_model_reproduces_worked_examples():
    """The H100 figures of the kernels notes, section 3.2 (4096x4096, density 0.1, bf16)."""
    h100 = HARDWARE["h100-sxm"]
    assert ideal_time(4096, 4096, 1, h100) == pytest.approx(10.0e-6, rel=0.01)
    assert predicted_speedup(4096, 4096, 0.1, (64, 64), h100, tokens=1) == pytest.approx(9.9, abs=0.1)
    assert predicted_speedup(4096, 4096, 0.1, (64, 64), h100, tokens=64) == pytest.approx(7.8, abs=0.1)
    assert predicted_speedup(4096, 4096, 0.1, (64, 64), h100, tokens=4096) == pytest.approx(6.6, abs=0.1)
    assert predicted_speedup(4096, 4096, 0.1, (64, 64), h100) == pytest.approx(6.9, abs=0.1)
    assert predicted_speedup(1536, 384, 0.0, (32, 32), h100) == pytest.approx(1.04, abs=0.01)


# ---------------------------------------------------------------- SparseLinear and sparsify


def make_linear(n=256, k=512, block=(32, 32), density=0.2, seed=0):
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(block_sparse(n, k, block, density, seed=seed))
    return linear


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 40])
def test_cpu_bsr_path_matches_dense(m):
    linear = make_linear()
    x = inputs(m, 512)
    expected = linear(x).detach()
    layer = SparseLinear.from_linear(linear, (32, 32))
    assert layer.path(x) == "torch-bsr"
    with torch.inference_mode():
        y = layer(x)
    assert y.is_contiguous() and torch.allclose(y, expected, atol=1e-5)
    x3 = torch.randn(2, m, 512)
    with torch.no_grad():
        assert torch.allclose(layer(x3), F.linear(x3, linear.weight, linear.bias), atol=1e-5)


def test_paths_dispatch_and_agree():
    linear = make_linear(128, 256, (64, 16), 0.3)
    x = inputs(20, 256)
    expected = reference(x, linear.weight, linear.bias, "gelu")
    outputs = {}
    for backend in ("auto", "triton", "torch-bsr", "dense"):
        layer = SparseLinear.from_linear(linear, (64, 16), activation="gelu", backend=backend)
        outputs[backend] = layer(x)
        assert_close(outputs[backend], expected, torch.float32)
    assert layer.path(x.requires_grad_()) == "dense"  # autograd needs the dense weight
    layer.weight.requires_grad_(True)
    assert layer.path(x.detach()) == "dense"
    with torch.no_grad():
        assert SparseLinear.from_linear(linear, (64, 16)).path(x) == "torch-bsr"
    assert SparseLinear.from_linear(linear, (64, 16)).path(x.half()) == "dense"
    with pytest.raises(SrcompressError, match="unknown backend"):
        SparseLinear.from_linear(linear, (64, 16), backend="cuda")


def test_torch_bsr_backend_refuses_half_precision_on_cpu():
    linear = make_linear(64, 64, (32, 32), 0.5)
    for dtype in (torch.float16, torch.bfloat16):
        layer = SparseLinear.from_linear(linear, (32, 32), backend="torch-bsr").to(dtype)
        for rows in (1, 3):
            with pytest.raises(SrcompressError, match="CPU in float32 only"), torch.no_grad():
                layer(torch.randn(rows, 64, dtype=dtype))
        auto = SparseLinear.from_linear(linear, (32, 32)).to(dtype)
        with torch.no_grad():
            assert auto.path(torch.randn(3, 64, dtype=dtype)) == "dense" and auto(torch.randn(3, 64, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("shape", [(1, 64), (4, 64), (1, 8, 64)])
def test_sparse_layers_trace_as_linear_on_their_dense_weight(shape):
    """trace_layers (a TorchDispatchMode) sees every SparseLinear/SparseConv1x1 as an op on its dense weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = nn.Sequential(make_linear(128, 64, (32, 32), 0.5), nn.ReLU(), make_linear(32, 128, (32, 32), 0.25, seed=3))
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
    model, _ = sparsify(model, (32, 32), force=True)
    layers, _ = trace_layers(model, (x,))
    assert [(layer.name, layer.op) for layer in layers] == [("0.weight", "linear"), ("2.weight", "linear")]
    assert [layer.param.shape for layer in layers] == [(128, 64), (32, 128)]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Recorder():
        assert model[0].path(x) == "dense"
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert model[0].path(x) == "torch-bsr"
    conv = SparseConv1x1.from_conv(nn.Conv2d(64, 32, 1), (32, 32))
    assert [(layer.name, layer.op) for layer in trace_layers(conv, (torch.randn(2, 64, 3, 3),))[0]] == [("weight", "conv")]


def test_conv1x1_channels_last():
    conv = nn.Conv2d(128, 64, 1)
    with torch.no_grad():
        conv.weight.copy_(block_sparse(64, 128, (32, 32), 0.3).view(64, 128, 1, 1))
    x = torch.randn(2, 128, 5, 7).to(memory_format=torch.channels_last)
    expected = F.relu(conv(x)).detach()
    layer = SparseConv1x1.from_conv(conv, (32, 32), activation="relu")
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(SparseConv1x1.from_conv(conv, (32, 32), backend="triton")(x.contiguous()), conv(x), atol=1e-5)
    assert torch.allclose(layer(x[0]), expected[0], atol=1e-5)  # unbatched (C, H, W)
    with pytest.raises(SrcompressError, match="not a plain 1x1"):
        SparseConv1x1.from_conv(nn.Conv2d(128, 64, 1, stride=2), (32, 32))


def test_sparsify_reports_each_layer_and_why():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Sequential(make_linear(1024, 1024, (64, 64), 0.1), nn.ReLU())
            self.narrow = make_linear(64, 256, (32, 32), 0.1)
            self.full = nn.Linear(1024, 1024)
            self.odd = nn.Linear(1024, 100)
            self.strided = nn.Conv2d(64, 64, 1, stride=2)
            self.conv3 = nn.Conv2d(64, 64, 3)

    model = Net()
    converted, report = sparsify(model)
    assert converted is model
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"wide.0", "narrow", "full", "odd", "strided"}
    assert by_name["wide.0"].converted and by_name["wide.0"].block == (64, 64) and by_name["wide.0"].activation == "relu"
    assert isinstance(model.wide[0], SparseLinear) and isinstance(model.wide[1], nn.Identity)
    assert by_name["wide.0"].density == pytest.approx(0.1, abs=0.01) and by_name["wide.0"].predicted_speedup > 1.5
    assert by_name["narrow"].reason.startswith("too narrow to gain")
    assert by_name["full"].reason.startswith("density 1.00 too high")
    assert by_name["odd"].reason == "100x1024 not divisible by any block of at least 16x16"
    assert by_name["strided"].reason.startswith("1x1 conv with stride")
    json.dumps(report.to_dict())
    assert "1 of 5 layers converted" in str(report)
    _, forced = sparsify(Net(), (32, 32), force=True)
    assert {layer.name for layer in forced.converted} == {"wide.0", "narrow", "full"}
    _, decode = sparsify(Net(), tokens=1)
    assert {layer.name for layer in decode.converted} == {"wide.0", "narrow"}
    with pytest.raises(SrcompressError, match="powers of two"):
        sparsify(Net(), (24, 24))


def test_sparsify_top_level_and_shared_layers():
    layer, report = sparsify(make_linear(), (32, 32), force=True)
    assert isinstance(layer, SparseLinear) and report.layers[0].name == "(model)"
    shared = make_linear(256, 256)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared)
    x = inputs(3, 256)
    expected = model[1](F.relu(model[0](x))).detach()
    sparsify(model, (32, 32), force=True)
    assert model[0][0] is model[1] and model[1].activation is None  # not fused: it is used twice
    with torch.no_grad():
        assert torch.allclose(model[1](model[0](x)), expected, atol=1e-5)


def test_choose_block_recovers_the_pruning_block():
    assert choose_block(block_sparse(256, 512, (32, 32), 0.1)) == (32, 32)
    assert choose_block(block_sparse(256, 512, (64, 16), 0.1)) == (64, 16)
    assert choose_block(block_sparse(256, 512, (64, 64), 0.1)) == (64, 64)
    assert choose_block(torch.randn(100, 512)) is None


def test_import_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, srcompress.kernels as k\n"
        "linear = torch.nn.Linear(64, 64)\n"
        "layer, report = k.sparsify(linear, (32, 32), force=True)\n"
        "x = torch.randn(3, 64)\n"
        "assert layer.path(x) == 'torch-bsr' and torch.allclose(layer(x), torch.nn.functional.linear(x, linear.weight, linear.bias), atol=1e-5)\n"
        "try:\n    k.bsr_linear\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------- real models


def prune_blocks(model, example_inputs, sparsity, block, exclude=()):
    layers, _ = trace_layers(model, example_inputs)
    spec = MaskSpec(sparsity, Pattern.parse(f"block:{block[0]}x{block[1]}"), scope="layer", exclude=exclude)
    plans = plan_layers(layers, spec)
    apply_masks(plans, compute_masks(plans, spec, magnitude_score))
    return plans


def test_pretrained_cnn_fc_layer_parity():
    from srcompress import assets

    model = assets.pretrained_digit_cnn()
    images, labels = assets.mnist5k("test")
    prune_blocks(model, (images[:1],), 0.9, (32, 32))
    with torch.no_grad():
        dense_logits = model(images)
    _, large_batch = sparsify(model, (32, 32), fuse_activations=False)
    assert not large_batch.converted and large_batch.layers[0].reason.startswith("too narrow")  # 256x1152 on H100
    model, report = sparsify(model, (32, 32), tokens=1)
    names = {layer.name: layer for layer in report.layers}
    assert names["fc_layers.0"].converted and names["fc_layers.0"].activation == "relu"
    assert names["fc_layers.0"].density == pytest.approx(0.1, abs=0.01)
    assert names["fc_layers.2"].reason == "10x256 not divisible by block 32x32"
    with torch.inference_mode():
        logits = model(images)
    assert model.fc_layers[0].path(images.flatten(1)[:, :1152]) == "torch-bsr"
    assert torch.allclose(logits, dense_logits, atol=1e-4)
    assert torch.equal(logits.argmax(1), dense_logits.argmax(1))
    model.fc_layers[0].backend = "triton"
    with torch.no_grad():
        assert torch.allclose(model(images[:40]), dense_logits[:40], atol=1e-4)


def test_minilm_ffn_layers_parity():
    from srcompress import assets

    sentence_model = assets.minilm()
    bert = sentence_model[0].auto_model.eval()
    batch = sentence_model.tokenize(["A man is playing a guitar.", "The stock market fell sharply on Monday."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plans = prune_blocks(bert, (ids, mask), 0.9, (32, 32), exclude=("*attention*", "pooler*"))
    assert sum(p.pruned for p in plans) == 12
    with torch.no_grad():
        dense = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = bert.embeddings(input_ids=ids)
    bert, report = sparsify(bert, (32, 32), tokens=1)
    converted = {layer.name for layer in report.converted}
    assert len(converted) == 12 and all(".intermediate.dense" in n or ".output.dense" in n for n in converted)
    assert all(layer.reason.startswith("density 1.00 too high") for layer in report.layers if not layer.converted)
    with torch.inference_mode():
        sparse = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(sparse, dense, atol=1e-4)
    ffn = bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        expected = F.linear(hidden, ffn.weight, ffn.bias)
        ffn.backend = "triton"
        assert_close(ffn(hidden), expected.double(), torch.float32)


# ---------------------------------------------------------------- ONNX export


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_of_sparsified_model_matches(tmp_path, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(64, 128, 1)
            self.mlp = nn.Sequential(make_linear(256, 128, (32, 32), 0.2, seed=1), nn.ReLU(), make_linear(64, 256, (32, 32), 0.3))

        def forward(self, x):
            return self.mlp(self.conv(x).mean(dim=(2, 3)))

    model = Net().eval()
    with torch.no_grad():
        model.conv.weight.copy_(block_sparse(128, 64, (32, 32), 0.25).view(128, 64, 1, 1))
    x = torch.randn(3, 64, 4, 4)
    with torch.no_grad():
        dense = model(x)
    model, report = sparsify(model, (32, 32), force=True)
    assert len(report.converted) == 3
    with torch.no_grad():
        sparse = model(x)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert torch.allclose(onnx_out, dense, atol=1e-5) and torch.allclose(sparse, dense, atol=1e-5)


# ---------------------------------------------------------------- GPU (compiled kernels)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_COMPILED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_compiled_matches_reference(dtype, monkeypatch):
    """Every block shape on real layer sizes, GEMV and tile paths, split-K reduced both ways, with the heuristic
    launch config (each tuning candidate is checked in the next test), so the sweep compiles each variant once."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for block in ((16, 16), (32, 32), (64, 64), (64, 16)):
        for n, k in ((4096, 4096), (1536, 384), (11008, 4096)):
            weight = block_sparse(n, k, block, 0.1, dtype=dtype).cuda()
            bsr = to_block_sparse(weight, block)
            bias = torch.randn(n, dtype=dtype, device="cuda")
            for m in (1, 7, 16, 100, 1024):
                x = inputs(m, k, dtype=dtype).cuda()
                ref = reference(x, weight, bias, "gelu")
                for deterministic in (True, False):
                    y = bsr_linear(x, bsr, bias, "gelu", deterministic=deterministic, autotune=False)
                    assert_close(y, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_COMPILED, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("m", [7, 100], ids=["gemv", "tile"])
def test_gpu_every_tuning_candidate_is_correct(m):
    from triton.runtime.errors import OutOfResources

    block, (n, k), dtype = (32, 32), (1536, 384), torch.bfloat16
    weight = block_sparse(n, k, block, 0.3, dtype=dtype).cuda()
    bsr = to_block_sparse(weight, block)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    x = inputs(m, k, dtype=dtype).cuda()
    ref = reference(x, weight, bias, "relu")
    configs = autotune.candidates(m, bsr, torch.cuda.get_device_properties(0).multi_processor_count)
    ran = 0
    for config in configs:
        for deterministic in (True, False):
            try:
                y = bsr_linear(x, bsr, bias, "relu", config=config, deterministic=deterministic)
            except OutOfResources:  # the tuner skips these too
                continue
            assert_close(y, ref, dtype)
            ran += 1
    assert ran > len(configs)  # most candidates fit


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_COMPILED, reason="needs CUDA and TRITON_INTERPRET=0")
def test_gpu_sparsify_dispatches_triton_and_captures_in_cuda_graph(monkeypatch, tmp_path):
    monkeypatch.setenv("SRCOMPRESS_CACHE_DIR", str(tmp_path))
    linear = make_linear(4096, 4096, (64, 64), 0.1).cuda().to(torch.bfloat16)
    layer, report = sparsify(linear, (64, 64), tokens=1)
    assert report.converted
    static_x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert layer.path(static_x) == "triton"
    with torch.no_grad():
        expected = F.linear(static_x, layer.weight, layer.bias)
        for _ in range(3):  # tune and compile before capture
            layer(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        graph.replay()
        torch.cuda.synchronize()
    assert_close(static_y.cpu(), expected.double().cpu(), torch.bfloat16)
    cache = json.loads(autotune.cache_path().read_text())
    assert autotune.device_key(static_x.device) in cache["devices"]
