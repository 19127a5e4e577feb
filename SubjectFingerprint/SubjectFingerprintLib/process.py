"""Run the engine's command line in a separate process, without freezing Slicer.

A crash or an out-of-memory in the child cannot take Slicer down, GPU memory is freed when
it exits, and cancelling is a kill of the whole process tree. The widget calls ``poll()``
from a ``qt.QTimer``; scripts call ``wait()``. Nothing here imports Qt or torch.
"""

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional, Sequence

# tqdm lines look like "embedding:  40%|####      | 4/10 [00:01<00:02, 3.1img/s]".
_PROGRESS = re.compile(r"(\d+)/(\d+)\s*\[")
_MAX_LOG_LINES = 5000


def pythonExecutable() -> str:
    """The interpreter for child processes: PythonSlicer inside Slicer, else this Python."""
    try:
        import slicer

        if hasattr(slicer, "app"):
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


def packagePaths() -> List[str]:
    """Folders that hold ``subject_fingerprint`` and ``fingerprint_training``.

    In a Slicer build both packages sit next to their module's script, which PythonSlicer
    does not have on its path, so they are passed through PYTHONPATH.
    """
    here = Path(__file__).resolve().parent.parent  # the SubjectFingerprint module folder
    paths = [here]
    for candidate in (here.parent / "FingerprintTraining", here):
        if (candidate / "fingerprint_training").is_dir():
            paths.append(candidate)
    return [str(p) for p in dict.fromkeys(paths)]


def engineCommand(*args, module: str = "subject_fingerprint") -> List[str]:
    """``[python, "-m", module, *args]`` with every argument as a string (``module``:
    ``subject_fingerprint`` for the engine's commands, ``fingerprint_training`` for training)."""
    return [pythonExecutable(), "-m", module] + [str(a) for a in args]


class BackgroundProcess:
    """A child process whose output lines and tqdm progress are collected by a reader thread.

    ``onLog(line)``, ``onProgress(done, total)`` and ``onFinished(returncode, cancelled)`` are
    called from ``poll()`` (so in the caller's thread, e.g. Qt's), never from the reader thread.
    """

    def __init__(self, command: Sequence[str], onLog: Optional[Callable] = None,
                 onProgress: Optional[Callable] = None, onFinished: Optional[Callable] = None,
                 env: Optional[dict] = None, cwd: Optional[str] = None):
        self.command = [str(c) for c in command]
        self.onLog, self.onProgress, self.onFinished = onLog, onProgress, onFinished
        self.env, self.cwd = env, cwd
        self.lines: List[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._finishedReported = False

    # -- running ------------------------------------------------------------------------
    def start(self) -> "BackgroundProcess":
        """Start the child; its stderr is merged into stdout."""
        env = dict(os.environ if self.env is None else self.env)
        extra = packagePaths()
        if env.get("PYTHONPATH"):
            extra.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(extra)
        env.setdefault("PYTHONUNBUFFERED", "1")
        kwargs = {}
        if os.name == "nt":  # no console window flashing up on Windows
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=self.cwd, **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        """Split the output on newlines and carriage returns (tqdm redraws with \\r)."""
        buffer = ""
        stream = self._proc.stdout
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            buffer += chunk.decode("utf-8", errors="replace")
            parts = re.split(r"[\r\n]", buffer)
            buffer = parts.pop()
            for part in parts:
                if part.strip():
                    self._queue.put(part)
        if buffer.strip():
            self._queue.put(buffer)
        self._queue.put(None)  # end of output

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._finishedReported

    def poll(self) -> bool:
        """Deliver pending output and, once the child has exited, the end. True while running."""
        if self._proc is None:
            return False
        ended = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            self._handleLine(item)
        if ended or (self._reader is not None and not self._reader.is_alive() and self._queue.empty()):
            self.returncode = self._proc.wait()
            self._finish()
            return False
        return not self._finishedReported

    def _handleLine(self, line: str) -> None:
        match = _PROGRESS.search(line)
        if match and self.onProgress:
            self.onProgress(int(match.group(1)), int(match.group(2)))
        if match and self.lines and _PROGRESS.search(self.lines[-1]):
            self.lines[-1] = line  # a redrawn progress bar replaces the previous one
            return
        self.lines.append(line)
        del self.lines[:-_MAX_LOG_LINES]
        if self.onLog:
            self.onLog(line)

    def _finish(self) -> None:
        if not self._finishedReported:
            self._finishedReported = True
            if self.onFinished:
                self.onFinished(self.returncode, self.cancelled)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the child exits (for scripts and batch mode); returns its exit code."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
            time.sleep(0.05)
        return self.returncode

    def cancel(self) -> None:
        """Kill the child and everything it started (DataLoader workers included)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self.cancelled = True
        try:
            import psutil

            children = psutil.Process(self._proc.pid).children(recursive=True)
        except Exception:  # no psutil, or the process vanished between the checks
            children = []
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        # Kill and reap our own child through Popen so that its real exit status is kept.
        self._proc.kill()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class EngineRunnerMixin:
    """What both modules' Logic classes share: logging to a callback, the device notice, and
    one background run of the engine's command line at a time."""

    process: Optional[BackgroundProcess] = None
    logCallback: Optional[Callable[[str], None]] = None
    commandModule = "subject_fingerprint"  # the package whose command line runs

    def log(self, message: str) -> None:
        import logging

        logging.info(message)
        if self.logCallback:
            self.logCallback(message)

    @staticmethod
    def deviceNotice(device: str = "auto") -> Optional[str]:
        """None, or the sentence saying the requested GPU is not there and the CPU is used."""
        from subject_fingerprint.device import resolve_device

        return resolve_device(device)[1]

    def _start(self, arguments: Sequence, waitForCompletion: bool, onLog=None, onProgress=None,
               **attributes):
        """Start the engine's command line; ``attributes`` (kind, paths) are kept on the process."""
        if self.process is not None and self.process.running:
            raise RuntimeError("Another run is still going; wait for it or cancel it.")
        command = engineCommand(*arguments, module=self.commandModule)
        self.log(" ".join(command))
        self.process = BackgroundProcess(command, onLog=onLog or self.log, onProgress=onProgress)
        for name, value in attributes.items():
            setattr(self.process, name, value)
        self.process.start()
        if waitForCompletion:
            self.process.wait()
            self.finishBackground(self.process)
        return self.process

    def cancel(self) -> None:
        """Stop the current background run at once (a transactional index leaves the library as it was)."""
        if self.process is not None:
            self.process.cancel()
