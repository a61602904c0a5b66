"""Write a deployment bundle: ONNX (fp32, optional fp16/INT8), baseline, TensorRT script/engines, manifest.

Everything is written into a temporary folder beside the output and renamed into place at the end, so a
failed export leaves nothing behind and an existing bundle is replaced only with ``force``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__, ui
from ..errors import SrcompressError
from . import manifest as manifest_mod
from ..io import flatten_outputs
from .onnx import max_sequence, check_opset, export_onnx, is_text_input, parity_cases
from .quantize import TARGET_ERROR, check_int8_options, convert_fp16, fidelity, heldout_set, quantize_int8
from .tensorrt import build_engine, build_script, profile_from_io, tensorrt_available, trtexec_command

FORMATS = ("onnx", "tensorrt", "all")
TEXT_MAX_LENGTH = 256  # the tokenizer truncation srcompress.calib.data uses for text calibration


@dataclass
class ExportOptions:
    fmt: str = "onnx"
    int8: bool = False
    fp16: bool = False
    int8_activations: str = "s8"
    int8_method: str = "minmax"
    int8_fp32_layers: int | str = "auto"
    int8_target_error: float = TARGET_ERROR
    opset: int | None = None
    simplify: bool = True
    opt_batch: int = 8
    max_batch: int = 32
    max_seq: int | None = None  # None: TEXT_MAX_LENGTH, or the model's longest sequence when shorter
    workspace_mib: int = 1024
    external_threshold: int | None = None
    force: bool = False
    notes: list[str] = field(default_factory=list)


def check_request(output: Path, options: ExportOptions, calibration_source: str | None) -> Path:
    """Reject bad requests before any work: unknown format, INT8 without data, an existing output."""
    if options.fmt not in FORMATS:
        raise SrcompressError(f"unknown export format {options.fmt!r}", f"use --format {'|'.join(FORMATS)}")
    if options.int8 and not calibration_source:
        raise SrcompressError("--int8 needs calibration data", "pass --calib DATA (a file, an image folder, or mnist5k/photos/sentences)")
    if options.int8:
        check_int8_options(options.int8_activations, options.int8_method, options.int8_fp32_layers, options.int8_target_error)
    check_opset(options.opset)
    for flag, value in (("--workspace-mib", options.workspace_mib), ("--max-seq", options.max_seq),
                        ("--opt-batch", options.opt_batch), ("--max-batch", options.max_batch)):
        if value is not None and value < 1:
            raise SrcompressError(f"{flag} {value} is not a positive number", f"pass {flag} 1 or more, or leave it out")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise SrcompressError(f"output {output} exists and is not a folder", "choose another -o")
    if output.exists() and not options.force:
        raise SrcompressError(f"output folder {output} already exists", "pass --force to replace it or choose another -o")
    if output.exists():
        _check_replaceable(output)
    parent = output.resolve().parent
    if not parent.is_dir():
        raise SrcompressError(f"parent folder {parent} does not exist", "create it or choose another -o")
    return output


def _check_replaceable(output: Path) -> None:
    """--force replaces a folder only if it is an earlier bundle: nothing in it but manifest.json and the files it
    lists, and it does not hold the working folder (``-o .`` would otherwise delete the user's files)."""
    import json

    from .manifest import MANIFEST

    here = Path.cwd().resolve()
    if output.resolve() == here or output.resolve() in here.parents:
        raise SrcompressError(f"output {output} is the current folder or holds it", "give a new folder name with -o, e.g. -o model.bundle")
    try:
        listed = set(json.loads((output / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SrcompressError(f"output folder {output} is not an srcompress bundle (no readable manifest.json)",
                              "--force only replaces an earlier bundle; choose another -o") from None
    others = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file() and p.name != MANIFEST
                    and str(p.relative_to(output)) not in listed)
    if others:
        raise SrcompressError(f"output folder {output} holds {others[0]!r}, which is not part of its bundle",
                              "--force only replaces an earlier bundle; move that file or choose another -o")


def _git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "tensorrt": tensorrt_available()}
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except ImportError:
        versions["onnxslim"] = None
    return versions


def _preprocessing(source: str | None, image_size: int, tokenizer: str | None, max_seq: int) -> dict | None:
    from .. import assets

    if source == "mnist5k":
        return {"layout": "NCHW", "size": [28, 28], "scale": "pixels / 255", "mean": [assets.MNIST_MEAN], "std": [assets.MNIST_STD]}
    if source == "photos" or (source and Path(source).is_dir()):
        return {"layout": "NCHW", "resize": [image_size, image_size], "scale": "pixels / 255", "color": "RGB",
                "mean": list(assets.IMAGENET_MEAN), "std": list(assets.IMAGENET_STD)}
    if source == "sentences" or (source and source.endswith(".txt")):
        return {"tokenizer": tokenizer or "the model's own (config._name_or_path)", "padding": "none within a batch",
                "max_length": max_seq}
    return None


def _calibration_hash(batches: list[tuple]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for t in batch:
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _layers(module, inputs: tuple, folder: Path, precisions: list[str]) -> tuple[list[dict], bool, dict[str, str]]:
    """Per weight matrix: op, shape, pattern, density, and its precision in each ONNX file (fp32 in model.onnx; read
    from model.fp16.onnx and model.int8.onnx, so a layer quantization kept fp32 says fp32). Also whether any layer
    is 2:4, and the int8 file's ONNX node -> layer name."""
    from ..compress.layers import trace_layers
    from ..compress.patterns import detect_pattern

    layers, _ = trace_layers(module, tuple(t[:1] for t in inputs))
    node_layer: dict[str, str] = {}
    found: dict[str, dict[str, set[str]]] = {layer.name: {"fp32": {"fp32"}} for layer in layers}
    for precision in precisions[1:]:
        for node, layer, used in onnx_layer_precisions(folder / f"model.{precision}.onnx", layers):
            if precision == "int8":
                node_layer[node] = layer
            found[layer].setdefault(precision, set()).add(used)
    rows, has_24 = [], False
    for layer in layers:
        weight = layer.param.detach()
        pattern = detect_pattern(layer, weight)
        has_24 = has_24 or pattern == "2:4"
        seen = found[layer.name]
        rows.append({"name": layer.name, "op": layer.op, "shape": list(layer.shape), "pattern": pattern,
                     "density": int(torch.count_nonzero(weight)) / max(weight.numel(), 1),
                     "precision": {p: "/".join(sorted(seen[p])) if p in seen else "unknown (no matching ONNX weight)"
                                   for p in precisions}})
    return rows, has_24, node_layer


def _onnx_weights(path: Path):
    """(node name, precision, weight) of every Conv/Gemm/MatMul whose weight is a constant: an fp32/fp16 initializer,
    or an int8/uint8 one behind a DequantizeLinear (dequantized)."""
    import onnx
    from onnx import numpy_helper

    from .quantize import WEIGHTED_OPS

    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def resolve(name):
        if name in init:
            array = numpy_helper.to_array(init[name])
            kind = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}.get(array.dtype)
            return (kind, array) if kind else None
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in init or node.input[1] not in init:
            return None
        q = numpy_helper.to_array(init[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(init[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] in init else np.zeros_like(scale))
        if scale.ndim == 1 and q.ndim > 1:
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return "int8", (q - zero) * scale

    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        for name in node.input[:2]:
            hit = resolve(name)
            if hit is not None and hit[1].ndim >= 2:
                yield node.name, hit[0], hit[1]
                break


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row (output channel) scaled to length 1; zero rows stay zero."""
    rows = matrix.reshape(matrix.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def onnx_layer_precisions(path: Path, layers) -> list[tuple[str, str, str]]:
    """(node, layer name, precision) for the weighted ONNX nodes of ``path`` whose weight is a layer's: same shape (or
    transposed) and every output row pointing the same way (|cosine| >= 0.99), so batch-norm folding (a scale per
    output channel) and INT8 rounding still match while unrelated weights never do."""
    candidates = []
    for layer in layers:
        weight = layer.param.detach().float().numpy()
        candidates.append((layer.name, weight.shape, _unit_rows(weight)))
    out = []
    for node, precision, weight in _onnx_weights(path):
        views = [(v.shape, _unit_rows(v)) for v in ((weight,) if weight.ndim != 2 else (weight.T, weight))]
        name = next((name for name, shape, unit in candidates
                     if any(s == shape and _same_rows(u, unit) for s, u in views)), None)
        if name is not None:
            out.append((node, name, precision))
    return out


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    zero_a, zero_b = ~a.any(1), ~b.any(1)
    if not np.array_equal(zero_a, zero_b):
        return False
    return bool((np.abs(np.sum(a * b, axis=1))[~zero_a] >= 0.99).all())


def _save_program(program, path: Path) -> bool:
    if program is None:
        return False
    try:
        torch.export.save(program, str(path))
        return True
    except Exception:  # noqa: BLE001 - the eager artifact is optional
        return False


def _make_readable(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        mode = (0o777 if os.access(file, os.X_OK) and file.suffix == ".sh" else 0o666) & ~umask
        file.chmod(mode)
    folder.chmod(0o777 & ~umask)


def export_bundle(module, inputs: tuple, output: Path, options: ExportOptions, *, model_name: str, model_sha256: str | None,
                  calibration=None, calibration_source: str | None = None, image_size: int = 224, tokenizer: str | None = None,
                  baseline=None) -> dict:
    """Export ``module`` (and the optional ``baseline`` LoadedModel) into ``output``; returns the manifest."""
    output = check_request(output, options, calibration_source)
    notes = list(options.notes)
    if calibration is not None:
        inputs = tuple(t[:2] for t in calibration.batches[0])
    if baseline is not None:
        _check_baseline(module, baseline.module, inputs)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.resolve().parent))
    try:
        manifest = _export_into(scratch, module, inputs, options, notes, model_name, model_sha256, calibration,
                                calibration_source, image_size, tokenizer, baseline)
        _make_readable(scratch)
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.resolve().parent))
            os.replace(output, trash / "bundle")
            os.replace(scratch, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(scratch, output)
        return manifest
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _check_baseline(module, base, inputs: tuple) -> None:
    """The baseline must run on the model's inputs and give a first output of the same shape (the same task)."""
    from ..inputs import run_model

    fix = "pass as --baseline the original (dense) version of the same model"
    got = flatten_outputs(run_model(base, inputs, what="the model's inputs", fix=fix, subject="the baseline"))
    want = flatten_outputs(run_model(module, inputs))
    if not got or got[0].shape != want[0].shape:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise SrcompressError(f"the baseline's output {list(got[0].shape) if got else 'nothing'} differs in shape from the "
                              f"model's {list(want[0].shape)} on inputs {shapes}", fix)


def _sequence_lengths(module, inputs: tuple, options: ExportOptions, calibration) -> tuple[int | None, int]:
    """TensorRT opt and max sequence for text inputs: the median calibration length (tokens under the attention
    mask, else the batch width), and --max-seq or TEXT_MAX_LENGTH, capped by the model's longest sequence."""
    if not any(is_text_input(t) for t in inputs):
        return None, options.max_seq or TEXT_MAX_LENGTH
    longest = max_sequence(module)
    if options.max_seq is not None and options.max_seq > longest:
        raise SrcompressError(f"--max-seq {options.max_seq} exceeds the model's longest sequence ({longest} positions)",
                              f"pass --max-seq {longest} or less")
    max_seq = options.max_seq or min(TEXT_MAX_LENGTH, longest)
    lengths = []
    for batch in (calibration.batches if calibration is not None else [inputs]):
        mask = batch[1] if len(batch) > 1 and is_text_input(batch[1]) and bool(((batch[1] == 0) | (batch[1] == 1)).all()) else None
        lengths += mask.sum(1).tolist() if mask is not None else [int(batch[0].shape[1])] * int(batch[0].shape[0])
    return int(min(max(1, np.median(lengths)), max_seq)), max_seq


def _export_into(folder: Path, module, inputs, options, notes, model_name, model_sha256, calibration, calibration_source,
                 image_size, tokenizer, baseline) -> dict:
    opt_seq, max_seq = _sequence_lengths(module, inputs, options, calibration)
    extra = {"external_threshold": options.external_threshold} if options.external_threshold else {}
    parity_batches = calibration.batches[:8] if calibration is not None else None
    with ui.phase("exporting model.onnx and checking parity in ONNX Runtime"):
        report = export_onnx(module, inputs, folder / "model.onnx", parity_batches=parity_batches, opset=options.opset,
                             simplify=options.simplify, keep_program=True, **extra)
    program = report.pop("program", None)
    notes += report.pop("notes")
    files = list(report["files"])
    artifacts = [{"name": "onnx-fp32", "file": "model.onnx", "runtime": "onnxruntime", "precision": "fp32", "role": "compressed"}]
    if _save_program(program, folder / "model.pt2"):
        files.append("model.pt2")
        artifacts.append({"name": "torch-eager", "file": "model.pt2", "runtime": "torch", "precision": "fp32", "role": "compressed"})
    cases = parity_cases(parity_batches or _single(inputs))
    sample = cases[1] if len(cases) > 1 else cases[0]
    names = [spec["name"] for spec in report["io"]["inputs"]]
    np.savez(folder / "sample_inputs.npz", **{n: t.numpy() for n, t in zip(names, sample)})
    files.append("sample_inputs.npz")

    baseline_info = None
    if baseline is not None:
        with ui.phase("exporting the baseline (dense) model"):
            base = export_onnx(baseline.module, inputs, folder / "baseline.onnx", parity_batches=parity_batches, opset=options.opset,
                               simplify=options.simplify, keep_program=True, **extra)
        files += base["files"]
        artifacts.append({"name": "baseline-onnx-fp32", "file": "baseline.onnx", "runtime": "onnxruntime", "precision": "fp32",
                          "role": "baseline"})
        if _save_program(base.pop("program", None), folder / "baseline.pt2"):
            files.append("baseline.pt2")
            artifacts.append({"name": "baseline-torch-eager", "file": "baseline.pt2", "runtime": "torch", "precision": "fp32",
                              "role": "baseline"})
        baseline_info = {"sha256": baseline.sha256, "params": sum(p.numel() for p in baseline.module.parameters()),
                         "parity_ok": base["parity"]["ok"]}
    else:
        notes.append("no --baseline given: bench cannot compare with the dense model")

    heldout = None
    if options.int8 or options.fp16:
        heldout = heldout_set(calibration_source, module)
        if heldout is None:
            source_batches = calibration.batches if calibration is not None else cases
            heldout = (source_batches, None, "calibration/parity inputs (no held-out set is known for this source)")
    if options.int8:
        with ui.phase(f"INT8 QDQ quantization on {len(calibration)} calibration samples"):
            scheme = quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", calibration.batches,
                                   activations=options.int8_activations, method=options.int8_method,
                                   fp32_layers=options.int8_fp32_layers, target_error=options.int8_target_error)
        with ui.phase("measuring INT8 fidelity"):
            fid = fidelity(folder / "model.onnx", folder / "model.int8.onnx", heldout[0], heldout[1], heldout[2])
        files += scheme["files"]
        artifacts.append({"name": "onnx-int8", "file": "model.int8.onnx", "runtime": "onnxruntime", "precision": "int8",
                          "role": "compressed", "quantization": scheme, "fidelity": fid})
    if options.fp16:
        with ui.phase("fp16 conversion"):
            scheme = convert_fp16(folder / "model.onnx", folder / "model.fp16.onnx")
            fid = fidelity(folder / "model.onnx", folder / "model.fp16.onnx", heldout[0], heldout[1], heldout[2])
        files += scheme["files"]
        artifacts.append({"name": "onnx-fp16", "file": "model.fp16.onnx", "runtime": "onnxruntime", "precision": "fp16",
                          "role": "compressed", "quantization": scheme, "fidelity": fid})

    precisions = ["fp32"] + (["fp16"] if options.fp16 else []) + (["int8"] if options.int8 else [])
    layers, has_24, node_layer = _layers(module, inputs, folder, precisions)
    for artifact in artifacts:  # the manifest names layers as compression.layers does; the ONNX nodes stay as fp32_nodes
        scheme = artifact.get("quantization") or {}
        if "fp32_layers" in scheme:
            scheme["fp32_nodes"] = scheme["fp32_layers"]
            scheme["fp32_layers"] = [node_layer.get(node, f"{node} (ONNX node without a matching layer)")
                                     for node in scheme["fp32_nodes"]]
    profile = profile_from_io(report["io"]["inputs"], options.opt_batch, options.max_batch, opt_seq, max_seq)
    engines = list(precisions)
    if options.int8 and options.int8_activations == "u8":
        engines.remove("int8")
        notes.append("--int8-activations u8 (asymmetric uint8) is for ONNX Runtime only: TensorRT takes symmetric int8 "
                     "Q/DQ, so build_engine.sh builds no INT8 engine; export with --int8-activations s8 for TensorRT")
    script = folder / "build_engine.sh"
    script.write_text(build_script(engines, profile, sparse=has_24, workspace_mib=options.workspace_mib))
    script.chmod(0o755)
    files.append("build_engine.sh")
    trt = {"installed": tensorrt_available(), "sparse_weights": has_24, "workspace_mib": options.workspace_mib,
           "profile": {name: {"min": list(lo), "opt": list(mid), "max": list(hi)} for name, (lo, mid, hi) in profile.shapes.items()},
           "commands": {f"trt{major}": {p: trtexec_command(p, profile, trt_major=major, sparse=has_24,
                                                            workspace_mib=options.workspace_mib) for p in engines}
                        for major in (10, 11)},
           "engines": []}
    if options.fmt in ("tensorrt", "all"):
        if trt["installed"] is None:
            notes.append("TensorRT is not installed here: wrote the ONNX files and build_engine.sh; run it on the target "
                         "device (pip install 'srcompress[tensorrt]' to build here)")
        else:
            for precision in engines:
                with ui.phase(f"building the TensorRT {precision} engine"):
                    record = build_engine(folder / ("model.onnx" if precision == "fp32" else f"model.{precision}.onnx"),
                                          folder / f"model.{precision}.plan", precision, profile, sparse=has_24,
                                          workspace_mib=options.workspace_mib, timing_cache=folder / "timing.cache")
                trt["engines"].append(record)
                files.append(record["engine"])
                artifacts.append({"name": f"tensorrt-{precision}", "file": record["engine"], "runtime": "tensorrt",
                                  "precision": precision, "role": "compressed"})
            files.append("timing.cache")

    preprocessing = _preprocessing(calibration_source, image_size, tokenizer, max_seq)
    io = report["io"]
    for spec in io["inputs"]:
        spec["preprocessing"] = preprocessing
        spec["semantics"] = ("token ids" if spec["name"] == "input_ids" else "attention mask (1 = token)"
                             if spec["name"] == "attention_mask" else None)
    for spec in io["outputs"]:
        spec["semantics"] = None
    manifest = {
        "schema_version": 1,
        "model": {"name": model_name, "sha256": model_sha256, "srcompress": __version__, "git_sha": _git_sha(),
                  "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "baseline_sha256": baseline_info["sha256"] if baseline_info else None},
        "versions": _versions(),
        "io": io,
        "onnx": {k: v for k, v in report.items() if k not in ("io", "parity", "files")},
        "compression": {"layers": layers, "params": sum(p.numel() for p in module.parameters()),
                        "baseline_params": baseline_info["params"] if baseline_info else None, "has_2_4": has_24},
        "calibration": ({"source": calibration_source, "description": calibration.description, "samples": len(calibration),
                         "seed": int(calibration.provenance.get("seed", 0)), "sha256": _calibration_hash(calibration.batches)}
                        if calibration is not None else None),
        "artifacts": artifacts,
        "parity": report["parity"],
        "tensorrt": trt,
        "files": manifest_mod.file_table(folder, files),
        "latency": None,
        "notes": notes,
    }
    manifest_mod.write(folder, manifest)
    return manifest


def _single(inputs: tuple) -> list[tuple]:
    from .onnx import example_batches

    return example_batches(inputs)
