"""The train stage as one function: classification training under a sparsity schedule, with periodic
atomic checkpoints and a resume that continues bit-identically on CPU.

Determinism: the batch order of epoch e is a permutation drawn from a generator seeded with
``(seed, e)``, the learning rate is a function of the step, and a checkpoint holds the weights, the
optimizer and pruner state and the global RNG state, so training from a checkpoint repeats exactly
the steps an uninterrupted run takes. Under ``torch.distributed`` every rank draws the same
permutation and takes every world-size-th sample of it; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import ui
from .compress.schedules import KINDS, check_cycles, make_schedule
from .compress.sparse_training import SparsePruner, set_mode
from .data import Dataset
from .errors import SrcompressError
from .inputs import set_eval

CHECKPOINT_FORMAT = "srcompress-train-checkpoint/1"
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant", "cycle")


@dataclass
class TrainConfig:
    """Everything that decides the training trajectory (a resume must use the same values)."""

    sparsity: float = 0.9
    schedule: str = "cyclical"
    pattern: str = "unstructured"
    scope: str = "global"
    min_density: float = 0.01
    exclude: tuple[str, ...] = ()
    keep_first: bool = True
    keep_last: bool = True
    cycles: int = 3
    prune_fraction: float = 0.75
    floor: bool = False
    last_cycle: float = 1.0
    oneshot_at: float = 0.0  # fraction of training done dense before a one-shot prune
    update_every: int | None = None  # steps between mask updates (default: 1% of the pruning phase)
    optimizer_state: str = "pruned"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0

    def validate(self) -> None:
        """Check every value (types too: recipes hand them over straight from TOML) before anything runs."""
        from .compress.masks import MaskSpec
        from .compress.patterns import Pattern
        from .compress.sparse_training import STATE_MODES

        for item in dataclasses.fields(self):
            _check_type(item.name, getattr(self, item.name), item.type)
        if self.schedule not in KINDS:
            raise SrcompressError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(KINDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise SrcompressError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SrcompressError(f"unknown learning-rate schedule {self.lr_schedule!r}", f"use one of {', '.join(LR_SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise SrcompressError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) must be positive", "pass e.g. --epochs 10 --batch-size 64")
        if not 0.0 <= self.sparsity < 1.0:
            raise SrcompressError(f"sparsity {self.sparsity} is outside [0, 1)", "pass e.g. --sparsity 0.9 (0 trains dense)")
        if not self.lr > 0:
            raise SrcompressError(f"learning rate {self.lr} is not positive", "pass e.g. --lr 1e-3")
        if not (0.0 <= self.momentum < 1.0 and self.weight_decay >= 0.0):
            raise SrcompressError(f"momentum {self.momentum} or weight decay {self.weight_decay} is out of range",
                                  "use 0 <= momentum < 1 and weight decay >= 0")
        if not 0.0 <= self.oneshot_at < 1.0:
            raise SrcompressError(f"one-shot point {self.oneshot_at} is outside [0, 1)", "pass a fraction of training, e.g. 0.5")
        check_cycles(self.cycles, self.prune_fraction, self.last_cycle)
        if self.update_every is not None and self.update_every < 1:
            raise SrcompressError(f"mask update interval {self.update_every} is below 1", "pass e.g. --update-every 10")
        if self.optimizer_state not in STATE_MODES:
            raise SrcompressError(f"unknown optimizer-state mode {self.optimizer_state!r}", f"use one of {', '.join(STATE_MODES)}")
        pattern = Pattern.parse(self.pattern)
        if self.sparsity > 0:
            MaskSpec(self.sparsity, pattern, self.scope, self.min_density).validate()

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}


# A TrainConfig field's annotation: the types it accepts, how to name them, an example value.
_TYPES = {"float": ((int, float), "a number", "0.5"), "int": ((int,), "an integer", "3"), "str": ((str,), "a string", '"cyclical"'),
          "bool": ((bool,), "true or false", "true"), "int | None": ((int, type(None)), "an integer", "10"),
          "tuple[str, ...]": ((tuple,), "a list of strings", '["fc*"]')}


def _check_type(name: str, value: Any, annotation: str) -> None:
    allowed, described, example = _TYPES[annotation]
    wrong = not isinstance(value, allowed) or (isinstance(value, bool) and annotation != "bool")
    if isinstance(value, tuple) and not wrong:
        wrong = not all(isinstance(item, str) for item in value)
    if wrong:
        raise SrcompressError(f"{name} must be {described}, not {value!r}", f"e.g. {name} = {example}")


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    sparse: dict[str, Any] | None = None  # the pruner's finalize() summary (None for dense training)
    eval_before: float | None = None
    eval_after: float | None = None
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def accuracy(model: nn.Module, data: Dataset, batch: int = 500) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    set_eval(model)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(data.x.split(batch), data.y.split(batch)))
    if was_training:
        set_mode(model, True)
    return correct / len(data)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr(config: TrainConfig, schedule, step: int, total: int) -> float:
    """Cosine over all steps, constant, or (``cycle``) cosine restarted at every cycle start and over the tail."""
    if config.lr_schedule == "constant":
        return config.lr
    start, end = 0, total
    if config.lr_schedule == "cycle" and hasattr(schedule, "bounds"):
        edges = [*schedule.bounds(), total]
        start, end = next(((a, b) for a, b in zip(edges, edges[1:]) if a <= step < b), (edges[-2], total))
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - start) / max(end - start, 1)))


def _check_model_output(model: nn.Module, data: Dataset) -> None:
    set_eval(model)
    try:
        with torch.no_grad():
            out = model(data.x[:3])  # three samples: a program exported with a fixed batch size fails here, not mid-training
    except Exception as err:  # noqa: BLE001 - a shape mismatch between data and model
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SrcompressError(f"the model cannot run on a batch of inputs of shape {tuple(data.x.shape[1:])} from {data.name} ({reason})",
                              "give data shaped like the model's input (a .pt2 must be exported with a dynamic batch size)") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SrcompressError("the model does not return one row of class scores per input", "train a classifier returning (batch, classes) logits")
    if out.shape[1] < data.classes:
        raise SrcompressError(f"{data.name} has labels up to {data.classes - 1} but the model has {out.shape[1]} outputs",
                              "give data whose labels fit the model's classes")


def make_config_schedule(config: TrainConfig, total_steps: int):
    """The sparsity schedule ``config`` asks for over ``total_steps`` (raises if it cannot fit in them)."""
    return make_schedule(config.schedule, config.sparsity, total_steps, interval=config.update_every, cycles=config.cycles,
                         prune_fraction=config.prune_fraction, floor=config.floor, last_cycle=config.last_cycle,
                         oneshot_at=round(config.oneshot_at * total_steps))


def train_model(model: nn.Module, train_data: Dataset, config: TrainConfig, *, eval_data: Dataset | None = None,
                example_inputs: tuple | None = None, checkpoint: Path | None = None, checkpoint_every: int = 0,
                resume: bool = False, fingerprint: dict[str, Any] | None = None, eval_each_epoch: bool = True,
                on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` in place; with ``sparsity > 0`` the result has the pruned weights baked in.

    ``checkpoint_every`` is in steps (0: at the end of every epoch). ``fingerprint`` is stored in
    checkpoints and must match on resume (the CLI puts the input model's and data's digests there).
    """
    config.validate()
    for data in (train_data, eval_data) if eval_data is not None else (train_data,):
        _check_model_output(model, data)
    rank, world = _world()
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    local = len(train_data) // world
    if local < 1:
        raise SrcompressError(f"{train_data.name} has {len(train_data)} samples for {world} processes", "give more data")
    per_epoch = math.ceil(local / config.batch_size)
    total = per_epoch * config.epochs
    result = TrainResult(eval_before=accuracy(model, eval_data) if eval_data is not None else None)

    schedule = pruner = None
    optimizer = _optimizer(model, config)
    if config.sparsity > 0:
        schedule = make_config_schedule(config, total)
        pruner = SparsePruner(model, schedule, pattern=config.pattern, scope=config.scope, min_density=config.min_density,
                              exclude=config.exclude, keep_first=config.keep_first, keep_last=config.keep_last,
                              optimizer=optimizer, optimizer_state=config.optimizer_state,
                              example_inputs=example_inputs if example_inputs is not None else (train_data.x[:1],))
    step, losses = 0, []
    meta = {"config": config.to_json(), "fingerprint": fingerprint or {}, "world": world}
    if resume:
        step, losses = _load_checkpoint(checkpoint, meta, model, optimizer, pruner, result)
        result.resumed_from = step
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if not set_mode(model, True):
        result.notes.append("the model came from a torch.export program: it trains in the mode it was exported in "
                            "(dropout and batch norm behave as at export)")
    first_epoch = step // per_epoch
    for epoch in range(first_epoch, config.epochs):
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        shard = order[: local * world][rank::world]
        for index in ui.track(range(step - epoch * per_epoch, per_epoch), f"epoch {epoch + 1}/{config.epochs}", total=per_epoch - (step - epoch * per_epoch)):
            batch = shard[index * config.batch_size:(index + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, schedule, step, total)
            loss = F.cross_entropy(net(train_data.x[batch]), train_data.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if pruner is not None:
                pruner.step()
            step += 1
            losses.append(float(loss.detach()))
            end_of_epoch = step % per_epoch == 0
            if end_of_epoch:
                result.history.append(_epoch_record(epoch, step, losses, pruner, model, eval_data if eval_each_epoch else None))
                losses = []
            if checkpoint is not None and ((checkpoint_every and step % checkpoint_every == 0) or (not checkpoint_every and end_of_epoch)):
                if step < total and rank == 0:
                    _save_checkpoint(checkpoint, meta, step, losses, model, optimizer, pruner, result)
            if on_step is not None:
                on_step(step)
    result.steps = step
    if pruner is not None:
        result.sparse = pruner.finalize()
    set_eval(model)
    result.eval_after = accuracy(model, eval_data) if eval_data is not None else None
    result.seconds = time.perf_counter() - started
    return result


def _epoch_record(epoch, step, losses, pruner, model, eval_data) -> dict[str, Any]:
    record = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / max(len(losses), 1)}
    if pruner is not None:  # the weights' zeros: at a cycle restart the mask is lifted but the pruned weights are still 0
        record["sparsity"], record["mask_sparsity"] = pruner.zero_fraction(), pruner.mask_sparsity()
    if eval_data is not None:
        record["eval_accuracy"] = accuracy(model, eval_data)
    return record


def _save_checkpoint(path: Path, meta, step, losses, model, optimizer, pruner, result: TrainResult) -> None:
    from .io import atomic_path

    state = {"format": CHECKPOINT_FORMAT, **meta, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "pruner": pruner.state_dict() if pruner is not None else None, "rng": torch.get_rng_state(),
             "history": result.history, "epoch_losses": losses, "eval_before": result.eval_before, "threads": torch.get_num_threads()}
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def is_checkpoint(path: Path) -> bool:
    """True if ``path`` is a file an srcompress training run wrote as its checkpoint."""
    if not Path(path).is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable means it is not ours
        return False
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def _load_checkpoint(path: Path | None, meta, model, optimizer, pruner, result: TrainResult) -> tuple[int, list[float]]:
    if path is None or not Path(path).is_file():
        raise SrcompressError(f"no checkpoint to resume from at {path}", "run without --resume to start training")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise SrcompressError(f"checkpoint {path} is corrupt ({type(err).__name__})", "delete it and run without --resume") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SrcompressError(f"{path} is not an srcompress training checkpoint", "point --checkpoint at the file a previous run wrote")
    for key in ("config", "fingerprint", "world"):
        if state[key] != meta[key]:
            changed = _difference(state[key], meta[key]) if isinstance(meta[key], dict) else f"{state[key]} processes"
            raise SrcompressError(f"checkpoint {path} was made with different {key} ({changed})",
                                  "resume with exactly the options, model, data and process count of the first run")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if pruner is not None:
        pruner.load_state_dict(state["pruner"])
    torch.set_rng_state(state["rng"])
    if state["threads"] != torch.get_num_threads():
        result.notes.append(f"resumed with {torch.get_num_threads()} torch threads, the checkpoint was written with {state['threads']}: "
                            "results can differ in the last bits from an uninterrupted run")
    result.history = list(state["history"])
    result.eval_before = state["eval_before"]
    return int(state["step"]), list(state["epoch_losses"])


def _difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)[:200]
