"""Find matches for every volume in a folder and write them to a CSV (Slicer batch mode).

    Slicer --no-main-window --python-script batch_find_matches.py FOLDER LIBRARY OUT.csv [--model M] [-k K] [--device D]

This needs Slicer's application: ``slicer.mrmlScene`` and the ScriptedLoadableModule base
classes (which import ``qt`` and ``ctk``) exist there, also without a main window, but not in
``PythonSlicer``, which is Slicer's plain Python. Without Slicer use the engine's command line
instead (``PythonSlicer -m subject_fingerprint query ...`` or ``subject-fingerprint query``).
Each image file in FOLDER (NRRD, NIfTI, MetaImage, PNG, JPEG, TIFF, DICOM) is
loaded as a volume node and looked up with ``SubjectFingerprintLogic.findMatches``; OUT.csv
gets one row per candidate: query, rank, subject, dataset, image, distance, probability.
Files that fail are reported on stderr and in the CSV (``error`` column) and do not stop the run.
Exit code: 0 ok, 1 some files failed, 2 error. The script calls ``sys.exit`` itself, as
Slicer's ``--python-script`` requires.
"""

import argparse
import os
import sys

VOLUME_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png", ".jpg", ".jpeg",
                     ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
COLUMNS = ("query", "rank", "subject", "dataset", "image", "distance", "probability", "error")


def volumeFiles(folder):
    """Image files directly in ``folder``, sorted (hidden files and other files are skipped)."""
    names = sorted(os.listdir(folder))
    return [os.path.join(folder, n) for n in names
            if not n.startswith(".") and n.lower().endswith(VOLUME_EXTENSIONS)
            and os.path.isfile(os.path.join(folder, n))]


def parseArguments(argv):
    parser = argparse.ArgumentParser(prog="batch_find_matches.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of image files to identify")
    parser.add_argument("library", help="embedding library (.h5)")
    parser.add_argument("out", help="CSV file to write")
    parser.add_argument("--model", default=None, help="model checkpoint (default: the bundled starter model)")
    parser.add_argument("-k", type=int, default=10, help="candidates per image (default 10)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args([a for a in argv if a != "--"])


def main(argv=None):
    """Run the batch lookup; returns the exit code."""
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    import slicer
    from SubjectFingerprint import SubjectFingerprintLogic
    from subject_fingerprint.csvsafe import SafeDictWriter

    logic = SubjectFingerprintLogic()
    try:
        if not os.path.isdir(args.folder):
            raise ValueError(f"{args.folder}: no such folder")
        files = volumeFiles(args.folder)
        if not files:
            raise ValueError(f"{args.folder}: no image files found")
        notice = logic.deviceNotice(args.device)
        if notice:
            print(notice, file=sys.stderr)
        failed = 0
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = SafeDictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for path in files:
                name = os.path.basename(path)
                node = None
                try:
                    node = logic.loadVolumeFile(path)
                    rows = logic.findMatches(node, args.library, modelPath=args.model, k=args.k, device=args.device)
                    for row in rows:
                        writer.writerow({"query": name, **{c: row.get(c) for c in COLUMNS[1:-1]},
                                         "probability": "" if row["probability"] is None else row["probability"],
                                         "error": ""})
                    print(f"{name}: {rows[0]['subject'] if rows else '-'} (distance "
                          f"{rows[0]['distance']:.4f})" if rows else f"{name}: no candidates")
                except Exception as exc:  # one bad file must not stop the batch
                    failed += 1
                    writer.writerow({"query": name, "error": str(exc)})
                    print(f"{name}: error: {exc}", file=sys.stderr)
                finally:
                    if node is not None:
                        slicer.mrmlScene.RemoveNode(node)
        print(f"{len(files) - failed} of {len(files)} images looked up; results in {args.out}")
        return 1 if failed else 0
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
