"""Training memory for high-resolution patches: activation checkpointing on and off.

Each configuration runs in its own process: a UNet3D training step (forward, Dice+CE loss,
backward, AdamW step) repeated a few times on random patches; reports the process's peak
resident memory and the time per step.

    python Testing/Benchmarks/training_memory.py [--patch 128] [--batch 2] [--features 16,32,64,128]

Writes Testing/Benchmarks/reports/training_memory.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "training_memory.md"


def worker(patch: int, batch: int, features, checkpointing: bool, steps: int) -> dict:
    import torch
    from imbalanceseglib.losses import build_loss
    from imbalanceseglib.networks import build_network, set_activation_checkpointing
    torch.manual_seed(0)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 4, "features": list(features)})
    set_activation_checkpointing(net, checkpointing)
    loss_fn = build_loss({"name": "dice_ce"}, ["bg", "a", "b", "c"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, patch, patch, patch)
    y = torch.randint(0, 4, (batch, 1, patch, patch, patch))
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    return {"checkpointing": checkpointing, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": min(times[1:] or times), "losses": losses}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", default="16,32,64,128")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    feats = [int(v) for v in a.features.split(",")]
    if a.worker:
        print(json.dumps(worker(a.patch, a.batch, feats, a.worker == "on", a.steps)))
        return 0
    rows = []
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--worker", mode, "--patch", str(a.patch), "--batch", str(a.batch),
               "--features", a.features, "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    off, on = rows
    import torch
    lines = ["# Training memory: activation checkpointing", "",
             f"Command: `python Testing/Benchmarks/training_memory.py --patch {a.patch} --batch {a.batch} "
             f"--features {a.features} --steps {a.steps}`  ",
             f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"One UNet3D training step (features {feats}, 4 classes, Dice+CE, AdamW) on a batch of {a.batch} "
             f"patches of {a.patch}³ voxels, {a.steps} steps per configuration, each configuration in its own "
             "process (peak = the process's maximum resident memory, including Python, torch and the batch).", "",
             "| activation checkpointing | peak memory GB | time per step s (best) | losses |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['peak_bytes'] / 1e9:.2f} | {r['step_s']:.1f} | "
                     + ", ".join(f"{v:.4f}" for v in r["losses"]) + " |")
    lines += ["", f"Checkpointing: {off['peak_bytes'] / on['peak_bytes']:.2f}× less peak memory, "
              f"{on['step_s'] / off['step_s']:.2f}× the time per step. The losses are the same step for step "
              "(same seed): checkpointing recomputes, it does not approximate."]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = REPORT.with_suffix(".md.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, REPORT)
    print(f"report written to {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
