"""The machine a figure was measured on, in a form reports record: the CPU's model, the widest vector
ISA it offers (what decides float rounding and INT8 kernels), and the cores this process may use.
Standard library only (the scripts that run before the virtual environment use it)."""
import os
import platform
from pathlib import Path

# widest first: the first flag /proc/cpuinfo lists decides the name
ISAS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"),
        ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def cpu_summary(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{"model": "AMD EPYC", "isa": "AVX-512 VNNI", "cores": 2}; "isa" is the machine (platform.machine())
    where /proc/cpuinfo cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in ISAS if flag in flags), platform.machine() or "unknown")
    return {"model": fields.get("model name", platform.processor() or "unknown"), "isa": isa,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def cpu_text(cpu: dict | None) -> str:
    """cpu_summary() as one phrase: "AMD EPYC, AVX-512 VNNI, 2 cores"."""
    if not cpu:
        return ""
    return f"{cpu.get('model', '?')}, {cpu.get('isa', '?')}, {cpu.get('cores', '?')} cores"
