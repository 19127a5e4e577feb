"""Dependency loggers kept off stderr while a file is decoded.

pydicom logs a full traceback for each decoder plugin that fails on damaged JPEG/JPEG 2000
data before raising; the exception it then raises carries the same detail, which goes into
the file's failure reason. Printing both would bury the one line a user needs.
"""

from __future__ import annotations

import contextlib
import logging

QUIET_LOGGERS = ("pydicom",)


@contextlib.contextmanager
def quiet_dependency_loggers(names=QUIET_LOGGERS):
    # Records go to the logger that made them (pydicom.pixels.decoders.base, ...): silence
    # each logger of the family, not only the parent.
    known = list(logging.root.manager.loggerDict)
    loggers = [logging.getLogger(n) for n in known
               if any(n == name or n.startswith(name + ".") for name in names)]
    loggers += [logging.getLogger(name) for name in names if name not in known]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was
