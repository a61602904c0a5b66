"""Ideal (roofline) time of y = x @ W.T for a dense or block-sparse W, and the speedup it predicts.

The model of the kernels research notes (section 3.2): a layer takes max(compute, memory) time at full
efficiency, where the sparse layer does d times the FLOPs and reads d times the weight bytes plus the block
indices, but still reads every activation and writes every output. Hardware figures are datasheet values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SrcompressError

INDEX_BYTES = 4  # int32 col/crow entries


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense tensor-core FLOP/s at 16-bit precision
    bandwidth: float  # memory bandwidth, bytes/s
    bytes_per_element: int = 2  # bf16/fp16 activations and weights

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a kernel is compute-bound."""
        return self.flops / self.bandwidth


HARDWARE = {
    "h100-sxm": Hardware("NVIDIA H100 SXM", 989e12, 3.35e12),
    "h100-pcie": Hardware("NVIDIA H100 PCIe", 756e12, 2.0e12),
    "h200": Hardware("NVIDIA H200", 989e12, 4.8e12),
}


def get_hardware(name: str | Hardware) -> Hardware:
    if isinstance(name, Hardware):
        return name
    if name not in HARDWARE:
        raise SrcompressError(f"unknown hardware {name!r}", f"use one of {', '.join(HARDWARE)}")
    return HARDWARE[name]


def hardware_for_device(device_name: str) -> Hardware | None:
    """The preset matching a CUDA device name such as 'NVIDIA H100 80GB HBM3', if there is one."""
    upper = device_name.upper()
    if "H200" in upper:
        return HARDWARE["h200"]
    if "H100" in upper:
        return HARDWARE["h100-pcie" if "PCIE" in upper else "h100-sxm"]
    return None


def weight_bytes(n: int, k: int, hw: Hardware, density: float | None = None, block: tuple[int, int] = (1, 1)) -> float:
    """Bytes of a dense weight, or of a BSR weight's values plus its col and crow indices."""
    s = hw.bytes_per_element
    if density is None:
        return float(n * k * s)
    bo, bi = block
    return density * n * k * (s + INDEX_BYTES / (bo * bi)) + INDEX_BYTES * (n / bo + 1)


def ideal_time(n: int, k: int, tokens: int, hw: Hardware, density: float | None = None,
               block: tuple[int, int] = (1, 1)) -> float:
    """Seconds for ``tokens`` rows at 100 % of peak FLOP/s and bandwidth (density None: dense)."""
    flops = 2.0 * tokens * n * k * (1.0 if density is None else density)
    io_bytes = weight_bytes(n, k, hw, density, block) + hw.bytes_per_element * tokens * (n + k)
    return max(flops / hw.flops, io_bytes / hw.bandwidth)


def predicted_speedup(n: int, k: int, density: float, block: tuple[int, int], hw: Hardware,
                      tokens: int | None = None) -> float:
    """Dense over block-sparse ideal time; ``tokens=None`` is the large-batch limit (weights amortised)."""
    if tokens is not None:
        return ideal_time(n, k, tokens, hw) / ideal_time(n, k, tokens, hw, density, block)
    activations = hw.bytes_per_element * (n + k) / hw.bandwidth  # per token
    dense = max(2.0 * n * k / hw.flops, activations)
    sparse = max(2.0 * n * k * density / hw.flops, activations)
    return dense / sparse
