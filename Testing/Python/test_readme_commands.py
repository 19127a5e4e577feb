"""The README's examples run as written, in order, from a checkout: every `subject-fingerprint`
command of its bash blocks (with small settings: 2 training steps, few episodes), and its
Python blocks that need no Slicer. Installing (pip), the test suite itself, the benchmarks and
Slicer's own executable are left out; so is anything that would need data outside the clone."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# torchrun is run, with two processes as in the README, by test_index_distributed.py.
SKIP_PREFIXES = ("python3 -m pip", "python3 -m pytest", "python3 Testing/", "Slicer ", "torchrun ")
SLICER_MODULES = re.compile(r"^\s*(import|from)\s+(slicer|SubjectFingerprint|FingerprintTraining)\b", re.M)
# Small settings for the expensive commands (the README's own values are for real runs).
SMALL = {"train": ["--steps", "2", "--quiet"], "evaluate": ["--episodes", "5", "--bootstrap", "20", "--no-plots", "--quiet"]}


def blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def bash_commands() -> list:
    """Every command of the bash blocks, continuation lines joined, comments dropped, `&&` split."""
    out = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            out.extend(part.strip() for part in line.split("&&") if part.strip())
    return out


def _small(args: list) -> list:
    if args and args[0] in SMALL:
        extra = SMALL[args[0]]
        if "--steps" in extra and "--steps" in args:
            i = args.index("--steps")
            args = args[:i] + args[i + 2:]
        args = args + extra
    return args


def _expand(args: list, cwd: Path) -> list:
    out = []
    for a in args:
        if any(c in a for c in "*?["):
            found = sorted(os.path.relpath(f, cwd) for f in glob.glob(os.path.join(cwd, a)))
            assert found, f"the README's pattern {a} matches nothing"
            out.extend(found)
        else:
            out.append(a)
    return out


def test_readme_has_the_commands_it_promises():
    commands = bash_commands()
    names = {c.split()[1] for c in commands if c.startswith("subject-fingerprint ")}
    assert {"index", "query", "library", "dedup", "split", "train", "evaluate"} <= names
    assert not [c for c in commands if "../shared" in c], "README examples must run from a clone"


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    (tmp_path / "Resources").symlink_to(ROOT / "Resources", target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "SubjectFingerprint"), str(ROOT / "FingerprintTraining"), os.environ.get("PYTHONPATH", "")]))
    env.pop("SUBJECT_FINGERPRINT_MODEL", None)
    ran = 0
    for command in bash_commands():
        if command.startswith(SKIP_PREFIXES):
            continue
        args = shlex.split(command)
        assert args[0] == "subject-fingerprint", f"README command not covered by this test: {command}"
        # The installed console script is fingerprint_training.cli:main, which is what -m runs.
        argv = [sys.executable, "-m", "fingerprint_training"] + _expand(_small(args[1:]), tmp_path)
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran += 1
    for block in blocks("python"):
        if SLICER_MODULES.search(block):
            continue  # needs a running Slicer
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran >= 15
    # What the examples promise to write is there.
    for path in ("fingerprint-report/index.html", "site-a.h5", "report/subjects.csv",
                 "runs/paper/best.pt", "runs/paper/eval/metrics.json", "runs/mri/best.pt"):
        assert (tmp_path / path).exists(), path
