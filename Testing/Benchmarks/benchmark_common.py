"""What every benchmark report starts with: the machine it ran on (shared by the scripts here)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> float:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        return float("nan")


def machine(extra: str = "") -> str:
    """'Linux x86_64, <CPU>, N logical cores, M GiB RAM, Python x.y.z' plus ``extra``."""
    text = (f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} logical cores, "
            f"{memory_gib():.0f} GiB RAM, Python {platform.python_version()}")
    return f"{text}, {extra}" if extra else text
