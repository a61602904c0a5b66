"""Block-sparse weights in torch's BSR layout, plus the work schedule the kernels need, cached per weight.

A weight W (N outputs x K inputs) cut into b_o x b_i blocks keeps the blocks that hold a non-zero:
``crow`` (int32, N/b_o + 1) gives each block row's range in ``col`` (int32, the block column of each kept
block, sorted within a row) and ``values`` (nnzb, b_o, b_i). This is ``torch.sparse_bsr_tensor``'s layout,
so the same three tensors feed our Triton kernels and torch's CPU BSR matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..errors import SrcompressError


def check_block(block: tuple[int, int], shape: tuple[int, int] | None = None) -> None:
    """Raise unless ``block`` is a power of two of at least 16 on each side (and divides ``shape``).

    Compiled ``tl.dot`` needs every dimension >= 16 and ``tl.arange`` needs powers of two; the interpreter
    accepts smaller blocks, so the rule is enforced here to keep CPU-tested code valid on GPU.
    """
    bo, bi = block
    if any(b < 16 or b & (b - 1) for b in block):
        raise SrcompressError(f"block {bo}x{bi} cannot run in the block-sparse kernels",
                              "use powers of two of at least 16 on each side, e.g. 32x32 or 64x16")
    if shape is not None and (shape[0] % bo or shape[1] % bi):
        raise SrcompressError(f"weight {shape[0]}x{shape[1]} is not divisible by block {bo}x{bi}",
                              "choose a block whose sides divide the weight's outputs and inputs")


@dataclass(frozen=True)
class Schedule:
    """Work items of one weight: each block row split into segments of at most ``max_blocks`` blocks.

    Every row has at least one segment (an empty row's segment is empty, so its output still gets the bias).
    Segments of a row are contiguous: row r owns segments ``row_ptr[r]`` to ``row_ptr[r + 1]``.
    """

    row: torch.Tensor  # int32 [S]: block row of each segment
    start: torch.Tensor  # int32 [S]: first index into col/values
    end: torch.Tensor  # int32 [S]: one past the last index
    order: torch.Tensor  # int32 [S]: launch order, longest segment first
    row_ptr: torch.Tensor  # int32 [rows + 1]
    max_blocks: int

    @property
    def count(self) -> int:
        return self.row.numel()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Schedule":
        return Schedule(*(fn(getattr(self, f.name)) if f.name != "max_blocks" else self.max_blocks for f in fields(self)))


class BlockSparseWeight:
    """crow/col/values of a block-sparse (N x K) weight; derived metadata is computed once and cached."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                 max_row_blocks: int | None = None):
        self.crow, self.col, self.values = crow, col, values.contiguous()
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = (int(values.shape[1]), int(values.shape[2]))
        if crow.numel() != self.shape[0] // self.block[0] + 1 or col.numel() != values.shape[0]:
            raise ValueError(f"inconsistent BSR tensors: crow {crow.numel()}, col {col.numel()}, values {tuple(values.shape)}")
        if max_row_blocks is None:
            max_row_blocks = int(crow.diff().max()) if crow.numel() > 1 else 0
        self.max_row_blocks = max_row_blocks  # kept on the host so launches never synchronise to find it
        self._cache: dict = {}

    @property
    def nnzb(self) -> int:
        return self.col.numel()

    @property
    def block_grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    @property
    def density(self) -> float:
        """Fraction of blocks that are stored (non-zero)."""
        rows, cols = self.block_grid
        return self.nnzb / (rows * cols)

    @property
    def sparsity(self) -> float:
        """Fraction of blocks that are entirely zero."""
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"BlockSparseWeight({n}x{k}, block={self.block[0]}x{self.block[1]}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.block_grid
        bo, bi = self.block
        grid = self.values.new_zeros(rows, cols, bo, bi)
        block_rows = torch.repeat_interleave(torch.arange(rows, device=self.device), self.crow.diff().long())
        grid[block_rows, self.col.long()] = self.values
        return grid.transpose(1, 2).reshape(self.shape)

    def schedule(self, max_blocks: int | None = None) -> Schedule:
        """Segments of at most ``max_blocks`` blocks (None: one segment per block row), cached."""
        cap = max(self.max_row_blocks, 1) if max_blocks is None else int(max_blocks)
        if cap < 1:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        key = ("schedule", min(cap, max(self.max_row_blocks, 1)))
        if key not in self._cache:
            self._cache[key] = _build_schedule(self.crow.cpu().long(), key[1]).map(lambda t: t.to(self.device))
        return self._cache[key]

    def torch_bsr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_bsr_tensor`` for torch's CPU BSR matmul, cached. MKL takes only
        square blocks, so an oblong block is stored as its square sub-blocks (empty ones dropped)."""
        if "torch_bsr" not in self._cache:
            side = min(self.block)
            square = self if self.block == (side, side) else to_block_sparse(self.to_dense(), (side, side))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*support is in beta.*")
                self._cache["torch_bsr"] = torch.sparse_bsr_tensor(square.crow, square.col, square.values, self.shape,
                                                                   check_invariants=True)
        return self._cache["torch_bsr"]

    def row_order(self) -> torch.Tensor:
        """Block rows by descending number of stored blocks (ties by position): the longest-first order."""
        return self.schedule(None).order

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BlockSparseWeight":
        """A copy with ``fn`` applied to every tensor (what ``Module.to``/``.half()``/``.cuda()`` pass)."""
        moved = BlockSparseWeight(fn(self.crow), fn(self.col), fn(self.values), self.shape, self.max_row_blocks)
        for key, value in self._cache.items():
            if isinstance(value, Schedule):
                moved._cache[key] = value.map(fn)
        return moved


def _build_schedule(crow: torch.Tensor, cap: int) -> Schedule:
    counts = crow.diff()
    per_row = torch.clamp((counts + cap - 1) // cap, min=1)
    row_ptr = torch.zeros(len(per_row) + 1, dtype=torch.long)
    row_ptr[1:] = per_row.cumsum(0)
    row = torch.repeat_interleave(torch.arange(len(per_row)), per_row)
    within = torch.arange(int(row_ptr[-1])) - row_ptr[row]
    start = crow[row] + within * cap
    end = torch.minimum(start + cap, crow[row + 1])
    order = torch.argsort(end - start, descending=True, stable=True)
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return Schedule(as32(row), as32(start), as32(end), as32(order), as32(row_ptr), cap)


def block_density(weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Fraction of ``block``-sized tiles of a 2-D weight that hold a non-zero (shape must divide)."""
    rows, cols = weight.shape
    bo, bi = block
    tiles = (weight != 0).reshape(rows // bo, bo, cols // bi, bi).any(dim=3).any(dim=1)
    return float(tiles.float().mean())


def to_block_sparse(weight: torch.Tensor, block: tuple[int, int]) -> BlockSparseWeight:
    """Convert a dense 2-D (N x K) weight to BSR, keeping every block that holds a non-zero (NaN counts)."""
    if weight.dim() != 2:
        raise SrcompressError(f"a block-sparse weight must be 2-D, got shape {tuple(weight.shape)}",
                              "pass the (outputs x inputs) matrix of a Linear or 1x1 convolution")
    check_block(block, tuple(weight.shape))
    rows, cols = weight.shape
    bo, bi = block
    grid = weight.detach().reshape(rows // bo, bo, cols // bi, bi).transpose(1, 2)  # (R, C, bo, bi)
    keep = (grid != 0).flatten(2).any(dim=2)
    block_rows, block_cols = keep.nonzero(as_tuple=True)  # row-major: columns sorted within each row
    counts = keep.sum(dim=1)
    crow = torch.zeros(rows // bo + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = counts.cumsum(0)
    max_row_blocks = int(counts.max()) if counts.numel() else 0
    return BlockSparseWeight(crow, block_cols.to(torch.int32), grid[block_rows, block_cols].contiguous(),
                             (rows, cols), max_row_blocks)

