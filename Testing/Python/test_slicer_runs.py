"""Background runs: exit codes read exactly, Cancel returns at once, buttons come back after a
failure, the poll timer stops on cleanup, and find/add run off the main thread."""

import sys
import threading
import time
import types

import pytest

slicer = pytest.importorskip("slicer")
import slicer_harness  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    slicer_harness.install()
    from SubjectFingerprintLib import process

    return process


@pytest.mark.parametrize("kind,code,lines,expected", [
    ("index", 0, [], "ok"),
    ("index", 1, ["error reading broken.png"], "warnings"),     # some files could not be read
    ("index", 1, ["Traceback (most recent call last):", "MemoryError"], "failed"),  # a crash
    ("index", 2, ["error: no such folder"], "failed"),
    ("dedup", 0, [], "ok"),
    ("dedup", 1, ["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'matplotlib'"],
     "failed"),
    ("dedup", 1, [], "failed"),   # dedup exits 1 only with --fail-on-overlap, which is never passed
    ("train", 1, [], "failed"),
    ("evaluate", -9, [], "failed"),
])
def test_exit_codes_are_read_exactly(lib, kind, code, lines, expected):
    assert lib.runOutcome(kind, code, False, lines) == expected
    assert lib.runOutcome(kind, code, True, lines) == "cancelled"


def test_a_crashed_check_is_an_error_not_a_partial_report(lib, tmp_path):
    """dedup exit 1 (matplotlib missing in a fresh Slicer) must raise, not open a half-written subjects.csv."""
    from subject_fingerprint.errors import FingerprintError

    sf = slicer_harness.import_module("SubjectFingerprint")
    (tmp_path / "subjects.csv").write_text("subject_a,subject_b\nA,B\n")
    run = types.SimpleNamespace(kind="dedup", returncode=1, cancelled=False, reportFolder=str(tmp_path), error=None,
                                lines=["Traceback (most recent call last):",
                                       "ModuleNotFoundError: No module named 'matplotlib'"])
    with pytest.raises(FingerprintError, match="exit code 1.*matplotlib"):
        sf.SubjectFingerprintLogic().finishBackground(run)
    run.returncode, run.lines = 0, []
    with pytest.raises(FingerprintError, match="without writing its report"):  # no index.html
        sf.SubjectFingerprintLogic().finishBackground(run)


def test_cancel_returns_at_once_and_poll_collects_the_exit(lib):
    process = lib.BackgroundProcess([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    process.start()
    deadline = time.monotonic() + 30
    while process.poll() and not process.lines and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    process.cancel()
    assert time.monotonic() - started < 1.0
    while process.poll():
        time.sleep(0.02)
    assert process.cancelled and process.returncode != 0


def test_background_task_runs_off_the_calling_thread_and_keeps_its_error(lib):
    seen = {}

    def work(task):
        seen["thread"] = threading.current_thread()
        task.log("working")
        return 42

    task = lib.BackgroundTask(work, kind="find").start()
    assert task.wait() == 0 and task.result == 42 and task.lines == ["working"]
    assert seen["thread"] is not threading.current_thread()

    def fail(task):
        raise ValueError("bad volume")

    task = lib.BackgroundTask(fail).start()
    assert task.wait() == 2 and isinstance(task.error, ValueError)
    assert lib.failureMessage(task) == "bad volume"


class Button:
    def __init__(self, text):
        self.text, self.enabled = text, True


class Panel:
    """Just enough of a panel for BackgroundRunWidgetMixin (no Qt): a fake timer and ui."""

    def __init__(self, lib, logic):
        class P(lib.BackgroundRunWidgetMixin):
            pass

        self.mixin = P()
        m = self.mixin
        m.logic = logic
        m.log = []
        m.appendLog = m.log.append
        m.ui = types.SimpleNamespace(progressBar=types.SimpleNamespace(setVisible=lambda v: None,
                                                                      setRange=lambda a, b: None,
                                                                      setValue=lambda v: None),
                                     statusLabel=types.SimpleNamespace(text=""))
        m.updates = 0

        def update():
            m.updates += 1
        m._updateButtons = update
        m.timer = types.SimpleNamespace(active=False)
        m.timer.start = lambda: setattr(m.timer, "active", True)
        m.timer.stop = lambda: setattr(m.timer, "active", False)
        m._makeTimer = lambda: m.timer


def test_buttons_are_updated_after_a_failed_start_and_a_failed_run(lib):
    class Logic:
        cancelled = 0

        def finishBackground(self, run):
            raise RuntimeError("the run failed (exit code 2): bad model")

        def cancel(self):
            Logic.cancelled += 1

    panel = Panel(lib, Logic()).mixin
    button = Button("Build")

    def broken_start():
        raise RuntimeError("no such folder")

    panel.startBackground(button, broken_start)
    assert panel.updates == 1 and not panel.busy and button.text == "Build"
    assert any("no such folder" in line for line in panel.log)

    run = types.SimpleNamespace(poll=lambda: False, cancelled=False)
    panel.startBackground(button, lambda: run)
    assert panel.busy and button.text == "Cancel" and panel.timer.active
    panel.pollBackground()
    assert not panel.busy and button.text == "Build" and not panel.timer.active
    assert panel.updates == 3 and "bad model" in panel.ui.statusLabel.text


def test_cleanup_stops_the_poll_timer_and_cancels(lib):
    class Logic:
        cancelled = 0

        def cancel(self):
            Logic.cancelled += 1

    panel = Panel(lib, Logic()).mixin
    panel.startBackground(Button("Train"), lambda: types.SimpleNamespace(poll=lambda: True, cancelled=False))
    assert panel.timer.active
    panel.cleanupBackground()
    assert not panel.timer.active and Logic.cancelled == 1 and not panel.busy
