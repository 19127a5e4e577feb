"""The ``subject-fingerprint`` command line.

Subcommands of the engine: ``index``, ``query``, ``library`` and ``dedup``. The training package
depends on the engine, never the other way round: its command line
(``fingerprint_training.cli.main``, which the installed ``subject-fingerprint`` runs) is this one
plus ``split``, ``train``, ``evaluate`` and ``derive``, passed in as ``extra_commands``. Exit
codes: 0 success, 1 something was found or some items failed, 2 an error stopped the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence

from . import __version__
from .csvsafe import SafeDictWriter, printable
from .errors import EXIT_ERROR, EXIT_FOUND, EXIT_OK, FingerprintError

# Before torch is imported: OpenMP threads that spin while waiting made inference 2-10x
# slower on a loaded machine (BENCHMARKS.md); on a quiet one PASSIVE costs about 1.2x.
# A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _common_model_args(parser: argparse.ArgumentParser, backend: Optional[str] = "auto",
                       default_text: str = "") -> None:
    parser.add_argument("--model", help="model checkpoint (.pt); default: the bundled starter model")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--backend", default=backend,
                        choices=("auto", "torch", "bf16", "bf16-mixed", "onnx", "onnx-int8"),
                        help=f"inference backend (default {default_text or backend}); auto times torch, bf16 "
                             "and bf16-mixed (CPUs with bf16 units; bf16-mixed keeps the last "
                             "ResNet stage and the head in float32) and ONNX Runtime on a check "
                             "batch and keeps "
                             "the fastest whose embeddings match float32; onnx-int8 only on "
                             "request")


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
            print(f"  {printable(failure.path)}: {printable(failure.reason)}", file=out)


# -- index -------------------------------------------------------------------------------------

def _add_index(sub) -> None:
    p = sub.add_parser("index", help="embed images and add them to an embedding library",
                       description="Embed every image found under SOURCE (files, folders, DICOM "
                                   "exports) and add it to the library.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--library", required=True, help="embedding library (.h5); created if missing")
    p.add_argument("--dataset", default="", help="dataset name stored with each entry")
    p.add_argument("--manifest", help="CSV with subject_id,image_path[,modality,view]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images decoded and stored together (default: 64 at 64 px, 16 for "
                        "larger inputs: one CPU pass of 2^18 voxels, at least 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes that decode images while the model runs "
                        "(default: one per CPU core; 0 decodes in the main process)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="store images whose pixels are already in the library")
    p.add_argument("--transactional", action="store_true",
                   help="write nothing until every image is embedded")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common_model_args(p)
    p.set_defaults(func=_run_index)


def _run_index(args) -> int:
    from .distributed_index import index_distributed, world_size
    from .lookup import index

    options = dict(model=args.model, dataset=args.dataset, manifest=args.manifest,
                   batch_size=args.batch_size, num_workers=args.workers,
                   skip_duplicates=not args.keep_duplicates, progress=not args.json,
                   transactional=args.transactional, backend=args.backend)
    if world_size() > 1:  # started by torchrun: this rank's share, rank 0 merges and reports
        report, rank = index_distributed(args.sources, args.library, device=args.device,
                                         **options)
        if rank != 0:
            return EXIT_FOUND if report.failures else EXIT_OK
    else:
        report = index(args.sources, args.library, device=args.device, **options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for notice in report.notices:
            print(f"note: {printable(notice)}", file=sys.stderr)
        not_images = f", {len(report.not_images)} not an image" if report.not_images else ""
        print(f"{report.added} image(s) added to {args.library}, {report.duplicates} exact "
              f"duplicate(s) skipped{not_images}, {report.embedded} embedded ({report.backend}), "
              f"{len(report.failures)} failure(s), {report.seconds:.1f} s")
        if report.not_images:
            print(f"{len(report.not_images)} file(s) skipped as not an image:", file=sys.stderr)
            for item in report.not_images:
                print(f"  {printable(item.path)}: {printable(item.reason)}", file=sys.stderr)
        _report_failures(report.failures)
    if report.discovered == 0 and not report.failures:
        where = args.manifest or ", ".join(map(str, args.sources))
        print(f"nothing found: no image in {printable(where)}", file=sys.stderr)
        return EXIT_FOUND
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
    # A few query images: the check batch of auto would cost more than it saves; embedding
    # them as the library was embedded puts a stored image at distance 0.
    _common_model_args(p, backend=None, default_text="the backend that built the library "
                       "if it runs here, else torch")
    p.set_defaults(func=_run_query)


def _run_query(args) -> int:
    import os

    from .errors import Failure
    from .lookup import query

    # Cheap checks first: loading the model takes seconds.
    if not os.path.isfile(args.library):
        raise FingerprintError(f"{args.library}: no such library file")
    present = [p for p in args.images if os.path.exists(p)]
    failures: list = [Failure(p, "no such file or folder") for p in args.images if p not in present]
    if not present:
        _report_failures(failures)
        raise FingerprintError("none of the images to query exists")
    notices: list = []
    results = query(present, args.library, model=args.model, k=args.k,
                    device=args.device, failures=failures, notices=notices,
                    backend=args.backend)
    for notice in notices:
        print(f"note: {printable(notice)}", file=sys.stderr)
    answers = [{"query": r.query, **r.to_dict()} for r in results]
    if args.json:
        print(json.dumps(answers, indent=2))
    elif args.csv:
        columns = ["query", "rank", "subject_id", "dataset", "distance", "probability", "image_id"]
        writer = SafeDictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for answer in answers:
            for subject in answer["subjects"]:
                writer.writerow({"query": answer["query"], **subject})
    else:
        for answer in answers:
            print(f"\nquery: {answer['query']}")
            if answer.get("open_set"):
                print(answer["open_set"]["answer"])
            for part, title in (("subjects", "closest subjects (distance of their closest image)"),
                                ("images", "closest images")):
                rows = answer[part]
                columns = ["rank", "subject_id", "dataset", "distance"]
                if rows and rows[0].get("probability") is not None:
                    columns.append("probability")
                print(f"{title}:")
                print_table(rows, columns + ["image_id"])
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

    mg = lib_sub.add_parser("merge", help="append libraries to one library (atomic)",
                            description="Append the entries of every SOURCE library, in order, "
                                        "to the --into library in one atomic write.")
    mg.add_argument("sources", nargs="+", metavar="SOURCE")
    mg.add_argument("--into", required=True, help="target library (.h5); created if missing")
    mg.add_argument("--keep-duplicates", action="store_true",
                    help="also append entries whose pixels are already in the target")
    mg.set_defaults(func=_run_library_merge)


def _run_library_info(args) -> int:
    from .library import EmbeddingLibrary

    with EmbeddingLibrary.open(args.library, mode="r") as lib:
        info = lib.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if key == "datasets":
                value = ", ".join(f"{name or '(unnamed)'} ({n} entries)" for name, n in value.items()) or "none"
            elif key == "file_size_bytes":
                key, value = "file_size", f"{value / 2**20:.1f} MiB"
            print(f"{key.replace('_', ' ')}: {value}")
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
        writer = SafeDictWriter(sys.stdout, fieldnames=_LIST_COLUMNS)
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


def _run_library_merge(args) -> int:
    from .library import merge_libraries

    result = merge_libraries(args.sources, args.into, skip_duplicates=not args.keep_duplicates)
    print(f"{result.added} entr{'y' if result.added == 1 else 'ies'} merged into {args.into}, "
          f"{len(result.duplicates)} exact duplicate(s) skipped")
    return EXIT_OK


# -- entry point -------------------------------------------------------------------------------

def build_parser(extra_commands: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    """The parser of the engine's commands; each of ``extra_commands`` is a
    ``register(subparsers)`` of a package built on the engine."""
    from .dedup.cli import register as register_dedup

    parser = argparse.ArgumentParser(
        prog="subject-fingerprint",
        description="Recognise the same subject across medical images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_index(sub)
    _add_query(sub)
    _add_library(sub)
    register_dedup(sub)
    for register in extra_commands:
        register(sub)
    return parser


def _quiet_broken_pipe() -> int:
    # The reader (``| head``) went away: stop quietly like a Unix tool. Point stdout at
    # /dev/null so the interpreter's final flush does not complain again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141 if os.name != "nt" else EXIT_ERROR  # 128 + SIGPIPE, as a shell reports it


def _prepare_streams() -> None:
    # File names that are not valid UTF-8 must print (escaped) rather than stop the command.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass


def main(argv: Optional[List[str]] = None, extra_commands: Sequence[Callable] = ()) -> int:
    from .caches import redirect_caches

    redirect_caches()
    _prepare_streams()
    parser = build_parser(extra_commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or EXIT_OK)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except FingerprintError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        # Files the user named that are missing or unreadable, bad option values.
        if args.verbose:
            raise
        print(f"error: {printable(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a line, never a traceback, unless asked for
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {printable(exc)} (run with -v for the "
              "details)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
