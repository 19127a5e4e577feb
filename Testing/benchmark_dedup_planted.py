"""Recall of planted shared patients, and false pairs, for `dedup` at the model's default
threshold, on DICOM exports built from the ChestX-ray14 *test* split (not a test).

Every test-split patient with two or more images is split across two exports (half of the
images in each, under two different pseudonyms); single-image patients go to one export only.

    python Testing/benchmark_dedup_planted.py [--model Resources/Models/starter-2d-cxr.pt]
"""

import argparse
import csv
import importlib.util
import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _demo_module():
    spec = importlib.util.spec_from_file_location(
        "make_demo_exports", REPO / "Resources/SampleData/make_demo_exports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(data: Path, split: Path, out: Path, max_subjects: int = 0):
    """Write the two exports under ``out``; returns the planted (pseudonym a, pseudonym b)
    pairs. ``max_subjects`` keeps only the first test-split patients (for a quick test)."""
    demo = _demo_module()
    test = set(json.loads(split.read_text())["test"])
    images = defaultdict(list)
    with open(data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["subject_id"] in test:
                images[row["subject_id"]].append(row["image_path"])
    rng = random.Random(0)
    planted = set()
    subjects = sorted(images)
    for subject in subjects[:max_subjects] if max_subjects else subjects:
        paths = images[subject]
        halves = ([paths[: len(paths) // 2], paths[len(paths) // 2:]] if len(paths) >= 2
                  else ([paths, []] if rng.random() < 0.5 else [[], paths]))
        pids = []
        for site, part in zip("ab", halves):
            pid = demo.pseudonym(site, subject)
            for k, rel in enumerate(part):
                pixels = np.asarray(Image.open(data / rel).convert("L"))
                path = out / f"site-{site}" / pid / f"S{k:03d}" / f"IM{k:05d}"
                demo.write_xray(path, pixels, pid, f"{site}-{subject}", k, monochrome1=site == "b")
            if part:
                pids.append(pid)
        if len(pids) == 2:
            planted.add(tuple(pids))
    return planted


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cxr14-subset-64px"))
    parser.add_argument("--split", default=str(REPO / "Resources/Splits/cxr14-subset-64px-seed42.json"))
    parser.add_argument("--model", default=str(REPO / "Resources/Models/starter-2d-cxr.pt"))
    parser.add_argument("--max-fpr", type=float, help="instead of the calibrated default threshold")
    args = parser.parse_args()

    from subject_fingerprint.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        planted = build(Path(args.data), Path(args.split), tmp / "exports")
        argv = ["dedup", str(tmp / "exports/site-a"), str(tmp / "exports/site-b"),
                "--model", args.model, "--out", str(tmp / "report"), "--quiet"]
        if args.max_fpr:
            argv += ["--max-fpr", str(args.max_fpr)]
        cli(argv)
        summary = json.loads((tmp / "report/summary.json").read_text())
        with open(tmp / "report/subjects.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    found = {(r["subject_a"], r["subject_b"]) for r in rows if r["dataset_a"] != r["dataset_b"]}
    found |= {(b, a) for a, b in found}
    hits = sum(1 for p in planted if p in found)
    false = [r for r in rows if (r["subject_a"], r["subject_b"]) not in planted
             and (r["subject_b"], r["subject_a"]) not in planted]
    print("| images a / b | planted shared patients | found | recall | false subject pairs | "
          "threshold | FPR per image pair |")
    print("|---|---|---|---|---|---|---|")
    n = [d["images"] for d in summary["datasets"]]
    print(f"| {n[0]} / {n[1]} | {len(planted)} | {hits} | {hits / max(len(planted), 1):.2f} | "
          f"{len(false)} | {summary['threshold']:.4g} | {summary['false_positive_rate']} |")


if __name__ == "__main__":
    main()
