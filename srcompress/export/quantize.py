"""INT8 (static QDQ, ONNX Runtime's quantization tools) and fp16 ONNX, with fidelity against the fp32 ONNX.

INT8 uses ``onnxruntime.quantization.quantize_static`` in QDQ format, calibrated on srcompress calibration
batches: weights per-channel symmetric int8 with empirical bias correction; activations symmetric int8 on the
inputs of weighted layers by default (zero point 0, the placement TensorRT 10 and 11 expect), or asymmetric
uint8 with Relu/Clip folded in (``activations="u8"``, ONNX Runtime's fast CPU form). The layers most sensitive
to INT8 can stay fp32 (``fp32_layers``, "auto" by default). fp16 uses ``onnxruntime.transformers.float16`` with
fp32 inputs and outputs kept. Neither is gated by the fp32 parity tolerances; both are reported as fidelity: max
abs diff, mean cosine, top-1 agreement and, with labels, accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..calib.data import first_batches
from ..errors import SrcompressError
from .onnx import _quiet_exporter, run_session, save_onnx, session


# Relative output error (squared error / squared output, first output, on calibration inputs) that "auto" aims for.
# Fidelity first: on MobileNetV2, 0.25 % keeps >= 95 % top-1 agreement on held-out photos where 1 % keeps 91-94 %
# (benchmarks/export.py); --int8-target-error 0.01 keeps fewer layers fp32, so it runs faster.
TARGET_ERROR = 0.0025
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# --int8-method names -> onnxruntime.quantization.CalibrationMethod members
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
PROBE_SAMPLES = 32


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
                  exclude: tuple[str, ...] = (), fp32_layers: int | str = "auto", target_error: float = TARGET_ERROR,
                  external_threshold: int | None = None) -> dict:
    """Static INT8 QDQ of ``fp32_path`` into ``out_path``; returns the scheme (for the manifest).

    ``fp32_layers`` keeps the weighted layers most sensitive to INT8 in fp32 (mixed precision): an int keeps that
    many (fewer than all), ``"auto"`` the fewest (at most half of them) that bring the relative output error on
    calibration inputs to ``target_error``, 0 none; the scheme's ``fp32_layers`` names the ONNX nodes kept.
    Sensitivity = output error with that layer alone quantized. Lower targets keep predictions closer to fp32
    at the price of more fp32 layers (slower).
    """
    import onnx

    check_int8_options(activations, method, fp32_layers, target_error)
    names = [i.name for i in session(fp32_path).get_inputs()]
    scratch = Path(tempfile.mkdtemp(prefix="srcompress-int8-"))
    try:
        pre = _preprocess(fp32_path, scratch)
        quantize = _Quantizer(pre, scratch, names, batches, activations, method)
        weighted = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node
                    if n.op_type in WEIGHTED_OPS and n.name not in exclude]
        if fp32_layers != "auto" and fp32_layers >= len(weighted):
            raise SrcompressError(f"--int8-fp32-layers {fp32_layers} keeps all {len(weighted)} weighted layers fp32: the INT8 "
                                  "model would hold no INT8 layer", f"use a count below {len(weighted)}, or auto")
        kept, search = _choose_fp32_layers(quantize, weighted, tuple(exclude), fp32_layers, target_error)
        raw = scratch / "int8.onnx"
        error = quantize(raw, tuple(exclude) + tuple(kept))
        model = onnx.load(str(raw))
        files = save_onnx(model, out_path, **({"external_threshold": external_threshold} if external_threshold else {}))
        counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
        if not counts["DequantizeLinear"]:
            raise SrcompressError(f"INT8 quantization left every layer of {fp32_path.name} in fp32 (no Conv, Gemm or MatMul "
                                  "could be quantized)", "export without --int8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"precision": "int8" if not kept else "int8 with fp32 fallback", "format": "QDQ (onnxruntime.quantization.quantize_static)",
            "weights": "int8 per-channel symmetric",
            "activations": ("int8 per-tensor symmetric (zero point 0), Q/DQ on the inputs of weighted layers only (TensorRT placement)"
                            if activations == "s8" else
                            "uint8 per-tensor asymmetric, Relu/Clip folded into the producing layer (ONNX Runtime QLinear kernels)"),
            "calibration_method": method, "calibration_samples": sum(int(b[0].shape[0]) for b in batches),
            "op_types": list(quantize.op_types), "excluded_nodes": list(exclude),
            "fp32_layers": kept, "fp32_layer_search": search, "weighted_layers": len(weighted),
            "calibration_output_error": error, "qdq_nodes": counts, "files": [f.name for f in files]}


def check_int8_options(activations: str, method: str, fp32_layers: int | str, target_error: float = TARGET_ERROR) -> None:
    """One-line errors for INT8 options, before any work."""
    if activations not in ("s8", "u8"):
        raise SrcompressError(f"--int8-activations {activations!r} is not s8 or u8", "use s8 (TensorRT-compatible) or u8")
    if method not in CALIBRATION_METHODS:
        raise SrcompressError(f"--int8-method {method!r} is unknown", f"use one of {', '.join(CALIBRATION_METHODS)}")
    if fp32_layers != "auto" and (isinstance(fp32_layers, bool) or not isinstance(fp32_layers, int) or fp32_layers < 0):
        raise SrcompressError(f"--int8-fp32-layers {fp32_layers!r} is not auto or a count", "use auto or a whole number >= 0")
    if not 0 < target_error < 1:
        raise SrcompressError(f"--int8-target-error {target_error} is outside (0, 1)", "use e.g. 0.0025 (0.25 % relative output error)")


def _preprocess(fp32_path: Path, scratch: Path) -> Path:
    """ONNX Runtime's shape inference + graph optimisation before quantization (plain copy if it fails)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
    return pre


class _Quantizer:
    """Quantizes one pre-processed model repeatedly (calibrated once where ONNX Runtime can cache ranges) and
    measures each result's relative output error against fp32 on a few calibration samples."""

    def __init__(self, pre: Path, scratch: Path, names: list[str], batches: list[tuple], activations: str, method: str):
        import inspect

        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        self.pre, self.names, self.batches = pre, names, batches
        # s8 (TensorRT): Q/DQ only on the inputs of weighted layers, TensorRT fuses the rest. u8 (ONNX Runtime CPU):
        # Relu/Clip are quantized too, so they fold into the producing layer's output and QLinearConv runs end to end.
        # LayerNorm, Softmax and element-wise ops stay fp32 (quantizing them ruins transformers).
        self.op_types = WEIGHTED_OPS + (("Relu", "Clip") if activations == "u8" else ())
        extra = {"ActivationSymmetric": activations == "s8", "WeightSymmetric": True}
        if activations == "s8":
            extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
        options = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,  # noqa: C408
                       activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                       calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                       op_types_to_quantize=list(self.op_types), use_external_data_format=True, extra_options=extra)
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            options["calibration_cache_path"] = str(scratch / "ranges.json")
        self._quantize_static, self._options = quantize_static, options
        self.corrector = _BiasCorrector(pre, names, batches)
        self.probe = first_batches(batches, PROBE_SAMPLES)
        reference = session(pre)
        self.reference = [run_session(reference, b)[0].astype(np.float64) for b in self.probe]

    def __call__(self, out: Path, exclude: tuple[str, ...]) -> float:
        """Quantize with ``exclude`` kept fp32 into ``out``; returns the relative output error on the probe."""
        corrected = self.corrector.write(out.with_name(out.stem + ".corrected.onnx"), exclude)
        with _quiet_exporter(), _quiet_logging():
            self._quantize_static(str(corrected), str(out), _reader(self.names, self.batches), nodes_to_exclude=list(exclude),
                                  **{**self._options, "extra_options": dict(self._options["extra_options"])})
        quantized = session(out)
        num = sum(float(np.sum((run_session(quantized, b)[0] - r) ** 2)) for b, r in zip(self.probe, self.reference))
        den = sum(float(np.sum(r ** 2)) for r in self.reference)
        return num / max(den, 1e-30)


class _BiasCorrector:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019, with calibration means):
    rounding the weights of a Conv or Gemm to INT8 shifts each output channel's mean by (W_int8 - W) applied to
    the layer's mean input; subtracting that shift from the bias removes most of the error of per-channel weight
    quantization in networks with few weights per channel (MobileNetV2's depthwise convolutions)."""

    def __init__(self, pre: Path, names: list[str], batches: list[tuple]):
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load(str(pre))
        init = {t.name: t for t in self.model.graph.initializer}
        self.layers = {}
        for node in self.model.graph.node:
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in init:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weight = numpy_helper.to_array(init[node.input[1]]).astype(np.float64)
            if node.op_type == "Conv" and (weight.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
                continue
            if node.op_type == "Gemm" and (attrs.get("transA", 0) or weight.ndim != 2):
                continue
            self.layers[node.name] = (node, attrs, weight)
        means = self._input_means(names, batches)
        self.shift = {name: self._shift(node, attrs, weight, means[node.input[0]])
                      for name, (node, attrs, weight) in self.layers.items() if node.input[0] in means}

    def _input_means(self, names: list[str], batches: list[tuple]) -> dict[str, np.ndarray]:
        """Per-position mean (over the calibration samples) of every corrected layer's input."""
        import onnx
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        graph_outputs = {o.name for o in probe.graph.output}
        wanted = sorted({node.input[0] for node, _, _ in self.layers.values()})
        for name in wanted:
            if name not in graph_outputs:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sums, count = {}, 0
        for batch in batches:
            values = sess.run(wanted, {n: t.numpy() for n, t in zip(names, batch)})
            for name, value in zip(wanted, values):
                sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(0)
            count += int(batch[0].shape[0])
        return {name: total / count for name, total in sums.items()}

    @staticmethod
    def _shift(node, attrs: dict, weight: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Mean output change per channel when ``weight`` is rounded to symmetric per-channel INT8."""
        axis = 0 if node.op_type == "Conv" or attrs.get("transB", 0) else 1
        absmax = np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(1)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0)
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        delta = np.clip(np.rint(weight / scale), -127, 127) * scale - weight
        if node.op_type == "Gemm":
            return attrs.get("alpha", 1.0) * (mean @ (delta.T if attrs.get("transB", 0) else delta))
        pads = attrs.get("pads", [0, 0, 0, 0])
        x = torch.from_numpy(mean)[None]
        x = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        y = torch.nn.functional.conv2d(x, torch.from_numpy(delta), stride=tuple(attrs.get("strides", [1, 1])),
                                       dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1))
        return y[0].mean((1, 2)).numpy()

    def write(self, path: Path, keep_fp32: tuple[str, ...]) -> Path:
        """The model with the biases of the layers that will be quantized corrected, saved to ``path``."""
        import onnx
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        init = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        for name, shift in self.shift.items():
            if name in keep_fp32:
                continue
            node, attrs = nodes[name], self.layers[name][1]
            beta = attrs.get("beta", 1.0) if node.op_type == "Gemm" else 1.0
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in init:
                    continue
                old = numpy_helper.to_array(init[node.input[2]])
                if old.shape != shift.shape:
                    continue
                new = (old.astype(np.float64) - shift / beta).astype(old.dtype)
                init[node.input[2]].CopyFrom(numpy_helper.from_array(new, node.input[2]))
            else:
                bias_name = f"{name}_srcompress_bias_correction"
                model.graph.initializer.append(numpy_helper.from_array((-shift / beta).astype(np.float32), bias_name))
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = bias_name
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
        return path


def _choose_fp32_layers(quantize: _Quantizer, weighted: list[str], exclude: tuple[str, ...], fp32_layers: int | str,
                        target_error: float) -> tuple[list[str], dict]:
    """Rank weighted layers by their error when quantized alone; keep the top ones fp32 (see ``quantize_int8``)."""
    if fp32_layers == 0 or not weighted:
        return [], {}
    trial = quantize.pre.with_name("trial.onnx")
    solo = {name: quantize(trial, exclude + tuple(n for n in weighted if n != name)) for name in weighted}
    ranked = sorted(weighted, key=lambda n: -solo[n])
    search = {"solo_error_top": {n: solo[n] for n in ranked[:10]}, "error_by_fp32_layers": {}}
    if fp32_layers != "auto":
        return ranked[:fp32_layers], search
    limit = max(1, len(weighted) // 2)
    counts = [0] + [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if k < limit] + [limit]
    best = 0
    for k in counts:
        error = quantize(trial, exclude + tuple(ranked[:k]))
        search["error_by_fp32_layers"][k] = error
        if error < search["error_by_fp32_layers"][best]:
            best = k
        if error <= target_error:
            best = k
            break
    search["target_error"] = target_error
    return ranked[:best], search


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
