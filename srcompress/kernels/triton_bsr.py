"""Triton kernels for y = act(x @ W.T + b) with a block-sparse W in BSR layout, accumulating in fp32.

Both kernels walk the same work list, a weight's block rows cut into segments, longest first (``Schedule``):

* ``_bsr_tile_kernel`` (M >= 16): a program owns (token tile, segment). Each step loads the x tile under one
  stored block plus the block and calls ``tl.dot``. Grouped ordering keeps programs that read the same x
  tiles together; a grid smaller than the work list makes it persistent (programs stride through the list).
* ``_bsr_gemv_kernel`` (M < 16, decode): a program owns a segment. It keeps the few x rows cached, streams
  the blocks and reduces with multiply + sum, since ``tl.dot`` needs 16 rows.

When block rows are split into several segments (split-K, to fill a GPU when the grid is small), partial
sums go to an fp32 workspace and ``_split_reduce_kernel`` adds them in a fixed order, so results are
bit-identical from run to run; with ``deterministic=False`` they are added atomically instead. Bias and
activation run in the epilogue of whichever kernel writes y. Empty rows get the bias; a weight with no
stored block skips the kernels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import SrcompressError
from .bsr import BlockSparseWeight, check_block

ACTIVATIONS = (None, "relu", "gelu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 15  # below 16 rows tl.dot cannot be used
INT32_LIMIT = 2**31  # offsets reaching this switch the kernels to int64 arithmetic


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. ``split_blocks`` caps the blocks per work item (None: one item per block row);
    ``programs`` makes the grid persistent with that many programs (None: one program per work item)."""

    block_m: int = 64  # token tile of the tile kernel
    group_m: int = 8  # token tiles scheduled together (L2 reuse of x)
    split_blocks: int | None = None
    programs: int | None = None
    chunk_k: int = 64  # inputs per inner step of the GEMV kernel (capped at the block width)
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _epilogue(acc, bias_ptr, cols, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    if ACTIVATION == "gelu":  # exact (erf) GELU, as nn.GELU()
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    return acc


@triton.jit
def _finish(acc, rm, ro, row, seg, M, bias_ptr, y_ptr, stride_ym, ws_ptr,
            BO: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Write a (rows x BO) fp32 result: through the epilogue to y, or as a partial sum to the workspace."""
    m_mask = rm[:, None] < M
    if SPLIT == 0:
        cols = row * BO + ro
        acc = _epilogue(acc, bias_ptr, cols, HAS_BIAS, ACTIVATION)
        tl.store(y_ptr + rm[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask)
    elif SPLIT == 1:  # workspace [segments, M, BO]
        tl.store(ws_ptr + (seg * M + rm[:, None]) * BO + ro[None, :], acc, mask=m_mask)
    else:  # workspace [block rows, M, BO], zero-filled; a full-shape mask, as the interpreter's atomics
        full_mask = m_mask & (ro[None, :] < BO)  # mishandle a (1, 1) mask broadcast over a (1, BO) tile
        tl.atomic_add(ws_ptr + (row * M + rm[:, None]) * BO + ro[None, :], acc, mask=full_mask, sem="relaxed")


@triton.jit
def _bsr_tile_kernel(x_ptr, val_ptr, col_ptr, seg_row_ptr, seg_start_ptr, seg_end_ptr, order_ptr,
                     bias_ptr, y_ptr, ws_ptr, M, num_segments, stride_xm, stride_ym,
                     BM: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, GROUP_M: tl.constexpr,
                     SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                     UPCAST: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    m_tiles = tl.cdiv(M, BM)
    per_group = GROUP_M * num_segments
    ro = tl.arange(0, BO)
    ri = tl.arange(0, BI)
    for tile in range(tl.program_id(0), m_tiles * num_segments, tl.num_programs(0)):
        first_m = (tile // per_group) * GROUP_M
        tiles_in_group = tl.minimum(m_tiles - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % tiles_in_group
        seg = tl.load(order_ptr + (tile % per_group) // tiles_in_group)
        row = tl.load(seg_row_ptr + seg)
        rm = pid_m * BM + tl.arange(0, BM)
        if WIDE:
            rm = rm.to(tl.int64)
            seg = seg.to(tl.int64)
            row = row.to(tl.int64)
        m_mask = rm[:, None] < M
        acc = tl.zeros((BM, BO), dtype=tl.float32)
        for p in range(tl.load(seg_start_ptr + seg), tl.load(seg_end_ptr + seg)):
            block_base = p * (BO * BI)
            if WIDE:
                block_base = tl.cast(p, tl.int64) * (BO * BI)  # loop variables are plain ints under the interpreter
            kb = tl.load(col_ptr + p)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + (kb * BI + ri)[None, :], mask=m_mask, other=0.0)
            wt = tl.load(val_ptr + block_base + ro[:, None] * BI + ri[None, :])  # (BO, BI) as stored
            if UPCAST:  # the interpreter's bf16 dot is wrong
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        _finish(acc, rm, ro, row, seg, M, bias_ptr, y_ptr, stride_ym, ws_ptr, BO, SPLIT, HAS_BIAS, ACTIVATION)


@triton.jit
def _bsr_gemv_kernel(x_ptr, val_ptr, col_ptr, seg_row_ptr, seg_start_ptr, seg_end_ptr, order_ptr,
                     bias_ptr, y_ptr, ws_ptr, M, num_segments, stride_xm, stride_ym,
                     MP: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, CHUNK: tl.constexpr,
                     SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, WIDE: tl.constexpr):
    rm = tl.arange(0, MP)
    if WIDE:
        rm = rm.to(tl.int64)
    ro = tl.arange(0, BO)
    rk = tl.arange(0, CHUNK)
    m_mask = rm[:, None] < M
    for item in range(tl.program_id(0), num_segments, tl.num_programs(0)):
        seg = tl.load(order_ptr + item)
        row = tl.load(seg_row_ptr + seg)
        if WIDE:
            seg = seg.to(tl.int64)
            row = row.to(tl.int64)
        acc = tl.zeros((MP, BO), dtype=tl.float32)
        for p in range(tl.load(seg_start_ptr + seg), tl.load(seg_end_ptr + seg)):
            block_base = p * (BO * BI)
            if WIDE:
                block_base = tl.cast(p, tl.int64) * (BO * BI)  # loop variables are plain ints under the interpreter
            x_base = tl.load(col_ptr + p) * BI
            for c in tl.static_range(0, BI, CHUNK):
                xs = tl.load(x_ptr + rm[:, None] * stride_xm + (x_base + c + rk)[None, :], mask=m_mask, other=0.0,
                             eviction_policy="evict_last").to(tl.float32)
                wb = tl.load(val_ptr + block_base + ro[:, None] * BI + (c + rk)[None, :],
                             eviction_policy="evict_first").to(tl.float32)
                acc += tl.sum(xs[:, None, :] * wb[None, :, :], axis=2)
        _finish(acc, rm, ro, row, seg, M, bias_ptr, y_ptr, stride_ym, ws_ptr, BO, SPLIT, HAS_BIAS, ACTIVATION)


@triton.jit
def _split_reduce_kernel(ws_ptr, row_ptr, bias_ptr, y_ptr, M, stride_ym,
                         BM: tl.constexpr, BO: tl.constexpr, ATOMIC: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, WIDE: tl.constexpr):
    row = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    if WIDE:
        row = row.to(tl.int64)
        rm = rm.to(tl.int64)
    ro = tl.arange(0, BO)
    m_mask = rm[:, None] < M
    if ATOMIC:
        acc = tl.load(ws_ptr + (row * M + rm[:, None]) * BO + ro[None, :], mask=m_mask, other=0.0)
    else:
        acc = tl.zeros((BM, BO), dtype=tl.float32)
        for seg in range(tl.load(row_ptr + row), tl.load(row_ptr + row + 1)):  # fixed order: deterministic
            base = seg * M
            if WIDE:
                base = tl.cast(seg, tl.int64) * M
            acc += tl.load(ws_ptr + (base + rm[:, None]) * BO + ro[None, :], mask=m_mask, other=0.0)
    cols = row * BO + ro
    acc = _epilogue(acc, bias_ptr, cols, HAS_BIAS, ACTIVATION)
    tl.store(y_ptr + rm[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask)


INTERPRETED = type(_bsr_tile_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import
KERNEL_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # tuned configs are per source


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None, activation: str | None,
           out: torch.Tensor | None) -> None:
    n, k = weight.shape
    check_block(weight.block, weight.shape)
    if activation not in ACTIVATIONS:
        raise SrcompressError(f"activation {activation!r} cannot be fused", "use None, 'relu' or 'gelu'")
    if x.dtype not in DTYPES:
        raise SrcompressError(f"input dtype {x.dtype} is not supported by the block-sparse kernels",
                              "use float16, bfloat16 or float32 inputs")
    if x.dtype != weight.dtype:
        raise SrcompressError(f"input is {x.dtype} but the block-sparse weight is {weight.dtype}",
                              "convert one to the other's dtype, e.g. model.to(torch.bfloat16)")
    if x.dim() == 0 or x.shape[-1] != k:
        raise SrcompressError(f"input of shape {tuple(x.shape)} does not end in the weight's {k} inputs",
                              f"pass an input whose last dimension is {k}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise SrcompressError(f"input is on {x.device} but the weight or bias is on {weight.device}",
                              "move the module and the input to the same device")
    if x.device.type == "cpu" and not INTERPRETED:
        raise SrcompressError("the Triton kernels need a CUDA device",
                              "on CPU use SparseLinear (torch's BSR path), or set TRITON_INTERPRET=1 before importing triton")
    if bias is not None and bias.shape != (n,):
        raise SrcompressError(f"bias of shape {tuple(bias.shape)} does not match the weight's {n} outputs",
                              f"pass a bias of shape ({n},) or None")
    if out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or out.device != x.device
                            or (out.numel() and out.stride(-1) != 1)):
        raise SrcompressError(f"out of shape {tuple(out.shape)} {out.dtype} does not fit the result",
                              f"pass a {x.dtype} tensor of shape {(*x.shape[:-1], n)} with unit stride in its last dimension")


def bsr_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None,
               activation: str | None = None, *, config: KernelConfig | None = None, deterministic: bool = True,
               autotune: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ W.T + bias)`` for x of shape (..., K) with the Triton kernels (CUDA, or the interpreter).

    ``config`` overrides the launch parameters (otherwise: tuned and cached on GPU, see ``autotune``; one
    fixed rule under the interpreter). ``deterministic=False`` adds split-K partial sums atomically.
    """
    _check(x, weight, bias, activation, out)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    try:
        y2 = out.view(-1, n)
    except RuntimeError as err:
        raise SrcompressError("out cannot be viewed as (rows, outputs)", "pass a contiguous out tensor") from err
    m = x2.shape[0]
    if m == 0:
        return out
    if weight.nnzb == 0:
        y2.copy_(_bias_only(weight, bias, activation, x.device).to(x.dtype).expand(m, n))
        return out
    if config is None:
        from .autotune import choose_config

        config = choose_config(x2, weight, bias, activation, deterministic, autotune)
    launch(x2, weight, bias, activation, config, deterministic, y2)
    return out


def _bias_only(weight: BlockSparseWeight, bias: torch.Tensor | None, activation: str | None, device) -> torch.Tensor:
    result = bias.float() if bias is not None else torch.zeros(weight.shape[0], device=device)
    if activation == "relu":
        return F.relu(result)
    return F.gelu(result) if activation == "gelu" else result


def launch(x2: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None, activation: str | None,
           config: KernelConfig, deterministic: bool, y2: torch.Tensor) -> None:
    """Run the kernels on a 2-D input (unit stride along K) into a 2-D output; no argument checks."""
    bo, bi = weight.block
    m = x2.shape[0]
    rows = weight.block_grid[0]
    schedule = weight.schedule(config.split_blocks)
    split = 0 if schedule.count == rows else (1 if deterministic else 2)
    if split == 1:
        ws = torch.empty((schedule.count, m, bo), dtype=torch.float32, device=x2.device)
    elif split == 2:
        ws = torch.zeros((rows, m, bo), dtype=torch.float32, device=x2.device)
    else:
        ws = y2  # unused
    extent = lambda t: (t.shape[0] - 1) * t.stride(0) + t.shape[1]  # noqa: E731
    wide = max(extent(x2), extent(y2), weight.values.numel(), ws.numel()) >= INT32_LIMIT
    bias_arg = bias if bias is not None else y2
    common = dict(BO=bo, BI=bi, SPLIT=split, HAS_BIAS=bias is not None, ACTIVATION=activation or "none", WIDE=wide,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    args = (x2, weight.values, weight.col, schedule.row, schedule.start, schedule.end, schedule.order,
            bias_arg, y2, ws, m, schedule.count, x2.stride(0), y2.stride(0))
    if m <= GEMV_MAX_ROWS:
        work = schedule.count
        grid = (min(work, config.programs) if config.programs else work,)
        _bsr_gemv_kernel[grid](*args, MP=_next_pow2(m), CHUNK=min(config.chunk_k, bi), **common)
    else:
        work = triton.cdiv(m, config.block_m) * schedule.count
        grid = (min(work, config.programs) if config.programs else work,)
        precision = None
        if x2.dtype == torch.float32:
            precision = "tf32" if x2.is_cuda and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED else "ieee"
        _bsr_tile_kernel[grid](*args, BM=config.block_m, GROUP_M=config.group_m, UPCAST=INTERPRETED,
                               PRECISION=precision, **common)
    if split:
        reduce_m = min(64, _next_pow2(m))
        _split_reduce_kernel[(rows, triton.cdiv(m, reduce_m))](
            ws, schedule.row_ptr, bias_arg, y2, m, y2.stride(0), BM=reduce_m, BO=bo, ATOMIC=split == 2,
            HAS_BIAS=bias is not None, ACTIVATION=activation or "none", WIDE=wide)
