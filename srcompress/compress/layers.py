"""Find a model's weight matrices by watching one forward pass.

Every parameter that is used as the weight of a convolution or a matrix product is a layer, whether
it belongs to ``nn.Linear``/``nn.Conv2d``, a bare ``nn.Parameter`` of a custom module, the packed
``in_proj_weight`` of ``nn.MultiheadAttention`` or an unlifted ``torch.export`` graph. The pass also
gives each layer's FLOPs and the order in which layers run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..inputs import run_model
from ..io import flatten_outputs

aten = torch.ops.aten
_MATMULS = {aten.addmm, aten.mm}
_CONVS = {aten.convolution, aten._convolution}


@dataclass
class Layer:
    """One weight tensor used as a matrix: conv (O, I/g, k...), linear (O, I) or a bare matmul weight."""

    name: str  # parameter name, e.g. "fc_layers.0.weight"
    param: nn.Parameter
    op: str  # "linear", "conv" or "conv_transpose"
    order: int  # position of its first use in the forward pass
    flops: int = 0  # dense FLOPs (2 x MACs) for the example input
    groups: int = 1
    reduction_dim: int = 1  # dimension of the 2-D weight that is summed over (1 for nn.Linear)
    is_output: bool = False  # a model output is its result, maybe after an activation or scale (an output head)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def module_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    def to_matrix(self, tensor: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(outputs, reduction) view; ``channels_last`` orders a conv's reduction as (kh, kw, in)."""
        if self.op == "conv" and channels_last and tensor.dim() > 2:
            return tensor.movedim(1, -1).reshape(tensor.shape[0], -1)
        if tensor.dim() == 2 and self.reduction_dim == 0:
            return tensor.t()
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`."""
        shape = self.shape
        if self.op == "conv" and channels_last and len(shape) > 2:
            moved = (shape[0], *shape[2:], shape[1])
            return matrix.reshape(moved).movedim(-1, 1).contiguous()
        if len(shape) == 2 and self.reduction_dim == 0:
            return matrix.t().contiguous()
        return matrix.reshape(shape).contiguous()

    def matrix_shape(self) -> tuple[int, int]:
        rows, cols = (self.shape[1], self.shape[0]) if len(self.shape) == 2 and self.reduction_dim == 0 else (self.shape[0], self.numel // self.shape[0])
        return rows, cols

    def in_channels_per_group(self) -> int:
        """Size of the input-channel axis that N:M groups run along."""
        if self.op == "conv":
            return self.shape[1]
        return self.matrix_shape()[1]


class _WeightUse(TorchDispatchMode):
    def __init__(self, params: dict[int, list[tuple[str, nn.Parameter]]], constants: set[int]):
        super().__init__()
        self.params = params
        self.constants = constants  # storages of parameters and buffers
        self.layers: dict[str, Layer] = {}
        self.embeddings: set[str] = set()
        # storage -> the layer whose result it holds, directly or through operators that read nothing else but
        # constants (an activation, a scale, a reshape): a model output found here comes from that layer
        self.source: dict[int, str] = {}
        self.kept: list[torch.Tensor] = []  # those tensors, kept alive so that no storage is reused during the trace

    def _derive(self, name: str, out) -> None:
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.source[tensor.untyped_storage().data_ptr()] = name
                self.kept.append(tensor)

    def _follow(self, args, kwargs, out) -> None:
        """Carry a layer's name to ``out`` when the operator read that layer's result and only constants besides."""
        names, other = set(), False
        for tensor in tree_flatten((args, kwargs))[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage().data_ptr()
                if storage in self.source:
                    names.add(self.source[storage])
                elif storage not in self.constants and tensor.dim() > 0:
                    other = True
        if len(names) == 1 and not other:
            self._derive(names.pop(), out)

    def _lookup(self, tensor) -> tuple[str, nn.Parameter] | None:
        """The parameter ``tensor`` views: the whole of it, or a block of its rows (a packed q/k/v weight's chunk)."""
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            return None
        for name, param in self.params.get(tensor.untyped_storage().data_ptr(), ()):
            start = param.data_ptr()
            if start <= tensor.data_ptr() < start + param.numel() * param.element_size() and tensor.numel() <= param.numel():
                return name, param
        return None

    def _record(self, name: str, param: nn.Parameter, op: str, flops: int, out=None, **extra) -> None:
        self._derive(name, out)
        layer = self.layers.get(name)
        if layer is None:
            self.layers[name] = Layer(name, param, op, order=len(self.layers), flops=flops, **extra)
        else:
            layer.flops += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        recorded = len(self.kept)
        if packet in _MATMULS:
            left, right = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
            flops = 2 * left.shape[0] * left.shape[1] * right.shape[1]
            for operand, operand_reduction in ((right, 0), (left, 1)):
                hit = self._lookup(operand)
                if hit is None or hit[1].dim() != 2:
                    continue
                name, param = hit
                same = operand.stride() == param.stride() and (operand.numel() < param.numel() or tuple(operand.shape) == tuple(param.shape))
                reduction = operand_reduction if same else 1 - operand_reduction
                self._record(name, param, "linear", flops, out, reduction_dim=reduction)
                break
        elif packet in _CONVS:
            hit = self._lookup(args[1])
            if hit is not None:
                name, param = hit
                transposed = bool(args[6])
                groups = int(args[8])
                kernel = math.prod(param.shape[2:])
                if transposed:
                    flops = 2 * args[0].numel() * (param.shape[1] * kernel)
                else:
                    flops = 2 * out.numel() * param.shape[1] * kernel
                self._record(name, param, "conv_transpose" if transposed else "conv", flops, out, groups=groups)
        elif packet is aten._native_multi_head_attention:
            tokens = args[0].numel() // args[0].shape[-1]
            for weight in (args[5], args[7]):  # packed q/k/v projection, output projection
                hit = self._lookup(weight)
                if hit is not None:
                    self._record(hit[0], hit[1], "linear", 2 * tokens * hit[1].numel())
        elif packet is aten.embedding:
            hit = self._lookup(args[0])
            if hit is not None:
                self.embeddings.add(hit[0])
        if len(self.kept) == recorded:  # not a layer: perhaps an operator on one layer's result
            self._follow(args, kwargs, out)
        return out


def trace_layers(model: nn.Module, example_inputs: tuple) -> tuple[list[Layer], set[str]]:
    """Layers in order of first use, with FLOPs per example input; also the embedding tables seen."""
    params: dict[int, list[tuple[str, nn.Parameter]]] = {}  # storage -> the parameters in it
    for name, param in model.named_parameters():
        params.setdefault(param.untyped_storage().data_ptr(), []).append((name, param))
    constants = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    mode = _WeightUse(params, constants)
    with mode:
        outputs = flatten_outputs(run_model(model, example_inputs))
    for tensor in outputs:
        name = mode.source.get(tensor.untyped_storage().data_ptr())
        if name is not None:
            mode.layers[name].is_output = True
    layers = sorted(mode.layers.values(), key=lambda layer: layer.order)
    return layers, mode.embeddings


def weight_density(layer: Layer) -> float:
    return float(torch.count_nonzero(layer.param.detach())) / max(layer.numel, 1)
