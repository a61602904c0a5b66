"""TensorRT: the equivalent ``trtexec`` command (always) and an engine build through the Python API (only when
``import tensorrt`` works and a GPU is present).

TensorRT 10 vs 11 (docs/kernels.md §7): 11.x networks are always strongly typed and trtexec has no
``--fp16/--int8/--best``, so precision comes from the ONNX file itself (``model.fp16.onnx`` casts,
``model.int8.onnx`` Q/DQ); 10.x takes the same typed files with ``--stronglyTyped`` for fp16, and the
explicit-Q/DQ INT8 file with ``--int8`` (plus ``--fp16`` so non-quantized layers may run in fp16).
``--sparsity=enable`` / ``SPARSE_WEIGHTS`` is set only when the model has 2:4 layers. Both versions use
``--memPoolSize=workspace:N`` (MiB), optimisation profiles from the dynamic axes and a timing cache.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SrcompressError

PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
SPARSITY_LINES = {"eligible": "Layers eligible for sparse math", "picked": "TRT inference plan picked sparse implementation for layers"}


@dataclass
class Profile:
    """One optimisation profile: per input name, (min, opt, max) shapes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def flag(self, which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in self.shapes.items())


def profile_from_io(inputs: list[dict], opt_batch: int = 8, max_batch: int = 32, opt_seq: int | None = None,
                    max_seq: int = 128) -> Profile:
    """min/opt/max shapes from the manifest's input shapes (``batch`` and ``sequence`` are the dynamic dims)."""
    if not 1 <= opt_batch <= max_batch:
        raise SrcompressError(f"optimisation batch {opt_batch} is not within 1..{max_batch}", "pass --opt-batch <= --max-batch")
    profile = Profile()
    for spec in inputs:
        lo, opt, hi = [], [], []
        for dim in spec["shape"]:
            if dim == "batch":
                lo.append(1), opt.append(opt_batch), hi.append(max_batch)
            elif dim == "sequence":
                lo.append(1), opt.append(min(opt_seq or max_seq, max_seq)), hi.append(max_seq)
            elif isinstance(dim, int):
                lo.append(dim), opt.append(dim), hi.append(dim)
            else:
                raise SrcompressError(f"input {spec['name']} has an unnamed dynamic dimension {dim!r}",
                                      "export with named batch/sequence axes")
        profile.shapes[spec["name"]] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def trtexec_command(precision: str, profile: Profile, *, trt_major: int, sparse: bool, workspace_mib: int = 1024,
                    engine: str | None = None, timing_cache: str = "timing.cache", opt_level: int | None = None,
                    hardware_compatible: bool = False) -> list[str]:
    """The ``trtexec`` argument list that builds the ``precision`` engine from the bundle's ONNX files."""
    if precision not in PRECISION_FILES:
        raise SrcompressError(f"unknown TensorRT precision {precision!r}", f"use one of {', '.join(PRECISION_FILES)}")
    if trt_major not in (10, 11):
        raise SrcompressError(f"TensorRT {trt_major} is not supported", "use TensorRT 10 or 11")
    if workspace_mib < 1:
        raise SrcompressError(f"workspace {workspace_mib} MiB is not positive", "pass --workspace-mib 1 or more")
    engine = engine or f"model.{precision}.plan"
    args = ["trtexec", f"--onnx={PRECISION_FILES[precision]}", f"--saveEngine={engine}"]
    if trt_major == 10:
        if precision == "fp16":
            args.append("--stronglyTyped")  # the fp16 file carries its own casts
        elif precision == "int8":
            args += ["--int8", "--fp16"]  # explicit Q/DQ; other layers may use fp16
    if profile.shapes:
        args += [f"--minShapes={profile.flag(0)}", f"--optShapes={profile.flag(1)}", f"--maxShapes={profile.flag(2)}"]
    args.append(f"--memPoolSize=workspace:{int(workspace_mib)}")
    if sparse:
        args.append("--sparsity=enable")
    args.append(f"--timingCacheFile={timing_cache}")
    if opt_level is not None:
        args.append(f"--builderOptimizationLevel={int(opt_level)}")
    if hardware_compatible:
        args.append("--hardwareCompatibilityLevel=ampere+")
    args += ["--profilingVerbosity=detailed", f"--exportLayerInfo={Path(engine).stem}.layers.json", "--verbose"]
    return args


def build_script(precisions: list[str], profile: Profile, *, sparse: bool, workspace_mib: int = 1024) -> str:
    """``build_engine.sh``: detects the TensorRT major version from trtexec and runs the matching command."""
    lines = [
        "#!/usr/bin/env bash",
        "# Build TensorRT engines from this bundle on the target device (e.g. Jetson); written by srcompress export.",
        "# Engines are specific to the GPU (SM) and TensorRT version that build them: build on the device.",
        "# Override the detected version with TRT_MAJOR=10 or TRT_MAJOR=11. Logs: build_<precision>.log",
        "# (with --verbose they hold the '(Sparsity)' lines: layers eligible for and picking sparse tactics).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'if [ -z "${TRT_MAJOR:-}" ]; then',
        '  version="$("$TRTEXEC" --help 2>&1 | grep -o "TensorRT v[0-9]*" | head -n1 | grep -o "[0-9]*" || true)"',
        '  if [ -z "$version" ]; then echo "cannot find trtexec (set TRTEXEC=/path/to/trtexec or TRT_MAJOR)" >&2; exit 2; fi',
        '  # trtexec prints TensorRT v8601 for 8.6.1 (major x 1000) and v100300 for 10.3.0 (major x 10000)',
        '  if [ "$version" -ge 100000 ]; then TRT_MAJOR=$((version / 10000)); else TRT_MAJOR=$((version / 1000)); fi',
        "fi",
        'case "$TRT_MAJOR" in',
    ]
    for major in (10, 11):
        lines.append(f"  {major})")
        for precision in precisions:
            args = trtexec_command(precision, profile, trt_major=major, sparse=sparse, workspace_mib=workspace_mib)
            args[0] = '"$TRTEXEC"'
            lines.append("    " + " ".join(a if a.startswith('"$') else shlex.quote(a) for a in args)
                         + f" 2>&1 | tee build_{precision}.log")
        lines.append("    ;;")
    lines += ['  *) echo "TensorRT $TRT_MAJOR is not supported by this bundle (10 or 11)" >&2; exit 2 ;;', "esac",
              'grep -h "(Sparsity)" build_*.log || true', ""]
    return "\n".join(lines)


def parse_sparsity_log(text: str) -> dict[str, list[str]]:
    """The layers named on the verbose build's two ``(Sparsity)`` lines."""
    found: dict[str, list[str]] = {"eligible": [], "picked": []}
    for line in text.splitlines():
        if "(Sparsity)" not in line:
            continue
        for key, marker in SPARSITY_LINES.items():
            if marker in line:
                tail = line.split(marker, 1)[1].lstrip(": ").strip()
                found[key] += [name.strip() for name in re.split(r",\s*", tail) if name.strip()]
    return found


def tensorrt_available() -> str | None:
    """The installed TensorRT version, or None."""
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - absent, or present without its libraries
        return None
    return str(trt.__version__)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, profile: Profile, *, sparse: bool,
                 workspace_mib: int = 1024, timing_cache: Path | None = None) -> dict:
    """Build a serialized engine with the TensorRT Python API (10.x or 11.x); returns the build record.

    Needs a GPU: creating the builder initialises CUDA. Parser errors become one SrcompressError.
    """
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    log_lines: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log_lines.append(str(msg))

    logger = Logger()
    try:
        builder = trt.Builder(logger)
    except Exception as err:  # noqa: BLE001 - "CUDA initialization failure" surfaces as a TypeError
        raise SrcompressError(f"TensorRT could not create a builder ({str(err).splitlines()[0][:120]})",
                              "build on a machine with an NVIDIA GPU, or run build_engine.sh there") from err
    flags = 0
    strongly_typed = major >= 11 or precision == "fp16"
    if major < 11 and strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SrcompressError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)[:300]}",
                              "check the ONNX operators TensorRT supports, or simplify the model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if major < 11 and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ in the file; no calibrator
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if profile.shapes:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.shapes.items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    previous = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(previous)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = [ln for ln in log_lines if "error" in ln.lower()][-3:]
        raise SrcompressError(f"TensorRT failed to build the {precision} engine ({'; '.join(tail)[:300]})",
                              "see the build log; try a larger --workspace-mib")
    engine_path.write_bytes(bytes(plan))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "precision": precision, "engine": engine_path.name, "strongly_typed": strongly_typed,
            "sparse_weights": sparse, "workspace_mib": workspace_mib, "sparsity": parse_sparsity_log("\n".join(log_lines))}
