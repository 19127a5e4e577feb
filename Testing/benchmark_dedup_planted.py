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


def read_manifest(data: Path, subjects=None):
    """{subject: [image paths]} of a manifest folder, only ``subjects`` when given."""
    images = defaultdict(list)
    with open(data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if subjects is None or row["subject_id"] in subjects:
                images[row["subject_id"]].append(row["image_path"])
    return images


def build_sites(data: Path, out: Path, per_site: int, n_shared: int, n_copies: int = 1,
                subjects=None, seed: int = 0):
    """Two exports of ``per_site`` subjects each with a known answer.

    ``n_shared`` subjects with two or more images are split across both exports (half of the
    images each, two pseudonyms); the others are in one export only. ``n_copies`` images of
    site-b are copied under a new patient ID in site-b (an exact duplicate). Returns
    ``{"shared": {(pid a, pid b)}, "copies": {frozenset((pid, copy pid))}}``.
    """
    demo = _demo_module()
    images = read_manifest(data, subjects)
    rng = random.Random(seed)
    multi = sorted(s for s, v in images.items() if len(v) >= 2)
    rng.shuffle(multi)
    shared = multi[:n_shared]
    rest = sorted(set(images) - set(shared))
    rng.shuffle(rest)
    need = 2 * (per_site - n_shared)
    if len(rest) < need:
        raise ValueError(f"{data}: {len(images)} subjects, too few for two sites of {per_site}")
    plan = {"a": [(s, images[s][: len(images[s]) // 2]) for s in shared],
            "b": [(s, images[s][len(images[s]) // 2:]) for s in shared]}
    for k, s in enumerate(rest[:need]):
        plan["ab"[k % 2]].append((s, images[s]))
    written = {}
    for site, entries in plan.items():
        for subject, paths in entries:
            pid = demo.pseudonym(site, subject)
            for k, rel in enumerate(paths):
                pixels = np.asarray(Image.open(data / rel).convert("L"))
                path = out / f"site-{site}" / pid / f"S{k:03d}" / f"IM{k:05d}"
                demo.write_xray(path, pixels, pid, f"{site}-{subject}", k, monochrome1=site == "b")
                written.setdefault(site, []).append((pid, path))
    truth = {"shared": {(demo.pseudonym("a", s), demo.pseudonym("b", s)) for s in shared},
             "copies": set()}
    import pydicom

    for n, (pid, path) in enumerate(rng.sample(written["b"], n_copies)):
        ds = pydicom.dcmread(path)
        copy_id = f"B-copy{n:04d}"
        ds.PatientID = ds.PatientName = copy_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = demo.uid("copy", path)
        target = out / "site-b" / copy_id / "S000" / "IM00000"
        target.parent.mkdir(parents=True)
        ds.save_as(target, enforce_file_format=True)
        truth["copies"].add(frozenset((pid, copy_id)))
    return truth


def score_report(report: Path, truth) -> dict:
    """Found / false pairs of a dedup report against a known answer."""
    summary = json.loads((report / "summary.json").read_text())
    with open(report / "subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    good = {frozenset(p) for p in truth["shared"]} | set(truth["copies"])
    right = [r for r in rows if frozenset((r["subject_a"], r["subject_b"])) in good]
    shared_found = sum(1 for r in right if r["dataset_a"] != r["dataset_b"])
    posteriors = [float(r["probability"]) for r in rows]
    return {"reported": len(rows), "false": len(rows) - len(right), "found": shared_found,
            "planted": len(truth["shared"]), "posteriors": posteriors,
            "mean_posterior": float(np.mean(posteriors)) if rows else None,
            "precision": len(right) / len(rows) if rows else None,
            "expected_false": summary["expected_false_pairs"], "summary": summary}


def calibration_p_value(posteriors, right: int) -> float:
    """Two-sided p-value of ``right`` correct pairs among pairs reported with these posteriors,
    were the posteriors exact: the count is then Poisson-binomial; the p-value sums the
    probabilities of the counts no likelier than the one seen."""
    pmf = np.ones(1)
    for p in posteriors:  # add one pair: correct with probability p
        pmf = np.r_[pmf * (1 - p), 0.0] + np.r_[0.0, pmf * p]
    return float(min(1.0, pmf[pmf <= pmf[right] * (1 + 1e-9)].sum()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cxr14-subset-64px"))
    parser.add_argument("--split", default=str(REPO / "Resources/Splits/cxr14-subset-64px-seed42.json"),
                        help="its test subjects are used; 'none': every subject of --data")
    parser.add_argument("--model", default=str(REPO / "Resources/Models/starter-2d-cxr.pt"))
    parser.add_argument("--max-fpr", type=float, default=0.01,
                        help="the old fixed per-image-pair threshold compared with the new rule")
    args = parser.parse_args()

    from subject_fingerprint.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.split == "none":
            # Every multi-image subject split across the two exports, as build() does.
            images = read_manifest(Path(args.data))
            multi = [s for s, v in images.items() if len(v) >= 2]
            per_site = (len(images) + len(multi)) // 2
            truth = build_sites(Path(args.data), tmp / "exports", per_site, len(multi), n_copies=0)
            planted = truth["shared"]
        else:
            planted = build(Path(args.data), Path(args.split), tmp / "exports")
            truth = {"shared": planted, "copies": set()}
        base = ["dedup", str(tmp / "exports/site-a"), str(tmp / "exports/site-b"),
                "--model", args.model, "--quiet", "--save-libraries", str(tmp / "libs")]
        cli(base + ["--out", str(tmp / "new")])
        libs = ["dedup", str(tmp / "libs/site-a.h5"), str(tmp / "libs/site-b.h5"),
                "--model", args.model, "--quiet"]
        cli(libs + ["--out", str(tmp / "old"), "--max-fpr", str(args.max_fpr)])
        results = {"new": score_report(tmp / "new", truth), "old": score_report(tmp / "old", truth)}
    print("| rule | images a / b | planted shared | found | recall | false subject pairs | "
          "expected false pairs (stated) | estimated shared | self-check AUC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        n = [d["images"] for d in s["datasets"]]
        rule = (f"new: <= {s['max_false_pairs']:.3g} expected false pairs" if name == "new"
                else f"old: fixed threshold {s['threshold']:.4g} (FPR {args.max_fpr} per image pair)")
        print(f"| {rule} | {n[0]} / {n[1]} | {len(planted)} | {r['found']} | "
              f"{r['found'] / max(len(planted), 1):.2f} | {r['false']} | {r['expected_false']:.3g} | "
              f"{s['estimated_shared_subjects']:.1f} | {s['self_check']['auc']:.3f} |")


if __name__ == "__main__":
    main()
