"""The channel dependency graph: which parameter slices must be removed together.

The model is traced with ``torch.export`` (non-strict, so ordinary Python models and Hugging Face
models trace). Every channel position of every parameter dimension gets an *atom*; walking the
graph, operators tie atoms together in one union-find: a linear layer ties its weight's input
columns to the channels of its input, a residual add ties the channels of both operands, attention
ties the rows of one head in q, k and v, a grouped convolution ties all channels of a group. Atoms
that reach the model's inputs or outputs, or an operator the graph does not understand, are fixed
(with the reason). Each remaining set of atoms is a *unit*: one neuron, channel, group or head,
removed as a whole. Units touching the same parameter slots form a :class:`ChannelGroup`.

Activations carry a numpy array of atoms, broadcastable to the tensor's shape, where a size-1 axis
means the tensor has no channel identity along that dimension (batch, space, sequence).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import SrcompressError
from ..inputs import set_eval

NONE = -1
aten = torch.ops.aten


class Atoms:
    """Union-find over atoms; a set is fixed (never pruned) once any member is fixed."""

    def __init__(self):
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}
        self.head: set[int] = set()

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, atom: int) -> int:
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def union(self, a: int, b: int) -> None:
        if a == NONE or b == NONE:
            return
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.reason and ra not in self.reason:
            self.reason[ra] = self.reason[rb]

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(*(arr.ravel() for arr in np.broadcast_arrays(a, b))):
            self.union(x, y)

    def together(self, atoms: np.ndarray) -> None:
        flat = [int(x) for x in np.ravel(atoms) if x != NONE]
        for other in flat[1:]:
            self.union(flat[0], other)

    def fix(self, atoms, reason: str) -> None:
        for atom in np.unique(np.ravel(atoms)):
            if atom != NONE:
                self.reason.setdefault(self.find(int(atom)), reason)

    def fixed(self, atom: int) -> bool:
        return self.find(atom) in self.reason

    def why(self, atom: int) -> str:
        return self.reason.get(self.find(atom), "")


@dataclass
class Act:
    """Atoms of an activation, broadcastable to its shape."""

    atoms: np.ndarray

    @property
    def varying(self) -> tuple[int, ...]:
        return tuple(d for d, size in enumerate(self.atoms.shape) if size > 1)


@dataclass
class ParamView:
    """A parameter or buffer (or a transposed / reshaped-by-ones view of it) with one atom vector per dim."""

    name: str
    vecs: list[np.ndarray | None]
    dims: list[int | None]  # original dimension of each current dimension (None for an inserted 1)


def none_act(ndim: int) -> Act:
    return Act(np.full((1,) * ndim, NONE, dtype=np.int64))


@dataclass
class Slot:
    """Positions of one unit along one dimension of one parameter or buffer."""

    tensor: str
    dim: int
    positions: np.ndarray


@dataclass
class ChannelGroup:
    """Units (neurons, channels, channel groups or heads) that share the same parameter slots."""

    index: int
    name: str
    kind: str  # "channels", "neurons", "heads" or "groups"
    units: list[int]  # root atom of each unit
    slots: list[list[Slot]]  # per unit
    producers: list[tuple[str, int]]  # (weight, dim) whose output channels are removed
    consumers: list[tuple[str, int]]  # (weight, dim) whose input channels are removed
    unit_width: int  # channels per unit in the first producer
    order: int

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class LayerInfo:
    """What follows a conv/linear weight in the forward pass (used to fold BatchNorm and classify activations)."""

    bias: str | None = None
    batch_norm: dict[str, Any] | None = None  # names of weight, bias, running_mean, running_var, and eps
    ops_after: set[str] = field(default_factory=set)  # operators between this layer and the next weighted ones
    feeds: set[str] = field(default_factory=set)  # weights of the next weighted layers this output reaches
    chain: list[tuple[str, Any, tuple, dict]] | None = None  # (op, target, args after the input, kwargs) to the next
    # weighted layer when the path does not branch; None when it does


@dataclass
class ModuleRule:
    """How a module's channels couple, for modules the graph should treat as one opaque step."""

    couple: Callable[["Coupler"], None]
    fixup: Callable[[nn.Module], nn.Module | None] | None = None  # module with sliced tensors -> replacement (or None)


MODULE_RULES: dict[type, ModuleRule] = {}


def register_module(cls: type, couple: Callable[["Coupler"], None], fixup=None) -> None:
    """Declare how ``cls``'s channels couple; see :class:`Coupler` for what ``couple`` may call."""
    MODULE_RULES[cls] = ModuleRule(couple, fixup)


@dataclass
class Split:
    """A reshape that spreads prunable channels over several dimensions (heads x head width): after pruning, the
    model's own code must produce the pruned layout there, which a hard-coded head count does not."""

    key: tuple[str, str, int]  # (module path, operator, index among that module's reshapes): stable across a re-trace
    where: str
    shape: tuple[int, ...]
    atoms: np.ndarray  # broadcastable to ``shape``


@dataclass
class Graph:
    """Result of :func:`build_graph`."""

    model: nn.Module
    atoms: Atoms
    tensors: dict[str, list[np.ndarray | None]]  # parameter/buffer name -> atom vector per dim
    roles: dict[tuple[str, int], str]  # (tensor, dim) -> "out", "in", "norm", "bias", "other"
    groups: list[ChannelGroup] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # weight -> why its output channels stay
    replaced_modules: dict[str, ModuleRule] = field(default_factory=dict)
    op_users: dict[str, list[str]] = field(default_factory=dict)  # weight -> module paths that use it
    layers: dict[str, "LayerInfo"] = field(default_factory=dict)  # weight -> bias, following BatchNorm, ops after it
    use_count: dict[str, int] = field(default_factory=dict)  # parameter -> number of operators that read it
    splits: list[Split] = field(default_factory=list)

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


class Coupler:
    """What a :class:`ModuleRule` sees: the module, its boundary tensors, and coupling operations."""

    def __init__(self, builder: "_Builder", path: str, module: nn.Module, inputs: list[tuple[Act, tuple]], outputs: list,
                 inside: set):
        self.builder = builder
        self.path = path
        self.module = module
        self.inputs = inputs  # (atoms, shape) of each activation flowing into the module
        self._outputs = outputs  # fx nodes of the module used outside it
        self._inside = inside
        self.output_atoms: dict[Any, Act] = {}
        self.accessed: set[tuple[str, int]] = set()

    def param(self, name: str, dim: int) -> np.ndarray:
        """Atom vector of the module's parameter or buffer ``name`` along ``dim``."""
        self.accessed.add((name, dim))
        full = f"{self.path}.{name}" if self.path else name
        vec = self.builder.tensor_vecs[full][dim]
        return vec if vec is not None else np.full(1, NONE, dtype=np.int64)

    def role(self, name: str, dim: int, role: str) -> None:
        self.builder.roles[(f"{self.path}.{name}" if self.path else name, dim)] = role

    def input_dim(self, index: int, dim: int, length: int) -> np.ndarray:
        """Atoms of input ``index`` along ``dim`` (fixed fresh atoms where it has no channel identity)."""
        act, shape = self.inputs[index]
        return self.builder.project(act, shape, dim % len(shape), length, f"{self.path} input")

    def same(self, a: np.ndarray, b: np.ndarray) -> None:
        self.builder.atoms.union_arrays(a, b)

    def together(self, atoms: np.ndarray, head: bool = False) -> None:
        self.builder.atoms.together(atoms)
        if head and np.size(atoms):
            self.builder.atoms.head.add(int(np.ravel(atoms)[0]))

    def fix(self, atoms: np.ndarray, reason: str) -> None:
        self.builder.atoms.fix(atoms, reason)

    def outputs(self) -> list:
        return list(self._outputs)

    def set_output(self, node, dim: int, vec: np.ndarray) -> None:
        """Output ``node`` carries the channels ``vec`` along ``dim`` (and no channel identity elsewhere)."""
        shape = _shape(node)
        dim = dim % len(shape)
        atoms = np.full([len(vec) if d == dim else 1 for d in range(len(shape))], NONE, dtype=np.int64)
        atoms.reshape(-1)[:] = vec
        self.output_atoms[node] = Act(atoms)

    def depends_on(self, node, target_name: str) -> bool:
        """Whether output ``node`` is computed from the weight ``target_name`` inside the module."""
        full = f"{self.path}.{target_name}"
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if self.builder.placeholder_names.get(current) == full:
                return True
            stack.extend(a for a in current.all_input_nodes if a in self._inside or a.op == "placeholder")
        return False


def _op_name(node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


class _Builder:
    def __init__(self, model: nn.Module, program):
        self.model = model
        self.program = program
        self.atoms = Atoms()
        self.tensor_vecs: dict[str, list[np.ndarray | None]] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.env: dict[Any, Any] = {}
        self.placeholder_names: dict[Any, str] = {}
        self.op_users: dict[str, list[str]] = {}
        self.replaced: dict[str, ModuleRule] = {}
        self.layers: dict[str, LayerInfo] = {}
        self.layer_nodes: dict[Any, str] = {}  # conv/linear node -> weight name
        self.use_count: dict[str, int] = {}
        self.splits: list[Split] = []
        self.reshape_keys = _reshape_keys(program)

    # ----- helpers -------------------------------------------------------------------------
    def where(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return f"{node.target} in {path or 'the top-level forward'}"

    def act(self, value, shape: tuple[int, ...] | None, reason: str) -> Act | None:
        """An activation view of any argument; parameters with several channel dims are fixed."""
        if isinstance(value, Act):
            return value
        if isinstance(value, ParamView):
            present = [d for d, v in enumerate(value.vecs) if v is not None]
            ndim = len(value.vecs)
            if len(present) == 0:
                return none_act(ndim)
            if len(present) == 1:
                d = present[0]
                shape_d = [1] * ndim
                shape_d[d] = len(value.vecs[d])
                return Act(value.vecs[d].reshape(shape_d))
            for vec in value.vecs:
                if vec is not None:
                    self.atoms.fix(vec, reason)
            return none_act(ndim)
        if isinstance(value, (tuple, list)):
            return None
        return None

    def project(self, act: Act, shape: tuple[int, ...], dim: int, length: int, reason: str) -> np.ndarray:
        """One atom per position along ``dim``: the activation's atoms there, tied across other dims."""
        atoms = act.atoms
        if atoms.shape[dim] == 1:
            fresh = self.atoms.new(length)
            if length > 1 or atoms.ravel()[0] == NONE:
                self.atoms.fix(fresh, f"{reason}: no channel identity along this dimension")
            return fresh
        moved = np.moveaxis(atoms, dim, 0).reshape(atoms.shape[dim], -1)
        for row in moved:
            self.atoms.together(row)
        if moved.shape[1] > 1 and any(np.any(row == NONE) for row in moved):
            self.atoms.fix(moved, reason)
        return moved[:, 0].copy()

    def fix_act(self, value, reason: str) -> None:
        if isinstance(value, Act):
            self.atoms.fix(value.atoms, reason)
        elif isinstance(value, ParamView):
            for vec in value.vecs:
                if vec is not None:
                    self.atoms.fix(vec, reason)
        elif isinstance(value, (tuple, list)):
            for item in value:
                self.fix_act(item, reason)

    def param_dim(self, view: ParamView, dim: int) -> tuple[str, int] | None:
        original = view.dims[dim]
        return None if original is None else (view.name, original)

    def vec(self, view: ParamView, dim: int, length: int) -> np.ndarray:
        vec = view.vecs[dim]
        if vec is None:
            return np.full(length, NONE, dtype=np.int64) if length == 1 else self.atoms.new(length)
        return vec

    def note_layer(self, node, weight: ParamView, bias) -> None:
        if weight.dims[:2] != [0, 1]:
            return
        self.layer_nodes[node] = weight.name
        self.layers.setdefault(weight.name, LayerInfo()).bias = bias.name if isinstance(bias, ParamView) else None

    def trace_ops_after(self) -> None:
        """For each conv/linear, the operators its output passes through before the next weighted op."""
        stops = {aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.matmul, aten.mm, aten.bmm, aten.addmm}
        for node, name in self.layer_nodes.items():
            seen, stack, ops = set(), list(node.users), self.layers[name].ops_after
            while stack:
                user = stack.pop()
                if user.op == "output":
                    ops.add("output")
                if user in seen or user.op != "call_function":
                    continue
                seen.add(user)
                packet = getattr(user.target, "overloadpacket", None)
                if packet in stops:
                    if user in self.layer_nodes:
                        self.layers[name].feeds.add(self.layer_nodes[user])
                    continue
                ops.add(_op_name(user))
                stack.extend(user.users)
            self.layers[name].chain = self._chain(node, stops)

    def _chain(self, node, stops) -> list[tuple[str, Any, tuple, dict]] | None:
        """The operators from ``node`` to the next weighted layer, in order, if the path never branches."""
        chain = []
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node.op != "call_function":
                return None
            if getattr(node.target, "overloadpacket", None) in stops:
                return chain
            chain.append((_op_name(node), node.target, tuple(node.args[1:]), dict(node.kwargs)))
        return None

    # ----- graph walk ----------------------------------------------------------------------
    def run(self) -> None:
        program = self.program
        signature = program.graph_signature
        names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        graph = program.graph
        live = _live_nodes(graph)
        regions = self._registered_regions(graph, live)
        done_regions = set()
        for node in graph.nodes:
            if node not in live:
                continue
            if node.op == "placeholder":
                shape = _shape(node)
                if node.name in names:
                    name = names[node.name]
                    vecs = [self.atoms.new(s) if s > 1 else None for s in (shape or ())]
                    self.tensor_vecs[name] = vecs
                    self.placeholder_names[node] = name
                    self.env[node] = ParamView(name, list(vecs), list(range(len(vecs))))
                else:
                    self.env[node] = none_act(len(shape or ()))
                continue
            if node.op == "output":
                for arg in _flat_args(node.args):
                    if arg in self.env:
                        self.fix_act(self.env[arg], "reaches the model output")
                continue
            region = regions.get(node)
            if region is not None:
                if region[0] not in done_regions:
                    done_regions.add(region[0])
                    self._run_region(*region)
                continue
            if node.op != "call_function":
                continue
            self._record_users(node)
            self.env[node] = self.apply(node)

    def _record_users(self, node) -> None:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        for arg in node.all_input_nodes:
            name = self.placeholder_names.get(arg)
            if name is not None:
                self.use_count[name] = self.use_count.get(name, 0) + 1
                self.op_users.setdefault(name, [])
                if path not in self.op_users[name]:
                    self.op_users[name].append(path)

    def _registered_regions(self, graph, live) -> dict:
        """Map each node inside a registered module to (path, module, nodes)."""
        modules = dict(self.model.named_modules())
        regions: dict[str, list] = {}
        for node in graph.nodes:
            if node.op != "call_function" or node not in live:
                continue
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                module = modules.get(path)
                if module is not None and type(module) in MODULE_RULES:
                    regions.setdefault(path, []).append(node)
                    break
        out = {}
        for path, nodes in regions.items():
            entry = (path, modules[path], nodes)
            for node in nodes:
                out[node] = entry
        return out

    def _run_region(self, path: str, module: nn.Module, nodes: list) -> None:
        inside = set(nodes)
        inputs, seen = [], set()
        for node in nodes:
            self._record_users(node)
            for arg in node.all_input_nodes:
                if arg in inside or arg in seen or arg in self.placeholder_names:
                    continue
                seen.add(arg)
                value, shape = self.env.get(arg), _shape(arg)
                if isinstance(value, Act) and shape is not None:
                    inputs.append((value, shape))
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]
        coupler = Coupler(self, path, module, inputs, outputs, inside)
        MODULE_RULES[type(module)].couple(coupler)
        self.replaced[path] = MODULE_RULES[type(module)]
        for name, param in list(module.named_parameters()) + list(module.named_buffers()):
            full = f"{path}.{name}" if path else name
            for dim, vec in enumerate(self.tensor_vecs.get(full, [])):
                if vec is not None and (name, dim) not in coupler.accessed:
                    self.atoms.fix(vec, f"{full} dim {dim} is not declared by the rule registered for {type(module).__name__}")
        for node in outputs:
            act = coupler.output_atoms.get(node)
            self.env[node] = act if act is not None else none_act(len(_shape(node) or ()))

    def apply(self, node) -> Any:
        packet = getattr(node.target, "overloadpacket", None)
        rule = RULES.get(packet) if packet is not None else None
        if node.target is operator.getitem:
            source = self.env.get(node.args[0])
            if isinstance(source, (tuple, list)):
                return source[node.args[1]]
            return none_act(len(_shape(node) or ()))
        args = [self._resolve(a) for a in node.args]
        kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
        if rule is None:
            return self.unknown(node, args, kwargs)
        return rule(self, node, args, kwargs)

    def _resolve(self, value):
        if isinstance(value, torch.fx.Node):
            return self.env.get(value, none_act(len(_shape(value) or ())))
        if isinstance(value, (list, tuple)):
            return type(value)(self._resolve(v) for v in value)
        return value

    def unknown(self, node, args, kwargs) -> Any:
        reason = f"passes through {self.where(node)}, which the channel graph does not understand"
        for value in list(args) + list(kwargs.values()):
            self.fix_act(value, reason)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(none_act(v.dim()) if isinstance(v, torch.Tensor) else None for v in val)
        return none_act(val.dim()) if isinstance(val, torch.Tensor) else None


def _flat_args(args) -> list:
    out = []
    for arg in args:
        if isinstance(arg, (list, tuple)):
            out.extend(_flat_args(arg))
        else:
            out.append(arg)
    return out


def _live_nodes(graph) -> set:
    output = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    return live


# ----- operator rules --------------------------------------------------------------------------
RULES: dict[Any, Callable] = {}


def rule(*packets):
    def register(func):
        for packet in packets:
            if packet is not None:
                RULES[packet] = func
        return func

    return register


def _op(name: str):
    return getattr(aten, name, None)


PASS_THROUGH = [
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "softplus",
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "sin", "cos", "reciprocal", "square", "clamp", "clamp_", "clamp_min",
    "clamp_max", "lift_fresh_copy", "zeros_like", "ones_like", "full_like", "empty_like", "type_as", "prelu_placeholder",
    "logical_not", "bitwise_not", "sign", "round", "floor", "ceil", "_assert_tensor_metadata", "relu6", "glu_placeholder",
]


@rule(*[_op(n) for n in PASS_THROUGH])
def _pass(b: _Builder, node, args, kwargs):
    first = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}") if args else None
    if first is None:
        return none_act(len(_shape(node) or ()))
    others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, (Act, ParamView))]
    if others:
        return _elementwise(b, node, args, kwargs)
    return first


@rule(_op("add"), _op("add_"), _op("sub"), _op("sub_"), _op("mul"), _op("mul_"), _op("div"), _op("div_"), _op("where"),
      _op("maximum"), _op("minimum"), _op("masked_fill"), _op("masked_fill_"), _op("pow"), _op("eq"), _op("ne"), _op("gt"),
      _op("ge"), _op("lt"), _op("le"), _op("logical_and"), _op("logical_or"), _op("bitwise_and"), _op("bitwise_or"),
      _op("rsub"), _op("copy_"), _op("fill_"), _op("lerp"), _op("addcmul"), _op("addcdiv"))
def _elementwise(b: _Builder, node, args, kwargs):
    out_shape = _shape(node) or ()
    ndim = len(out_shape)
    operands = []
    for arg_node, value in zip(list(node.args) + list(node.kwargs.values()), list(args) + list(kwargs.values())):
        if isinstance(value, (Act, ParamView)):
            shape = _shape(arg_node) if isinstance(arg_node, torch.fx.Node) else None
            act = b.act(value, shape, f"used by {b.where(node)}")
            if act is None or shape is None:
                continue
            pad = ndim - act.atoms.ndim
            atoms = act.atoms.reshape((1,) * pad + act.atoms.shape) if pad >= 0 else act.atoms
            shape = (1,) * max(pad, 0) + tuple(shape)
            operands.append((atoms, shape))
    if not operands:
        return none_act(ndim)
    reason = f"combined in {b.where(node)} with a tensor that has no channel identity"
    varying = [tuple(d for d, s in enumerate(a.shape) if s > 1) for a, _ in operands]
    for d in range(ndim):
        carriers = [i for i, v in enumerate(varying) if d in v]
        blind = [i for i, (a, shape) in enumerate(operands) if d not in varying[i] and shape[d] > 1]
        if carriers and blind:
            for i in carriers:
                b.atoms.fix(operands[i][0], reason)
    present = [i for i, v in enumerate(varying) if v]
    if not present:
        return none_act(ndim)
    if len({varying[i] for i in present}) > 1:
        for i in present:
            b.atoms.fix(operands[i][0], f"mixes channel axes in {b.where(node)}")
        return none_act(ndim)
    first = operands[present[0]][0]
    for i in present[1:]:
        b.atoms.union_arrays(first, operands[i][0])
    target = tuple(out_shape[d] if d in varying[present[0]] else 1 for d in range(ndim))
    return Act(np.broadcast_to(first, target).copy())


@rule(_op("linear"))
def _linear(b: _Builder, node, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    x_shape = _shape(node.args[0])
    if not isinstance(weight, ParamView) or x_shape is None or not isinstance(x, Act):
        return b.unknown(node, args, kwargs)
    out_features, in_features = _shape(node.args[1])
    w_in = b.vec(weight, 1, in_features)
    x_in = b.project(x, x_shape, len(x_shape) - 1, in_features, f"input of {b.where(node)}")
    b.atoms.union_arrays(x_in, w_in)
    w_out = b.vec(weight, 0, out_features)
    for dim, role in ((0, "out"), (1, "in")):
        if b.param_dim(weight, dim):
            b.roles[b.param_dim(weight, dim)] = role
    if isinstance(bias, ParamView) and bias.vecs[0] is not None:
        b.atoms.union_arrays(bias.vecs[0], w_out)
        b.roles[(bias.name, 0)] = "bias"
    b.note_layer(node, weight, bias)
    others = [d for d in x.varying if d != x.atoms.ndim - 1]
    if others:
        b.atoms.fix(x.atoms, f"input of {b.where(node)} carries channels on several axes")
    out = np.full((1,) * (len(x_shape) - 1) + (out_features,), NONE, dtype=np.int64)
    out[..., :] = w_out
    return Act(out)


@rule(_op("conv1d"), _op("conv2d"), _op("conv3d"), _op("convolution"), _op("_convolution"), _op("conv_transpose1d"),
      _op("conv_transpose2d"), _op("conv_transpose3d"))
def _conv(b: _Builder, node, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    name = str(node.target)
    if "convolution" in name:
        transposed, groups = bool(args[6]), int(args[8])
    else:
        transposed, groups = "transpose" in name, int(args[6]) if len(args) > 6 else int(kwargs.get("groups", 1))
    x_shape, w_shape = _shape(node.args[0]), _shape(node.args[1])
    if not isinstance(weight, ParamView) or not isinstance(x, Act) or x_shape is None:
        return b.unknown(node, args, kwargs)
    reason = f"input of {b.where(node)}"
    if x.varying and set(x.varying) != {1}:
        b.atoms.fix(x.atoms, f"{reason} carries channels on spatial axes")
    channels_in = x_shape[1]
    if transposed:
        if groups != 1:
            return b.unknown(node, args, kwargs)
        out_ch = w_shape[1]
        b.atoms.union_arrays(b.project(x, x_shape, 1, channels_in, reason), b.vec(weight, 0, w_shape[0]))
        w_out = b.vec(weight, 1, out_ch)
        roles = ((0, "in"), (1, "out"))
    else:
        out_ch = w_shape[0]
        w_out = b.vec(weight, 0, out_ch)
        x_in = b.project(x, x_shape, 1, channels_in, reason)
        if groups == 1:
            b.atoms.union_arrays(x_in, b.vec(weight, 1, w_shape[1]))
            roles = ((0, "out"), (1, "in"))
        else:
            per_in, per_out = channels_in // groups, out_ch // groups
            for g in range(groups):
                b.atoms.together(np.concatenate([x_in[g * per_in:(g + 1) * per_in], w_out[g * per_out:(g + 1) * per_out]]))
            if weight.vecs[1] is not None:
                b.atoms.fix(weight.vecs[1], f"within-group input slot of grouped {b.where(node)}")
            roles = ((0, "out"),)
    for dim, role in roles:
        if b.param_dim(weight, dim):
            b.roles[b.param_dim(weight, dim)] = role
    if isinstance(bias, ParamView) and bias.vecs[0] is not None:
        b.atoms.union_arrays(bias.vecs[0], w_out)
        b.roles[(bias.name, 0)] = "bias"
    if not transposed:
        b.note_layer(node, weight, bias)
    out = np.full((1, out_ch) + (1,) * (len(x_shape) - 2), NONE, dtype=np.int64)
    out[0, :] = w_out.reshape((-1,) + (1,) * (len(x_shape) - 2))
    return Act(out)


def _couple_params(b: _Builder, x: Act, x_shape, dim: int, params, role: str, where: str) -> None:
    channels = x_shape[dim]
    x_vec = b.project(x, x_shape, dim, channels, f"input of {where}")
    for p in params:
        if isinstance(p, ParamView) and p.vecs and p.vecs[0] is not None:
            b.atoms.union_arrays(x_vec, p.vecs[0])
            b.roles[(p.name, 0)] = role


@rule(_op("batch_norm"), _op("_native_batch_norm_legit_no_training"), _op("native_batch_norm"), _op("instance_norm"),
      _op("_native_batch_norm_legit"))
def _batch_norm(b: _Builder, node, args, kwargs):
    x, x_shape = args[0], _shape(node.args[0])
    if not isinstance(x, Act) or x_shape is None:
        return b.unknown(node, args, kwargs)
    _couple_params(b, x, x_shape, 1, args[1:5], "norm", b.where(node))
    producer = b.layer_nodes.get(node.args[0])
    names = [a.name if isinstance(a, ParamView) else None for a in args[1:5]]
    if producer is not None and all(names[2:]):
        eps = args[7] if node.target.overloadpacket is aten.batch_norm else args[-1]
        b.layers[producer].batch_norm = {"weight": names[0], "bias": names[1], "mean": names[2], "var": names[3], "eps": float(eps)}
    if isinstance(node.meta.get("val"), (tuple, list)):
        return (x,) + tuple(none_act(1) for _ in node.meta["val"][1:])
    return x


@rule(_op("prelu"), _op("_prelu_kernel"))
def _prelu(b: _Builder, node, args, kwargs):
    x, x_shape = args[0], _shape(node.args[0])
    if not isinstance(x, Act) or x_shape is None or len(x_shape) < 2:
        return b.unknown(node, args, kwargs)
    weight = args[1]
    if isinstance(weight, ParamView) and weight.vecs and weight.vecs[0] is not None:
        _couple_params(b, x, x_shape, 1, [weight], "norm", b.where(node))
    return x


@rule(_op("layer_norm"), _op("native_layer_norm"), _op("rms_norm"))
def _layer_norm(b: _Builder, node, args, kwargs):
    x, x_shape = args[0], _shape(node.args[0])
    normalized = list(args[1])
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 and "rms" not in str(node.target) else kwargs.get("bias")
    if not isinstance(x, Act) or x_shape is None:
        return b.unknown(node, args, kwargs)
    for i in range(len(normalized)):
        dim = len(x_shape) - len(normalized) + i
        vec = b.project(x, x_shape, dim, x_shape[dim], f"input of {b.where(node)}")
        if not isinstance(weight, ParamView):
            b.atoms.fix(vec, f"normalised without affine parameters in {b.where(node)}")
        for p in (weight, bias):
            if isinstance(p, ParamView) and p.vecs[i] is not None:
                b.atoms.union_arrays(vec, p.vecs[i])
                b.roles[(p.name, i)] = "norm"
    if isinstance(node.meta.get("val"), (tuple, list)):
        return (x,) + tuple(none_act(len(x_shape)) for _ in node.meta["val"][1:])
    return x


@rule(_op("group_norm"), _op("native_group_norm"))
def _group_norm(b: _Builder, node, args, kwargs):
    x, x_shape = args[0], _shape(node.args[0])
    if not isinstance(x, Act) or x_shape is None:
        return b.unknown(node, args, kwargs)
    if "native" in str(node.target):
        weight, bias, groups = args[1], args[2], int(args[6])
    else:
        groups, weight, bias = int(args[1]), args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None
    channels = x_shape[1]
    vec = b.project(x, x_shape, 1, channels, f"input of {b.where(node)}")
    per = channels // groups
    for g in range(groups):
        b.atoms.together(vec[g * per:(g + 1) * per])
    for p in (weight, bias):
        if isinstance(p, ParamView) and p.vecs[0] is not None:
            b.atoms.union_arrays(vec, p.vecs[0])
            b.roles[(p.name, 0)] = "norm"
    if isinstance(node.meta.get("val"), (tuple, list)):
        return (x,) + tuple(none_act(2) for _ in node.meta["val"][1:])
    return x


@rule(_op("embedding"))
def _embedding(b: _Builder, node, args, kwargs):
    weight = args[0]
    out_shape = _shape(node)
    if not isinstance(weight, ParamView) or out_shape is None:
        return b.unknown(node, args, kwargs)
    if weight.vecs[0] is not None:
        b.atoms.fix(weight.vecs[0], "embedding rows are looked up by index")
    b.roles[(weight.name, 1)] = "out"
    out = np.full((1,) * (len(out_shape) - 1) + (out_shape[-1],), NONE, dtype=np.int64)
    out[..., :] = b.vec(weight, 1, out_shape[-1])
    return Act(out)


@rule(_op("scaled_dot_product_attention"))
def _sdpa(b: _Builder, node, args, kwargs):
    q, k, v = args[:3]
    shapes = [_shape(n) for n in node.args[:3]]
    if not all(isinstance(a, Act) for a in (q, k, v)) or any(s is None or len(s) < 3 for s in shapes):
        return b.unknown(node, args, kwargs)
    where = b.where(node)
    mask_node = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    mask_shape = _shape(mask_node) if isinstance(mask_node, torch.fx.Node) else None
    per_head_mask = mask_shape is not None and len(mask_shape) >= 3 and mask_shape[-3] > 1
    grids = []
    for act, shape in ((q, shapes[0]), (k, shapes[1]), (v, shapes[2])):
        nd = len(shape)
        atoms = act.atoms
        heads_vary, width_vary = atoms.shape[-3] > 1, atoms.shape[-1] > 1
        if set(act.varying) - {nd - 3, nd - 1} or not (heads_vary or shape[-3] == 1) or not width_vary or per_head_mask:
            b.atoms.fix(atoms, f"attention input of {where} has no per-head channel identity")
            fresh = b.atoms.new(shape[-3] * shape[-1]).reshape(shape[-3], shape[-1])
            b.atoms.fix(fresh, f"attention in {where}")
            grids.append(fresh)
            continue
        grid = atoms.reshape(-1, *atoms.shape[-3:])[0][:, 0, :]
        grids.append(np.broadcast_to(grid, (shape[-3], shape[-1])))
    q_grid, k_grid, v_grid = grids
    heads, kv_heads = shapes[0][-3], shapes[1][-3]
    repeat = max(heads // max(kv_heads, 1), 1)
    for h in range(heads):
        kv = h // repeat
        b.atoms.union_arrays(q_grid[h], k_grid[kv])
        b.atoms.together(np.concatenate([q_grid[h], k_grid[kv], v_grid[kv]]))
        b.atoms.head.add(int(q_grid[h][0]))
    out_shape = _shape(node)
    out = np.full((1,) * (len(out_shape) - 3) + (heads, 1, out_shape[-1]), NONE, dtype=np.int64)
    out[..., :, 0, :] = np.repeat(v_grid, repeat, axis=0)
    return Act(out)


@rule(_op("matmul"), _op("bmm"), _op("mm"), _op("addmm"))
def _matmul(b: _Builder, node, args, kwargs):
    offset = 1 if node.target.overloadpacket is aten.addmm else 0
    a, c = args[offset], args[offset + 1]
    a_shape, c_shape, out_shape = _shape(node.args[offset]), _shape(node.args[offset + 1]), _shape(node)
    if a_shape is None or c_shape is None or out_shape is None or len(a_shape) < 2 or len(c_shape) < 2:
        return b.unknown(node, args, kwargs)
    where = b.where(node)
    if isinstance(c, ParamView) and len(c_shape) == 2 and isinstance(a, Act):
        return _matmul_weight(b, node, args, a, a_shape, c, c_shape, out_shape, offset)
    a_act, c_act = b.act(a, a_shape, f"used by {where}"), b.act(c, c_shape, f"used by {where}")
    if a_act is None or c_act is None:
        return b.unknown(node, args, kwargs)
    nd = len(out_shape)
    A = a_act.atoms.reshape((1,) * (nd - a_act.atoms.ndim) + a_act.atoms.shape)
    C = c_act.atoms.reshape((1,) * (nd - c_act.atoms.ndim) + c_act.atoms.shape)
    k = a_shape[-1]
    a_k, c_k = A.shape[-1] > 1, C.shape[-2] > 1
    if a_k != c_k:
        b.atoms.fix(A if a_k else C, f"contracted in {where} with a tensor that has no channel identity")
    a_m, c_n = A.shape[-2] > 1, C.shape[-1] > 1
    if a_m and c_n:
        b.fix_act(a_act, f"outer product of channels in {where}")
        b.fix_act(c_act, f"outer product of channels in {where}")
        return none_act(nd)
    batch = np.broadcast_shapes(A.shape[:-2], C.shape[:-2])
    A = np.broadcast_to(A, batch + A.shape[-2:]).reshape(-1, A.shape[-2], A.shape[-1])
    C = np.broadcast_to(C, batch + C.shape[-2:]).reshape(-1, C.shape[-2], C.shape[-1])
    if a_k and c_k:
        for i in range(A.shape[0]):
            for j in range(k):
                b.atoms.together(np.concatenate([A[i, :, j], C[i, j, :]]))
    if not (a_m or c_n or any(s > 1 for s in batch)):
        return none_act(nd)
    rows, cols = A.shape[1] if a_m else 1, C.shape[2] if c_n else 1
    out = b.atoms.new(A.shape[0] * rows * cols).reshape(A.shape[0], rows, cols)
    for i in range(A.shape[0]):
        for m in range(rows):
            for n in range(cols):
                b.atoms.together(np.concatenate([[out[i, m, n]], A[i, m], C[i, :, n]]))
    return Act(out.reshape(batch + (rows, cols)))


def _matmul_weight(b: _Builder, node, args, a, a_shape, weight, w_shape, out_shape, offset):
    """x @ W with W a parameter (K, N), possibly a transposed view."""
    k, n = w_shape
    b.atoms.union_arrays(b.project(a, a_shape, len(a_shape) - 1, k, f"input of {b.where(node)}"), b.vec(weight, 0, k))
    for dim, role in ((0, "in"), (1, "out")):
        if b.param_dim(weight, dim):
            b.roles[b.param_dim(weight, dim)] = role
    w_out = b.vec(weight, 1, n)
    bias = args[0] if offset else None
    if isinstance(bias, ParamView) and bias.vecs and bias.vecs[-1] is not None:
        b.atoms.union_arrays(bias.vecs[-1], w_out)
        b.roles[(bias.name, bias.dims[-1])] = "bias"
    out = np.full((1,) * (len(out_shape) - 1) + (n,), NONE, dtype=np.int64)
    out[..., :] = w_out
    return Act(out)


def _reshape_blocks(s_in: tuple[int, ...], s_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    blocks, i, j = [], 0, 0
    while i < len(s_in) or j < len(s_out):
        ins, outs, p_in, p_out = [], [], 1, 1
        if i < len(s_in):
            p_in *= s_in[i]
            ins.append(i)
            i += 1
        if j < len(s_out):
            p_out *= s_out[j]
            outs.append(j)
            j += 1
        while p_in != p_out:
            if p_in < p_out and i < len(s_in):
                p_in *= s_in[i]
                ins.append(i)
                i += 1
            elif p_out < p_in and j < len(s_out):
                p_out *= s_out[j]
                outs.append(j)
                j += 1
            else:
                return None
        blocks.append((ins, outs))
    return blocks


@rule(_op("view"), _op("reshape"), _op("_unsafe_view"), _op("flatten"), _op("unflatten"), _op("view_as"), _op("reshape_as"))
def _reshape(b: _Builder, node, args, kwargs):
    x = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    s_in, s_out = _shape(node.args[0]), _shape(node)
    if x is None or s_in is None or s_out is None:
        return b.unknown(node, args, kwargs)
    if not x.varying:
        return none_act(len(s_out)) if np.all(x.atoms == NONE) else Act(x.atoms.reshape((1,) * len(s_out)))
    blocks = _reshape_blocks(s_in, s_out)
    if blocks is None:
        return b.unknown(node, args, kwargs)
    expand = [s_in[d] if any(x.atoms.shape[e] > 1 for e in ins) else 1 for ins, _ in blocks for d in ins]
    full = np.broadcast_to(x.atoms, expand)
    new_shape = [s for ins, outs in blocks for s in ([s_out[o] for o in outs] if any(x.atoms.shape[e] > 1 for e in ins) else [1] * len(outs))]
    out = Act(full.reshape(new_shape).copy())
    if any(len(outs) > 1 and sum(out.atoms.shape[o] > 1 for o in outs) > 1 for _, outs in blocks) and node.name in b.reshape_keys:
        b.splits.append(Split(b.reshape_keys[node.name], b.where(node), tuple(s_out), out.atoms))
    return out


RESHAPES = ("view", "reshape", "_unsafe_view", "unflatten", "view_as", "reshape_as")


def _reshape_keys(program) -> dict[str, tuple[str, str, int]]:
    """Each reshape node's (module path, operator, index among that module's reshapes), in graph order."""
    keys, seen = {}, {}
    for node in program.graph.nodes:
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
        if node.op == "call_function" and name in RESHAPES:
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            index = seen[path, name] = seen.get((path, name), -1) + 1
            keys[node.name] = (path, name, index)
    return keys


def check_splits(graph: Graph, removed: set[int], example_inputs: tuple) -> None:
    """Re-trace the pruned model and refuse it where a reshape does not split the kept channels as pruning left them
    (``view(B, T, self.heads, -1)`` after whole heads went: the code still makes the old head count, so each head
    silently gets fewer, mixed channels)."""
    expected = []
    for split in graph.splits:
        kept = np.vectorize(lambda a: a == NONE or graph.atoms.find(int(a)) not in removed, otypes=[bool])(split.atoms)
        shape = tuple(int(kept.any(axis=tuple(i for i in range(kept.ndim) if i != d)).sum()) if split.atoms.shape[d] > 1 else size
                      for d, size in enumerate(split.shape))
        if shape != split.shape:
            expected.append((split, shape))
    if not expected:
        return
    program = trace_program(graph.model, example_inputs)
    keys = _reshape_keys(program)
    actual = {keys[node.name]: _shape(node) for node in program.graph.nodes if node.name in keys}
    for split, shape in expected:
        got = actual.get(split.key)
        if got is not None and got != shape:
            roots = {graph.atoms.find(int(a)) for a in np.unique(split.atoms) if a != NONE}
            group = next((g.name for g in graph.groups if roots & set(g.units)), "that group")
            raise SrcompressError(
                f"after pruning, {split.where} splits the kept channels into {got} instead of {shape}: the code fixes that "
                "split (e.g. view(B, T, self.heads, -1)), so the pruned model would silently compute something else",
                f"exclude the group with --exclude '{group}', or compute the split from the tensor (view(B, T, -1, head_dim))")


@rule(_op("permute"), _op("transpose"), _op("t"), _op("swapaxes"), _op("movedim"), _op("numpy_T"))
def _permute(b: _Builder, node, args, kwargs):
    value = args[0]
    ndim = len(_shape(node.args[0]) or ())
    name = node.target.overloadpacket
    if name is aten.permute:
        order = [d % ndim for d in args[1]]
    elif name in (aten.transpose, getattr(aten, "swapaxes", None)):
        d0, d1 = args[1] % ndim, args[2] % ndim
        order = list(range(ndim))
        order[d0], order[d1] = order[d1], order[d0]
    elif name is aten.t:
        order = list(reversed(range(ndim)))
    else:
        return b.unknown(node, args, kwargs)
    if isinstance(value, ParamView):
        return ParamView(value.name, [value.vecs[d] for d in order], [value.dims[d] for d in order])
    if isinstance(value, Act):
        return Act(np.transpose(value.atoms, order))
    return none_act(ndim)


@rule(_op("unsqueeze"), _op("unsqueeze_"))
def _unsqueeze(b: _Builder, node, args, kwargs):
    value, dim = args[0], args[1]
    ndim = len(_shape(node) or ())
    dim = dim % ndim
    if isinstance(value, ParamView):
        return ParamView(value.name, value.vecs[:dim] + [None] + value.vecs[dim:], value.dims[:dim] + [None] + value.dims[dim:])
    if isinstance(value, Act):
        return Act(np.expand_dims(value.atoms, dim))
    return none_act(ndim)


@rule(_op("squeeze"), _op("squeeze_"))
def _squeeze(b: _Builder, node, args, kwargs):
    value = args[0]
    s_in = _shape(node.args[0]) or ()
    dims = args[1] if len(args) > 1 else [d for d, s in enumerate(s_in) if s == 1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % max(len(s_in), 1) for d in dims if s_in and s_in[d % len(s_in)] == 1]
    keep = [d for d in range(len(s_in)) if d not in dims]
    if isinstance(value, ParamView):
        return ParamView(value.name, [value.vecs[d] for d in keep], [value.dims[d] for d in keep])
    if isinstance(value, Act):
        return Act(value.atoms.reshape([value.atoms.shape[d] for d in keep]))
    return none_act(len(keep))


@rule(_op("expand"), _op("expand_as"), _op("broadcast_to"))
def _expand(b: _Builder, node, args, kwargs):
    value = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    ndim = len(_shape(node) or ())
    if value is None:
        return none_act(ndim)
    return Act(value.atoms.reshape((1,) * (ndim - value.atoms.ndim) + value.atoms.shape))


@rule(_op("repeat"))
def _repeat(b: _Builder, node, args, kwargs):
    value = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    reps = list(args[1])
    if value is None:
        return none_act(len(reps))
    atoms = value.atoms.reshape((1,) * (len(reps) - value.atoms.ndim) + value.atoms.shape)
    return Act(np.tile(atoms, [r if atoms.shape[d] > 1 else 1 for d, r in enumerate(reps)]))


def _reduce(b: _Builder, node, args, kwargs, dims, keepdim):
    x = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    s_in = _shape(node.args[0]) or ()
    ndim = len(s_in)
    if x is None:
        return none_act(len(_shape(node) or ()))
    dims = list(range(ndim)) if dims is None or dims == [] else [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
    if any(x.atoms.shape[d] > 1 for d in dims):
        b.atoms.fix(x.atoms, f"reduced over channels in {b.where(node)}")
        return none_act(len(_shape(node) or ()))
    atoms = x.atoms if keepdim else np.squeeze(x.atoms, axis=tuple(dims)) if dims else x.atoms
    return Act(atoms)


@rule(_op("mean"), _op("sum"), _op("amax"), _op("amin"), _op("var"), _op("std"), _op("logsumexp"), _op("norm"),
      _op("prod"), _op("any"), _op("all"), _op("max"), _op("min"), _op("argmax"), _op("argmin"), _op("var_mean"))
def _reduction(b: _Builder, node, args, kwargs):
    if node.target._overloadname == "other":  # max/min of two tensors is element-wise
        return _elementwise(b, node, args, kwargs)
    dims = args[1] if len(args) > 1 and isinstance(args[1], (int, list, tuple)) else kwargs.get("dim")
    keepdim = kwargs.get("keepdim", next((a for a in args[2:] if isinstance(a, bool)), False))
    result = _reduce(b, node, args, kwargs, dims, bool(keepdim))
    if isinstance(node.meta.get("val"), (tuple, list)):
        return tuple(result for _ in node.meta["val"])
    return result


@rule(_op("softmax"), _op("_softmax"), _op("log_softmax"), _op("_log_softmax"), _op("cumsum"), _op("cumprod"))
def _softmax(b: _Builder, node, args, kwargs):
    x = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    if x is None:
        return none_act(len(_shape(node) or ()))
    dim = args[1] % max(x.atoms.ndim, 1)
    if x.atoms.shape[dim] > 1:
        b.atoms.fix(x.atoms, f"normalised across channels in {b.where(node)}")
    return x


@rule(_op("max_pool1d"), _op("max_pool2d"), _op("max_pool3d"), _op("avg_pool1d"), _op("avg_pool2d"), _op("avg_pool3d"),
      _op("adaptive_avg_pool1d"), _op("adaptive_avg_pool2d"), _op("adaptive_avg_pool3d"), _op("adaptive_max_pool2d"),
      _op("max_pool2d_with_indices"), _op("upsample_nearest2d"), _op("upsample_bilinear2d"), _op("pixel_shuffle_placeholder"))
def _pool(b: _Builder, node, args, kwargs):
    x = args[0]
    if not isinstance(x, Act):
        return b.unknown(node, args, kwargs)
    if set(x.varying) - {0, 1}:
        b.atoms.fix(x.atoms, f"spatial channel axes in {b.where(node)}")
    if isinstance(node.meta.get("val"), (tuple, list)):
        return tuple(x for _ in node.meta["val"])
    return x


@rule(_op("cat"), _op("concat"), _op("concatenate"))
def _cat(b: _Builder, node, args, kwargs):
    tensors = args[0]
    nodes = node.args[0]
    out_shape = _shape(node)
    ndim = len(out_shape)
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % ndim
    parts, other_varying = [], set()
    acts = []
    for value, arg in zip(tensors, nodes):
        shape = _shape(arg)
        act = b.act(value, shape, f"used by {b.where(node)}")
        if act is None or shape is None or len(shape) != ndim:
            return b.unknown(node, args, kwargs)
        acts.append((act, shape))
        other_varying |= set(act.varying) - {dim}
    if other_varying:
        for act, _ in acts:
            b.atoms.fix(act.atoms, f"concatenated along another axis in {b.where(node)}")
        return none_act(ndim)
    if not any(act.varying for act, _ in acts):
        return none_act(ndim)
    for act, shape in acts:
        if act.atoms.shape[dim] > 1:
            parts.append(np.moveaxis(act.atoms, dim, 0).reshape(-1))
        else:
            fresh = b.atoms.new(shape[dim])
            b.atoms.fix(fresh, f"concatenated in {b.where(node)} with a tensor that has no channel identity")
            parts.append(fresh)
    joined = np.concatenate(parts)
    shape = [1] * ndim
    shape[dim] = len(joined)
    return Act(joined.reshape(shape))


@rule(_op("chunk"), _op("split"), _op("split_with_sizes"), _op("unbind"), _op("tensor_split"))
def _split(b: _Builder, node, args, kwargs):
    x = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    outs = node.meta.get("val")
    if x is None or not isinstance(outs, (tuple, list)):
        return b.unknown(node, args, kwargs)
    packet = node.target.overloadpacket
    ndim = x.atoms.ndim
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) if packet is not aten.unbind else (args[1] if len(args) > 1 else 0)
    dim = dim % ndim
    if x.atoms.shape[dim] == 1:
        if packet is aten.unbind:
            return tuple(Act(np.squeeze(x.atoms, axis=dim)) for _ in outs)
        return tuple(x for _ in outs)
    sizes = [int(o.shape[dim]) for o in outs] if packet is not aten.unbind else [1] * len(outs)
    moved = np.moveaxis(x.atoms, dim, 0)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(np.moveaxis(moved[start:start + size], 0, dim))
        start += size
    if packet is aten.chunk and len(set(sizes)) == 1:
        for piece in pieces[1:]:
            b.atoms.union_arrays(pieces[0], piece)  # equal chunks must stay equal
        return tuple(Act(p.copy()) for p in pieces)
    b.atoms.fix(x.atoms, f"split at fixed positions in {b.where(node)}")
    if packet is aten.unbind:
        return tuple(none_act(ndim - 1) for _ in outs)
    return tuple(none_act(ndim) for _ in outs)


@rule(_op("slice"), _op("select"), _op("index_select"), _op("narrow"), _op("gather"), _op("index"))
def _index(b: _Builder, node, args, kwargs):
    x = b.act(args[0], _shape(node.args[0]), f"used by {b.where(node)}")
    s_in, out_shape = _shape(node.args[0]), _shape(node)
    if x is None or s_in is None or out_shape is None:
        return none_act(len(out_shape or ()))
    packet = node.target.overloadpacket
    dim = args[1] % len(s_in) if len(args) > 1 and isinstance(args[1], int) else None
    if packet is aten.index:
        dims = [d for d, idx in enumerate(args[1]) if idx is not None]
        if any(x.atoms.shape[d] > 1 for d in dims):
            b.atoms.fix(x.atoms, f"indexed in {b.where(node)}")
        return none_act(len(out_shape)) if any(x.atoms.shape[d] > 1 for d in dims) or len(out_shape) != len(s_in) else x
    if dim is None:
        return b.unknown(node, args, kwargs)
    if packet is aten.slice and x.atoms.shape[dim] > 1 and out_shape[dim] == s_in[dim]:
        return x
    if x.atoms.shape[dim] > 1:
        b.atoms.fix(x.atoms, f"indexed at fixed positions in {b.where(node)}")
        return none_act(len(out_shape))
    atoms = np.squeeze(x.atoms, axis=dim) if packet is aten.select else x.atoms
    return Act(atoms)


@rule(_op("arange"), _op("full"), _op("zeros"), _op("ones"), _op("empty"), _op("scalar_tensor"), _op("rand"), _op("randn"),
      _op("tensor"), _op("new_zeros"), _op("new_ones"), _op("new_full"), _op("new_empty"),
      _op("sym_size"), _op("_assert_scalar"), _op("sym_constrain_range_for_size"), _op("_local_scalar_dense"), _op("item"))
def _fresh(b: _Builder, node, args, kwargs):
    val = node.meta.get("val")
    return none_act(val.dim()) if isinstance(val, torch.Tensor) else None


# ----- registered modules ----------------------------------------------------------------------
def _mha_couple(c: Coupler) -> None:
    module: nn.MultiheadAttention = c.module
    heads, embed = module.num_heads, module.embed_dim
    if not module._qkv_same_embed_dim or module.bias_k is not None:
        reason = f"nn.MultiheadAttention {c.path} with separate q/k/v sizes or bias_k"
        for name, param in module.named_parameters():
            for dim in range(param.dim()):
                c.fix(c.param(name, dim), reason)
        for index, (_, shape) in enumerate(c.inputs):  # query/key/value widths are fixed too (kdim, vdim)
            if shape and len(shape) >= 2:
                c.fix(c.input_dim(index, -1, shape[-1]), reason)
        return
    head_dim = embed // heads
    rows = c.param("in_proj_weight", 0)
    cols = c.param("in_proj_weight", 1)
    out_rows, out_cols = c.param("out_proj.weight", 0), c.param("out_proj.weight", 1)
    for role in (("in_proj_weight", 0, "out"), ("in_proj_weight", 1, "in"), ("out_proj.weight", 0, "out"), ("out_proj.weight", 1, "in")):
        c.role(*role)
    if module.in_proj_bias is not None:
        c.same(c.param("in_proj_bias", 0), rows)
        c.role("in_proj_bias", 0, "bias")
    if module.out_proj.bias is not None:
        c.same(c.param("out_proj.bias", 0), out_rows)
        c.role("out_proj.bias", 0, "bias")
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        c.together(np.concatenate([rows[part], rows[embed:][part], rows[2 * embed:][part], out_cols[part]]), head=True)
    for index, (_, shape) in enumerate(c.inputs):
        if shape and shape[-1] == embed and len(shape) >= 2:
            c.same(c.input_dim(index, -1, embed), cols)
    for node in c.outputs():
        shape = _shape(node)
        if c.depends_on(node, "out_proj.weight") and shape and shape[-1] == out_rows.shape[0]:
            c.set_output(node, -1, out_rows)
        else:
            c.fix(rows, f"attention weights of {c.path} are returned and used")


def _mha_fixup(module: nn.Module) -> nn.Module:
    from ..modules import HeadPrunedAttention

    return HeadPrunedAttention.from_multihead(module)


register_module(nn.MultiheadAttention, _mha_couple, _mha_fixup)


# ----- entry point -------------------------------------------------------------------------------
def trace_program(model: nn.Module, example_inputs: tuple):
    """torch.export the model for analysis; a failure names the op or line that stopped it."""
    set_eval(model)
    try:
        with torch.no_grad():
            return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as err:  # noqa: BLE001
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        reason = lines[0][:200] if lines else type(err).__name__
        raise SrcompressError(
            f"structured pruning could not trace the model with torch.export ({reason})",
            "make the forward traceable (no data-dependent Python control flow), register the module that fails "
            "with srcompress.compress.graph.register_module, or use a mask pattern instead of --structured",
        ) from err


def build_graph(model: nn.Module, example_inputs: tuple) -> Graph:
    """Trace ``model`` and return its channel groups and the layers it could not place."""
    program = trace_program(model, example_inputs)
    builder = _Builder(model, program)
    builder.run()
    builder.trace_ops_after()
    graph = Graph(model, builder.atoms, builder.tensor_vecs, builder.roles, replaced_modules=builder.replaced,
                  op_users=builder.op_users, layers=builder.layers, use_count=builder.use_count, splits=builder.splits)
    _collect_groups(graph)
    return graph


def _collect_groups(graph: Graph) -> None:
    atoms = graph.atoms
    slots: dict[int, dict[tuple[str, int], list[int]]] = {}
    first_seen: dict[int, int] = {}
    counter = 0
    for name, vecs in graph.tensors.items():
        for dim, vec in enumerate(vecs):
            if vec is None:
                continue
            for position, atom in enumerate(vec):
                root = atoms.find(int(atom))
                if root in atoms.reason:
                    continue
                slots.setdefault(root, {}).setdefault((name, dim), []).append(position)
                first_seen.setdefault(root, counter)
                counter += 1
    by_signature: dict[tuple, list[int]] = {}
    for root, unit_slots in slots.items():
        signature = tuple(sorted((key, len(pos)) for key, pos in unit_slots.items()))
        by_signature.setdefault(signature, []).append(root)
    groups = []
    role_order = {key: i for i, key in enumerate(graph.roles)}
    for signature, roots in by_signature.items():
        keys = sorted((key for key, _ in signature), key=lambda k: role_order.get(k, len(role_order)))
        producers = [k for k in keys if graph.roles.get(k) == "out"]
        consumers = [k for k in keys if graph.roles.get(k) == "in"]
        if not producers:
            continue
        roots.sort(key=lambda r: slots[r][producers[0]][0])
        unit_slots = [[Slot(name, dim, np.array(slots[r][(name, dim)])) for (name, dim) in keys] for r in roots]
        width = len(slots[roots[0]][producers[0]])
        is_head = any(atoms.find(h) == r for r in roots[:1] for h in atoms.head)
        producer = producers[0][0].rsplit(".", 1)[0]
        if is_head:
            kind, name = "heads", _common_prefix([p[0] for p in producers]) or producer
        elif width > 1:
            kind, name = "groups", producer
        else:
            kind = "neurons" if len(graph.tensors[producers[0][0]]) == 2 else "channels"
            name = producer
        order = min(first_seen[r] for r in roots)
        groups.append(ChannelGroup(0, name, kind, roots, unit_slots, producers, consumers, width, order))
    groups.sort(key=lambda g: g.order)
    seen_names: dict[str, int] = {}
    for index, group in enumerate(groups):
        group.index = index
        if group.name in seen_names:
            seen_names[group.name] += 1
            group.name = f"{group.name}#{seen_names[group.name]}"
        else:
            seen_names[group.name] = 1
    graph.groups = groups
    _collect_unplaced(graph)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _collect_unplaced(graph: Graph) -> None:
    """Weights whose output channels are not prunable, with the reason."""
    for (name, dim), role in graph.roles.items():
        if role != "out":
            continue
        vec = graph.tensors.get(name, [None])[dim]
        if vec is None:
            continue
        reasons = {graph.atoms.why(int(a)) for a in vec} - {""}
        if len(reasons) and all(graph.atoms.fixed(int(a)) for a in vec):
            graph.unplaced[name] = sorted(reasons)[0]
    weights = {name for name, vecs in graph.tensors.items() if len(vecs) >= 2}
    placed = {name for (name, _), role in graph.roles.items() if role in ("out", "in")}
    for name in sorted(weights - placed):
        vec = next((v for v in graph.tensors[name] if v is not None), None)
        if vec is not None and all(graph.atoms.fixed(int(a)) for a in vec):
            graph.unplaced.setdefault(name, graph.atoms.why(int(vec[0])) or "not used as a layer weight")


def count_params_after(graph: Graph, removed_roots: set[int]) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter/buffer once ``removed_roots`` are gone."""
    shapes = {}
    tensors = dict(graph.model.named_parameters(remove_duplicate=False))
    tensors.update(dict(graph.model.named_buffers(remove_duplicate=False)))
    for name, vecs in graph.tensors.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        shape = list(tensor.shape)
        for dim, vec in enumerate(vecs):
            if vec is not None and removed_roots:
                shape[dim] -= sum(1 for a in vec if graph.atoms.find(int(a)) in removed_roots)
        shapes[name] = tuple(shape)
    return shapes


def numel(shape) -> int:
    return math.prod(shape) if shape else 1
