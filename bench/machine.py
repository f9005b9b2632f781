"""Describe the machine and estimate its peak floating-point rate."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

#: CPU flags worth naming in the report, in this order.
NOTABLE_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

#: Libraries whose versions the report lists.
LIBRARIES = ("tensorflow", "keras", "numpy", "pillow", "scikit-learn", "lightgbm", "h5py", "jax")


@dataclasses.dataclass
class Machine:
    """Description of the machine the benchmark ran on.

    Attributes
    ----------
    cpu_model : str
    cores : int
        CPUs this process may run on.
    nominal_ghz : float or None
        Base clock from the model name or, failing that, from BogoMIPS / 2
        (the TSC rate on x86), in GHz.
    flags : list of str
        The notable flags of :data:`NOTABLE_FLAGS` that the CPU reports.
    memory_gib : float
    gpu : str
        ``nvidia-smi`` names, or "none".
    libraries : dict of str to str
        Installed versions ("not installed" where missing).
    python : str
    """

    cpu_model: str
    cores: int
    nominal_ghz: float | None
    flags: list
    memory_gib: float
    gpu: str
    libraries: dict
    python: str

    def has(self, flag: str) -> bool:
        return flag in self.flags


def describe_machine() -> Machine:
    """Read /proc/cpuinfo, /proc/meminfo, nvidia-smi and package metadata."""
    cpuinfo = _read("/proc/cpuinfo")
    model = _first_field(cpuinfo, "model name") or platform.processor() or "unknown"
    flags = set((_first_field(cpuinfo, "flags") or "").split())
    bogomips = _first_field(cpuinfo, "bogomips")

    nominal = None
    in_name = re.search(r"([\d.]+)\s*GHz", model)
    if in_name:
        nominal = float(in_name.group(1))
    elif bogomips:
        nominal = round(float(bogomips) / 2000.0, 2)

    meminfo = _read("/proc/meminfo")
    total_kib = re.search(r"MemTotal:\s+(\d+)", meminfo)
    memory_gib = int(total_kib.group(1)) / 2**20 if total_kib else 0.0

    return Machine(
        cpu_model=model,
        cores=len(os.sched_getaffinity(0)),
        nominal_ghz=nominal,
        flags=[flag for flag in NOTABLE_FLAGS if flag in flags],
        memory_gib=memory_gib,
        gpu=_gpu_names(),
        libraries={name: _version(name) for name in LIBRARIES},
        python=platform.python_version(),
    )


def fp32_flops_per_cycle(machine: Machine) -> int:
    """Return float32 FLOPs per cycle per core of the widest FMA units the flags show.

    AVX-512: 16 lanes x 2 (multiply and add) x 2 FMA units = 64. AVX2 with
    FMA: 8 x 2 x 2 = 32. The count of FMA units is assumed (two on server
    cores that have AVX-512); the flags do not show it.
    """
    if machine.has("avx512f"):
        return 64
    if machine.has("fma"):
        return 32
    return 8


def bf16_flops_per_cycle(machine: Machine) -> int | None:
    """Return bfloat16 FLOPs per cycle per core: AMX's, else AVX512_BF16's, else None.

    NOTE: 1,024 for AMX is Intel's stated figure for the Sapphire Rapids
    tile multiply unit, taken on trust; the CPU flags do not show the
    generation.
    """
    if machine.has("amx_bf16"):
        return 1024
    if machine.has("avx512_bf16"):
        # VDPBF16PS: 16 float32 lanes, each two products and their sum, on 2 units.
        return 128
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _first_field(text: str, name: str) -> str | None:
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, flags=re.MULTILINE | re.IGNORECASE)
    return match.group(1).strip() if match else None


def _gpu_names() -> str:
    if not shutil.which("nvidia-smi"):
        return "none"
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "none (nvidia-smi failed)"
    return "; ".join(line.strip() for line in output.splitlines() if line.strip()) or "none"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
