"""The ``subject-fingerprint`` command line.

Subcommands of this package: ``index``, ``query`` and ``library``. The training package adds
``split``, ``train`` and ``evaluate`` and the dedup package ``dedup``, each through its own
``register(subparsers)``. Exit codes: 0 success, 1 something was found or some items failed,
2 an error stopped the command.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import sys
from typing import List, Optional, Sequence

from . import __version__
from .errors import FingerprintError

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

# Other packages that add subcommands; absent ones are simply not offered.
_PLUGINS = ("fingerprint_training.cli", "subject_fingerprint.dedup.cli")


def _common_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model checkpoint (.pt); default: the bundled starter model")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")


def print_table(rows: Sequence[dict], columns: Sequence[str], out=None) -> None:
    """Print dictionaries as an aligned plain-text table."""
    out = out or sys.stdout

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    text = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)), file=out)


def _report_failures(failures, out=None) -> None:
    out = out or sys.stderr
    if failures:
        print(f"{len(failures)} item(s) failed:", file=out)
        for failure in failures:
            print(f"  {failure.path}: {failure.reason}", file=out)


# -- index -------------------------------------------------------------------------------------

def _add_index(sub) -> None:
    p = sub.add_parser("index", help="embed images and add them to an embedding library",
                       description="Embed every image found under SOURCE (files, folders, DICOM "
                                   "exports) and add it to the library.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--library", required=True, help="embedding library (.h5); created if missing")
    p.add_argument("--dataset", default="", help="dataset name stored with each entry")
    p.add_argument("--manifest", help="CSV with subject_id,image_path[,modality,view]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers that decode images")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="store images whose pixels are already in the library")
    p.add_argument("--transactional", action="store_true",
                   help="write nothing until every image is embedded")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common_model_args(p)
    p.set_defaults(func=_run_index)


def _run_index(args) -> int:
    from .lookup import index

    report = index(args.sources, args.library, model=args.model, dataset=args.dataset,
                   manifest=args.manifest, device=args.device, batch_size=args.batch_size,
                   num_workers=args.workers, skip_duplicates=not args.keep_duplicates,
                   progress=not args.json, transactional=args.transactional)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report.added} image(s) added to {args.library}, {report.duplicates} exact "
              f"duplicate(s) skipped, {len(report.failures)} failure(s), "
              f"{report.seconds:.1f} s")
        _report_failures(report.failures)
    return EXIT_FOUND if report.failures else EXIT_OK


# -- query -------------------------------------------------------------------------------------

def _add_query(sub) -> None:
    p = sub.add_parser("query", help="find the closest subjects for images",
                       description="Rank the library's images and subjects for each IMAGE "
                                   "(a file or a DICOM series folder).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--library", required=True)
    p.add_argument("-k", type=int, default=10, help="number of candidates (default 10)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON list, one object per query")
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per candidate subject")
    _common_model_args(p)
    p.set_defaults(func=_run_query)


def _run_query(args) -> int:
    from .lookup import query

    failures: list = []
    results = query(args.images, args.library, model=args.model, k=args.k,
                    device=args.device, failures=failures)
    answers = [{"query": r.query, **r.to_dict()} for r in results]
    if args.json:
        print(json.dumps(answers, indent=2))
    elif args.csv:
        columns = ["query", "rank", "subject_id", "dataset", "distance", "probability", "image_id"]
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for answer in answers:
            for subject in answer["subjects"]:
                writer.writerow({"query": answer["query"], **subject})
    else:
        for answer in answers:
            print(f"\n{answer['query']}")
            if answer.get("open_set"):
                print(answer["open_set"]["answer"])
            subjects = answer["subjects"]
            columns = ["rank", "subject_id", "dataset", "distance"]
            if subjects and subjects[0].get("probability") is not None:
                columns.append("probability")
            print_table(subjects, columns + ["image_id"])
    _report_failures(failures)
    return EXIT_FOUND if failures else EXIT_OK


# -- library -----------------------------------------------------------------------------------

def _add_library(sub) -> None:
    p = sub.add_parser("library", help="inspect or edit an embedding library")
    lib_sub = p.add_subparsers(dest="library_command", required=True)

    info = lib_sub.add_parser("info", help="summary of a library")
    info.add_argument("library")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_run_library_info)

    ls = lib_sub.add_parser("list", help="list the entries of a library")
    ls.add_argument("library")
    ls.add_argument("--subject", action="append", default=[], help="only this subject (repeatable)")
    ls.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    ls.add_argument("--csv", action="store_true")
    ls.set_defaults(func=_run_library_list)

    rm = lib_sub.add_parser("remove", help="remove entries by subject or image ID")
    rm.add_argument("library")
    rm.add_argument("--subject", action="append", default=[], help="subject ID (repeatable)")
    rm.add_argument("--image", action="append", default=[], help="image ID (repeatable)")
    rm.set_defaults(func=_run_library_remove)


def _run_library_info(args) -> int:
    from .library import EmbeddingLibrary

    with EmbeddingLibrary.open(args.library, mode="r") as lib:
        info = lib.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return EXIT_OK


_LIST_COLUMNS = ["subject_id", "image_id", "dataset", "modality", "view", "source", "content_hash"]


def _run_library_list(args) -> int:
    from .library import EmbeddingLibrary

    with EmbeddingLibrary.open(args.library, mode="r") as lib:
        columns = {name: lib.column(name) for name in _LIST_COLUMNS}
    rows = [dict(zip(_LIST_COLUMNS, values)) for values in zip(*columns.values())]
    if args.subject:
        wanted = set(args.subject)
        rows = [r for r in rows if r["subject_id"] in wanted]
    if args.limit:
        rows = rows[: args.limit]
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=_LIST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        print_table(rows, _LIST_COLUMNS[:5])
    return EXIT_OK


def _run_library_remove(args) -> int:
    from .library import EmbeddingLibrary

    if not args.subject and not args.image:
        raise FingerprintError("library remove: give at least one --subject or --image")
    with EmbeddingLibrary.open(args.library, mode="a") as lib:
        removed = lib.remove(subject_ids=args.subject, image_ids=args.image)
    print(f"{removed} entr{'y' if removed == 1 else 'ies'} removed from {args.library}")
    return EXIT_OK


# -- entry point -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subject-fingerprint",
        description="Recognise the same subject across medical images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_index(sub)
    _add_query(sub)
    _add_library(sub)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # the package that adds these commands is not installed
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or EXIT_OK)
    except FingerprintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        # Files the user named that are missing or unreadable, bad option values.
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
