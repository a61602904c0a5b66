"""Stream calibration batches through a model and accumulate what a layer's input needs, not the activations.

For each consumer layer (``nn.Linear`` or a non-grouped ``nn.Conv1d``/``nn.Conv2d``), its input is turned into
rows (tokens, or conv patches unfolded as ``channel x kernel tap`` columns) with a constant-one column
appended, and only the Gram matrix ``B^T B`` and the cross matrix ``B^T A`` are kept, where ``B`` comes from
the model being pruned and ``A`` from a reference model (the original, for the asymmetric objective).
Memory is O(columns^2) per consumer, whatever the number of samples. A forward pass stops as soon as every
consumer has seen its input. Capture runs in eval mode without gradients.
"""

from __future__ import annotations

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
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
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
    try:
        with torch.no_grad():
            model(*batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


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
            cached: ReferenceInputs | None = None) -> dict[str, LayerInputStats]:
    """Gram and cross matrices of each consumer's input.

    A comes from ``cached`` reference inputs when they hold these consumers, else from running ``reference``
    (default: the model itself, so A = B).
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
    for index, batch in enumerate(ui.track(batches, description)):
        current = _run_until_seen(model, modules, batch, early_exit)
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
    return stats
