"""Stream calibration batches through a model and accumulate what a layer's input needs, not the activations.

For each consumer layer (``nn.Linear`` or a non-grouped ``nn.Conv1d``/``nn.Conv2d``), its input is turned into
rows (tokens, or conv patches unfolded as ``channel x kernel tap`` columns) with a constant-one column
appended, and only the Gram matrix ``B^T B`` and the cross matrix ``B^T A`` are kept, where ``B`` comes from
the model being pruned and ``A`` from a reference model (the original, for the asymmetric objective).
Memory is O(columns^2) per consumer, whatever the number of samples. A forward pass stops as soon as every
consumer has seen its input. Capture runs in eval mode without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ui
from ..inputs import set_eval


@dataclass
class LayerInputStats:
    """Second moments of one consumer layer's input over the calibration set (float64), per fold.

    Batch i goes to fold ``i % folds``, so a method can cross-validate on the statistics alone.
    """

    grams: list[torch.Tensor]  # B^T B per fold, with the ones column last
    crosses: list[torch.Tensor]  # B^T A per fold
    rows: int
    taps: int  # kernel taps per input channel (1 for linear layers)

    @property
    def gram(self) -> torch.Tensor:
        return sum(self.grams)

    @property
    def cross(self) -> torch.Tensor:
        return sum(self.crosses)


class _Stop(Exception):
    pass


def consumer_module(model: nn.Module, weight_name: str) -> nn.Module | None:
    """The module whose ``weight`` this is, if capture can read its input as rows."""
    path, _, attr = weight_name.rpartition(".")
    if attr != "weight":
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and not module.transposed and isinstance(module.padding, tuple):
        return module
    return None


POSITIONS_PER_SAMPLE = 256  # conv patches kept per sample: neighbouring patches are nearly redundant


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a (rows, columns + 1) float32 matrix; the last column is all ones.

    For convolutions, at most ``POSITIONS_PER_SAMPLE`` patch positions per sample are kept, the same
    evenly spread positions for every sample (and for the reference model), so B and A rows stay aligned.
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride, padding, dilation = (1, *module.kernel_size), (1, *module.stride), (0, *module.padding), (1, *module.dilation)
        else:
            kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
        pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)
        patches = x.flatten(2) if pointwise else F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        positions = patches.shape[2]
        if positions > POSITIONS_PER_SAMPLE:
            keep = torch.linspace(0, positions - 1, POSITIONS_PER_SAMPLE).round().long()
            patches = patches[:, :, keep]
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    rows = rows.float()
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def _run_until_seen(model: nn.Module, modules: dict[str, nn.Module], batch: tuple, early_exit: bool) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, []).append(input_rows(module, args[0].detach()))
            if early_exit and len(seen) == len(modules):
                raise _Stop

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    # Channels-last images run convolutions about 1.6x faster on CPU (same values up to float round-off).
    batch = tuple(t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                  for t in batch)
    try:
        with torch.no_grad():
            model(*batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


class PrefixCache:
    """One module's output per calibration batch (a checkpoint), so the next capture resumes there.

    Sequential pruning runs the calibration set once per group, although everything before the first layer a
    group changes computes what it computed for the previous group. The checkpoint is the latest child of an
    ``nn.Sequential`` (its output goes only to the next sibling) that finishes before the layers the current group
    changes; the next capture skips every module that finishes before it (they return a placeholder) and the
    checkpoint returns its stored output. The first batch of each resumed capture is also run in full and the
    captured inputs compared; any difference (model code that reuses an early output later) switches the cache
    off for the run. Stored outputs are dropped when they would exceed ``budget`` bytes.
    """

    def __init__(self, budget: int = 2 << 30):
        self.budget = budget
        self.enabled = True
        self.spans: dict[str, tuple[int, int]] | None = None  # module called once -> (start, end) in one forward pass
        self.first_start: dict[str, int] = {}  # every module called -> when it first started
        self.eligible: set[str] = set()
        self.name: str | None = None
        self.outputs: list[torch.Tensor] = []
        self.snapshot: dict[str, torch.Tensor] = {}

    def _trace(self, model: nn.Module, batch: tuple) -> None:
        """Start/end order of every module in one forward pass; modules called more than once are never skipped."""
        clock, starts, ends, calls, tensor_out = [0], {}, {}, {}, set()

        def pre(name):
            def hook(module, args):
                starts.setdefault(name, clock[0])
                calls[name] = calls.get(name, 0) + 1
                clock[0] += 1
            return hook

        def post(name):
            def hook(module, args, output):
                ends[name] = clock[0]
                clock[0] += 1
                if isinstance(output, torch.Tensor):
                    tensor_out.add(name)
            return hook

        named = dict(model.named_modules())
        handles = [h for name, m in named.items() for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name)))]
        try:
            with torch.no_grad():
                model(*batch)
        finally:
            for handle in handles:
                handle.remove()
        once = {n for n in ends if calls[n] == 1}
        self.first_start = starts
        self.spans = {n: (starts[n], ends[n]) for n in once}
        self.eligible = {n for n in once & tensor_out if n and isinstance(named.get(n.rpartition(".")[0]), nn.Sequential)}

    def _valid(self, model: nn.Module) -> bool:
        current = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return all(name in current and torch.equal(current[name], value) for name, value in self.snapshot.items())

    def plan(self, model: nn.Module, first_batch: tuple, before: list[str]) -> tuple[str | None, str | None]:
        """(checkpoint to resume from, or None; checkpoint to record in this pass, or None), for a capture whose
        consumers and changed layers are the modules ``before``."""
        if not self.enabled:
            return None, None
        if self.spans is None:
            self._trace(model, first_batch)
        limit = min((self.first_start[n] for n in before if n in self.first_start), default=None)
        if limit is None:
            return None, None
        resume = self.name if self.name and self.spans[self.name][1] < limit and self._valid(model) else None
        candidates = [n for n in self.eligible if self.spans[n][1] < limit]
        record = max(candidates, key=lambda n: (self.spans[n][1], -self.spans[n][0])) if candidates else None
        return resume, (None if record == resume else record)

    def skipped(self, model: nn.Module, checkpoint: str) -> list[nn.Module]:
        """The outermost modules that finish before ``checkpoint`` starts."""
        start = self.spans[checkpoint][0]
        before = {n for n, (_, end) in self.spans.items() if end < start and n}
        return [m for n, m in model.named_modules() if n in before and n.rpartition(".")[0] not in before]

    def store(self, model: nn.Module, name: str, outputs: list[torch.Tensor]) -> None:
        """Keep ``outputs`` of checkpoint ``name`` and the state of every tensor of the modules before it."""
        if sum(o.numel() * o.element_size() for o in outputs) > self.budget:
            self.name, self.outputs, self.snapshot = None, [], {}
            return
        end = self.spans[name][1]
        owners = {n for n, (_, e) in self.spans.items() if e <= end}
        self.name, self.outputs = name, outputs
        self.snapshot = {f"{m}.{t}" if m else t: v.detach().clone()
                         for m, module in model.named_modules() if m in owners
                         for t, v in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}


class _Resumed:
    """Within the block, modules before the checkpoint return a placeholder and the checkpoint its stored output."""

    def __init__(self, model: nn.Module, cache: PrefixCache, index: int):
        self.targets = [(m, lambda *a, **k: torch.zeros(())) for m in cache.skipped(model, cache.name)]
        # a copy: the model's code may work in place on what the checkpoint returns
        self.targets.append((model.get_submodule(cache.name), lambda *a, **k: cache.outputs[index].clone()))

    def __enter__(self):
        for module, forward in self.targets:
            module.forward = forward

    def __exit__(self, *exc):
        for module, _ in self.targets:
            del module.forward


def _same_rows(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


class ReferenceInputs:
    """Consumer-layer inputs of a fixed reference model, captured in one pass and kept in float16.

    Sequential pruning needs the reference (original) model's input at every consumer in turn; keeping them
    avoids one reference forward pass per group. Nothing is kept when the estimate exceeds ``budget`` bytes;
    callers then run the reference model alongside (same result, more time).
    """

    def __init__(self, reference: nn.Module, consumers: list[str], calibration, budget: int = 4 << 30):
        set_eval(reference)
        modules = {name: m for name in consumers if (m := consumer_module(reference, name)) is not None}
        batches = list(calibration)
        self.rows: list[dict[str, torch.Tensor]] | None = None
        if not modules or not batches:
            return
        first = _run_until_seen(reference, modules, batches[0], early_exit=False)
        if sum(r.numel() * 2 for r in first.values()) * len(batches) > budget:
            return
        self.rows = [{k: v.half() for k, v in first.items()}]
        for batch in ui.track(batches[1:], "capturing the original model's layer inputs"):
            self.rows.append({k: v.half() for k, v in _run_until_seen(reference, modules, batch, early_exit=False).items()})

    def get(self, index: int, names: list[str]) -> dict[str, torch.Tensor] | None:
        if self.rows is None or any(name not in self.rows[index] for name in names):
            return None
        return {name: self.rows[index][name].float() for name in names}


def capture(model: nn.Module, consumers: list[str], calibration, reference: nn.Module | None = None,
            early_exit: bool = True, description: str = "capturing", folds: int = 4,
            cached: ReferenceInputs | None = None, prefix: PrefixCache | None = None,
            changes: tuple[str, ...] = ()) -> dict[str, LayerInputStats]:
    """Gram and cross matrices of each consumer's input.

    A comes from ``cached`` reference inputs when they hold these consumers, else from running ``reference``
    (default: the model itself, so A = B). With ``prefix``, the pass resumes from the last checkpoint and records
    one before the earliest of the consumers and ``changes`` (the modules the caller will modify next).
    """
    set_eval(model)
    modules = {name: consumer_module(model, name) for name in consumers}
    missing = [name for name, module in modules.items() if module is None]
    if missing:
        raise ValueError(f"cannot capture the input of {missing}")
    ref_modules = {name: consumer_module(reference, name) for name in consumers} if reference is not None else None
    if reference is not None:
        set_eval(reference)
    stats: dict[str, LayerInputStats] = {}
    batches = list(calibration)
    folds = max(1, min(folds, len(batches)))
    resume, record, recorded = None, None, []
    if prefix is not None and batches:
        layers = [name.rpartition(".")[0] for name in consumers] + list(changes)
        resume, record = prefix.plan(model, batches[0], layers)
        resume = resume if resume and len(prefix.outputs) == len(batches) else None
    for index, batch in enumerate(ui.track(batches, description)):
        handle = model.get_submodule(record).register_forward_hook(
            lambda module, args, out: recorded.append(out.detach().clone())) if record else None
        current = None
        try:
            with _Resumed(model, prefix, index) if resume else contextlib.nullcontext():
                current = _run_until_seen(model, modules, batch, early_exit)
        except Exception:  # noqa: BLE001 - only while verifying a resumed pass: the model's code used a placeholder
            if not (resume and index == 0):
                raise
        finally:
            if handle is not None:
                handle.remove()
        if resume and index == 0:
            full = _run_until_seen(model, modules, batch, early_exit)
            if current is None or not _same_rows(current, full):
                prefix.enabled, resume, current = False, None, full
        target = cached.get(index, consumers) if cached is not None else None
        if target is None:
            target = _run_until_seen(reference, ref_modules, batch, early_exit) if reference is not None else current
        for name, rows in current.items():
            other = target[name]
            if name not in stats:
                module = modules[name]
                taps = 1 if isinstance(module, nn.Linear) else int(torch.tensor(module.kernel_size).prod())
                size = rows.shape[1]
                stats[name] = LayerInputStats([torch.zeros(size, size, dtype=torch.float64) for _ in range(folds)],
                                              [torch.zeros(size, size, dtype=torch.float64) for _ in range(folds)], 0, taps)
            entry = stats[name]
            entry.grams[index % folds] += (rows.T @ rows).double()  # products in float32, sums over batches in float64
            entry.crosses[index % folds] += (rows.T @ other).double()
            entry.rows += rows.shape[0]
    if record and prefix.enabled and len(recorded) == len(batches):
        prefix.store(model, record, recorded)
    return stats
