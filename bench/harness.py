"""What the benchmarks share: the CPU line every table names, and a system run in a child process of
its own (so its memory and threads are its own) that hands back a JSON result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu() -> str:
    """The CPU model, the cores this process may use, and the flags that choose OpenVINO's kernels."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ["amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2"]
    return f"{model}, {len(os.sched_getaffinity(0))} cores; flags: " + " ".join(f for f in wanted if f in flags)


def tf_dtype() -> str:
    """transformers' best precision here: bf16 where the CPU computes it (AVX-512 BF16, AMX), else
    fp32. torch's bf16 matrix product without it ran 220x slower than fp32 on an AVX2-only AMD EPYC
    (64x2048 by 2048x8192, 2 cores: 10.9 s against 49 ms)."""
    from pipeline.model import cpu_has

    return "bf16" if cpu_has("avx512_bf16") or cpu_has("amx_bf16") else "fp32"


def run_child(script: str, system: str, **options) -> dict:
    """`python script --child system --result FILE --option value ...`; the JSON it wrote to FILE."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, script, "--child", system, "--result", result.name]
        for k, v in options.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(result.name).read_text())
