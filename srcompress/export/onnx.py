"""PyTorch → ONNX for deployment: named I/O, dynamic batch (and sequence) axes, onnxslim, checker, parity.

:func:`export_onnx` is the one entry point; it returns a plain dict (the ``onnx`` part of the manifest). The
model is traced once with ``torch.export`` (dynamic dims named ``batch`` and ``sequence``) and the program
is converted with the dynamo exporter; when tracing fails, the legacy TorchScript exporter is tried with
``dynamic_axes``. Parity runs the final file in ONNX Runtime against PyTorch on every given input batch
and raises :class:`~srcompress.errors.SrcompressError` when any output is outside the tolerances.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SrcompressError
from ..inputs import set_eval
from ..io import _flat_output_view, flatten_outputs

# fp32 parity: |onnx - torch| <= ATOL * max(1, max|torch output|) + RTOL * |torch| elementwise, every output.
RTOL, ATOL = 1e-3, 1e-4
DEFAULT_EXTERNAL_THRESHOLD = 1 << 30  # weights above 1 GiB go to <name>.onnx.data (protobuf caps files at 2 GB)
MAX_BATCH = 4096
MIN_OPSET = 7


def check_opset(opset: int | None) -> None:
    """``--opset`` must be one the installed onnx package defines (None: the exporter's default)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise SrcompressError(f"--opset {opset} is outside the opsets onnx {onnx.__version__} defines ({MIN_OPSET} to {newest})",
                              f"pass --opset {MIN_OPSET}..{newest}, or leave it out for the exporter's default")


def check_float32(module: nn.Module, what: str = "the model") -> None:
    """Export traces and checks parity in fp32: half- or double-precision weights are refused with the fix."""
    dtypes = {str(t.dtype).replace("torch.", "") for t in (*module.parameters(), *module.buffers())
              if t.is_floating_point() and t.dtype != torch.float32}
    if dtypes:
        raise SrcompressError(f"{what} has {', '.join(sorted(dtypes))} weights; export needs a float32 model",
                              "export the float32 model (model.float()) and add --fp16 for a half-precision ONNX")


def is_text_input(t: torch.Tensor) -> bool:
    """Token ids / attention masks: integer tensors of shape (batch, sequence)."""
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2


def input_names(module: nn.Module, inputs: tuple) -> list[str]:
    """The forward signature's parameter names for the given positional inputs (``input_i`` when unnamed)."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:len(inputs)]]
    if len(names) < len(inputs) or len(set(names)) < len(names):
        names = [f"input_{i}" for i in range(len(inputs))]
    return names


def output_names(module: nn.Module, inputs: tuple) -> list[str]:
    """Names of the flattened outputs: a Hugging Face ModelOutput's keys, else ``output`` / ``output_i``."""
    with torch.no_grad():
        out = module(*inputs)
    count = len(flatten_outputs(out))
    if hasattr(out, "keys") and not isinstance(out, torch.Tensor):
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(keys) == count:
            return keys
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def dynamic_axes_for(inputs: tuple) -> list[dict[int, str]]:
    """Axis 0 is ``batch`` for every input; axis 1 of token-id / mask inputs is ``sequence``."""
    return [({0: "batch", 1: "sequence"} if is_text_input(t) else {0: "batch"}) if t.dim() > 0 else {} for t in inputs]


def _trace_inputs(inputs: tuple) -> tuple:
    """Batch (and sequence) at least 2, so torch.export does not specialise them to 1."""
    out = []
    for t in inputs:
        if t.dim() > 0 and t.shape[0] == 1:
            t = torch.cat([t, t])
        if is_text_input(t) and t.shape[1] == 1:
            t = torch.cat([t, t], dim=1)
        out.append(t)
    return tuple(out)


def max_sequence(module: nn.Module) -> int:
    """Longest sequence the model takes: its config's, else the rows of a position-embedding table (a module
    unlifted from a .pt2 has no config but keeps its parameter names), else 4096."""
    config = getattr(module, "config", None)
    if getattr(config, "max_position_embeddings", 0):
        return int(config.max_position_embeddings)
    rows = [p.shape[0] for name, p in module.named_parameters() if "position" in name and name.endswith("weight") and p.dim() == 2]
    return int(min(rows)) if rows else 4096


def _rename_dims(model, axes: list[dict[int, str]]) -> None:
    """Give the exporter's symbolic dims (s0, s43, ...) the names ``batch`` and ``sequence`` everywhere."""
    mapping: dict[str, str] = {}
    for value, dims in zip(model.graph.input, axes):
        shape = value.type.tensor_type.shape.dim
        for axis, name in dims.items():
            if axis < len(shape) and shape[axis].dim_param:
                mapping[shape[axis].dim_param] = name
            elif axis < len(shape):
                shape[axis].dim_param = name
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def io_signature(model) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX model: name, dtype and shape (ints, or names for dynamic dims)."""
    import onnx

    def describe(value):
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}

    initializers = {i.name for i in model.graph.initializer}
    return {"inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in model.graph.output]}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress and, when tracing fails, graph dumps (on stdout, which --json needs, on stderr and
    through torch's loggers); all of it is dropped, and a failure reaches the user as one line."""
    import io
    import logging

    loggers = [logging.getLogger(name) for name in ("torch", *logging.root.manager.loggerDict) if name.startswith("torch")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def trace_program(module: nn.Module, inputs: tuple):
    """torch.export the model (outputs flattened) with named dynamic dims; returns (program, trace inputs)."""
    from torch.export import Dim

    set_eval(module)
    trace = _trace_inputs(inputs)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    sequence = Dim("sequence", min=1, max=max_sequence(module))
    shapes = tuple({axis: (batch if name == "batch" else sequence) for axis, name in dims.items()} for dims in dynamic_axes_for(trace))
    wrapped = _flat_output_view(module, trace)
    with _quiet_exporter():
        program = torch.export.export(wrapped, trace, dynamic_shapes=shapes, strict=False)
    return program, trace


def _export_raw(module: nn.Module, inputs: tuple, path: Path, names_in: list[str], names_out: list[str], opset: int | None,
                notes: list[str]):
    """Write ``path`` (weights possibly in external data); returns (exporter used, torch.export program or None)."""
    trace = _trace_inputs(inputs)
    try:
        program, trace = trace_program(module, inputs)
        with _quiet_exporter():
            torch.onnx.export(program, trace, str(path), input_names=names_in, output_names=names_out, opset_version=opset,
                              external_data=True, verbose=False, optimize=True)
        return "dynamo", program
    except Exception as err:  # noqa: BLE001 - fall back to the legacy exporter, and say why
        dynamo_reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        notes.append(f"the dynamo exporter failed ({dynamo_reason}); used the legacy TorchScript exporter")
    axes = {name: dims for name, dims in zip(names_in, dynamic_axes_for(trace))}
    axes.update({name: {0: "batch"} for name in names_out})
    wrapped = _flat_output_view(module, trace)
    try:
        with _quiet_exporter(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            torch.onnx.export(wrapped, trace, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                              dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True)
    except Exception as err:  # noqa: BLE001
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SrcompressError(f"neither ONNX exporter could export the model (torch.export: {dynamo_reason}; legacy: {reason})",
                              "check that the model runs under torch.export, or report the operator that fails") from err
    _refuse_frozen_branches(caught, notes)
    return "legacy", None


def _refuse_frozen_branches(caught: list, notes: list[str]) -> None:
    """The legacy tracer records one path through Python control flow: a branch on a tensor's value is frozen into
    the graph, and parity on inputs that take the same branch cannot see it. Such a trace is refused; other tracer
    warnings (a tensor read as a Python number) become notes."""
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    where = lambda w: f"{Path(w.filename).name}:{w.lineno}"  # noqa: E731
    frozen = sorted({where(w) for w in tracer if "Python boolean" in str(w.message)})
    if frozen:
        raise SrcompressError(f"the model branches on a tensor's value ({', '.join(frozen[:3])}) and the fallback exporter "
                              "would freeze one branch into the ONNX for every input",
                              "make the branch traceable (torch.where or torch.cond) so torch.export can capture it")
    constants = sorted({where(w) for w in tracer})
    if constants:
        notes.append(f"the legacy tracer read tensor values as Python constants at {', '.join(constants[:3])}; the ONNX "
                     "assumes they never change, checked only on the parity inputs")


def weight_bytes(model) -> int:
    from onnx import numpy_helper

    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) * numpy_helper.to_array(init).dtype.itemsize if init.dims else 0
    return total


def save_onnx(model, path: Path, external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD) -> list[Path]:
    """Save the model, with weights in ``<name>.data`` when they exceed ``external_threshold`` bytes; returns the files."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if weight_bytes(model) > external_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def check_onnx(path: Path) -> None:
    """``onnx.checker`` by path (so external data is found), with shape inference."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # noqa: BLE001 - checker and shape-inference errors alike
        raise SrcompressError(f"{path.name} fails onnx.checker ({str(err).strip().splitlines()[0][:200]})",
                              "report the model and the exporter version; try --opset") from err


def session(path: Path, threads: int | None = None, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads must not steal the CPU
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def torch_outputs(module: nn.Module, inputs: tuple) -> list[np.ndarray]:
    set_eval(module)
    with torch.no_grad():
        return [t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy() for t in flatten_outputs(module(*inputs))]


def run_session(sess, inputs: tuple) -> list[np.ndarray]:
    feeds = {meta.name: t.numpy() for meta, t in zip(sess.get_inputs(), inputs)}
    return [np.asarray(o) for o in sess.run(None, feeds)]


def compare(reference: list[np.ndarray], actual: list[np.ndarray], names: list[str], rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Per output: max abs diff, the scale the tolerance is relative to, and whether it is within tolerance."""
    rows, ok = [], len(reference) == len(actual)
    for name, ref, out in zip(names, reference, actual):
        if ref.shape != out.shape:
            rows.append({"output": name, "ok": False, "problem": f"shape {list(out.shape)} != {list(ref.shape)}"})
            ok = False
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        diff = np.abs(ref64 - out64)
        scale = max(1.0, float(np.abs(ref64).max()) if ref64.size else 1.0)
        within = bool(np.all(diff <= atol * scale + rtol * np.abs(ref64))) and bool(np.isfinite(out64).all())
        rows.append({"output": name, "shape": list(ref.shape), "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                     "scale": scale, "ok": within})
        ok = ok and within
    return {"ok": ok, "outputs": rows}


def parity(path: Path, module: nn.Module, cases: list[tuple], names: list[str], rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Run the ONNX file in ONNX Runtime and PyTorch on every case; a plain report (``ok`` false on any miss)."""
    sess = session(path)
    results = []
    for inputs in cases:
        result = compare(torch_outputs(module, inputs), run_session(sess, inputs), names, rtol, atol)
        result["input_shapes"] = [list(t.shape) for t in inputs]
        results.append(result)
    return {"runtime": "onnxruntime CPUExecutionProvider", "rtol": rtol, "atol": atol,
            "rule": "|onnx - torch| <= atol * max(1, max|torch|) + rtol * |torch|, elementwise, every output",
            "ok": all(r["ok"] for r in results), "cases": results}


def parity_cases(batches: list[tuple]) -> list[tuple]:
    """Batch 1 and batch 7 (rows cycled from the given batches); text inputs also at a second sequence length."""
    first = batches[0]
    text = any(is_text_input(t) for t in first)
    if text:
        lengths = sorted({int(b[0].shape[1]) for b in batches})
        longest = next(b for b in batches if int(b[0].shape[1]) == lengths[-1])
        shortest = next(b for b in batches if int(b[0].shape[1]) == lengths[0])
        if len(lengths) == 1 and lengths[0] > 2:  # one length only: cut a shorter copy
            cut = max(2, lengths[0] // 2)
            shortest = tuple(t[:, :cut].contiguous() for t in longest)
        cases = [tuple(t[:1] for t in shortest), _rows(longest, 7), _rows(shortest, 3)]
        padded = _padded(cases[1])
        return cases + ([padded] if padded else [])
    pool = tuple(torch.cat([b[i] for b in batches]) for i in range(len(first)))
    return [tuple(t[:1] for t in pool), _rows(pool, 7)]


def _padded(batch: tuple) -> tuple | None:
    """The batch with the second half of every other row masked out, when its second input is an attention mask
    (0/1 values): a mask that only ever held ones could hide an exporter that specialised on it."""
    if len(batch) < 2 or not is_text_input(batch[1]) or not bool(((batch[1] == 0) | (batch[1] == 1)).all()) or batch[1].shape[1] < 2:
        return None
    mask = batch[1].clone()
    mask[::2, mask.shape[1] // 2:] = 0
    return (batch[0], mask, *batch[2:])


def _rows(batch: tuple, count: int) -> tuple:
    n = int(batch[0].shape[0])
    index = torch.arange(count) % n
    return tuple(t[index].contiguous() for t in batch)


def example_batches(inputs: tuple, seed: int = 0) -> list[tuple]:
    """Parity batches when no calibration data is given: the example input plus seeded perturbed copies."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(7):
        row = []
        for t in inputs:
            one = t[:1]
            if k and one.is_floating_point():
                one = one + 0.1 * torch.randn(one.shape, generator=gen, dtype=one.dtype) * (one.std() if one.numel() > 1 else 1)
            row.append(one)
        rows.append(tuple(row))
    return [tuple(torch.cat([r[i] for r in rows]) for i in range(len(inputs)))]


def export_onnx(module: nn.Module, example_inputs: tuple, path: Path, *, parity_batches: list[tuple] | None = None,
                opset: int | None = None, simplify: bool = True, external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
                rtol: float = RTOL, atol: float = ATOL, keep_program: bool = False) -> dict:
    """Export, simplify, check and verify ``module``; writes ``path`` (and ``path.data`` when large).

    Returns a plain dict: exporter, opset, I/O signature, dynamic axes, simplification, files and parity. Raises
    SrcompressError when the checker or parity fails (nothing is left at ``path`` then).
    """
    import onnx

    check_opset(opset)
    check_float32(module)
    set_eval(module)
    notes: list[str] = []
    names_in = input_names(module, example_inputs)
    names_out = output_names(module, example_inputs)
    axes = dynamic_axes_for(example_inputs)
    scratch = Path(tempfile.mkdtemp(prefix="srcompress-onnx-"))
    try:
        raw = scratch / "raw.onnx"
        exporter, program = _export_raw(module, example_inputs, raw, names_in, names_out, opset, notes)
        model = onnx.load(str(raw))  # loads external data too
        written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:  # the dynamo exporter keeps opset 18 when it cannot convert
            raise SrcompressError(f"the {exporter} exporter could not convert the model to --opset {opset} (it wrote opset {written})",
                                  "pass a newer --opset, or leave it out for the exporter's default")
        _rename_dims(model, axes)
        nodes_before = len(model.graph.node)
        simplified = None
        if simplify:
            simplified = _slim(model, notes)
        cases = parity_cases(parity_batches or example_batches(example_inputs))
        chosen, report = None, None
        for candidate, label in ((simplified, "onnxslim"), (model, "exporter")):
            if candidate is None:
                continue
            files = save_onnx(candidate, path, external_threshold)
            check_onnx(path)
            report = parity(path, module, cases, names_out, rtol, atol)
            if report["ok"]:
                chosen = label
                break
            if label == "onnxslim":
                notes.append("the onnxslim-simplified model missed parity; kept the exporter's graph")
        if chosen is None:
            for file in (path, path.with_name(path.name + ".data")):
                if file.exists():
                    file.unlink()
            worst = max((o for c in report["cases"] for o in c["outputs"]), key=lambda o: o.get("max_abs_diff", float("inf")))
            raise SrcompressError(
                f"ONNX Runtime output differs from PyTorch beyond tolerance (output {worst['output']}: max abs diff "
                f"{worst.get('max_abs_diff', float('nan')):.3g} vs atol {atol} x scale {worst.get('scale', 1):.3g}, rtol {rtol})",
                "report the model and exporter version; try --opset or --no-simplify")
        final = onnx.load(str(path), load_external_data=False)
        result = {
            "exporter": exporter,
            "opset": next((o.version for o in final.opset_import if o.domain in ("", "ai.onnx")), None),
            "io": io_signature(final),
            "dynamic_axes": {name: {str(k): v for k, v in dims.items()} for name, dims in zip(names_in, axes)},
            "simplified": {"tool": "onnxslim" if chosen == "onnxslim" else None, "nodes_before": nodes_before,
                           "nodes_after": len(final.graph.node)},
            "external_data": len(files) > 1,
            "files": [f.name for f in files],
            "checker": "passed (onnx.checker.check_model by path, full_check)",
            "parity": report,
            "notes": notes,
        }
        if keep_program:
            result["program"] = program
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _slim(model, notes: list[str]):
    try:
        import onnxslim
    except ImportError:
        notes.append("onnxslim is not installed; the graph was not simplified")
        return None
    try:
        import onnx

        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnxslim may edit its argument
        with _quiet_exporter():
            return onnxslim.slim(copy)
    except Exception as err:  # noqa: BLE001 - simplification is optional
        notes.append(f"onnxslim failed ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]}); graph not simplified")
        return None
