"""What this machine offers: CPU flags, the devices OpenVINO lists and what they compute, and this
process's share of the cores. Choices that depend on the machine ask here."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from pipeline.config import EngineConfig, Precision
from pipeline.errors import ConfigError

VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


@cache
def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists (e.g. `amx_bf16`, `avx512f`); none where there is no such file."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has(flag: str) -> bool:
    return flag in cpu_flags()


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads(cfg: EngineConfig) -> int:
    """This process's OpenVINO threads: shards side by side must not oversubscribe the machine."""
    return cfg.threads or max(1, cores() // cfg.shards_per_machine)


@cache
def capabilities(device: str) -> tuple[str, ...] | None:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of `device`; None for one (AUTO:...) that reports none."""
    import openvino as ov

    try:
        return tuple(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError:
        return None


def has_bf16(device: str) -> bool:
    """Whether `device` computes bf16 natively (OpenVINO lists BF16: AVX-512 BF16 or AMX on a CPU)."""
    return "BF16" in (capabilities(device) or ())


def check_bf16(cfg: EngineConfig) -> None:
    """Refuse engine.precision=bf16 on a device that reports it cannot compute it: on a CPU without
    AVX-512 BF16 or AMX, OpenVINO's paged attention refuses a bf16 KV cache at compile time."""
    found = capabilities(cfg.device)
    if cfg.precision == Precision.bf16 and found is not None and "BF16" not in found:
        raise ConfigError(
            f"engine.precision=bf16: {cfg.device} on this machine computes no bf16 (OpenVINO reports "
            f"{', '.join(found)}); use engine.precision=null (f32 here) or f32"
        )


def check_device(cfg: EngineConfig) -> None:
    """Refuse, before anything is loaded, a device OpenVINO does not list (`GPU`, `GPU.1`,
    `AUTO:GPU,CPU`), or a precision it cannot compute."""
    import openvino as ov

    device = cfg.device
    available = ov.Core().available_devices
    kind, _, listed = device.partition(":")
    names = [n for n in listed.split(",") if n] if kind in VIRTUAL_DEVICES else [device]
    known = set(available) | {d.split(".")[0] for d in available}
    unknown = [n for n in names if n not in known]
    if unknown or not device:
        raise ConfigError(
            f"engine.device={device!r}: OpenVINO on this machine has no {', '.join(unknown) or 'device'}; "
            f"it lists {', '.join(available)}"
        )
    check_bf16(cfg)
