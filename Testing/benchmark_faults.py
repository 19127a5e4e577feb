"""Fault-injection loops on the embedding library (the long version of test_faults_library.py).

    python Testing/benchmark_faults.py --kills 100 --removes 30 --lock-deletions 10 --disk-full 20

Counts, for each kind of trial, how many were run, how many left a damaged library (does not
open, or rows inconsistent) and how many acknowledged rows (commits a writer reported) were
lost. The disk-full sweep mounts a tmpfs of growing size (root only; skipped otherwise) and
fills it with one writer until it fails. The figures go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "Python"))
sys.path.insert(0, str(HERE.parent / "SubjectFingerprint"))

import fault_trials as ft  # noqa: E402


def _loop(name, trial, count, rng, root: Path):
    totals = {"trials": 0, "damaged": 0, "lost_rows": 0, "crashed": 0, "tracebacks": 0,
              "refused_commits": 0, "lock_left": 0, "acknowledged_batches": 0}
    for k in range(count):
        folder = root / f"{name}{k}"
        folder.mkdir()
        result = trial(folder, rng)
        totals["trials"] += 1
        totals["damaged"] += int(result["damaged"])
        totals["lost_rows"] += result["lost"]
        totals["crashed"] += result.get("crashed", 0)
        totals["tracebacks"] += result.get("tracebacks", 0)
        totals["refused_commits"] += result.get("refused", 0)
        totals["lock_left"] += int(result.get("lock_left", False))
        totals["acknowledged_batches"] += result.get("acknowledged", 0)
        if "removed_done" in result:
            totals["removes_completed_before_kill"] = (
                totals.get("removes_completed_before_kill", 0) + int(result["removed_done"]))
        if result["damaged"] or result["lost"]:
            print(f"{name} trial {k}: {result}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    return totals


def _disk_full_sweep(count, root: Path):
    """Writers on tmpfs mounts of 256 KiB .. a few MiB: every run must end with the clear
    error and an intact library holding what was committed."""
    if os.name != "posix" or os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    totals = {"trials": 0, "damaged": 0, "lost_rows": 0, "clear_error": 0, "tracebacks": 0}
    for k in range(count):
        mount = root / f"full{k}"
        mount.mkdir()
        size_kib = 256 + 128 * k
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                               str(mount)], capture_output=True)
        if done.returncode != 0:
            return {"skipped": f"cannot mount a tmpfs: {done.stderr.decode().strip()}"}
        try:
            writer = ft.start(ft.WRITER, mount / "lib.h5", "f", 10_000)
            out, err = writer.communicate(timeout=300)
            result = ft.check_library(mount / "lib.h5", ft.acknowledged(out)) \
                if (mount / "lib.h5").exists() else {"damaged": False, "lost": 0}
            totals["trials"] += 1
            totals["damaged"] += int(result["damaged"])
            totals["lost_rows"] += result["lost"]
            totals["clear_error"] += int("no space left on device, nothing stored" in out)
            totals["tracebacks"] += int("Traceback" in err)
        finally:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--removes", type=int, default=20)
    parser.add_argument("--lock-deletions", type=int, default=10)
    parser.add_argument("--disk-full", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="sf-faults-"))
    started = time.time()
    try:
        results = {
            "kill_mid_write": _loop("kill", ft.kill_trial, args.kills, rng, root),
            "kill_mid_remove": _loop("remove", ft.remove_kill_trial, args.removes, rng, root),
            "lock_file_deleted": _loop("lock", ft.lock_deletion_trial, args.lock_deletions, rng,
                                       root),
            "disk_full": _disk_full_sweep(args.disk_full, root),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["seconds"] = round(time.time() - started, 1)
    results["machine"] = platform.platform()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    bad = sum(r.get("damaged", 0) + r.get("lost_rows", 0) + r.get("crashed", 0)
              for r in results.values() if isinstance(r, dict))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
