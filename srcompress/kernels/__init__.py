"""Block-sparse inference: BSR conversion, Triton kernels, and ``sparsify(model)``.

``sparsify`` swaps block-pruned ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers for ``SparseLinear`` modules that
run the Triton kernels on CUDA and torch's BSR matmul on CPU. Triton is optional (``srcompress[triton]``):
this package imports without it, and ``bsr_linear`` (the kernels themselves) is loaded on first use.
"""

from .bsr import BlockSparseWeight, Schedule, to_block_sparse
from .roofline import HARDWARE, Hardware, predicted_speedup
from .sparse_linear import LayerDecision, SparseConv1x1, SparseLinear, SparsifyReport, sparsify

_TRITON_API = {"bsr_linear": "srcompress.kernels.triton_bsr", "KernelConfig": "srcompress.kernels.triton_bsr"}

__all__ = ["BlockSparseWeight", "Schedule", "to_block_sparse", "HARDWARE", "Hardware", "predicted_speedup",
           "LayerDecision", "SparseConv1x1", "SparseLinear", "SparsifyReport", "sparsify", *_TRITON_API]


def __getattr__(name):
    if name in _TRITON_API:
        import importlib

        return getattr(importlib.import_module(_TRITON_API[name]), name)
    raise AttributeError(f"module 'srcompress.kernels' has no attribute {name!r}")
