"""Sparsity patterns: unstructured, N:M along the input dimension, and whole blocks.

A pattern turns element scores of a layer's (outputs x reduction) matrix into pruning units (single
weights or blocks) and back into an element mask, and it detects itself in an existing weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import SrcompressError
from .layers import Layer

DETECT_BLOCKS = ((64, 64), (64, 32), (32, 64), (64, 16), (16, 64), (32, 32), (32, 16), (16, 32), (16, 16), (8, 8), (4, 4))


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured", "nm" or "block"
    n: int = 1
    m: int = 1
    block: tuple[int, int] = (1, 1)

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = text.strip().lower()
        if text in ("unstructured", "element", "elementwise"):
            return cls("unstructured")
        nm = re.fullmatch(r"(\d+):(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise SrcompressError(f"pattern {text!r} needs 0 < N < M", "use e.g. 2:4")
            return cls("nm", n=n, m=m)
        block = re.fullmatch(r"block:(\d+)(?:x(\d+))?", text)
        if block:
            rows = int(block.group(1))
            cols = int(block.group(2) or rows)
            if rows < 1 or cols < 1 or rows * cols < 2:
                raise SrcompressError(f"block pattern {text!r} is too small", "use e.g. block:32x32")
            return cls("block", block=(rows, cols))
        raise SrcompressError(f"unknown pattern {text!r}", "use unstructured, N:M (e.g. 2:4) or block:RxC (e.g. block:32x32)")

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        return 1 - self.n / self.m if self.kind == "nm" else None

    @property
    def unit_size(self) -> int:
        """Elements removed together (one weight, one block, or the M-group granularity of N:M)."""
        if self.kind == "block":
            return self.block[0] * self.block[1]
        return self.m if self.kind == "nm" else 1

    def unsupported_reason(self, layer: Layer) -> str | None:
        rows, cols = layer.matrix_shape()
        if self.kind == "nm":
            if layer.op == "conv_transpose":
                return "transposed conv: N:M needs a regular conv or linear"
            channels = layer.in_channels_per_group()
            if channels % self.m:
                return "depthwise conv (1 input per group)" if channels == 1 else f"{channels} inputs per group, not a multiple of {self.m}"
        elif self.kind == "block":
            bo, bi = self.block
            if rows % bo or cols % bi:
                return f"{rows}x{cols} not divisible by {bo}x{bi}"
        return None

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Flat scores of pruning units from element scores of the (rows x cols) matrix."""
        if self.kind == "block":
            bo, bi = self.block
            rows, cols = scores.shape
            return scores.reshape(rows // bo, bo, cols // bi, bi).mean(dim=(1, 3)).flatten()
        return scores.flatten()

    def unit_mask_to_matrix(self, keep_units: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if self.kind == "block":
            bo, bi = self.block
            grid = keep_units.reshape(shape[0] // bo, shape[1] // bi)
            return grid.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
        return keep_units.reshape(shape)

    def nm_keep(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the N best of every M consecutive entries along the last axis (ties: lower index)."""
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // self.m, self.m)
        best = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., : self.n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
        return keep.reshape(rows, cols)


def detect_pattern(layer: Layer, weight: torch.Tensor | None = None) -> str:
    """Name the sparsity pattern a weight has: dense, empty, block:RxC, N:M, rows or unstructured."""
    weight = layer.param.detach() if weight is None else weight
    zero = weight == 0
    zeros = int(zero.sum())
    if zeros == 0:
        return "dense"
    if zeros == weight.numel():
        return "empty"
    matrix = layer.to_matrix(zero)
    rows, cols = matrix.shape
    for bo, bi in DETECT_BLOCKS:
        if rows % bo or cols % bi or (bo, bi) == (rows, cols):
            continue
        blocks = matrix.reshape(rows // bo, bo, cols // bi, bi).all(dim=3).all(dim=1)
        if int(blocks.sum()) * bo * bi == zeros:
            return f"block:{bo}x{bi}"
    if layer.op != "conv_transpose":
        channel_matrix = layer.to_matrix(zero, channels_last=True)
        channels = layer.in_channels_per_group()
        for n, m in ((2, 4), (1, 4), (4, 8)):
            if channels % m == 0:
                per_group = channel_matrix.reshape(rows, -1, m).sum(dim=-1)
                if bool((per_group >= m - n).all()) and zeros <= (m - n) / m * weight.numel() * 1.02:
                    return f"{n}:{m}"
    if int(matrix.all(dim=1).sum()) * cols == zeros:
        return "rows"
    return "unstructured"
