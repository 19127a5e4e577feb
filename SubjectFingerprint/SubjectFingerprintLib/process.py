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
        """Kill the child and everything it started (DataLoader workers included).

        Returns at once: the exit is collected by the next ``poll()``, so the GUI never waits.
        """
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
        # Kill our own child through Popen so that poll() reaps it and keeps its real status.
        self._proc.kill()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class BackgroundTask:
    """A function run on a worker thread, with the same interface as ``BackgroundProcess``.

    For short in-process work (one embedding, a ranking, adding one image) that must not block
    Qt's event loop: the function gets no Qt or MRML object, only arrays and paths prepared on
    the main thread. ``returncode`` is 0 on success and 2 when it raised (``error``); ``result``
    is its return value. Cancel cannot stop a thread: its result is then dropped.
    """

    def __init__(self, function: Callable, kind: str = "", onLog: Optional[Callable] = None,
                 onFinished: Optional[Callable] = None):
        self.function, self.kind = function, kind
        self.onLog, self.onFinished = onLog, onFinished
        self.lines: List[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.result = None
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._finishedReported = False

    def log(self, line: str) -> None:
        """Called by the function (any thread): delivered to ``onLog`` from ``poll()``."""
        self._queue.put(str(line))

    def start(self) -> "BackgroundTask":
        def run():
            try:
                self.result = self.function(self)
            except BaseException as exc:  # reported to the caller by poll()/finishBackground
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finishedReported

    # Each poll waits this long for the thread: a wait releases the GIL, so the worker progresses
    # even in an embedded interpreter whose event loop keeps the GIL while idle.
    SHARE_SECONDS = 0.04

    def poll(self) -> bool:
        if self._thread is None:
            return False
        self._thread.join(self.SHARE_SECONDS)
        alive = self._thread.is_alive()
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            self.lines.append(line)
            if self.onLog:
                self.onLog(line)
        if alive:
            return True
        if not self._finishedReported:
            self._finishedReported = True
            self.returncode = 0 if self.error is None else 2
            if self.onFinished:
                self.onFinished(self.returncode, self.cancelled)
        return False

    def wait(self, timeout: Optional[float] = None) -> int:
        if self._thread is not None:
            self._thread.join(timeout)
        while self.poll():
            self._thread.join(0.05)
        return self.returncode

    def cancel(self) -> None:
        if self.running:
            self.cancelled = True

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


# -- what an exit code means -------------------------------------------------------------------
OK, WARNINGS, CANCELLED, FAILED = "ok", "warnings", "cancelled", "failed"
# Exit codes of ``subject_fingerprint`` that are not failures, per command: index and query
# exit 1 when some files could not be read (the rest was done); dedup exits 1 only with
# --fail-on-overlap, which the modules never pass, so a 1 from it is a crash.
_WARNING_CODES = {"index": (1,), "query": (1,)}
_TRACEBACK = "Traceback (most recent call last)"


def runOutcome(kind: str, returncode: Optional[int], cancelled: bool, lines: Sequence[str] = ()) -> str:
    """OK, WARNINGS, CANCELLED or FAILED for a finished run, read exactly from its exit code.

    A Python crash also exits with 1, so a 1 that printed a traceback is a failure for every
    command (a crash is never "done with warnings").
    """
    if cancelled:
        return CANCELLED
    if returncode == 0:
        return OK
    crashed = any(_TRACEBACK in line for line in lines)
    if not crashed and returncode in _WARNING_CODES.get(kind, ()):
        return WARNINGS
    return FAILED


def failureMessage(process) -> str:
    """The tool's own last ``error:`` line, else the last line of a traceback, else the last line."""
    lines = list(getattr(process, "lines", []))
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if getattr(process, "error", None) is not None:
        return str(process.error)
    return lines[-1] if lines else ""


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

    def _startTask(self, function: Callable, kind: str, waitForCompletion: bool, onLog=None, **attributes):
        """Run ``function(task)`` on a worker thread as the current run (see ``BackgroundTask``)."""
        if self.process is not None and self.process.running:
            raise RuntimeError("Another run is still going; wait for it or cancel it.")
        self.process = BackgroundTask(function, kind=kind, onLog=onLog or self.log)
        for name, value in attributes.items():
            setattr(self.process, name, value)
        self.process.start()
        if waitForCompletion:
            self.process.wait()
            self.finishBackground(self.process)  # raises the function's own error
            return self.process.result
        return self.process

    def cancel(self) -> None:
        """Stop the current background run at once (a transactional index leaves the library as it was)."""
        if self.process is not None:
            self.process.cancel()


class BackgroundRunWidgetMixin:
    """The panel side of a background run, shared by both modules' widgets.

    The run's button becomes Cancel, a QTimer polls the run, and when it ends the Logic's
    ``finishBackground`` is shown. Errors are displayed and never skip ``_updateButtons``
    (``slicer.util.tryWithErrorDisplay`` re-raises, which left the buttons disabled).
    The widget provides ``logic``, ``ui.progressBar``, ``ui.statusLabel``, ``appendLog``
    and ``_updateButtons``.
    """

    POLL_INTERVAL_MS = 200
    _running = None  # (button, its text, the run, onDone) while a run is active
    _timer = None

    @property
    def busy(self) -> bool:
        return self._running is not None

    def isRunButton(self, button) -> bool:
        return self._running is not None and self._running[0] is button

    def showError(self, message: str, exc: BaseException) -> None:
        """The error box in Slicer (none in testing mode), the log everywhere."""
        import logging
        import traceback

        logging.error("%s %s", message, exc)
        self.appendLog(f"{message} {exc}")
        try:
            import slicer

            if hasattr(slicer, "app") and not slicer.app.testingEnabled():
                slicer.util.errorDisplay(f"{message}\n\n{exc}", detailedText=traceback.format_exc())
        except Exception:  # no GUI to show it in: the log has it
            pass

    def _makeTimer(self):
        import qt

        timer = qt.QTimer()
        timer.setInterval(self.POLL_INTERVAL_MS)
        timer.connect("timeout()", self.pollBackground)
        return timer

    def startBackground(self, button, start: Callable, onDone: Optional[Callable] = None,
                        prepare: Optional[Callable] = None) -> None:
        """``prepare()`` (dependencies, device notice), then ``start()`` -> a run; its button becomes Cancel.

        Clicking the button of the active run cancels it; other run buttons do nothing meanwhile.
        ``onDone(run, summary)`` is called after a successful finish.
        """
        if self._running is not None:
            if self._running[0] is button:
                self.appendLog("Cancelling...")
                self.logic.cancel()
            return
        try:
            if prepare is not None:
                prepare()
            run = start()
            self._running = (button, button.text, run, onDone)
            button.text = "Cancel"
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress line
            if self._timer is None:
                self._timer = self._makeTimer()
            self._timer.start()
        except Exception as exc:
            self.showError("Could not start.", exc)
        finally:
            self._updateButtons()

    def onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.setValue(done)

    def pollBackground(self) -> None:
        if self._running is None:
            return
        button, text, run, onDone = self._running
        if run.poll():
            return
        self.stopBackgroundTimer()
        self._running = None
        button.text = text
        self.ui.progressBar.setVisible(False)
        try:
            summary = self.logic.finishBackground(run)
            message = summary.get("message", "") if isinstance(summary, dict) else str(summary)
            self.ui.statusLabel.text = message
            self.appendLog(message)
            if onDone is not None and not run.cancelled:
                onDone(run, summary)
        except Exception as exc:
            self.ui.statusLabel.text = str(exc)
            self.showError("The run failed.", exc)
        finally:
            self._updateButtons()

    def stopBackgroundTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    def cleanupBackground(self) -> None:
        """For the widget's ``cleanup()`` (also on Reload): stop polling and cancel the run."""
        self.stopBackgroundTimer()
        self._timer = None
        if self._running is not None:
            self._running = None
            self.logic.cancel()
