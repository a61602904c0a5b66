"""Sparse training inside any training loop: masks follow a sparsity schedule, pruned weights stay at
zero, and with a cyclical schedule pruned weights can grow back.

    pruner = CyclicalPruner(model, target=0.9, steps=total_steps, optimizer=optimizer)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    summary = pruner.finalize()

or ``with CyclicalPruner(..., optimizer=optimizer):`` (``step`` then runs after every ``optimizer.step()``
and ``finalize`` on exit), or ``pruner.attach(optimizer)``.

How pruned weights are handled:

* Masks come from :func:`~srcompress.compress.masks.compute_masks` on the current weights (exact counts,
  ties broken by position), so every pattern and allocation mode behaves as in ``srcompress prune``.
* Gradients of pruned weights are zeroed by a hook before the optimizer sees them, and weights are
  masked again after every step. A dense update (a cycle start) lifts both, so pruned weights,
  restarting at 0, receive gradients again.
* Optimizer state (``optimizer_state``): ``"pruned"`` (default) zeroes the first moments (SGD
  momentum, Adam ``exp_avg``) of pruned weights, so a weight that grows back starts without stale
  momentum; second moments are kept because Adam's bias correction is per tensor and zeroing them would
  inflate the first steps of revived weights. ``"reset"`` also drops all optimizer state of the pruned
  layers at every cycle start (as AC/DC does). ``"keep"`` touches nothing.
* Under ``torch.distributed`` the masks of rank 0 are broadcast at every update, so all ranks hold
  identical masks even if their weights differed in the last bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ..errors import SrcompressError, TargetNotMet
from ..inputs import guess_example_inputs
from .layers import trace_layers
from .masks import LayerPlan, MaskSpec, ScoreFn, compute_masks, plan_layers
from .patterns import Pattern
from .schedules import Cyclical, Gradual, OneShot, Schedule
from .scores import magnitude_score

SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf"}
STATE_MODES = ("pruned", "reset", "keep")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def set_mode(model: nn.Module, training: bool) -> bool:
    """``model.train(training)``; False for modules unlifted from torch.export, which keep the mode they were exported in."""
    try:
        model.train(training)
    except NotImplementedError:
        return False
    return True


class SparsePruner:
    """Keeps a model's prunable weights at the sparsity a :class:`Schedule` asks for, step by step."""

    def __init__(self, model: nn.Module, schedule: Schedule, *, pattern: str | Pattern = "unstructured", scope: str = "layer",
                 min_density: float = 0.01, exclude: tuple[str, ...] = (), keep_first: bool = True, keep_last: bool = True,
                 optimizer: torch.optim.Optimizer | None = None, optimizer_state: str = "pruned",
                 example_inputs: tuple | None = None, score: ScoreFn = magnitude_score):
        pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
        self.spec = MaskSpec(schedule.target, pattern, scope, min_density, tuple(exclude), keep_first, keep_last)
        self.spec.validate()
        if optimizer_state not in STATE_MODES:
            raise SrcompressError(f"unknown optimizer-state mode {optimizer_state!r}", f"use one of {', '.join(STATE_MODES)}")
        self.schedule = schedule
        self.optimizer = optimizer
        self.optimizer_state = optimizer_state
        self.score = score
        module = unwrap(model)
        was_training = module.training
        inputs = example_inputs if example_inputs is not None else guess_example_inputs(module)
        layers, _ = trace_layers(module, inputs)
        set_mode(module, was_training)
        self.plans: list[LayerPlan] = plan_layers(layers, self.spec)
        self.active = [p for p in self.plans if p.pruned]
        if not self.active:
            reasons = "; ".join(sorted({p.skipped for p in self.plans})) or "no conv or linear weights"
            raise SrcompressError(f"no layer of the model can be pruned ({reasons[:200]})", "change --pattern, --exclude or --prune-first/--prune-last")
        self.params = {p.layer.name: p.layer.param for p in self.active}
        self.masks = {name: torch.ones_like(param, dtype=torch.bool) for name, param in self.params.items()}
        self._check_reachable()
        self.ever_pruned = {name: torch.zeros_like(param, dtype=torch.bool) for name, param in self.params.items()}
        self.log: list[dict[str, Any]] = []
        self.step_count = 0
        self.finalized = False
        self._hooks = [param.register_hook(self._grad_hook(name)) for name, param in self.params.items()]
        self._optimizer_hook = None
        self._update(0)

    def _check_reachable(self) -> None:
        """Refuse a target the masks cannot reach (``min_density`` caps every layer) before any training."""
        if self.schedule.target <= 0:
            return
        masks = self._compute(self.schedule.target)
        total = sum(m.numel() for m in masks.values())
        reached = sum(int((~m).sum()) for m in masks.values()) / total
        tolerance = self.spec.pattern.unit_size * len(masks) / total
        if self.schedule.target - reached > tolerance + 1e-9:
            raise TargetNotMet(f"sparsity {self.schedule.target:.2%} cannot be reached: at most {reached:.2%} of the pruned layers' "
                               f"weights can go (--min-density {self.spec.min_density:g} keeps that share of every layer)",
                               "nothing was trained; lower --sparsity or --min-density")

    # ----- the per-step work -------------------------------------------------------------------
    def step(self) -> None:
        """Call after every optimizer step: recompute masks when the schedule says so, re-zero pruned weights."""
        if self.finalized:
            raise RuntimeError("this pruner was finalized; create a new one to keep training sparsely")
        self.step_count += 1
        if self.schedule.is_update(self.step_count):
            self._update(self.step_count)
        else:
            self._apply()

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad.dtype)
        return hook

    def _compute(self, sparsity: float) -> dict[str, torch.Tensor]:
        if sparsity <= 0.0:
            return {name: torch.ones_like(param, dtype=torch.bool) for name, param in self.params.items()}
        pattern = self.spec.pattern
        spec = self.spec if pattern.kind == "nm" else dataclasses.replace(self.spec, sparsity=sparsity)
        masks = compute_masks(self.plans, spec, self.score)
        if pattern.kind == "nm" and sparsity < self.spec.sparsity:
            masks = {p.layer.name: _partial_nm(p, masks[p.layer.name], pattern, sparsity / self.spec.sparsity) for p in self.active}
        return {name: mask.to(self.params[name].device) for name, mask in masks.items()}

    def _update(self, step: int, sparsity: float | None = None) -> None:
        sparsity = self.schedule.sparsity(step) if sparsity is None else sparsity
        restart = self.schedule.is_restart(step)
        new = self._compute(sparsity)
        if _distributed():
            new = _broadcast_masks(new)
        pruned_now = newly_pruned = revived = 0
        for name, mask in new.items():
            old = self.masks[name]
            newly_pruned += int((old & ~mask).sum())
            revived += int((~old & mask).sum())
            pruned_now += int((~mask).sum())
            self.ever_pruned[name] |= ~mask
        self.masks = new
        self._apply()
        self._fix_optimizer_state(restart)
        self.log.append({"step": step, "sparsity": sparsity, "restart": restart, "pruned": pruned_now,
                         "newly_pruned": newly_pruned, "revived": revived})

    def _apply(self) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.mul_(self.masks[name].to(param.dtype))

    def _fix_optimizer_state(self, restart: bool) -> None:
        if self.optimizer is None or self.optimizer_state == "keep":
            return
        with torch.no_grad():
            for name, param in self.params.items():
                state = self.optimizer.state.get(param)
                if not state:
                    continue
                if restart and self.optimizer_state == "reset":
                    self.optimizer.state[param] = {}
                    continue
                for key, value in state.items():
                    if key not in SECOND_MOMENTS and isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.mul_(self.masks[name].to(value.dtype))

    # ----- reading the state --------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """Scheduled sparsity in force now."""
        return self.schedule.sparsity(self.step_count)

    def mask_sparsity(self) -> float:
        """Fraction of the pruned layers' weights that the current masks remove."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total

    def zero_fraction(self) -> float:
        """Fraction of the pruned layers' weights that are exactly zero now."""
        total = sum(p.numel() for p in self.params.values())
        return sum(int((p == 0).sum()) for p in self.params.values()) / total

    def recovered_fraction(self) -> float:
        """Fraction of the weights kept now that were pruned at some earlier update (0 for GMP, > 0 when weights grew back)."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        back = sum(int((m & self.ever_pruned[n]).sum()) for n, m in self.masks.items())
        return back / kept if kept else 0.0

    # ----- hooks, context manager, checkpoints, finalize ------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`step` after every ``optimizer.step()``; returns the removable hook handle."""
        self.optimizer = self.optimizer or optimizer
        self._optimizer_hook = optimizer.register_step_post_hook(lambda *_: self.step())
        return self._optimizer_hook

    def __enter__(self) -> "SparsePruner":
        if self.optimizer is not None and self._optimizer_hook is None:
            self.attach(self.optimizer)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._detach()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "schedule": self.schedule.describe(), "masks": {n: m.clone() for n, m in self.masks.items()},
                "ever_pruned": {n: m.clone() for n, m in self.ever_pruned.items()}, "log": [dict(e) for e in self.log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["schedule"] != self.schedule.describe():
            raise SrcompressError("the checkpoint was made with another sparsity schedule", "resume with the options of the first run")
        if set(state["masks"]) != set(self.masks):
            raise SrcompressError("the checkpoint prunes other layers than this run", "resume with the options of the first run")
        self.step_count = state["step"]
        self.masks = {n: state["masks"][n].to(self.params[n].device) for n in self.masks}
        self.ever_pruned = {n: state["ever_pruned"][n].to(self.params[n].device) for n in self.masks}
        self.log = list(state["log"])
        self._apply()

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None

    def finalize(self) -> dict[str, Any]:
        """Bake the target-sparsity masks into the weights, remove all hooks and summarise.

        If training stopped before the schedule reached its target, masks at the target are computed
        from the current weights first (``early`` is then True).
        """
        if self.finalized:
            raise RuntimeError("finalize() was already called")
        early = abs(self.sparsity - self.schedule.target) > 1e-12
        if early:
            self._update(self.step_count, sparsity=self.schedule.target)
        self._apply()
        self._detach()
        self.finalized = True
        layers = []
        for plan in self.plans:
            mask = self.masks.get(plan.layer.name)
            layers.append({"name": plan.layer.name, "params": plan.layer.numel, "skipped": plan.skipped,
                           "sparsity": 0.0 if mask is None else 1 - int(mask.sum()) / mask.numel()})
        return {"schedule": self.schedule.describe(), "pattern": str(self.spec.pattern), "scope": self.spec.scope,
                "target": self.schedule.target, "reached": self.mask_sparsity(), "steps": self.step_count, "early": early,
                "recovered_fraction": self.recovered_fraction(), "mask_updates": len(self.log),
                "revived_total": sum(e["revived"] for e in self.log), "layers": layers}


def _partial_nm(plan: LayerPlan, full: torch.Tensor, pattern: Pattern, fraction: float) -> torch.Tensor:
    """Apply the N:M mask to only ``round(fraction x groups)`` M-groups: those losing the least |w| (ties by position)."""
    layer = plan.layer
    keep = layer.to_matrix(full, channels_last=True).reshape(-1, pattern.m)
    weights = layer.to_matrix(layer.param.detach().abs(), channels_last=True).reshape(-1, pattern.m)
    lost = (weights * ~keep).sum(dim=1)
    count = round(fraction * len(lost))
    chosen = torch.argsort(lost, stable=True)[:count]
    partial = torch.ones_like(keep)
    partial[chosen] = keep[chosen]
    return layer.from_matrix(partial.reshape(layer.to_matrix(full, channels_last=True).shape), channels_last=True)


def _broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(masks):
        flat = masks[name].to(torch.uint8)
        torch.distributed.broadcast(flat, src=0)
        out[name] = flat.bool()
    return {name: out[name] for name in masks}


class OneShotPruner(SparsePruner):
    """Prune to ``target`` once at step ``at`` (default 0), then train with the mask fixed."""

    def __init__(self, model: nn.Module, target: float, steps: int, *, at: int = 0, **options):
        super().__init__(model, OneShot(target, steps, at=at), **options)


class GradualPruner(SparsePruner):
    """Gradual magnitude pruning: one cubic ramp from dense to ``target`` over ``[begin, end)``."""

    def __init__(self, model: nn.Module, target: float, steps: int, *, begin: int = 0, end: int | None = None,
                 interval: int = 1, **options):
        super().__init__(model, Gradual(target, steps, interval, begin=begin, end=end), **options)


class CyclicalPruner(SparsePruner):
    """Cyclical pruning: ``cycles`` cubic ramps, each starting dense, then fine-tuning at ``target``."""

    def __init__(self, model: nn.Module, target: float, steps: int, *, cycles: int = 3, prune_fraction: float = 0.75,
                 floor: bool = False, interval: int = 1, **options):
        super().__init__(model, Cyclical(target, steps, interval, cycles=cycles, prune_fraction=prune_fraction, floor=floor), **options)
