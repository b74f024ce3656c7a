"""What every benchmark report starts with: the machine it ran on (shared by the scripts here)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


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


def write_json_atomic(path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a kill mid-write leaves the old file or none),
    creating the folder; numpy scalars are written as floats."""
    import json
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, default=float)
    os.replace(tmp, path)


def code_commit():
    """The checkout's commit (with ``+changes`` when the library or benchmarks differ from it): which
    code a result came from."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ImbalanceSegLib/src", "Testing/Benchmarks/*.py"],
                               cwd=_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if dirty else "")) or None


def write_report_atomic(path, lines) -> None:
    """Write a report's ``lines`` (joined by newlines, with a final one) to ``path`` atomically,
    creating the folder: a kill mid-write leaves the old report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def job_log(out_dir):
    """``say(msg)``: append a time-stamped line to ``out_dir/train.log`` (created), flushed at once,
    for a benchmark job running in a worker process."""
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / "train.log", "a")

    def say(msg: str) -> None:
        fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")
        fh.flush()
    say.close = fh.close
    return say
