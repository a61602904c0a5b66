"""Launch configurations for the block-sparse kernels: one fixed rule under the interpreter; on GPU the
fastest of a small candidate set, measured once per shape bucket and kept in a JSON cache keyed by GPU
name, Triton version and kernel source hash.

The cache file is ``$SRCOMPRESS_CACHE_DIR/bsr_autotune.json`` (default ``~/.cache/srcompress``)::

    {"version": 1, "devices": {"<gpu>|triton <version>|kernels <hash>": {"<shape bucket>": {config}}}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import triton

from .bsr import BlockSparseWeight
from .triton_bsr import GEMV_MAX_ROWS, INTERPRETED, KERNEL_HASH, KernelConfig, _next_pow2, launch

CACHE_VERSION = 1


def cache_path() -> Path:
    root = os.environ.get("SRCOMPRESS_CACHE_DIR") or Path.home() / ".cache" / "srcompress"
    return Path(root) / "bsr_autotune.json"


def device_key(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}|kernels {KERNEL_HASH}"


def shape_key(m: int, weight: BlockSparseWeight, dtype: torch.dtype, deterministic: bool) -> str:
    """Tokens rounded up to a power of two, the exact layer and block, stored blocks to a power of two."""
    n, k = weight.shape
    bo, bi = weight.block
    return (f"m{_next_pow2(m)}|{n}x{k}|b{bo}x{bi}|nnzb{_next_pow2(max(weight.nnzb, 1))}|"
            f"{str(dtype).removeprefix('torch.')}|{'det' if deterministic else 'atomic'}")


class TuneCache:
    """Tuned configs on disk. A missing, unreadable or foreign-version file reads as empty."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_path()
        self.devices: dict[str, dict[str, dict]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.devices = data["devices"]
            except (OSError, ValueError, KeyError, AttributeError) as err:
                warnings.warn(f"ignoring unreadable kernel tuning cache {self.path}: {err}", stacklevel=2)

    def get(self, device: str, shape: str) -> KernelConfig | None:
        entry = self.devices.get(device, {}).get(shape)
        if entry is None:
            return None
        try:
            return KernelConfig(**entry)
        except TypeError:  # written by another version of KernelConfig
            return None

    def put(self, device: str, shape: str, config: KernelConfig) -> None:
        """Store one config and write the file atomically (merged with what another process wrote)."""
        on_disk = TuneCache(self.path).devices
        on_disk.setdefault(device, {})[shape] = dataclasses.asdict(config)
        self.devices = on_disk
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as handle:
            json.dump({"version": CACHE_VERSION, "devices": on_disk}, handle, indent=1, sort_keys=True)
        os.replace(handle.name, self.path)


def fixed_config(m: int) -> KernelConfig:
    """The one configuration used under the interpreter: no split, no persistence, token tile <= 64."""
    return KernelConfig(block_m=min(64, max(16, _next_pow2(m))))


def heuristic_config(m: int, weight: BlockSparseWeight, multiprocessors: int) -> KernelConfig:
    """A reasonable GPU config without measuring: split rows when the grid would not fill the GPU twice."""
    bo, bi = weight.block
    block_m = min(128 if m >= 1024 else 64, max(16, _next_pow2(m)))
    m_tiles = 1 if m <= GEMV_MAX_ROWS else triton.cdiv(m, block_m)
    rows = weight.block_grid[0]
    target = 2 * multiprocessors
    split = None
    if m_tiles * rows < target:
        split = max(1, triton.cdiv(weight.nnzb * m_tiles, target))
    chunk = max(16, min(bi, 4096 // (_next_pow2(m) * bo))) if m <= GEMV_MAX_ROWS else 64
    return KernelConfig(block_m=block_m, split_blocks=split, chunk_k=chunk)


def candidates(m: int, weight: BlockSparseWeight, multiprocessors: int) -> list[KernelConfig]:
    """What the tuner tries: around the heuristic, token tiles, warps, stages, split and persistence."""
    base = heuristic_config(m, weight, multiprocessors)
    splits = {None, base.split_blocks, max(1, (base.split_blocks or weight.max_row_blocks) // 2)}
    found = []
    if m <= GEMV_MAX_ROWS:
        for split in splits:
            for chunk in sorted({c for c in (16, 32, 64, base.chunk_k) if c <= weight.block[1]}):
                for warps in (2, 4, 8):
                    found.append(dataclasses.replace(base, split_blocks=split, chunk_k=chunk, num_warps=warps))
        return found
    tiles = [t for t in (32, 64, 128) if t <= max(32, _next_pow2(m))]
    for block_m in tiles:
        for split in splits:
            for warps, stages in ((4, 3), (4, 4), (8, 3), (8, 4)):
                found.append(dataclasses.replace(base, block_m=block_m, split_blocks=split, num_warps=warps, num_stages=stages))
    persistent = dataclasses.replace(base, programs=4 * multiprocessors)
    return found + [persistent, dataclasses.replace(persistent, group_m=4)]


def tune(x2: torch.Tensor, weight: BlockSparseWeight, bias, activation, deterministic: bool) -> KernelConfig:
    """Time every candidate on this input with ``triton.testing.do_bench`` and return the fastest."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    props = torch.cuda.get_device_properties(x2.device)
    y2 = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
    best, best_ms = None, float("inf")
    for config in candidates(x2.shape[0], weight, props.multi_processor_count):
        try:
            ms = triton.testing.do_bench(lambda c=config: launch(x2, weight, bias, activation, c, deterministic, y2),
                                         warmup=5, rep=20, return_mode="median")
        except OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best or heuristic_config(x2.shape[0], weight, props.multi_processor_count)


_caches: dict[Path, TuneCache] = {}  # one loaded cache per file, per process


def choose_config(x2: torch.Tensor, weight: BlockSparseWeight, bias, activation, deterministic: bool,
                  autotune: bool) -> KernelConfig:
    """Interpreter: the fixed rule. GPU: the cached config, else tune (unless capturing a CUDA graph or
    ``autotune`` is off) and cache, else the heuristic. A cached or tuned config is also kept on the weight,
    so later calls skip the lookup (it cost about 28 us of host time per call on an H200 machine)."""
    m = x2.shape[0]
    if INTERPRETED or not x2.is_cuda:
        return fixed_config(m)
    known = weight._cache.setdefault("configs", {})
    key = (_next_pow2(m), x2.dtype, deterministic, x2.device.index)
    if key in known:
        return known[key]
    path = cache_path()
    if path not in _caches:
        _caches[path] = TuneCache(path)
    cache = _caches[path]
    device, shape = device_key(x2.device), shape_key(m, weight, x2.dtype, deterministic)
    config = cache.get(device, shape)
    if config is None:
        if not autotune or torch.cuda.is_current_stream_capturing():
            return heuristic_config(m, weight, torch.cuda.get_device_properties(x2.device).multi_processor_count)
        config = tune(x2, weight, bias, activation, deterministic)
        cache.put(device, shape, config)
    known[key] = config
    return config

