"""``SparseLinear``: a Linear (or plain 1x1 convolution) whose block-sparse weight runs on a sparse path, and
``sparsify(model)``, which swaps such layers in and reports, per layer, what it did and why.

Paths, picked per call: the Triton kernels for CUDA inputs, torch's CPU BSR matmul for fp32 CPU inputs,
dense ``F.linear`` otherwise and always while exporting or tracing (ONNX, ``torch.export``, ``torch.compile``,
any ``TorchDispatchMode`` such as srcompress's layer tracer) or when autograd needs gradients, since neither
sparse path has a backward. The dense weight stays in the module (same parameter names as
``nn.Linear``/``nn.Conv2d``), so exports and state dicts are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..errors import SrcompressError
from .bsr import BlockSparseWeight, block_density, check_block, to_block_sparse
from .roofline import Hardware, get_hardware, predicted_speedup

BACKENDS = ("auto", "triton", "torch-bsr", "dense")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSABLE = {nn.ReLU: "relu", nn.GELU: "gelu"}
# Blocks tried when sparsify() picks one: largest area first, squares before oblongs at equal area.
AUTO_BLOCKS = ((64, 64), (64, 32), (32, 64), (32, 32), (64, 16), (16, 64), (32, 16), (16, 32), (16, 16))
# MKL's BSR matmul is several times slower when the dense operand's column count is not a multiple of 16
# (measured on torch 2.13 CPU: 5-15 columns take 4x longer than 16); short inputs are padded to one.
_CPU_PAD = 16


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y) if activation == "gelu" else y


def _exporting() -> bool:
    """Exporting, compiling or under a dispatch mode: tracers see the dense weight in an ordinary linear op."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or is_in_torch_dispatch_mode())


def torch_bsr_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with torch's BSR matmul as ``(W @ x.T).T`` (its fast CPU path), any leading dims."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    w = weight.torch_bsr()
    if m == 1:
        y2 = torch.mv(w, x2[0])[None]
    else:
        pad = -m % _CPU_PAD if m > 4 else 0
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        y2 = (w @ x2.T).T[:m]
    if bias is not None:
        y2 = y2 + bias
    return y2.contiguous().reshape(*x.shape[:-1], n)


class SparseLinear(nn.Module):
    """``act(x @ W.T + b)`` for a block-sparse W, on the fastest path available for the input.

    The BSR copy is made from the weight at construction and again when a state dict is loaded (not after
    in-place edits of the weight). The weight and bias are frozen (``requires_grad`` False); unfreezing them,
    or an input that needs gradients, selects the dense path.

    ``backend``: ``auto`` (Triton on CUDA, torch BSR for fp32 on CPU, dense otherwise), or one of
    ``triton``, ``torch-bsr``, ``dense`` to force a path (exports always run dense; ``torch-bsr`` takes only
    float32 on CPU and raises SrcompressError for other CPU dtypes).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, block: tuple[int, int],
                 activation: str | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise SrcompressError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        if activation not in (None, "relu", "gelu"):
            raise SrcompressError(f"activation {activation!r} cannot be fused", "use None, 'relu' or 'gelu'")
        self.out_features = weight.shape[0]
        self.in_features = weight[0].numel()
        check_block(block, (self.out_features, self.in_features))
        self.weight = weight.requires_grad_(False)  # inference module: a gradient would force the dense path
        self.bias = bias.requires_grad_(False) if bias is not None else None
        self.block = tuple(block)
        self.activation = activation
        self.backend = backend
        self.sparse = to_block_sparse(self.matrix().detach(), self.block)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int], activation: str | None = None,
                    backend: str = "auto") -> "SparseLinear":
        return cls(linear.weight, linear.bias, block, activation, backend)

    def matrix(self) -> torch.Tensor:
        """The dense (outputs x inputs) weight."""
        return self.weight.reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block[0]}x{self.block[1]}, "
                f"density={self.sparse.density:.3f}, activation={self.activation}, backend={self.backend}")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.sparse = to_block_sparse(self.matrix().detach(), self.block)  # keep the BSR copy in step

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.sparse = self.sparse.apply(fn)
        return self

    def path(self, x: torch.Tensor) -> str:
        """The path a call with input ``x`` takes: ``triton``, ``torch-bsr`` or ``dense``."""
        if _exporting() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))):
            return "dense"
        if self.backend == "torch-bsr" and x.device.type == "cpu" and not x.dtype == torch.float32 == self.sparse.dtype:
            raise SrcompressError(f"backend 'torch-bsr' runs on CPU in float32 only (input {x.dtype}, weight {self.sparse.dtype})",
                                  "use float32 weights and inputs on CPU, or backend='auto' (dense for other dtypes)")
        if self.backend != "auto":
            return self.backend
        if x.is_cuda and x.dtype in TRITON_DTYPES and x.dtype == self.sparse.dtype and _triton_available():
            return "triton"
        if x.device.type == "cpu" and x.dtype == torch.float32 == self.sparse.dtype:
            return "torch-bsr"
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "triton":
            from .triton_bsr import bsr_linear

            return bsr_linear(x, self.sparse, self.bias, self.activation)
        if path == "torch-bsr":
            return _activate(torch_bsr_linear(x, self.sparse, self.bias), self.activation)
        return _activate(F.linear(x, self.matrix(), self.bias), self.activation)


class SparseConv1x1(SparseLinear):
    """A 1x1 convolution (stride 1, no padding, one group) run as SparseLinear over channels-last pixels.

    Inputs in ``torch.channels_last`` memory format need no copy; the output comes back channels-last.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block: tuple[int, int], activation: str | None = None,
                  backend: str = "auto") -> "SparseConv1x1":
        if not is_plain_1x1(conv):
            raise SrcompressError(f"{conv} is not a plain 1x1 convolution", "convert only 1x1 convs with stride 1, no padding, one group")
        return cls(conv.weight, conv.bias, block, activation, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path(x) == "dense":
            return _activate(F.conv2d(x, self.weight, self.bias), self.activation)
        return super().forward(x.movedim(-3, -1)).movedim(-1, -3)


def is_plain_1x1(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LayerDecision:
    """What sparsify() did with one Linear or 1x1 convolution."""

    name: str
    kind: str  # "linear" or "conv1x1"
    shape: tuple[int, int]  # (outputs, inputs)
    converted: bool = False
    reason: str = ""  # why it stayed dense; empty when converted
    block: tuple[int, int] | None = None
    density: float | None = None  # fraction of non-zero blocks
    predicted_speedup: float | None = None  # ideal dense / sparse time (kernels notes, section 3.2)
    activation: str | None = None  # fused activation


@dataclass
class SparsifyReport:
    hardware: str
    tokens: int | None  # None: the large-batch limit
    min_speedup: float
    forced: bool
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.converted]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} of {len(self.layers)} layers converted "
                 f"(predicted for {self.hardware}, {'large batch' if self.tokens is None else f'{self.tokens} tokens'})"]
        for layer in self.layers:
            detail = (f"block {layer.block[0]}x{layer.block[1]}, density {layer.density:.3f}, predicted {layer.predicted_speedup:.2f}x"
                      if layer.block else "")
            state = "converted" + (f" +{layer.activation}" if layer.activation else "") if layer.converted else f"dense: {layer.reason}"
            lines.append(f"  {layer.name} {layer.kind} {layer.shape[0]}x{layer.shape[1]} {detail} -> {state}")
        return "\n".join(lines)


def choose_block(matrix: torch.Tensor, tolerance: float = 0.02) -> tuple[int, int] | None:
    """The largest kernel block that keeps as few weights as the finest block that fits (within ``tolerance``,
    relative): a layer pruned in 32x32 blocks gets 32x32, not 16x16 (same zeros) nor 64x64 (fewer zeros)."""
    fitting = [b for b in AUTO_BLOCKS if matrix.shape[0] % b[0] == 0 and matrix.shape[1] % b[1] == 0]
    if not fitting:
        return None
    densities = {b: block_density(matrix, b) for b in fitting}
    best = min(densities.values())
    return next(b for b in fitting if densities[b] <= best * (1 + tolerance) + 1e-12)


def _decide(layer: LayerDecision, matrix: torch.Tensor, block: tuple[int, int] | None, hw: Hardware,
            tokens: int | None, min_speedup: float, force: bool) -> None:
    rows, cols = layer.shape
    chosen = block or choose_block(matrix)
    if chosen is None:
        layer.reason = f"{rows}x{cols} not divisible by any block of at least 16x16"
        return
    if rows % chosen[0] or cols % chosen[1]:
        layer.reason = f"{rows}x{cols} not divisible by block {chosen[0]}x{chosen[1]}"
        return
    layer.block = chosen
    layer.density = block_density(matrix, chosen)
    layer.predicted_speedup = predicted_speedup(rows, cols, layer.density, chosen, hw, tokens)
    if force or layer.predicted_speedup >= min_speedup:
        layer.converted = True
        return
    ceiling = predicted_speedup(rows, cols, 0.0, chosen, hw, tokens)
    if ceiling < min_speedup:
        layer.reason = f"too narrow to gain: even an empty weight would be at most {ceiling:.2f}x faster"
    else:
        layer.reason = f"density {layer.density:.2f} too high to gain: predicted {layer.predicted_speedup:.2f}x"


def sparsify(model: nn.Module, block: tuple[int, int] | None = None, *, tokens: int | None = None,
             hardware: str | Hardware = "h100-sxm", min_speedup: float = 1.2, force: bool = False,
             fuse_activations: bool = True, backend: str = "auto") -> tuple[nn.Module, SparsifyReport]:
    """Replace the block-sparse ``nn.Linear`` and plain 1x1 ``nn.Conv2d`` layers of ``model`` (in place).

    A layer is converted when the ideal speedup predicted for ``hardware`` at ``tokens`` rows per call
    (None: the large-batch limit, the least favourable) reaches ``min_speedup``; ``force`` converts every
    layer whose shape fits the block. ``block`` None picks one per layer (see ``choose_block``). A ReLU or
    GELU that directly follows a converted layer inside an ``nn.Sequential`` is fused into its epilogue.
    Returns the model (a new module only when ``model`` itself is a layer) and a report that lists every
    Linear/1x1-conv layer with why it stayed dense, if it did.
    """
    if block is not None:
        check_block(block)
    hw = get_hardware(hardware)
    report = SparsifyReport(hw.name, tokens, min_speedup, force)
    root = nn.ModuleDict({"model": model})
    uses = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    replaced: dict[int, nn.Module] = {}
    for parent_name, parent in list(root.named_modules()):
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            kind = "linear" if isinstance(child, nn.Linear) else "conv1x1" if _is_1x1(child) else None
            if kind is None:
                continue
            if id(child) in replaced:  # a layer shared by several parents
                setattr(parent, child_name, replaced[id(child)])
                continue
            path = f"{parent_name}.{child_name}" if parent_name else child_name  # "model", "model.fc", ...
            name = path.removeprefix("model").removeprefix(".") or "(model)"
            matrix = child.weight.detach().reshape(child.weight.shape[0], -1)
            layer = LayerDecision(name, kind, tuple(matrix.shape))
            report.layers.append(layer)
            if kind == "conv1x1" and not is_plain_1x1(child):
                layer.reason = "1x1 conv with stride, padding, dilation or groups"
                continue
            _decide(layer, matrix, block, hw, tokens, min_speedup, force)
            if not layer.converted:
                continue
            following = children[index + 1] if index + 1 < len(children) else None
            if (fuse_activations and isinstance(parent, nn.Sequential) and following and _fusable(following[1])
                    and uses[id(child)] == 1):
                layer.activation = FUSABLE[type(following[1])]
                setattr(parent, following[0], nn.Identity())
            new = (SparseLinear.from_linear(child, layer.block, layer.activation, backend) if kind == "linear"
                   else SparseConv1x1.from_conv(child, layer.block, layer.activation, backend))
            replaced[id(child)] = new
            setattr(parent, child_name, new)
    return root["model"], report


def _is_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)


def _fusable(module: nn.Module | None) -> bool:
    return type(module) in FUSABLE and (not isinstance(module, nn.GELU) or module.approximate == "none")
