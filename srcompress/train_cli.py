"""``srcompress train`` and ``srcompress recipe``: sparse training, and chained stages from a TOML recipe.

``cli.py`` adds both commands to its group with :func:`register` (this module imports nothing from
``cli`` at import time, so ``python -m srcompress.cli`` works too).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click

from . import ui
from .errors import SrcompressError

SUFFIX = {"pt": ".pt", "pt2": ".pt2", "state_dict": ".pt"}


def _output_path(model_path: Path | None, example: str | None, fmt: str | None, output: Path | None) -> Path:
    if output is not None:
        return output
    if example:
        return Path(f"{example}.sparse{SUFFIX[fmt or 'pt2']}")
    stem = model_path.name.split(".")[0] or "model"
    return Path(f"{stem}.sparse{SUFFIX[fmt] if fmt else (model_path.suffix or '.pt')}")


def _parse_normalize(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        mean, std = (float(part) for part in text.split(","))
    except ValueError:
        raise SrcompressError(f"--normalize {text!r} is not MEAN,STD", "e.g. --normalize 0.1307,0.3081") from None
    if std <= 0:
        raise SrcompressError(f"--normalize std {std} is not positive", "e.g. --normalize 0.5,0.25")
    return mean, std


def _load_model(model_path, example, arch, trust_pickle, input_shape, input_dtype, train_data):
    """The model and its example input: a training sample unless --input-shape is given."""
    from .inputs import resolve_example_inputs
    from .io import LoadedModel, load_model

    if bool(model_path) == bool(example):
        raise SrcompressError("give either a MODEL file or --example", "e.g. srcompress train --example mnist --data mnist5k")
    if example:
        from .examples import get_example

        with ui.phase(f"loading example {example}"):
            loaded = LoadedModel(get_example(example).load(), "pt2")
    else:
        with ui.phase(f"loading {model_path}"):
            loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    if input_shape:
        return loaded, resolve_example_inputs(loaded.module, input_shape, input_dtype)[0]
    return loaded, (train_data.x[:1],)


def _init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo: training runs on CPU); (rank, world size)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


TRAIN_HELP = ("Train a classifier to a target sparsity (cyclical pruning, GMP or one-shot + fine-tuning) and save it.\n\n"
              "DATA is mnist5k (the bundled digits; evaluated on their held-out split), a .pt/.npz file with x and y, "
              "or a folder with one sub-folder of images per class. Under torchrun it trains data-parallel.")
RECIPE_HELP = "Run the stages of a TOML recipe (e.g. prune, then cyclical training to a higher sparsity) and save the result."
_COMMANDS: list[click.Command] = []


def register(group: click.Group, model_options) -> None:
    """Add ``train`` and ``recipe`` to ``group``; ``model_options`` is cli's shared model-loading option decorator."""
    if not _COMMANDS:
        _COMMANDS.append(click.command("train", help=TRAIN_HELP)(model_options(_train)))
        _COMMANDS.append(click.command("recipe", help=RECIPE_HELP)(model_options(_recipe)))
    for command in _COMMANDS:
        group.add_command(command)


@click.argument("model_path", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--data", "data_source", required=True, help="Training data: mnist5k, FILE.pt, FILE.npz or an image FOLDER.")
@click.option("--eval-data", default=None, help="Held-out data for accuracy (default: mnist5k:test for mnist5k, else none).")
@click.option("--normalize", default=None, help="For image folders: MEAN,STD applied to pixels in [0, 1].")
@click.option("--sparsity", type=float, default=0.9, show_default=True, help="Target fraction of weights removed in the pruned layers.")
@click.option("--schedule", type=click.Choice(["cyclical", "gmp", "oneshot"]), default="cyclical", show_default=True,
              help="cyclical (Srinivas et al. 2022), gmp (Zhu & Gupta cubic ramp) or oneshot (prune once, then fine-tune).")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured, N:M (e.g. 2:4) or block:RxC (e.g. block:16x16).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True, help="One ranking across layers, or every layer at the target.")
@click.option("--min-density", type=float, default=0.01, show_default=True, help="Fraction of each layer always kept.")
@click.option("--exclude", multiple=True, help="Keep layers matching this glob dense (repeatable).")
@click.option("--prune-first/--keep-first", default=False, show_default=True, help="Prune the first conv (kept dense by default).")
@click.option("--prune-last/--keep-last", default=False, show_default=True, help="Prune the last layer and every layer whose result is a model output (kept dense by default).")
@click.option("--cycles", type=int, default=3, show_default=True, help="Cyclical: number of prune cycles.")
@click.option("--prune-fraction", type=float, default=0.75, show_default=True, help="Fraction of training spent in the pruning ramp(s); the rest fine-tunes at the target.")
@click.option("--restart-floor", is_flag=True, help="Cyclical: cycle c ramps from sparsity*c/cycles instead of 0 (after one dense update).")
@click.option("--last-cycle", type=float, default=1.0, show_default=True, help="Cyclical: length of the last cycle relative to the others.")
@click.option("--oneshot-at", type=float, default=0.0, show_default=True, help="Oneshot: fraction of training done dense before pruning.")
@click.option("--update-every", type=int, default=None, help="Steps between mask updates (default: 1% of a pruning ramp).")
@click.option("--optimizer-state", type=click.Choice(["pruned", "reset", "keep"]), default="pruned", show_default=True,
              help="pruned: zero momentum of pruned weights; reset: also drop optimizer state at each cycle start; keep: leave it.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size (per process under torchrun).")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant", "cycle"]), default="cosine", show_default=True,
              help="cosine over training, constant, or cosine restarted at every cycle start.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output file (default: <name>.sparse.<ext> here).")
@click.option("--format", "fmt", type=click.Choice(["pt", "pt2", "state_dict"]), default=None, help="Output format (default: the input's).")
@click.option("--force", is_flag=True, help="Overwrite an existing output and discard an existing checkpoint.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Checkpoint file (default: <output>.ckpt); removed after success.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True, help="Steps between checkpoints (0: every epoch).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint; on CPU with the same thread count the result is bit-identical to an uninterrupted run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initial RNG state and the batch order.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--stop-after-steps", type=int, default=None, hidden=True, help="Testing: kill the process (SIGKILL) after this many steps.")
def _train(model_path, data_source, eval_data, normalize, sparsity, schedule, pattern, scope, min_density, exclude, prune_first,
          prune_last, cycles, prune_fraction, restart_floor, last_cycle, oneshot_at, update_every, optimizer_state, epochs, lr,
          batch_size, optimizer, momentum, weight_decay, lr_schedule, output, fmt, force, checkpoint, checkpoint_every, resume,
          seed, quiet, stop_after_steps, example, arch, trust_pickle, input_shape, input_dtype, as_json):
    from .cli import _fail
    from .train import TrainConfig

    world, finished = 1, False
    try:
        rank, world = _init_distributed()
        ui.enable(not (quiet or as_json) and rank == 0)
        config = TrainConfig(sparsity=sparsity, schedule=schedule, pattern=pattern, scope=scope, min_density=min_density,
                             exclude=tuple(exclude), keep_first=not prune_first, keep_last=not prune_last, cycles=cycles,
                             prune_fraction=prune_fraction, floor=restart_floor, last_cycle=last_cycle, oneshot_at=oneshot_at,
                             update_every=update_every, optimizer_state=optimizer_state, epochs=epochs, batch_size=batch_size,
                             lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
                             seed=seed)
        config.validate()
        output = _output_path(model_path, example, fmt, output)
        checkpoint = checkpoint or output.with_name(output.name + ".ckpt")
        for role, path in (("output", output), ("input model", model_path)):
            if path is not None and checkpoint.resolve() == Path(path).resolve():
                raise SrcompressError(f"--checkpoint {checkpoint} is the {role} file (checkpoints are overwritten, then deleted)",
                                      "choose another --checkpoint path")
        on_step = None
        if stop_after_steps:
            def on_step(step):
                if step == stop_after_steps:
                    os.kill(os.getpid(), signal.SIGKILL)
        _run_train(rank, config, model_path, example, arch, trust_pickle, input_shape, input_dtype, data_source, eval_data,
                   _parse_normalize(normalize), output, fmt, force, checkpoint, checkpoint_every, resume, on_step, as_json)
        finished = True
    except SrcompressError as err:
        _fail(err, as_json)
    finally:
        if world > 1:
            import torch

            if finished:
                torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
            torch.distributed.destroy_process_group()


def _run_train(rank, config, model_path, example, arch, trust_pickle, input_shape, input_dtype, data_source, eval_source, normalize,
               output, fmt, force, checkpoint, checkpoint_every, resume, on_step, as_json):
    import torch

    from .data import held_out_note, load_data
    from .io import check_output_path, output_format, save_model
    from .report import layer_stats, model_totals, provenance
    from .train import is_checkpoint, train_model

    torch.manual_seed(config.seed)
    with ui.phase(f"loading {data_source}"):
        train_data = load_data(data_source, normalize)
        if eval_source is None and train_data.name.startswith("mnist5k:") and train_data.name != "mnist5k:all":
            eval_source = "mnist5k:test"
        eval_data = load_data(eval_source, normalize, train_data.class_names) if eval_source else None
    overlap = held_out_note(train_data.x, train_data.name, eval_data.x, eval_data.name) if eval_data is not None else None
    loaded, inputs = _load_model(model_path, example, arch, trust_pickle, input_shape, input_dtype, train_data)
    check_output_path(output, force=force, protected=(loaded.path,) if loaded.path else ())
    fmt = output_format(output, fmt, loaded.format, from_program=loaded.program is not None)
    if not checkpoint.parent.is_dir():
        raise SrcompressError(f"checkpoint folder {checkpoint.parent} does not exist", "create it or choose another --checkpoint")
    if checkpoint.exists() and not is_checkpoint(checkpoint):  # --force would overwrite, then delete, someone's file
        raise SrcompressError(f"--checkpoint {checkpoint} exists and is not an srcompress training checkpoint",
                              "choose another --checkpoint path (the default is <output>.ckpt)")
    if checkpoint.exists() and not resume and not force:
        raise SrcompressError(f"checkpoint {checkpoint} exists from an earlier run", "pass --resume to continue it or --force to start over")
    fingerprint = {"model": loaded.sha256 or f"example:{example}", "data": train_data.digest()}
    result = train_model(loaded.module, train_data, config, eval_data=eval_data, example_inputs=inputs, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume, fingerprint=fingerprint, on_step=on_step)
    if rank != 0:
        torch.distributed.barrier()
        return
    with ui.phase(f"saving {output}"):
        written = save_model(loaded, output, fmt, example_inputs=inputs, force=force, reuse_program=False)
    if checkpoint.exists():
        checkpoint.unlink()
    from .compress.layers import trace_layers

    layers, _ = trace_layers(loaded.module, inputs)
    report = {
        "ok": True, "request": config.to_json(),
        "data": {"train": train_data.name, "train_samples": len(train_data),
                 "eval": eval_data.name if eval_data else None, "eval_samples": len(eval_data) if eval_data else 0},
        "steps": result.steps, "resumed_from": result.resumed_from, "seconds": result.seconds, "history": result.history,
        "sparsity": result.sparse, "totals": model_totals(loaded.module, layer_stats(layers)),
        "evaluation": {"metric": "accuracy", "dataset": eval_data.name, "before": result.eval_before, "after": result.eval_after} if eval_data else None,
        "files": {"input": str(loaded.path) if loaded.path else f"example:{example}", "output": str(written),
                  "output_bytes": written.stat().st_size, "format": fmt},
        "provenance": provenance(config.seed, loaded.sha256),
        "notes": loaded.notes + result.notes + ([overlap] if overlap else []),
    }
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if as_json:
        click.echo(json.dumps(report))
    else:
        _render(report)


def _render(report: dict) -> None:
    from rich.table import Table

    console = ui.stdout_console()
    request = report["request"]
    table = Table(title=f"srcompress train: {request['schedule']} {request['pattern']} to {request['sparsity']:.1%} ({request['scope']} scope)")
    for column in ("epoch", "step", "loss", "sparsity", "accuracy"):
        table.add_column(column, justify="right")
    for row in report["history"]:
        table.add_row(str(row["epoch"]), str(row["step"]), f"{row['loss']:.4f}",
                      f"{row['sparsity']:.2%}" if "sparsity" in row else "dense",
                      f"{row['eval_accuracy']:.2%}" if "eval_accuracy" in row else "")
    console.print(table)
    sparse = report["sparsity"]
    if sparse:
        console.print(f"sparsity of pruned layers: target {sparse['target']:.2%}, reached {sparse['reached']:.2%}; "
                      f"{sparse['recovered_fraction']:.2%} of kept weights grew back after being pruned")
    ev = report["evaluation"]
    if ev:
        console.print(f"accuracy on {ev['dataset']}: before {ev['before']:.2%}, after {ev['after']:.2%} ({(ev['after'] - ev['before']) * 100:+.2f} points)")
    resumed = f", resumed at step {report['resumed_from']}" if report["resumed_from"] is not None else ""
    console.print(f"{report['steps']} steps in {report['seconds']:.1f} s{resumed}; wrote {report['files']['output']} ({report['files']['format']})")
    for note in report["notes"]:
        console.print(f"note: {note}")


@click.argument("recipe_path", type=click.Path(exists=False, path_type=Path))
@click.argument("model_path", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output file (default: <name>.sparse.<ext> here).")
@click.option("--format", "fmt", type=click.Choice(["pt", "pt2", "state_dict"]), default=None, help="Output format (default: the input's).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def _recipe(recipe_path, model_path, output, fmt, force, quiet, example, arch, trust_pickle, input_shape, input_dtype, as_json):
    from .cli import _fail, _load
    from .recipe import load_recipe, run_recipe

    ui.enable(not (quiet or as_json))
    try:
        plan = load_recipe(recipe_path)
        output = _output_path(model_path, example, fmt, output)
        report = run_recipe(plan, lambda: _load(model_path, example, arch, trust_pickle, input_shape, input_dtype), output, fmt, force)
    except SrcompressError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps(report))
        return
    console = ui.stdout_console()
    for index, stage in enumerate(report["stages"], 1):
        console.print(f"stage {index} ({stage['kind']}): {stage['summary']}")
    ev = report["evaluation"]
    if ev:
        console.print(f"accuracy on {ev['dataset']}: before {ev['before']:.2%}, after {ev['after']:.2%}")
    console.print(f"wrote {report['files']['output']} ({report['files']['format']})")
