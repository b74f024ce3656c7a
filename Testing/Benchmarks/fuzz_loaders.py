"""Time-bounded mutation fuzzing of the two file loaders (issue #9).

Targets
* ``bundle``: ``imbalanceseglib.bundle.load_bundle_from_bytes`` -- must give a
  model or ``BundleError`` (and never via the loader's internal safety net);
* ``image``: ``imbalanceseglib.images.read_image`` on NRRD and NIfTI files --
  must give an image or ``ImageError``.

Each target runs in a worker process (so a native crash such as a segfault in
ITK is caught, recorded with its input, and the worker restarted) under an
address-space limit. Inputs come from a seeded mutation engine: raw byte
mutations of a valid file, "attacker" mutations of the bundle's card and
weights re-signed with fresh checksums and CRCs, ZIP central-directory field
patches, NRRD header field edits, NIfTI header byte edits and truncations.
(The pytest suite ``test_hostile_files.py`` runs bounded hypothesis fuzzers; a
long run needs crash isolation, which hypothesis inside one process cannot give.)

    python Testing/Benchmarks/fuzz_loaders.py --seconds 120

writes ``Testing/Benchmarks/reports/fuzz_loaders.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "ImbalanceSegLib" / "src"
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "fuzz_loaders.md"
MEMBERS = ("manifest.json", "card.json", "weights.safetensors")
MEM_LIMIT = {"bundle": 6 << 30, "image": 4 << 30}


# --- seeds -------------------------------------------------------------------------

def make_bundle_seed(workdir: Path) -> bytes:
    import torch
    from imbalanceseglib.bundle import save_bundle
    from imbalanceseglib.networks import build_network
    card = {"name": "fuzz", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                     "features": [4, 8]}},
            "classes": [{"value": 0, "name": "Background", "color": [0, 0, 0]},
                        {"value": 1, "name": "Ball", "color": [1, 0, 0]},
                        {"value": 2, "name": "Bead", "color": [0, 1, 0]}],
            "preprocessing": {"target_spacing": [1.0, 1.0, 2.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "percentile_zscore", "lower_percentile": 0.5,
                                                "upper_percentile": 99.5}},
            "calibration": {"method": "temperature", "temperature": [1.0, 1.2, 0.9]},
            "validation": {"per_class": {"Ball": {"dice": 0.9}}}}
    torch.manual_seed(0)
    net = build_network("UNet3D", card["network"]["params"])
    return save_bundle(workdir / "seed.imbseg", card, net).read_bytes()


def make_image_seeds(workdir: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk
    arr = (np.random.default_rng(0).random((6, 7, 8)) + 1).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    seeds = {}
    for name, compress in [("raw.nrrd", False), ("gz.nrrd", True), ("raw.nii", False), ("gz.nii.gz", True)]:
        sitk.WriteImage(img, str(workdir / name), compress)
        seeds[name] = (workdir / name).read_bytes()
    return seeds


# --- mutation engine ---------------------------------------------------------------------

INTERESTING_INTS = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate_bytes(rng: random.Random, data: bytes, region: int = 0) -> bytes:
    buf = bytearray(data)
    hi = len(buf) if not region else min(region, len(buf))
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4, 8, 16])):
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        pos = rng.randrange(max(1, min(hi, len(buf))))
        op = rng.randrange(8)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 64)]
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op == 4:
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 512)]
        elif op == 5:
            fmt = rng.choice(["<H", "<L", "<Q", ">L"])
            size = struct.calcsize(fmt)
            if pos + size <= len(buf):
                v = rng.choice(INTERESTING_INTS) & ((1 << (8 * size)) - 1)
                struct.pack_into(fmt, buf, pos, v)
        elif op == 6:
            other = rng.randrange(len(buf))
            n = rng.randint(1, 64)
            buf[pos:pos + n] = buf[other:other + n]
        else:
            del buf[pos:]
    return bytes(buf)


def rezip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in MEMBERS:
            zf.writestr(n, members[n])
    return buf.getvalue()


def resign(members: dict) -> bytes:
    m = dict(members)
    man = {"format": "imbalanceseg-bundle", "format_version": 1,
           "sha256": {n: hashlib.sha256(m[n]).hexdigest() for n in ("card.json", "weights.safetensors")}}
    m["manifest.json"] = json.dumps(man).encode()
    return rezip(m)


def random_json(rng: random.Random, depth: int = 0):
    k = rng.randrange(9 if depth < 3 else 6)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 2, 3, 255, 256, 10 ** 6, 10 ** 18, -10 ** 9])
    if k == 3:
        return rng.choice([0.0, -0.0, 1e-300, 1e300, 0.5, 2.0, -1.5, 1e-3])
    if k in (4, 5):
        return rng.choice(["", "x", "UNet3D", "none", "temperature", "fixed_zscore", "percentile_zscore",
                           "Background", "../../x", "\u202e", "a" * rng.choice([1, 300, 5000])])
    if k in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["name", "value", "color", "arch", "params", "scheme", "method", "x"]):
            random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


def mutate_card(rng: random.Random, card_bytes: bytes) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(rng, card_bytes)
    card = json.loads(card_bytes)
    paths = [p for p in json_paths(card) if p]
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        node = card
        try:
            for key in path[:-1]:
                node = node[key]
            if rng.random() < 0.15 and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = random_json(rng)
        except (KeyError, IndexError, TypeError):
            pass
    text = json.dumps(card)
    if rng.random() < 0.05:
        text = text.replace("0.9", rng.choice(["NaN", "Infinity", "1e999", "[" * 2000 + "]" * 2000, "9" * 5000]))
    return text.encode()


def mutate_weights(rng: random.Random, weights: bytes) -> bytes:
    n = struct.unpack("<Q", weights[:8])[0]
    if rng.random() < 0.5:
        return mutate_bytes(rng, weights, region=8 + n)  # the header region
    header = json.loads(weights[8:8 + n])
    body = weights[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "add", "rename"])
    if field == "dtype":
        header[key]["dtype"] = rng.choice(["F64", "F16", "BF16", "I64", "U8", "BOOL", "X", 3, None])
    elif field == "shape":
        header[key]["shape"] = rng.choice([[], [0], [1], [2 ** 62, 2 ** 62], [-1, 4], list(reversed(header[key]["shape"]))])
    elif field == "data_offsets":
        b, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[e, b], [0, e - b], [b, e + 4], [b - 4, e - 4], [0, 2 ** 63], [b]])
    elif field == "drop":
        header.pop(key)
    elif field == "add":
        header["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    else:
        header[key + "x"] = header.pop(key)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def patch_central(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    cd_off = struct.unpack("<L", buf[-6:-2])[0]
    entries, pos = [], cd_off
    while buf[pos:pos + 4] == b"PK\x01\x02":
        nlen, elen, clen = struct.unpack("<3H", buf[pos + 28:pos + 34])
        entries.append(pos)
        pos += 46 + nlen + elen + clen
    e = rng.choice(entries)
    off, fmt = rng.choice([(8, "<H"), (10, "<H"), (16, "<L"), (20, "<L"), (24, "<L"), (28, "<H"), (30, "<H"),
                           (38, "<L"), (42, "<L")])
    struct.pack_into(fmt, buf, e + off, rng.choice(INTERESTING_INTS) & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    if rng.random() < 0.3:  # also the end record
        end = len(buf) - 22
        o = rng.choice([8, 10, 12, 16])
        struct.pack_into("<H" if o < 12 else "<L", buf, end + o, rng.choice(INTERESTING_INTS) & 0xFFFF)
    return bytes(buf)


def bundle_input(rng: random.Random, seed: bytes, members: dict):
    kind = rng.choices(["bytes", "card", "weights", "central", "random"], [40, 25, 15, 15, 5])[0]
    if kind == "bytes":
        return kind, mutate_bytes(rng, seed)
    if kind == "card":
        return kind, resign({**members, "card.json": mutate_card(rng, members["card.json"])})
    if kind == "weights":
        return kind, resign({**members, "weights.safetensors": mutate_weights(rng, members["weights.safetensors"])})
    if kind == "central":
        return kind, patch_central(rng, seed)
    return kind, os.urandom(rng.randrange(4096))


NRRD_VALUES = ["0", "-1", "1", "3", "4", "99999999999", "nan", "inf", "1e308", "", "a b c", "1 1", "8 7 6 5",
               "float", "int64", "block", "raw", "gzip", "hex", "ascii", "bzip2", "little", "big", "LIST",
               "(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)", "(1,0,0) (1,0,0) (0,0,1)",
               "none (1,0,0) (0,1,0)", "3-vector domain domain", "left-posterior-superior", "RGB-color", "-5",
               "2147483648 7 6", "100000 100000 100000", "30000 30000 8", "/etc/hostname", "../../etc/hostname",
               "x%d 1 3 1", "???"]
NRRD_KEYS = ["data file", "byte skip", "line skip", "space dimension", "spacings", "block size", "endian",
             "space units", "measurement frame", "sizes", "type", "encoding", "dimension", "kinds"]


def image_input(rng: random.Random, seeds: dict):
    name = rng.choice(list(seeds))
    raw = seeds[name]
    if name.endswith(".nrrd") and rng.random() < 0.6:
        header, body = raw.split(b"\n\n", 1)
        lines = header.split(b"\n")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(1, len(lines))
            op = rng.randrange(3)
            value = rng.choice(NRRD_VALUES)
            if rng.random() < 0.01:  # rare: very long value (SimpleITK NrrdIO crash trigger, see report)
                value = "1" * rng.choice([500, 2000])
            if op == 0:
                lines[i] = lines[i].split(b":")[0] + b": " + value.encode()
            elif op == 1 and len(lines) > 2:
                del lines[i]
            else:
                lines.insert(i, f"{rng.choice(NRRD_KEYS)}: {value}".encode())
        if rng.random() < 0.3:
            body = body[:rng.randrange(len(body) + 1)]
        return "nrrd-header", name, b"\n".join(lines) + b"\n\n" + body
    if name.endswith((".nii", ".nii.gz")):
        plain = seeds["raw.nii"]
        out = mutate_bytes(rng, plain, region=352) if rng.random() < 0.8 else plain
        if rng.random() < 0.3:
            out = out[:rng.randrange(len(out) + 1)]
        return "nifti-header", name, gzip.compress(out) if name.endswith(".gz") else out
    return "bytes", name, mutate_bytes(rng, raw)


# --- worker ---------------------------------------------------------------------------

def worker(target: str, seconds: float, seed: int, workdir: Path, current: Path) -> None:
    """Run inputs until the time is up; one JSON line per input on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT[target], MEM_LIMIT[target]))
    sys.path.insert(0, str(SRC))
    import warnings
    warnings.filterwarnings("ignore")
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    if target == "bundle":
        import torch
        torch.set_num_threads(1)
        from imbalanceseglib.bundle import BundleError, load_bundle_from_bytes
        from imbalanceseglib.container import _UNEXPECTED
        seed_bytes = (workdir / "seed.imbseg").read_bytes()
        with zipfile.ZipFile(io.BytesIO(seed_bytes)) as zf:
            members = {n: zf.read(n) for n in MEMBERS}
        while time.monotonic() < deadline:
            kind, data = bundle_input(rng, seed_bytes, members)
            current.write_bytes(data)
            t0 = time.perf_counter()
            try:
                load_bundle_from_bytes(data, "fuzz.imbseg")
                outcome, msg = "loaded", ""
            except BundleError as exc:
                msg = str(exc)
                outcome = "BundleError (safety net)" if _UNEXPECTED in msg else "BundleError"
            except BaseException as exc:  # noqa: BLE001 -- this is what the fuzzer looks for
                outcome, msg = type(exc).__name__, str(exc)[:300]
            print(json.dumps({"kind": kind, "outcome": outcome, "msg": msg[:300],
                              "ms": (time.perf_counter() - t0) * 1e3}), flush=True)
    else:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        from imbalanceseglib.images import ImageError, read_image
        seeds = {n: (workdir / n).read_bytes() for n in ("raw.nrrd", "gz.nrrd", "raw.nii", "gz.nii.gz")}
        while time.monotonic() < deadline:
            kind, name, data = image_input(rng, seeds)
            path = workdir / f"fuzz_{name}"
            path.write_bytes(data)
            current.write_bytes(name.encode() + b"\n" + data)
            t0 = time.perf_counter()
            try:
                read_image(path)
                outcome, msg = "loaded", ""
            except ImageError as exc:
                outcome, msg = "ImageError", str(exc)
            except BaseException as exc:  # noqa: BLE001
                outcome, msg = type(exc).__name__, str(exc)[:300]
            print(json.dumps({"kind": kind, "outcome": outcome, "msg": msg[:300],
                              "ms": (time.perf_counter() - t0) * 1e3}), flush=True)


# --- driver ---------------------------------------------------------------------------------

def family(msg: str) -> str:
    """Problem family of an error message: the message without file names and numbers."""
    msg = re.sub(r"\S*fuzz[^\s:]*:?\s*", "", msg)
    inner = re.search(r"cannot be read as an image \((?:\[nrrd\] )?(?:ITK ERROR: )?(.*)", msg)
    if inner:  # image errors: keep ITK's reason, without object addresses
        msg = "cannot be read: " + re.sub(r"\w+\(0x[0-9a-f]+\):?", "", inner.group(1))
    else:
        msg = re.sub(r"\(.*", "", msg)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|-?\d[\d.e+-]*", "#", msg)
    return " ".join(msg.split()[:9])


def run_target(target: str, seconds: float, seed: int, workdir: Path) -> dict:
    stats = {"inputs": 0, "outcomes": collections.Counter(), "kinds": collections.Counter(),
             "families": collections.Counter(), "crashes": [], "escapes": [], "restarts": 0, "max_ms": 0.0,
             "total_ms": 0.0}
    deadline = time.monotonic() + seconds
    current = workdir / f"current_{target}.bin"
    while time.monotonic() < deadline - 1:
        left = deadline - time.monotonic()
        seed += 1
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--seconds", f"{left:.1f}",
               "--seed", str(seed), "--workdir", str(workdir)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            stats["inputs"] += 1
            stats["outcomes"][rec["outcome"]] += 1
            stats["kinds"][rec["kind"]] += 1
            stats["max_ms"] = max(stats["max_ms"], rec["ms"])
            stats["total_ms"] += rec["ms"]
            if rec["outcome"] in ("BundleError", "ImageError"):
                stats["families"][family(rec["msg"])] += 1
            elif rec["outcome"] != "loaded" and len(stats["escapes"]) < 20:
                stats["escapes"].append({**rec, "input_sha256": hashlib.sha256(current.read_bytes()).hexdigest(),
                                         "input_head": current.read_bytes()[:300].decode("latin1")})
        rc = proc.wait()
        if rc != 0:
            data = current.read_bytes() if current.exists() else b""
            crash_file = workdir / f"crash_{target}_{len(stats['crashes'])}.bin"
            shutil.copy(current, crash_file) if current.exists() else None
            stats["crashes"].append({"returncode": rc, "signal": -rc if rc < 0 else None, "bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest(),
                                     "head": data[:400].decode("latin1"), "saved": str(crash_file),
                                     "longest_line": max((len(x) for x in data.split(b"\n")), default=0)})
            stats["outcomes"][f"process crash (rc {rc})"] += 1
            stats["inputs"] += 1
            stats["restarts"] += 1
    return stats


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_common import machine as _machine
    return _machine()


def write_report(args, results: dict, seconds_each: float, started: str, versions: str) -> None:
    lines = ["# Loader fuzzing", "",
             f"Command: `python Testing/Benchmarks/fuzz_loaders.py --seconds {args.seconds:g}"
             + (f" --seed {args.seed}" if args.seed != 0 else "") + "` (from the repository root, in `.venv`)",
             f"Machine: {machine()}",
             f"Date: {started}",
             f"Software: {versions}", "",
             f"Each target ran for {seconds_each:.0f} s of wall time in a worker process (address space limited to "
             f"{MEM_LIMIT['bundle'] >> 30} GiB for bundles, {MEM_LIMIT['image'] >> 30} GiB for images; a native crash "
             "restarts the worker and is recorded with its input). Contract: bundles give a model or `BundleError` "
             "(not through the loader's internal safety net); images give an image or `ImageError`.", ""]
    for target, s in results.items():
        fn = "load_bundle_from_bytes" if target == "bundle" else "read_image"
        lines += [f"## `{fn}`", "",
                  f"Inputs tried: **{s['inputs']}** ({s['inputs'] / max(seconds_each, 1):.0f}/s; mean "
                  f"{s['total_ms'] / max(s['inputs'], 1):.1f} ms, slowest {s['max_ms']:.0f} ms per input), "
                  f"worker restarts: {s['restarts']}.", "",
                  "Inputs by mutation kind: " + ", ".join(f"{k} {v}" for k, v in s["kinds"].most_common()), "",
                  "| outcome | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in s["outcomes"].most_common()]
        lines += ["", "Most frequent error families (file names and numbers elided):", "",
                  "| message family | count |", "|---|---:|"]
        lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in s["families"].most_common(15)]
        lines += [""]
        if s["escapes"]:
            lines += ["Exceptions other than the contract's (first 20):", ""]
            for e in s["escapes"]:
                lines += [f"- `{e['outcome']}` ({e['kind']}): {e['msg'][:200]!r}; input sha256 {e['input_sha256'][:16]}, "
                          f"starts {e['input_head'][:120]!r}"]
            lines += [""]
        else:
            lines += ["No exception other than the contract's escaped.", ""]
        if s["crashes"]:
            lines += [f"Process crashes: {len(s['crashes'])}", ""]
            for c in s["crashes"][:10]:
                lines += [f"- return code {c['returncode']}" + (f" (signal {c['signal']})" if c["signal"] else "")
                          + f", input {c['bytes']} bytes (longest line {c['longest_line']} bytes), "
                          f"sha256 {c['sha256'][:16]}, starts {c['head'][:240]!r}"]
            long_lines = sum(c["longest_line"] > 990 for c in s["crashes"])
            lines += ["", f"{long_lines} of {len(s['crashes'])} crashing inputs hold a header line longer than "
                      "990 bytes: SimpleITK's NrrdIO segfaults while reporting an unparsable NRRD header line of "
                      "about 1000 bytes or more (reproduced by `test_hostile_files.py::"
                      "test_nrrd_long_header_line_does_not_crash_the_process`, xfail until `images.py` pre-checks "
                      "NRRD headers).", ""]
        else:
            lines += ["No process crash.", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0, help="total wall time, split between the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="bundle,image")
    p.add_argument("--worker", choices=["bundle", "image"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.seconds, args.seed, Path(args.workdir), Path(args.workdir) / f"current_{args.worker}.bin")
        return 0
    sys.path.insert(0, str(SRC))
    import SimpleITK as sitk
    import torch
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"SimpleITK {sitk.Version.VersionString()}")
    targets = [t for t in args.targets.split(",") if t]
    seconds_each = args.seconds / len(targets)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fuzz_loaders_") as tmp:
        workdir = Path(tmp)
        make_bundle_seed(workdir)
        make_image_seeds(workdir)
        for i, target in enumerate(targets):
            results[target] = run_target(target, seconds_each, args.seed * 1000 + i * 100, workdir)
            s = results[target]
            print(f"{target}: {s['inputs']} inputs, {dict(s['outcomes'])}, crashes {len(s['crashes'])}")
        write_report(args, results, seconds_each, started, versions)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
