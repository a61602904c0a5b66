"""``srcompress export`` and ``srcompress bench``: deployment bundles and their latency.

``cli.py`` adds both commands with :func:`register` (nothing from ``cli`` is imported at import time).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import ui
from .errors import SrcompressError


def register(main, model_options, load, fail, pickle_note: str) -> None:
    @main.command(help="Export a model as a deployment bundle: verified ONNX (dynamic batch, parity-checked in ONNX "
                       "Runtime), optional INT8 QDQ and fp16 ONNX, TensorRT engines or the trtexec build script, "
                       "and manifest.json.\n\n" + pickle_note)
    @click.argument("model_path", required=False, type=click.Path(dir_okay=True, path_type=Path))
    @click.option("--format", "fmt", default="onnx", show_default=True, help="onnx, tensorrt or all.")
    @click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Bundle folder (default: <name>.bundle).")
    @click.option("--baseline", type=click.Path(dir_okay=True, path_type=Path), default=None,
                  help="The original (dense) model, exported too so bench can report the speedup.")
    @click.option("--int8", is_flag=True, help="Also write model.int8.onnx (static QDQ; needs --calib).")
    @click.option("--int8-activations", default="s8", show_default=True, help="s8: symmetric int8 (TensorRT-compatible); u8: asymmetric uint8 (ONNX Runtime only).")
    @click.option("--int8-method", default="minmax", show_default=True, help="Calibration: minmax, entropy or percentile.")
    @click.option("--int8-fp32-layers", default="auto", show_default=True,
                  help="Keep the layers most sensitive to INT8 in fp32: auto (fewest that reach --int8-target-error "
                       "on calibration inputs, at most half), or a count below the number of weighted layers (0: every "
                       "weighted layer INT8).")
    @click.option("--int8-target-error", type=float, default=0.0025, show_default=True,  # quantize.TARGET_ERROR
                  help="Relative output error (squared error / squared output) that --int8-fp32-layers auto aims for; lower "
                       "keeps predictions closer to fp32 with more fp32 layers.")
    @click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx.")
    @click.option("--calib", default=None, help="Calibration/parity data: .npz/.pt, an image folder, a .txt, or mnist5k, photos, sentences.")
    @click.option("--calib-samples", type=int, default=128, show_default=True, help="Number of calibration samples.")
    @click.option("--tokenizer", default=None, help="Hugging Face tokenizer folder for text calibration.")
    @click.option("--image-size", type=int, default=224, show_default=True, help="Image side for image calibration.")
    @click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
    @click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
    @click.option("--opt-batch", type=int, default=8, show_default=True, help="TensorRT profile: optimal batch.")
    @click.option("--max-batch", type=int, default=32, show_default=True, help="TensorRT profile: largest batch.")
    @click.option("--max-seq", type=int, default=None,
                  help="Longest sequence (text models): the TensorRT profile's max and the manifest's max_length "
                       "(default: 256, or the model's limit when shorter).")
    @click.option("--workspace-mib", type=int, default=1024, show_default=True, help="TensorRT workspace pool (MiB).")
    @click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling.")
    @click.option("--quiet", is_flag=True, help="No progress display.")
    @model_options
    def export(model_path, fmt, output, baseline, int8, int8_activations, int8_method, int8_fp32_layers, int8_target_error, fp16, calib, calib_samples, tokenizer,
               image_size, opset, no_simplify, opt_batch, max_batch, max_seq, workspace_mib, force, seed, quiet, example, arch,
               trust_pickle, input_shape, input_dtype, as_json):
        from .export.bundle import ExportOptions, check_request, export_bundle
        from .export.onnx import check_float32

        ui.enable(not (quiet or as_json))
        try:
            options = ExportOptions(fmt=fmt, int8=int8, fp16=fp16, int8_activations=int8_activations, int8_method=int8_method,
                                    int8_fp32_layers=_fp32_layers(int8_fp32_layers), int8_target_error=int8_target_error,
                                    opset=opset, simplify=not no_simplify, opt_batch=opt_batch, max_batch=max_batch,
                                    max_seq=max_seq, workspace_mib=workspace_mib, force=force)
            if output is None:
                stem = (model_path.name.split(".")[0] if model_path else example) or "model"
                output = Path(f"{stem}.bundle")
            check_request(output, options, calib)
            if image_size < 1:
                raise SrcompressError(f"--image-size {image_size} is not a positive number of pixels", "e.g. --image-size 224")
            loaded, inputs, _source, _evaluate = load(model_path, example, arch, trust_pickle, input_shape, input_dtype)
            check_float32(loaded.module)
            _check_dynamic_batch(loaded)
            options.notes += loaded.notes
            base = None
            if baseline is not None:
                from .io import load_model

                with ui.phase(f"loading baseline {baseline}"):
                    base = load_model(baseline, arch=arch, trust_pickle=trust_pickle)
                check_float32(base.module, "the baseline")
                _check_dynamic_batch(base)
                options.notes += [f"baseline: {note}" for note in base.notes]
            calibration = None
            if calib:
                from .calib.data import load_calibration

                with ui.phase(f"loading calibration data {calib}"):
                    calibration = load_calibration(calib, calib_samples, seed=seed, example_inputs=inputs, tokenizer=tokenizer,
                                                   image_size=image_size, model=loaded.module)
            name = model_path.name if model_path else f"example:{example}"
            manifest = export_bundle(loaded.module, inputs, output, options, model_name=name, model_sha256=loaded.sha256,
                                     calibration=calibration, calibration_source=calib, image_size=image_size,
                                     tokenizer=tokenizer, baseline=base)
        except SrcompressError as err:
            fail(err, as_json)
            return
        if as_json:
            click.echo(json.dumps({"ok": True, "bundle": str(output), "manifest": manifest}))
        else:
            _render_export(ui.stdout_console(), output, manifest)

    @main.command(help="Measure the latency of every artifact in a bundle (PyTorch, ONNX Runtime, TensorRT when "
                       "present) at several batch sizes, with the speedup over the dense baseline; writes "
                       "latency.json and latency.md into the bundle.")
    @click.argument("bundle", type=click.Path(path_type=Path))
    @click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
    @click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per artifact and batch size.")
    @click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up runs.")
    @click.option("--threads", type=int, default=None, help="ONNX Runtime / torch threads (default: their own).")
    @click.option("--quiet", is_flag=True, help="No progress display.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
    def bench(bundle, batch_sizes, runs, warmup, threads, quiet, as_json):
        from .export.bench import bench_bundle, render
        from .export.onnx import MAX_BATCH

        ui.enable(not (quiet or as_json))
        try:
            try:
                sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
            except ValueError:
                sizes = []
            if not sizes or any(s < 1 for s in sizes):
                raise SrcompressError(f"--batch-sizes {batch_sizes!r} is not a list of positive integers", "e.g. --batch-sizes 1,8,32")
            if max(sizes) > MAX_BATCH:
                raise SrcompressError(f"batch size {max(sizes)} exceeds {MAX_BATCH}, the largest batch a bundle's programs take",
                                      f"pass --batch-sizes of at most {MAX_BATCH}")
            if runs < 3 or warmup < 0:
                raise SrcompressError("--runs must be at least 3 and --warmup not negative", "e.g. --runs 30 --warmup 5")
            if threads is not None and threads < 1:
                raise SrcompressError(f"--threads {threads} is not a positive number", "pass --threads 1 or more, or leave it out")
            result = bench_bundle(bundle, sizes, runs=runs, warmup=warmup, threads=threads)
        except SrcompressError as err:
            fail(err, as_json)
            return
        if as_json:
            click.echo(json.dumps({"ok": True, **result}))
        else:
            render(ui.stdout_console(), result)


def _render_export(console, output: Path, manifest: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"bundle {output}")
    for column in ("artifact", "file", "precision", "fidelity"):
        table.add_column(column)
    for artifact in manifest["artifacts"]:
        fid = artifact.get("fidelity") or {}
        parts = []
        if fid.get("accuracy") is not None:
            parts.append(f"accuracy {fid['accuracy_reference']:.2%} → {fid['accuracy']:.2%}")
        if fid.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {fid['top1_agreement']:.1%}")
        if fid.get("mean_cosine") is not None:
            parts.append(f"cosine {fid['mean_cosine']:.4f}")
        table.add_row(artifact["name"], artifact["file"], artifact["precision"], ", ".join(parts) or "parity passed" if artifact["precision"] == "fp32" else ", ".join(parts))
    console.print(table)
    parity = manifest["parity"]
    console.print(f"parity vs PyTorch: {'passed' if parity['ok'] else 'FAILED'} (rtol {parity['rtol']}, atol {parity['atol']} "
                  f"x max(1, |output|)) on {len(parity['cases'])} input batches")
    for note in manifest["notes"]:
        console.print(f"note: {escape(note)}")
    console.print(f"TensorRT: build on the device with {output}/build_engine.sh")


def _fp32_layers(value: str) -> int | str:
    """--int8-fp32-layers: auto or a whole number."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        return value  # quantize_int8 names the problem and the fix


def _check_dynamic_batch(loaded) -> None:
    """The bundle's ONNX has a dynamic batch and parity runs at batch 1 and 7, which a program fixed at one batch
    (torch.export's default) cannot run."""
    from .io import fixed_batch

    batch = fixed_batch(loaded.program) if loaded.program is not None else None
    if batch is not None:
        raise SrcompressError(f"{loaded.path} is a torch.export program with its batch fixed at {batch}; the export needs a "
                              "dynamic batch (the ONNX has one, and parity runs at batch 1 and 7)",
                              "re-export it with dynamic_shapes={'x': {0: torch.export.Dim.AUTO}}, or export the nn.Module "
                              "(a pickle, or a state dict with --arch)")
