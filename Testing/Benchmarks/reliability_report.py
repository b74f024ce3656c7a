"""Run the reliability tests and write Testing/Benchmarks/reports/reliability.md.

    .venv/bin/python Testing/Benchmarks/reliability_report.py

Every case in ImbalanceSegLib/tests/test_reliability.py and test_hostile_files.py
(when present) is listed with what happened (the message the code produced, kept
by the test with ``record_property("observed", ...)``) and the pytest node id
that reproduces it.
"""

from __future__ import annotations

import ast
import datetime
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_common import machine, write_report_atomic  # noqa: E402

FILES = ["ImbalanceSegLib/tests/test_reliability.py", "ImbalanceSegLib/tests/test_hostile_files.py"]


def docstrings(path: Path) -> dict:
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node) or node.name
            out[node.name] = " ".join(doc.split("\n\n")[0].split())
    return out


def main() -> int:
    files = [f for f in FILES if (ROOT / f).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
               f"--junitxml={xml}", "-o", "junit_family=xunit1", *files]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-2000:])
        tree = ET.parse(xml)
    docs = {}
    for f in files:
        docs.update({(f, k): v for k, v in docstrings(ROOT / f).items()})
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    for tc in tree.iter("testcase"):
        name = tc.get("name")
        file = tc.get("file") or next((f for f in files if Path(f).stem == tc.get("classname", "").split(".")[-1]), files[0])
        func = name.split("[")[0]
        param = name[len(func):].strip("[]")
        case = docs.get((file, func), func) + (f" — {param}" if param else "")
        observed = " ".join(p.get("value", "") for p in tc.iter("property") if p.get("name") == "observed")
        if tc.find("failure") is not None or tc.find("error") is not None:
            outcome = "FAILED"
            counts["failed"] += 1
        elif tc.find("skipped") is not None:
            outcome = "xfail/skip: " + (tc.find("skipped").get("message") or "")
            counts["skipped"] += 1
        else:
            outcome = "passed"
            counts["passed"] += 1
        rows.append((case, observed or "-", outcome, f"{file}::{name}"))
    rel_cmd = ".venv/bin/python Testing/Benchmarks/reliability_report.py"
    lines = [
        "# Reliability report",
        "",
        f"Command: `{rel_cmd}` (from the repository root)",
        f"Machine: {machine()}",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Cases: {sum(counts.values())}; passed {counts['passed']}, failed {counts['failed']}, "
        f"skipped/xfail {counts['skipped']}. Each case is a test in the suite; rerun one with "
        "`.venv/bin/python -m pytest '<node id>'`.",
        "",
        "| case | what happened | result | reproduce |",
        "|---|---|---|---|",
    ]
    for case, observed, outcome, node in rows:
        esc = lambda t: t.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {esc(case)} | {esc(observed)} | {outcome} | `{node}` |")
    out = ROOT / "Testing" / "Benchmarks" / "reports" / "reliability.md"
    write_report_atomic(out, lines)
    print(f"wrote {out}")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
