"""A device's peak arithmetic rate, the denominator of utilisation: a table of published dense
peaks per chip for the accelerators users train on, a short measured matmul on a CPU (no
published figure fits every CPU), or the user's own figure (``--peak-tflops``).

Peaks are dense (no 2:4 sparsity) and per device as the runtime counts devices: on TPU v2 and
v3 every core is a device, so the chip's figure is halved."""

import os
import re
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Peak:
    tflops: Optional[float]  # None: not known (utilisation is then not reported)
    source: str  # where the figure comes from, reported beside it


@dataclass(frozen=True)
class Chip:
    name: str
    bf16_tflops: float
    fp32_tflops: Optional[float]  # None: no fp32 peak is published (TPUs run fp32 matmuls as bf16 passes)
    devices_per_chip: int = 1


# Vendors' datasheets, dense, per chip. Patterns are tried in order: the more specific first.
CHIPS: Tuple[Tuple[str, Chip], ...] = (
    (r"H100.*PCIE", Chip("NVIDIA H100 PCIe", 756.0, 51.0)),
    (r"H100.*NVL", Chip("NVIDIA H100 NVL", 835.0, 60.0)),
    (r"GH200", Chip("NVIDIA GH200", 989.0, 67.0)),
    (r"H100", Chip("NVIDIA H100 SXM", 989.0, 67.0)),
    (r"H200", Chip("NVIDIA H200", 989.0, 67.0)),
    (r"B200", Chip("NVIDIA B200", 2250.0, None)),
    (r"A100", Chip("NVIDIA A100", 312.0, 19.5)),
    (r"L40S", Chip("NVIDIA L40S", 362.0, 91.6)),
    (r"\bL4\b", Chip("NVIDIA L4", 121.0, 30.3)),
    (r"^(TPU )?V2\b|^V2-", Chip("TPU v2", 45.0, None, devices_per_chip=2)),
    (r"^(TPU )?V3\b|^V3-", Chip("TPU v3", 123.0, None, devices_per_chip=2)),
    (r"^(TPU )?V4\b|^V4-", Chip("TPU v4", 275.0, None)),
    (r"^(TPU )?V5(E|LITE)", Chip("TPU v5e", 197.0, None)),
    (r"^(TPU )?V5P", Chip("TPU v5p", 459.0, None)),
    (r"^(TPU )?V6E", Chip("TPU v6e", 918.0, None)),
    (r"^(TPU )?(V7|TPU7)", Chip("TPU v7", 2307.0, None)),
)


def chip_of(name: str) -> Optional[Chip]:
    """The table's chip for a device name (``torch.cuda.get_device_name``, a TPU accelerator
    type such as ``v5litepod-8`` or ``v6e-8``); None when it is not in the table."""
    upper = name.strip().upper()
    for pattern, chip in CHIPS:
        if re.search(pattern, upper):
            return chip
    return None


def table_peak(name: str, precision: str) -> Peak:
    """The published peak per device of the chip called ``name``, in the step's precision."""
    chip = chip_of(name)
    if chip is None:
        return Peak(None, f"{name}: not in the table of peaks; pass --peak-tflops")
    value = chip.bf16_tflops if precision == "bf16" else chip.fp32_tflops
    if value is None:
        return Peak(None, f"{chip.name}: no published {precision} peak; pass --peak-tflops")
    per_device = value / chip.devices_per_chip
    cores = f", 1/{chip.devices_per_chip} of the chip per device" if chip.devices_per_chip > 1 else ""
    return Peak(per_device, f"{chip.name} {precision} dense peak (datasheet{cores})")


def measured_cpu_peak(precision: str, size: int = 2048, repeats: int = 3) -> Peak:
    """The rate of a ``size``-square matmul on this CPU, in the step's precision, with every
    thread torch uses: the fastest of ``repeats`` after one warm-up (about a second on a
    2-core VM). A CPU's vendor figure assumes clocks and instructions a VM rarely delivers;
    the matmul is what the step's convolutions can reach on these cores."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - start)
    tflops = 2 * size**3 / fastest / 1e12
    return Peak(tflops, f"measured: {size}x{size} {precision} matmul on this CPU, {torch.get_num_threads()} threads")


def tpu_accelerator_type() -> Optional[str]:
    """A Cloud TPU VM's accelerator type (``v5litepod-8``, ``v6e-8``), as its runtime
    environment gives it; None elsewhere."""
    return os.environ.get("TPU_ACCELERATOR_TYPE") or None


def given_peak(tflops: float) -> Peak:
    return Peak(tflops, "--peak-tflops")
