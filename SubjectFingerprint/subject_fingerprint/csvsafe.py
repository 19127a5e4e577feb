"""The one CSV writer for every CSV the project writes: cells cannot run as spreadsheet
formulas, and file names that are not valid UTF-8 are written escaped instead of failing.

A text cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is
prefixed with a single quote, as OWASP recommends against CSV injection; numbers stay
numbers (a negative distance is not a formula).
"""

from __future__ import annotations

import csv

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text) -> str:
    """``text`` as a string that encodes to UTF-8: surrogate escapes (undecodable bytes of a
    file name) become backslash escapes."""
    text = "" if text is None else str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape" if _only_surrogates(text) else
                           "backslashreplace").decode("utf-8", "backslashreplace")
    return text


def _only_surrogates(text: str) -> bool:
    # Lone surrogates from os.fsdecode map back to the original bytes; show those bytes.
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def safe_cell(value):
    """One cell: text neutralised and made printable; numbers, booleans and None as they are."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = printable(value)
    if text.startswith(_FORMULA_STARTS):
        text = "'" + text
    return text


class SafeDictWriter(csv.DictWriter):
    """``csv.DictWriter`` whose text cells go through :func:`safe_cell`."""

    def writerow(self, rowdict):
        return super().writerow({k: safe_cell(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts):
        for row in rowdicts:
            self.writerow(row)
