"""The bundled sample images, offered in Slicer's Sample Data module (category "SubjectFingerprint").

The files ship with the module (Resources/SampleData, copied there by CMake from the
repository's Resources/SampleData); Sample Data "downloads" them from their file:// URI into
its cache, so nothing goes over the network.
"""

import pathlib
from typing import Dict, List

CATEGORY = "SubjectFingerprint"
# sample name -> files relative to Resources/SampleData (the same subject twice: a match to find)
SAMPLES: Dict[str, List[str]] = {
    "SubjectFingerprintChestXray": ["cxr/images/nih47__00000047_000.png", "cxr/images/nih47__00000047_001.png"],
    "SubjectFingerprintBrainMRI": ["mri/TCGA-FG-6692/TCGA-FG-6692_MR-FLAIR.nii.gz",
                                   "mri/TCGA-FG-6692/TCGA-FG-6692_MR-T1CE.nii.gz"],
}


def sampleDataFolder() -> str:
    """The module's Resources/SampleData (installed), else the repository's (a source checkout)."""
    module = pathlib.Path(__file__).resolve().parents[1]
    for folder in (module / "Resources" / "SampleData", module.parent / "Resources" / "SampleData"):
        if folder.is_dir():
            return str(folder)
    raise FileNotFoundError(f"no Resources/SampleData next to {module}")


def sampleSources() -> List[dict]:
    """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for each sample."""
    folder = pathlib.Path(sampleDataFolder())
    icon = pathlib.Path(__file__).resolve().parents[1] / "Resources" / "Icons" / "SubjectFingerprint.png"
    sources = []
    for name, files in SAMPLES.items():
        paths = [folder / f for f in files]
        if not all(p.is_file() for p in paths):
            continue  # a build that left them out: nothing to offer
        sources.append({
            "category": CATEGORY,
            "sampleName": name,
            "uris": [p.as_uri() for p in paths],
            "fileNames": [p.name for p in paths],
            "nodeNames": [p.name.split(".")[0] for p in paths],
            "thumbnailFileName": str(icon),
            "loadFileTypes": ["VolumeFile"] * len(paths),
        })
    return sources


def registerSampleData() -> None:
    import SampleData

    for source in sampleSources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
