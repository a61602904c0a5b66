"""Recipes: several stages run on one model in order, described in a small TOML file.

    seed = 0                      # optional, default for every stage
    [data]                        # used by train stages
    train = "mnist5k"             # eval defaults to mnist5k:test for mnist5k
    [[stage]]
    kind = "structured"           # channels removed physically, the keys of `srcompress prune --structured`
    method = "surgery"            # l1, random-channels, surgery, surgery-pairwise, submodular (needs calib = "...")
    sparsity = 0.25
    [[stage]]
    kind = "prune"                # mask pruning, the keys of `srcompress prune`
    sparsity = 0.5
    [[stage]]
    kind = "train"                # sparse training, the keys of `srcompress train`
    sparsity = 0.9
    schedule = "cyclical"
    epochs = 3

A stage kind is a :class:`StageKind`: ``parse`` checks a table before anything runs, ``run`` changes
the model (or returns a new one) and says what it did. Adding a kind is one entry in ``STAGES``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from . import ui
from .errors import SrcompressError, TargetNotMet


@dataclass
class Context:
    """What stages share: the example input, the data (loaded once) and the recipe's defaults."""

    example_inputs: tuple
    data: dict[str, str]
    seed: int
    loaded_data: dict[str, Any] = field(default_factory=dict)
    evaluate: Any = None  # the bundled example's held-out evaluator, if any (a data-driven stage must not fit to it)

    def dataset(self, source: str, class_names: tuple[str, ...] | None = None):
        from .data import load_data

        if (source, class_names) not in self.loaded_data:
            self.loaded_data[source, class_names] = load_data(source, class_names=class_names)
        return self.loaded_data[source, class_names]

    def eval_source(self) -> str | None:
        train = self.data.get("train", "")
        if "eval" in self.data:
            return self.data["eval"]
        return "mnist5k:test" if train in ("mnist5k", "mnist5k:train") else None


@dataclass(frozen=True)
class StageKind:
    parse: Callable[[dict[str, Any], int, dict], Any]  # (table, seed, data) -> validated stage config
    run: Callable[[nn.Module, Any, Context], tuple[nn.Module, dict[str, Any]]]


def _typed(table: dict[str, Any], key: str, default: Any, kinds: tuple[type, ...], described: str, example: str) -> Any:
    """``table[key]`` (or ``default``) after checking its TOML type: a string is not a number, nor a list of globs."""
    value = table.get(key, default)
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise SrcompressError(f"{key} must be {described}, not {value!r}", f"e.g. {key} = {example}")
    return value


def _number(table, key, default=None):
    return _typed(table, key, default, (int, float), "a number", "0.5")


def _integer(table, key, default=None):
    return _typed(table, key, default, (int,), "an integer", "3")


def _text(table, key, default=None):
    return _typed(table, key, default, (str,), "a string", '"..."')


def _flag(table, key, default=False):
    return _typed(table, key, default, (bool,), "true or false", "true")


def _globs(table, key="exclude") -> tuple[str, ...]:
    value = _typed(table, key, [], (list,), "a list of globs", '["fc*"]')
    if not all(isinstance(item, str) for item in value):
        raise SrcompressError(f"{key} must be a list of globs, not {value!r}", f'e.g. {key} = ["fc*"]')
    return tuple(value)


def _keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed - {"kind"})
    if unknown:
        raise SrcompressError(f"{where}: unknown key {unknown[0]!r}", f"use one of {', '.join(sorted(allowed))}")


def _parse_prune(table: dict[str, Any], seed: int, data: dict) -> dict[str, Any]:
    from .compress.masks import MaskSpec
    from .compress.patterns import Pattern
    from .compress.registry import get_method

    allowed = {"sparsity", "pattern", "method", "scope", "min_density", "exclude", "prune_first", "prune_last", "seed"}
    _keys(table, allowed, "prune stage")
    pattern = Pattern.parse(_text(table, "pattern", "unstructured"))
    sparsity = _number(table, "sparsity", pattern.fixed_sparsity)
    if sparsity is None:
        raise SrcompressError("prune stage: sparsity is required", "add e.g. sparsity = 0.5")
    spec = MaskSpec(float(sparsity), pattern, _text(table, "scope", "global"), float(_number(table, "min_density", 0.01)),
                    _globs(table), not _flag(table, "prune_first"), not _flag(table, "prune_last"), _integer(table, "seed", seed))
    spec.validate()
    method = _text(table, "method", "magnitude")
    if get_method(method).kind != "mask":
        raise SrcompressError(f"prune stage: method {method!r} removes whole units", 'use kind = "structured" for it')
    return {"spec": spec, "method": method}


STRUCTURED_KEYS = {"sparsity", "target", "method", "scope", "min_density", "round_to", "hardware", "uniform", "exclude", "seed",
                   "saliency_threshold", "calib", "calib_samples", "tokenizer", "image_size"}


def _parse_structured(table: dict[str, Any], seed: int, data: dict) -> dict[str, Any]:
    from .compress.registry import get_method
    from .compress.structured import structured_spec

    _keys(table, STRUCTURED_KEYS, "structured stage")
    method = get_method(_text(table, "method", "l1"), structured=True)
    spec = structured_spec(_number(table, "sparsity"), "unstructured", _text(table, "target"), _text(table, "scope", method.default_scope),
                           float(_number(table, "min_density", 0.01)), _integer(table, "round_to"), _text(table, "hardware", "cpu"),
                           _flag(table, "uniform"), _globs(table), _integer(table, "seed", seed), _number(table, "saliency_threshold"))
    calib = _text(table, "calib")
    if method.needs_data and not calib:
        raise SrcompressError(f"structured stage: method {method.name!r} needs calibration data", 'add calib = "mnist5k" (or a file, a folder)')
    calibration = {"source": calib, "samples": _integer(table, "calib_samples", 512), "tokenizer": _text(table, "tokenizer"),
                   "image_size": _integer(table, "image_size", 224)}
    return {"spec": spec, "method": method.name, "calibration": calibration}


def _run_structured(model: nn.Module, stage: dict[str, Any], context: Context) -> tuple[nn.Module, dict[str, Any]]:
    from .pipeline import prune_structured

    options = stage["calibration"]
    calibration = None
    if options["source"]:
        from .calib.data import load_calibration

        calibration = load_calibration(options["source"], options["samples"], seed=stage["spec"].seed,
                                       example_inputs=context.example_inputs, tokenizer=options["tokenizer"],
                                       image_size=options["image_size"], model=model)
    report = prune_structured(model, context.example_inputs, stage["spec"], stage["method"], calibration=calibration,
                              evaluate=context.evaluate)
    if not report.ok:
        raise TargetNotMet(f"structured stage: {report.problem}", f"nothing was written; {report.fix or 'adjust the recipe'}")
    summary = (f"{stage['method']} removed {report.reached['channels']:.1%} of units, {report.reached['params']:.1%} of "
               f"parameters ({report.before['params']:,} -> {report.after['params']:,})")
    if report.drift:
        summary += f"; output drift {report.drift['relative_error']:.1%} on {report.drift['inputs']}"
    return model, {"summary": summary, "report": report.to_json()}


def _run_prune(model: nn.Module, stage: dict[str, Any], context: Context) -> tuple[nn.Module, dict[str, Any]]:
    from .pipeline import prune_model

    report = prune_model(model, context.example_inputs, stage["spec"], stage["method"])
    if not report.ok:
        raise TargetNotMet(f"prune stage: {report.problem}", "nothing was written; adjust the recipe")
    sp = report.sparsity
    summary = f"{stage['method']} {report.request['pattern']} to {sp['reached']:.2%} of the pruned layers"
    return model, {"summary": summary, "report": report.to_json()}


TRAIN_DATA_KEYS = {"data", "eval_data"}


def _parse_train(table: dict[str, Any], seed: int, data: dict) -> dict[str, Any]:
    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _keys(table, fields | TRAIN_DATA_KEYS, "train stage")
    values = {k: (_globs(table) if k == "exclude" else v) for k, v in table.items() if k in fields}
    values.setdefault("seed", seed)
    config = TrainConfig(**values)
    config.validate()
    source = _text(table, "data", data.get("train"))
    if not source:
        raise SrcompressError("train stage: no training data", "add [data] train = \"...\" or data = \"...\" to the stage")
    return {"config": config, "data": source, "eval_data": _text(table, "eval_data")}


def _run_train(model: nn.Module, stage: dict[str, Any], context: Context) -> tuple[nn.Module, dict[str, Any]]:
    from .train import train_model

    from .data import held_out_note

    train_data = context.dataset(stage["data"])
    eval_source = stage["eval_data"] or (context.eval_source() if stage["data"] == context.data.get("train") else None)
    eval_data = context.dataset(eval_source, train_data.class_names) if eval_source else None
    overlap = held_out_note(train_data.x, train_data.name, eval_data.x, eval_data.name) if eval_data is not None else None
    result = train_model(model, train_data, stage["config"], eval_data=eval_data, example_inputs=context.example_inputs)
    config = stage["config"]
    summary = f"{config.schedule} {config.pattern} training for {config.epochs} epochs"
    if result.sparse:
        summary += f" to {result.sparse['reached']:.2%} of the pruned layers"
    if result.eval_after is not None:
        summary += f", accuracy {result.eval_before:.2%} -> {result.eval_after:.2%} on {eval_data.name}"
    return model, {"summary": summary, "config": config.to_json(), "history": result.history, "sparsity": result.sparse,
                   "eval_before": result.eval_before, "eval_after": result.eval_after, "steps": result.steps,
                   "notes": result.notes + ([overlap] if overlap else [])}


STAGES: dict[str, StageKind] = {
    "prune": StageKind(_parse_prune, _run_prune),
    "structured": StageKind(_parse_structured, _run_structured),
    "train": StageKind(_parse_train, _run_train),
}


@dataclass
class Recipe:
    path: Path
    seed: int
    data: dict[str, str]
    stages: list[tuple[str, Any]]


def load_recipe(path: Path) -> Recipe:
    """Read and check every stage of a recipe file, so a mistake in stage 3 stops before stage 1 runs."""
    path = Path(path)
    if not path.is_file():
        raise SrcompressError(f"recipe not found: {path}", "give the path of a .toml recipe")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise SrcompressError("reading a TOML recipe needs Python 3.11+ or the tomli package", "pip install tomli") from None
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SrcompressError(f"{path} is not valid TOML ({str(err).splitlines()[0][:120]})", "fix the recipe's syntax") from err
    _keys(table, {"seed", "data", "stage"}, f"recipe {path.name}")
    stages = table.get("stage")
    if not isinstance(stages, list) or not stages:
        raise SrcompressError(f"recipe {path.name} has no [[stage]] tables", "add at least one [[stage]] with a kind")
    data = _typed(table, "data", {}, (dict,), "a table", '{ train = "mnist5k" }')
    _keys(data, {"train", "eval"}, "[data]")
    for key in data:
        _text(data, key)
    seed = _integer(table, "seed", 0)
    parsed = []
    for index, stage in enumerate(stages, 1):
        kind = stage.get("kind") if isinstance(stage, dict) else None
        if not isinstance(kind, str) or kind not in STAGES:
            raise SrcompressError(f"recipe stage {index}: unknown kind {kind!r}", f"use one of {', '.join(STAGES)}")
        try:
            parsed.append((kind, STAGES[kind].parse(stage, seed, data)))
        except SrcompressError as err:
            raise SrcompressError(f"recipe stage {index}: {err.problem}", err.fix) from err
    return Recipe(path, seed, dict(data), parsed)


def run_recipe(recipe: Recipe, load: Callable[[], tuple], output: Path, fmt: str | None, force: bool) -> dict[str, Any]:
    """Run the stages on the loaded model and write it atomically; returns the JSON report."""
    import torch

    from .io import check_output_path, output_format, save_model
    from .report import provenance

    torch.manual_seed(recipe.seed)
    loaded, inputs, _, evaluate = load()
    check_output_path(output, force=force, protected=(loaded.path,) if loaded.path else ())
    fmt = output_format(output, fmt, loaded.format, from_program=loaded.program is not None)
    context = Context(inputs, recipe.data, recipe.seed, evaluate=evaluate)
    notes = _check_before_running(recipe, loaded.module, context, evaluate)
    before = evaluate(loaded.module) if evaluate else None
    model = loaded.module
    reports = []
    for index, (kind, stage) in enumerate(recipe.stages, 1):
        with ui.phase(f"stage {index}/{len(recipe.stages)}: {kind}"), _stage_errors(index):
            model, report = STAGES[kind].run(model, stage, context)
        reports.append({"kind": kind, **report})
    loaded = copy.copy(loaded)
    loaded.module = model
    after = evaluate(model) if evaluate else None
    written = save_model(loaded, output, fmt, example_inputs=inputs, force=force, reuse_program=False)
    return {"ok": True, "recipe": str(recipe.path), "stages": reports,
            "evaluation": {"metric": before["metric"], "dataset": before["dataset"], "before": before["value"], "after": after["value"]} if before else None,
            "files": {"input": str(loaded.path) if loaded.path else "example", "output": str(written), "format": fmt},
            "provenance": provenance(recipe.seed, loaded.sha256), "notes": notes}


@contextmanager
def _stage_errors(index: int):
    """Errors raised while stage ``index`` runs name the stage, as errors found while parsing it do."""
    try:
        yield
    except SrcompressError as err:
        raise type(err)(f"recipe stage {index}: {err.problem}", err.fix) from err


def _check_before_running(recipe: Recipe, model: nn.Module, context: Context, evaluate) -> list[str]:
    """What can be checked once the model and data are known, before stage 1 runs: each mask stage's --exclude
    globs match a layer, each train stage's schedule fits its steps, and the result is not evaluated on data a
    train stage learns from (refused when all of the evaluation data is in the training data; a note when some is)."""
    from .compress.layers import trace_layers
    from .compress.masks import check_exclude_matches
    from .data import held_out_note
    from .train import make_config_schedule

    notes = []
    layers = None
    for index, (kind, stage) in enumerate(recipe.stages, 1):
        with _stage_errors(index):
            exclude = stage["spec"].exclude if kind == "prune" else stage["config"].exclude if kind == "train" else ()
            if exclude:
                layers = layers or trace_layers(model, context.example_inputs)[0]
                check_exclude_matches(exclude, [[layer.name, layer.module_name] for layer in layers])
            if kind == "train":
                data, config = context.dataset(stage["data"]), stage["config"]
                if config.sparsity > 0:
                    make_config_schedule(config, math.ceil(len(data) / config.batch_size) * config.epochs)
                note = held_out_note(data.x, data.name, evaluate.inputs, evaluate.dataset) if evaluate is not None else None
                if note:
                    notes.append(f"stage {index}: {note}")
    return notes
