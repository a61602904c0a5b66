"""The ``srcompress`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__, ui
from .errors import SrcompressError

PICKLE_NOTE = ("A pickled model (torch.save(model)) runs code from the file when loaded: srcompress loads one only "
               "if you own the file and no one else can write it, or with --trust-pickle. .pt2 programs and state "
               "dicts (with --arch) load without running code from the file.")


def _fail(err: SrcompressError, as_json: bool) -> None:
    if as_json and not getattr(err, "reported", False):
        click.echo(json.dumps({"ok": False, "error": err.one_line()}))
    click.echo(f"error: {err.one_line()}", err=True)
    sys.exit(err.exit_code)


def _model_options(func):
    options = [
        click.option("--example", type=str, default=None, help="Use a bundled real model instead of MODEL (mnist)."),
        click.option("--arch", default=None, help="module:callable that builds the model, for state-dict files."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled module from a file you do not own."),
        click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,224,224 (guessed if omitted)."),
        click.option("--input-dtype", default=None, help="Example input dtype: float32 (default) or int64 for token ids."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(model_path, example, arch, trust_pickle, input_shape, input_dtype):
    """The model, its example input and its evaluator (bundled examples only)."""
    from .inputs import resolve_example_inputs
    from .io import LoadedModel, load_model

    if bool(model_path) == bool(example):
        raise SrcompressError("give either a MODEL file or --example", "e.g. srcompress prune --sparsity 0.9 --example mnist")
    if example:
        from .examples import get_example

        chosen = get_example(example)
        with ui.phase(f"loading example {example}"):
            module = chosen.load()
            loaded = LoadedModel(module, "pt2")
            inputs, source = resolve_example_inputs(module, input_shape, input_dtype, known=chosen.example_inputs())
            evaluate = chosen.make_evaluator(module)
        return loaded, inputs, source, evaluate
    with ui.phase(f"loading {model_path}"):
        loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
        inputs, source = resolve_example_inputs(loaded.module, input_shape, input_dtype, known=loaded.example_inputs)
    return loaded, inputs, source, None


class _JsonGroup(click.Group):
    """A usage error (bad option value, unknown option) under --json also prints the one JSON object CI reads."""

    def main(self, args=None, **kwargs):
        argv = sys.argv[1:] if args is None else list(args)
        if "--json" not in argv:
            return super().main(args, **kwargs)
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args, standalone_mode=False, **kwargs)
        except click.ClickException as err:
            click.echo(json.dumps({"ok": False, "error": err.format_message()}))
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo(json.dumps({"ok": False, "error": "aborted"}))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_JsonGroup, help="Prune PyTorch models into smaller, faster ones, and say exactly what changed.\n\n" + PICKLE_NOTE)
@click.version_option(__version__, prog_name="srcompress")
def main() -> None:
    pass


@main.command(help="Prune a model and save it: zeros baked into plain weights (masks), or whole neurons, channels "
                   "and heads removed (--structured).\n\n" + PICKLE_NOTE)
@click.argument("model_path", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--sparsity", type=float, default=None,
              help="Fraction removed, in [0, 1): of weights in the pruned layers, or of units (channels) with --structured.")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured, N:M (e.g. 2:4, along inputs) or block:RxC (e.g. block:32x32).")
@click.option("--structured", is_flag=True, help="Remove whole neurons, channels, channel groups and attention heads.")
@click.option("--target", "target", default=None, help="With --structured: channels:F, params:F or flops:F (fraction removed).")
@click.option("--method", default="magnitude", show_default=True,
              help="magnitude or random (masks); l1 (also 'magnitude'), random, surgery or surgery-pairwise (data-free) and "
                   "submodular (needs --calib) remove units and imply --structured.")
@click.option("--scope", type=click.Choice(["global", "layer"]), default=None,
              help="global: one ranking across layers/groups; layer: each at the target. Default: global for masks and surgery, "
                   "layer for other structured methods.")
@click.option("--min-density", type=float, default=0.01, show_default=True, help="Fraction of each layer (or channel group) always kept.")
@click.option("--round-to", type=int, default=None, help="With --structured: kept channels per group rounded to a multiple of N.")
@click.option("--hardware", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Deployment target; gpu rounds structured widths to multiples of 8 unless --round-to is given.")
@click.option("--uniform", is_flag=True, help="With --structured: equivalent groups (e.g. every FFN) keep equal widths.")
@click.option("--calib", "calib", default=None,
              help="Calibration data for data-driven methods (data-free ones only measure output drift on it): .npz/.pt "
                   "tensors, an image folder, a .txt of sentences, or mnist5k, photos, sentences, random.")
@click.option("--calib-samples", type=int, default=512, show_default=True, help="Number of calibration samples.")
@click.option("--tokenizer", default=None, help="Hugging Face tokenizer folder for text calibration.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Image side for image-folder calibration.")
@click.option("--saliency-threshold", type=float, default=None,
              help="Surgery: remove units while their normalised saliency stays below this (instead of --sparsity).")
@click.option("--exclude", multiple=True, help="Keep layers (or groups) matching this glob dense (repeatable), e.g. 'classifier.*'.")
@click.option("--prune-first/--keep-first", default=False, show_default=True, help="Prune the first conv (kept dense by default).")
@click.option("--prune-last/--keep-last", default=False, show_default=True, help="Prune the last layer and every layer whose result is a model output (kept dense by default).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output file (default: <name>.pruned.<ext> here).")
@click.option("--format", "fmt", type=click.Choice(["pt", "pt2", "state_dict"]), default=None, help="Output format (default: the input's).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random choices (random method, tie-breaks).")
@click.option("--quiet", is_flag=True, help="No progress display.")
@_model_options
def prune(model_path, sparsity, pattern, structured, target, method, scope, min_density, round_to, hardware, uniform,
          calib, calib_samples, tokenizer, image_size, saliency_threshold, exclude, prune_first, prune_last, output, fmt, force, seed, quiet, example, arch, trust_pickle,
          input_shape, input_dtype, as_json):
    from .compress.registry import METHODS, get_method
    from .compress.structured import structured_spec

    ui.enable(not (quiet or as_json))
    console = ui.stdout_console(quiet=as_json)
    try:
        if method in METHODS and get_method(method).kind == "structured":
            structured = True
        if structured:
            if prune_first or prune_last:
                raise SrcompressError("--prune-first and --prune-last apply to mask pruning; structured pruning keeps the "
                                      "model's input and output widths anyway", "drop them (use --exclude to keep a group whole)")
            scope = scope or get_method(method, structured=True).default_scope
            spec = structured_spec(sparsity, pattern, target, scope, min_density, round_to, hardware, uniform, exclude, seed,
                                    saliency_threshold)
        else:
            if target or round_to or uniform or saliency_threshold is not None:
                raise SrcompressError("--target, --round-to, --uniform and --saliency-threshold apply to structured pruning",
                                      "add --structured")
            spec = _mask_spec(sparsity, pattern, scope, min_density, exclude, prune_first, prune_last, seed)
        get_method(method, structured=structured)
        output = _default_output(model_path, example, fmt, output)
        calibration = {"source": calib, "samples": calib_samples, "tokenizer": tokenizer, "image_size": image_size}
        _run_prune(console, model_path, example, arch, trust_pickle, input_shape, input_dtype, spec, method, output, fmt,
                   force, as_json, structured, calibration)
    except SrcompressError as err:
        _fail(err, as_json)


def _mask_spec(sparsity, pattern, scope, min_density, exclude, prune_first, prune_last, seed):
    from .compress.masks import MaskSpec
    from .compress.patterns import Pattern

    parsed = Pattern.parse(pattern)
    if sparsity is None:
        if parsed.fixed_sparsity is None:
            raise SrcompressError("--sparsity is required", "pass e.g. --sparsity 0.9")
        sparsity = parsed.fixed_sparsity
    spec = MaskSpec(sparsity=sparsity, pattern=parsed, scope=scope or "global", min_density=min_density,
                    exclude=tuple(exclude), keep_first=not prune_first, keep_last=not prune_last, seed=seed)
    spec.validate()
    return spec


def _default_output(model_path: Path | None, example: str | None, fmt: str | None, output: Path | None) -> Path:
    if output is not None:
        return output
    suffix = {"pt": ".pt", "pt2": ".pt2", "state_dict": ".pt"}
    if example:
        return Path(f"{example}.pruned{suffix[fmt or 'pt2']}")
    stem = model_path.name.split(".")[0] if model_path.name else "model"
    ext = suffix[fmt] if fmt else (model_path.suffix or ".pt")
    return Path(f"{stem}.pruned{ext}")


def _calibration(method: str | None, options: dict, example: str | None, inputs: tuple, model, seed: int):
    """Calibration data when the structured ``method`` needs it (the bundled example brings its own default), or when
    given to a data-free or mask method (``method`` None), which then only measures its output drift on it."""
    from .compress.registry import get_method

    source = options["source"]
    if (method is None or not get_method(method, structured=True).needs_data) and not source:
        return None  # otherwise --calib only measures output drift
    if source is None and example:
        from .examples import get_example

        source = get_example(example).calibration
    if source is None:
        raise SrcompressError(f"method {method!r} needs calibration data", "pass --calib DATA (a file, an image folder, or mnist5k/photos/sentences)")
    from .calib.data import load_calibration

    with ui.phase(f"loading calibration data {source}"):
        return load_calibration(source, options["samples"], seed=seed, example_inputs=inputs, tokenizer=options["tokenizer"],
                                image_size=options["image_size"], model=model)


def _run_prune(console, model_path, example, arch, trust_pickle, input_shape, input_dtype, spec, method, output, fmt, force,
               as_json, structured, calibration_options):
    import torch

    from .io import check_output_path, output_format, save_model
    from .pipeline import prune_model, prune_structured
    from .report import provenance, render_prune, render_structured

    torch.manual_seed(spec.seed)
    loaded, inputs, source, evaluate = _load(model_path, example, arch, trust_pickle, input_shape, input_dtype)
    check_output_path(output, force=force, protected=(loaded.path,) if loaded.path else ())
    fmt = output_format(output, fmt, loaded.format, from_program=loaded.program is not None)
    calibration = _calibration(method if structured else None, calibration_options, example, inputs, loaded.module, spec.seed)
    with ui.phase(f"pruning with {method}"):
        if structured:
            report = prune_structured(loaded.module, inputs, spec, method, evaluate=evaluate, input_source=source,
                                      calibration=calibration)
        else:
            report = prune_model(loaded.module, inputs, spec, method, evaluate=evaluate, input_source=source, calibration=calibration)
    report.notes = loaded.notes + report.notes
    if source == "guessed":
        report.notes.append(f"example input shape {list(inputs[0].shape)} was guessed; pass --input-shape to set it")
    if structured and fmt == "state_dict":
        report.notes.append("a state dict of a structurally pruned model only loads into a module built with the pruned "
                            "widths; prefer --format pt2, which reloads with torch.export.load alone")
    report.provenance = provenance(spec.seed, loaded.sha256)
    if report.ok:
        with ui.phase(f"saving {output}"):
            written = save_model(loaded, output, fmt, example_inputs=inputs, force=force, reuse_program=not structured)
        report.files = {"input": str(loaded.path) if loaded.path else f"example:{example}",
                        "input_bytes": loaded.path.stat().st_size if loaded.path else None,
                        "output": str(written), "output_bytes": written.stat().st_size, "format": fmt}
    if as_json:
        click.echo(json.dumps(report.to_json()))
    elif structured:
        render_structured(console, report)
    else:
        render_prune(console, report)
    if not report.ok:
        from .errors import TargetNotMet

        err = TargetNotMet(report.problem, f"nothing was written; {report.fix or 'adjust --sparsity, --min-density or --exclude'}")
        err.reported = True  # the JSON report already says ok: false
        raise err


@main.command(help="Show each layer's shape, parameters, zeros, sparsity, pattern and FLOPs.\n\n" + PICKLE_NOTE)
@click.argument("model_path", required=False, type=click.Path(dir_okay=True, path_type=Path))
@_model_options
def inspect(model_path, example, arch, trust_pickle, input_shape, input_dtype, as_json):
    from .compress.layers import trace_layers
    from .report import layer_stats, model_totals, render_stats

    ui.enable(not as_json)
    try:
        loaded, inputs, source, _ = _load(model_path, example, arch, trust_pickle, input_shape, input_dtype)
        layers, _ = trace_layers(loaded.module, inputs)
        stats = layer_stats(layers)
        totals = model_totals(loaded.module, stats)
    except SrcompressError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"ok": True, "model": str(model_path or f"example:{example}"), "format": loaded.format,
                               "example_input": {"shapes": [list(t.shape) for t in inputs], "source": source},
                               "layers": [vars(s) for s in stats], "totals": totals, "notes": loaded.notes}))
    else:
        console = ui.stdout_console()
        render_stats(console, stats, totals, f"{model_path or example} ({loaded.format})")
        for note in loaded.notes:
            console.print(f"note: {note}")


from .train_cli import register as _register_training  # noqa: E402
_register_training(main, _model_options)  # adds the train and recipe commands

from .export_cli import register as _register_export  # noqa: E402

_register_export(main, _model_options, _load, _fail, PICKLE_NOTE)  # adds the export and bench commands

if __name__ == "__main__":
    main()
