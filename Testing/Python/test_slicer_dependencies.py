"""Dependency installation inside Slicer: what is missing or too old, one confirmation, torch only
through PyTorchUtils, torch/SimpleITK/numpy never replaced, nothing installed in testing mode."""

import sys
import types

import pytest

slicer = pytest.importorskip("slicer")
import slicer_harness  # noqa: E402


@pytest.fixture()
def deps():
    slicer_harness.install()
    return slicer_harness.import_module("SubjectFingerprintLib.dependencies")


def test_version_comparison(deps):
    assert deps.versionAtLeast("2.13.0+cpu", "2.3")
    assert deps.versionAtLeast("2.3", "2.3.0")
    assert not deps.versionAtLeast("2.2.2", "2.3")
    assert not deps.versionAtLeast("1.2rc1", "1.3")
    assert deps.versionTuple("1.5.dev0") == (1, 5)


def test_every_package_an_action_imports_is_in_its_modules_list(deps):
    engine = {p.importName for p in deps.ENGINE_PACKAGES}
    training = {p.importName for p in deps.TRAINING_PACKAGES}
    # dedup report: matplotlib; calibration: scipy; the library writer lock: filelock
    assert {"monai", "scipy", "h5py", "pydicom", "PIL", "tqdm", "psutil", "matplotlib", "filelock"} <= engine
    # splits/metrics, evaluate --baselines, the miners and losses
    assert {"sklearn", "skimage", "pytorch_metric_learning"} <= training - engine
    assert engine <= training
    assert not {"torch", "SimpleITK", "numpy"} & training  # never installed by pip here


def test_missing_and_too_old_packages_are_both_found(deps, monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.0.0" if name == "monai" else real(name))
    missing = deps.Package("no_such_module_xyz", "no-such-dist", "1.0")
    found = dict((p.distribution, v) for p, v in deps.problems(deps.ENGINE_PACKAGES + (missing,)))
    assert found["monai"] == "1.0.0"             # installed but older than 1.3: an old monai no longer passes
    assert found["no-such-dist"] is None
    assert "h5py" not in found
    assert deps.describe([(deps.ENGINE_PACKAGES[0], "1.0.0")]) == ["monai>=1.3 (installed: 1.0.0)"]


def test_an_old_torch_is_refused_with_what_to_do(deps, monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2.2.1" if name == "torch" else real(name))
    assert "torch>=2.3" in deps.torchProblem() and "PyTorch Utils" in deps.torchProblem()
    with pytest.raises(deps.DependencyError, match="2.2.1"):
        deps.ensureDependencies()
    monkeypatch.setattr(metadata, "version", lambda name: "2.3.0" if name == "torch" else real(name))
    assert deps.torchProblem() is None


def test_pyproject_asks_for_the_torch_the_code_needs(deps):
    import pathlib
    import re

    text = (pathlib.Path(slicer_harness.REPO) / "pyproject.toml").read_text()
    assert re.search(r'"torch>=([0-9.]+)"', text).group(1) == deps.TORCH_MINIMUM


class FakeSlicer:
    """slicer.app / slicer.util / PyTorchUtils stand-ins that record what the installer does."""

    def __init__(self, testing=False, answer=True):
        self.calls = []
        self.testing, self.answer = testing, answer
        self.app = types.SimpleNamespace(testingEnabled=lambda: self.testing)
        self.util = types.SimpleNamespace(confirmOkCancelDisplay=self.confirm, pip_install=self.pip)

    def confirm(self, text, title):
        self.calls.append(("confirm", text))
        return self.answer

    def pip(self, args):
        constraints = open(args[args.index("-c") + 1]).read()
        self.calls.append(("pip", [a for a in args if not a.endswith(".txt")], constraints))


@pytest.fixture()
def fake(deps, monkeypatch):
    f = FakeSlicer()
    monkeypatch.setattr(slicer, "app", f.app, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", f.confirm, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", f.pip)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.8 / 5.10: no slicer.packaging
    return f


def fake_missing(deps, monkeypatch, names, torch_missing=False):
    wanted = set(names)
    real_problems = deps.problems
    monkeypatch.setattr(deps, "problems", lambda packages: [(p, None) for p in packages if p.importName in wanted]
                        if packages is not deps.SLICER_PACKAGES else real_problems(packages))
    if torch_missing:
        state = {"installed": False}
        monkeypatch.setattr(deps, "torchProblem",
                            lambda: None if state["installed"] else "torch is not installed")
        return state


def test_one_confirmation_lists_torch_and_packages_then_installs_with_pins(deps, fake, monkeypatch):
    state = fake_missing(deps, monkeypatch, ["monai", "matplotlib"], torch_missing=True)

    class Logic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None):
            fake.calls.append(("torch", askConfirmation, torchVersionRequirement))
            state["installed"] = True
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))

    def pip(args):
        fake.pip(args)
        monkeypatch.setattr(deps, "problems", lambda packages: [])

    monkeypatch.setattr(slicer.util, "pip_install", pip)
    deps.ensureDependencies()
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["confirm", "torch", "pip"]  # one dialog, torch through PyTorchUtils, then pip
    text = fake.calls[0][1]
    assert "torch>=2.3" in text and "monai>=1.3" in text and "matplotlib>=3.6" in text
    assert fake.calls[1] == ("torch", False, ">=2.3")  # PyTorchUtils does not ask a second time
    _, args, constraints = fake.calls[2]
    assert args[0] == "-c" and "monai>=1.3" in args and "matplotlib>=3.6" in args
    assert not any(a.startswith(("torch", "SimpleITK", "numpy")) for a in args[1:])
    assert "SimpleITK==" in constraints and "numpy==" in constraints  # Slicer's own are pinned


def test_declining_or_testing_mode_installs_nothing(deps, fake, monkeypatch):
    fake_missing(deps, monkeypatch, ["h5py"])
    fake.answer = False
    with pytest.raises(deps.DependencyError, match="declined.*h5py"):
        deps.ensureDependencies()
    assert [c[0] for c in fake.calls] == ["confirm"]
    fake.calls.clear()
    fake.testing = True
    with pytest.raises(deps.DependencyError, match="testing mode.*h5py"):
        deps.ensureDependencies()
    assert fake.calls == []


def test_slicer_packaging_is_used_where_it_exists(deps, fake, monkeypatch):
    fake_missing(deps, monkeypatch, ["tqdm"])
    used = {}

    def pip_install(requirements, constraints=None, requester=None):
        used.update(requirements=requirements, constraints=open(constraints).read(), requester=requester)
        monkeypatch.setattr(deps, "problems", lambda packages: [])

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_install = pip_install
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    deps.ensureDependencies()
    assert used["requirements"] == ["tqdm>=4.60"] and used["requester"] == "SubjectFingerprint"
    assert "SimpleITK==" in used["constraints"]


def test_a_pip_failure_is_a_dependency_error_that_names_the_packages(deps, fake, monkeypatch):
    import subprocess

    fake_missing(deps, monkeypatch, ["monai"])

    def pip(args):
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    monkeypatch.setattr(slicer.util, "pip_install", pip)
    with pytest.raises(deps.DependencyError, match="monai>=1.3.*kept at their installed versions"):
        deps.ensureDependencies()
