"""What this machine has: GPUs through NVML (nvidia-ml-py), else CPU and memory.

Adverts say exactly which GPU a price is for (a top complaint about markets that don't).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import pynvml


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int


@dataclass(frozen=True)
class GpuLoad:
    index: int
    utilization_pct: int
    memory_used_mib: int
    memory_total_mib: int


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    driver_version: str  # "" without NVIDIA driver
    cuda_version: str
    cpu_model: str
    cpu_count: int
    memory_total_mib: int

    def summary(self) -> str:
        if self.gpus:
            names = {g.name for g in self.gpus}
            name = names.pop() if len(names) == 1 else "mixed GPUs"
            vram = self.gpus[0].memory_total_mib // 1024
            return f"{len(self.gpus)}x {name} ({vram} GiB), driver {self.driver_version}"
        return (
            f"no GPU; {self.cpu_count} CPU cores ({self.cpu_model}), "
            f"{self.memory_total_mib // 1024} GiB RAM"
        )

    def advert_fields(self) -> dict[str, str]:
        """Flat strings for the signed advert."""
        fields = {
            "cpu_model": self.cpu_model,
            "cpu_count": str(self.cpu_count),
            "memory_total_mib": str(self.memory_total_mib),
            "machine": platform.machine(),
            "gpu_count": str(len(self.gpus)),
        }
        if self.gpus:
            fields["gpu_model"] = self.gpus[0].name
            fields["gpu_memory_mib"] = str(self.gpus[0].memory_total_mib)
            fields["driver_version"] = self.driver_version
            fields["cuda_version"] = self.cuda_version
        return fields


@contextmanager
def _nvml() -> Iterator[bool]:
    """True inside when NVML is usable (an NVIDIA driver is present)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield False
        return
    try:
        yield True
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect() -> Hardware:
    gpus: list[Gpu] = []
    driver = cuda = ""
    with _nvml() as available:
        if available:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            version = pynvml.nvmlSystemGetCudaDriverVersion()
            cuda = f"{version // 1000}.{version % 1000 // 10}"
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                gpus.append(Gpu(i, name, int(memory.total) // (1024 * 1024)))
    return Hardware(
        gpus=tuple(gpus),
        driver_version=driver,
        cuda_version=cuda,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        memory_total_mib=psutil.virtual_memory().total // (1024 * 1024),
    )


def gpu_loads() -> list[GpuLoad]:
    """Live utilisation and memory of every GPU (empty without NVIDIA driver)."""
    loads: list[GpuLoad] = []
    with _nvml() as available:
        if not available:
            return loads
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mib = 1024 * 1024
            loads.append(
                GpuLoad(i, int(util.gpu), int(memory.used) // mib, int(memory.total) // mib)
            )
    return loads


@dataclass(frozen=True)
class EngineProposal:
    dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float | None
    max_model_len: int | None
    enforce_eager: bool
    max_concurrency: int


def propose_engine(hardware: Hardware) -> EngineProposal:
    """A sensible vLLM configuration for this machine."""
    if hardware.gpus:
        tp = 1
        while tp * 2 <= len(hardware.gpus):  # attention heads split evenly over powers of two
            tp *= 2
        return EngineProposal(
            dtype="auto",
            tensor_parallel_size=tp,
            gpu_memory_utilization=0.90,
            max_model_len=None,
            enforce_eager=False,
            max_concurrency=64,
        )
    return EngineProposal(
        dtype="bfloat16",
        tensor_parallel_size=1,
        gpu_memory_utilization=None,
        max_model_len=2048,
        enforce_eager=True,  # CPU: graph compilation costs minutes and gains little
        max_concurrency=4,
    )
