"""Helpers the tests share: run the command line in-process, load a script of Testing/."""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

TESTING = Path(__file__).resolve().parents[1]


def run_cli(*argv):
    """``subject-fingerprint ARGV...`` in this process: (exit code, stdout, stderr)."""
    from fingerprint_training.cli import main  # the engine's commands plus train/evaluate

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def load_script(name: str):
    """``Testing/<name>.py`` (a benchmark or tool script) as a module."""
    spec = importlib.util.spec_from_file_location(name, TESTING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
