"""INT8 (static QDQ, ONNX Runtime's quantization tools) and fp16 ONNX, with fidelity against the fp32 ONNX.

INT8 uses ``onnxruntime.quantization.quantize_static`` in QDQ format, calibrated on srcompress calibration
batches: weights per-channel symmetric int8; activations symmetric int8 by default (zero point 0, the form
TensorRT 10 and 11 consume), or asymmetric uint8 (``activations="u8"``, ONNX Runtime only). fp16 uses
``onnxruntime.transformers.float16`` with fp32 inputs and outputs kept. Neither is gated by the fp32 parity
tolerances; both are reported as fidelity: max abs diff, mean cosine, top-1 agreement and, with labels,
accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SrcompressError
from .onnx import _quiet_exporter, run_session, save_onnx, session


# Weighted ops only: LayerNorm, Softmax and element-wise ops stay fp32 (quantizing them ruins transformers).
OP_TYPES = ("Conv", "Gemm", "MatMul")


def _reader(names: list[str], batches: list[tuple]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds srcompress calibration batches to the ONNX Runtime calibrator."""

        def __init__(self):
            self._items = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in batches])

        def get_next(self):
            return next(self._items, None)

    return Reader()


def quantize_int8(fp32_path: Path, out_path: Path, batches: list[tuple], *, activations: str = "s8", method: str = "minmax",
                  exclude: tuple[str, ...] = (), external_threshold: int | None = None) -> dict:
    """Static INT8 QDQ of ``fp32_path`` into ``out_path``; returns the scheme (for the manifest)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activations not in ("s8", "u8"):
        raise SrcompressError(f"--int8-activations {activations!r} is not s8 or u8", "use s8 (TensorRT-compatible) or u8")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise SrcompressError(f"--int8-method {method!r} is unknown", f"use one of {', '.join(methods)}")
    names = [i.name for i in session(fp32_path).get_inputs()]
    scratch = Path(tempfile.mkdtemp(prefix="srcompress-int8-"))
    try:
        pre = scratch / "pre.onnx"
        with _quiet_exporter(), _quiet_logging():
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, save_as_external_data=True,
                                  all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the plain model then
                shutil.copy(fp32_path, pre)
                data = fp32_path.with_name(fp32_path.name + ".data")
                if data.exists():
                    shutil.copy(data, scratch / data.name)
            raw = scratch / "int8.onnx"
            quantize_static(str(pre), str(raw), _reader(names, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                            calibrate_method=methods[method], nodes_to_exclude=list(exclude), op_types_to_quantize=list(OP_TYPES),
                            use_external_data_format=True,
                            extra_options={"ActivationSymmetric": activations == "s8", "WeightSymmetric": True})
        model = onnx.load(str(raw))
        files = save_onnx(model, out_path, **({"external_threshold": external_threshold} if external_threshold else {}))
        counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"precision": "int8", "format": "QDQ (onnxruntime.quantization.quantize_static)",
            "weights": "int8 per-channel symmetric",
            "activations": "int8 per-tensor symmetric (zero point 0)" if activations == "s8" else "uint8 per-tensor asymmetric",
            "calibration_method": method, "calibration_samples": sum(int(b[0].shape[0]) for b in batches),
            "op_types": list(OP_TYPES), "excluded_nodes": list(exclude), "qdq_nodes": counts, "files": [f.name for f in files]}


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization warns on the root logger (e.g. per-channel axes of LayerNorm weights)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def convert_fp16(fp32_path: Path, out_path: Path) -> dict:
    """fp16 weights and compute, fp32 inputs and outputs (casts at the edges)."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as err:
        raise SrcompressError("fp16 conversion needs onnxruntime.transformers", "pip install onnxruntime") from err
    model = onnx.load(str(fp32_path))
    with _quiet_exporter():
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    files = save_onnx(half, out_path)
    return {"precision": "fp16", "format": "onnxruntime.transformers.float16 (keep_io_types)",
            "weights": "fp16", "activations": "fp16 (fp32 at inputs and outputs)", "files": [f.name for f in files]}


def fidelity(reference_path: Path, candidate_path: Path, batches: list[tuple], labels: torch.Tensor | None = None,
             dataset: str = "") -> dict:
    """How far ``candidate`` is from ``reference`` (both ONNX) on ``batches``: first output compared."""
    ref_sess, cand_sess = session(reference_path), session(candidate_path)
    max_abs, cosines, agree, total = 0.0, [], 0, 0
    ref_correct = cand_correct = 0
    classify = None
    for batch in batches:
        ref = run_session(ref_sess, batch)[0].astype(np.float64)
        out = run_session(cand_sess, batch)[0].astype(np.float64)
        max_abs = max(max_abs, float(np.abs(ref - out).max()))
        a, b = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.extend((np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)).tolist())
        classify = ref.ndim == 2 and ref.shape[1] > 1
        if classify:
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            total += len(ref)
    result = {"dataset": dataset, "samples": sum(int(b[0].shape[0]) for b in batches), "max_abs_diff": max_abs,
              "mean_cosine": float(np.mean(cosines)) if cosines else None,
              "top1_agreement": agree / total if classify and total else None}
    if labels is not None and classify:
        offset = 0
        for batch in batches:
            n = int(batch[0].shape[0])
            truth = labels[offset:offset + n].numpy()
            ref_correct += int((run_session(ref_sess, batch)[0].argmax(1) == truth).sum())
            cand_correct += int((run_session(cand_sess, batch)[0].argmax(1) == truth).sum())
            offset += n
        result["accuracy_reference"] = ref_correct / offset
        result["accuracy"] = cand_correct / offset
        result["accuracy_change_points"] = 100 * (cand_correct - ref_correct) / offset
    return result


def heldout_set(source: str | None, model=None, count: int = 256) -> tuple[list[tuple], torch.Tensor | None, str] | None:
    """Held-out evaluation data for a bundled calibration source (never the calibration samples themselves)."""
    from .. import assets

    if source == "mnist5k":
        x, y = assets.mnist5k("test")
        return [(c,) for c in x.split(100)], y, f"MNIST-5k held-out test split ({len(y)} images, labels)"
    if source == "photos":
        x = assets.image_crops("test", count)
        return [(c,) for c in x.split(32)], None, f"{count} crops of the nine evaluation photos (disjoint from calibration)"
    if source == "sentences":
        from ..calib.data import _text_set

        texts = assets.sentences("test", count)
        batches = _text_set(texts, None, model, 32, "test sentences", 0).batches
        return batches, None, f"{len(texts)} held-out test sentences"
    return None
