"""Both modules load, and say what is missing, in a Slicer that has no torch and no MONAI.

The static check (test_slicer_static) looks at module-scope imports of the module files;
this one really imports the modules and their Lib helpers in a child Python where torch and
monai cannot be imported, as in a fresh Slicer before the PyTorch extension installed anything.
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys
for name in ("torch", "monai"):
    sys.modules[name] = None  # import fails, importlib.util.find_spec returns None: "not installed"
import slicer_harness
slicer_harness.install()
import SubjectFingerprint, FingerprintTraining
import SubjectFingerprintLib.widget, SubjectFingerprintLib.views, SubjectFingerprintLib.sampledata
import SubjectFingerprintLib.selftest, FingerprintTrainingLib.widget, FingerprintTrainingLib.selftest
from SubjectFingerprintLib import dependencies
logic = SubjectFingerprint.SubjectFingerprintLogic()
params = logic.getParameterNode()
try:
    logic.ensureDependencies()
    error = ""
except dependencies.DependencyError as exc:
    error = str(exc)
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in
                 ("torch", "monai", "subject_fingerprint", "fingerprint_training") and sys.modules[m] is not None})
print(json.dumps({"loaded": loaded, "device": params.device, "candidates": params.candidates,
                  "trainingLogic": hasattr(FingerprintTraining, "FingerprintTrainingLogic"),
                  "torchAvailable": dependencies.torchAvailable(), "error": error}))
"""


def test_modules_import_and_name_missing_packages_without_torch():
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    # Importing the modules and creating the Logic pulled in neither torch nor the engine.
    assert answer["loaded"] == []
    assert answer["trainingLogic"]
    # The parameter node has its defaults without any engine code.
    assert (answer["device"], answer["candidates"]) == ("auto", 10)
    # Outside Slicer's application nothing is installed: the user is told what is missing.
    assert not answer["torchAvailable"]
    assert "torch" in answer["error"] and "monai" in answer["error"]
