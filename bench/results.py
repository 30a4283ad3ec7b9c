"""Record files and results folders in: the rows of every subcommand, and why some measured nothing.

A results folder is read whole (its *.json, *.jsonl, *.csv record files) plus its *.err
files: one line each, why a subcommand measured nothing (`itera-bench all` writes them).
"""

from __future__ import annotations

import math
from pathlib import Path

from itera_runtime.errors import UserError

from .record import Record, parse

RECORD_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
# No measurement of ours comes near this (1e15 ns is 11 days, 1e15 B a petabyte); beyond it a
# sample is corrupt or forged, and mean/stdev of such values overflow.
MAX_SAMPLE = 1e15


class ReportError(UserError, ValueError):
    """Inputs the report cannot use (missing or foreign files); one line for the user."""


# --------------------------------------------------------------------------- inputs


def _read_records(path: Path) -> list[Record]:
    fmt = RECORD_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ReportError(f"{path}: not a record file (expected {', '.join(RECORD_SUFFIXES)})")
    try:
        records = parse(path.read_text(encoding="utf-8"), fmt)
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e.strerror if isinstance(e, OSError) else e})") from None
    except RecursionError:  # json nests deeper than the interpreter's stack: no record of ours does
        raise ReportError(f"{path}: not a record file written by itera-bench (nested too deeply)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"{path}: not a record file written by itera-bench ({type(e).__name__}: {e})") from None
    bad = next((r for r in records if not _valid(r)), None)
    if bad is not None:
        raise ReportError(f"{path}: not a record file written by itera-bench (a row without kind, metric or "
                          "numeric samples)")
    for i, r in enumerate(records, 1):
        values = [*r.samples, *r.samples_ns] + ([r.model_size] if r.model_size is not None else [])
        odd = next((x for x in values if not _plausible(x)), None)
        if odd is not None:
            finite = isinstance(odd, int) or math.isfinite(odd)
            what = f"an implausible value (beyond {MAX_SAMPLE:g})" if finite else "a non-finite sample"
            shown = f"{odd:.3g}" if isinstance(odd, float) else f"{str(odd)[:8]}... ({len(str(odd))} digits)"
            raise ReportError(f"{path}: row {i} ({r.kind} {r.test} {r.metric}) has {what}: {shown}; "
                              "itera-bench writes only finite, plausible measurements")
    return records


def _plausible(x: float) -> bool:
    """Finite and within MAX_SAMPLE (a json integer may be any size: compared as an int)."""
    return abs(x) <= MAX_SAMPLE if isinstance(x, int) else math.isfinite(x) and abs(x) <= MAX_SAMPLE


def _valid(r: Record) -> bool:
    """What the report relies on. csv.DictReader fills missing columns with nothing, so any
    table would otherwise parse into empty rows; json could carry strings as samples."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (all(isinstance(v, str) and v for v in (r.kind, r.metric, r.test)) and isinstance(r.unit, str)
            and isinstance(r.samples, list) and all(num(x) for x in r.samples)
            and isinstance(r.samples_ns, list) and all(num(x) for x in r.samples_ns) and isinstance(r.extra, dict)
            and isinstance(r.provenance, dict) and isinstance(r.bundle, str) and isinstance(r.family, str)
            and (r.model_size is None or num(r.model_size)) and num(r.n_depth))


def load_results(paths) -> tuple[list[Record], dict[str, str]]:
    """Records from files and results folders, and the reasons (name → line) of *.err files."""
    records: list[Record] = []
    reasons: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir():
            # Hidden files are not results: our listing of the folder (runtime/owned.py), temp files.
            for f in sorted(q for q in p.iterdir() if not q.name.startswith(".")):
                if f.is_file() and f.suffix.lower() in RECORD_SUFFIXES:
                    records += _read_records(f)
                elif f.is_file() and f.suffix == ".err":
                    reasons[f.stem] = f.read_text(encoding="utf-8", errors="replace").strip()
        elif p.exists():
            records += _read_records(p)
        else:
            raise ReportError(f"{p}: no such file or folder")
    return records, reasons
