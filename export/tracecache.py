"""Traced ONNX (model graphs, kernel functions) kept in memory and, with use_trace_dir(), on disk.

A trace takes seconds to tens of seconds, so each is made once per key: recent results stay in
this process (least recently used dropped past MAX_BYTES), and in a trace folder other processes
read (the test workers, the next test run). A disk entry is named by its key and code_version(),
so an edit to the code a trace comes from, or another torch / onnx / onnxscript, traces again
instead of reading a stale one. One process makes an entry under a file lock while others wait.
Entry files: `{hash}.{part}.onnx` for each part, then `{hash}.entry` (the key, for a reader).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

_KEPT: dict[tuple, dict[str, bytes]] = {}  # most recently used last
MAX_BYTES = 512 << 20  # a few tiny/small models' graphs; one base model's is ~200 MB
_DIR: Path | None = None


def use_trace_dir(path: Path | None) -> None:
    """Keep traces in `path` as well, for other processes to reuse; None: this process's memory only."""
    global _DIR
    _DIR = None if path is None else Path(path)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of what shapes a trace: the versions of torch, onnx and onnxscript and the source of
    the models (itera_lite/models: nothing else of ours computes in them), the graph exporter and
    the kernels. The passes run after a trace is read (lowering, pruning) are not in it."""
    import onnx
    import onnxscript
    import torch

    from itera_lite import models

    h = hashlib.sha256(f"{torch.__version__} {onnx.__version__} {onnxscript.__version__}".encode())
    here = Path(__file__).parent
    for f in [*sorted(Path(models.__file__).parent.rglob("*.py")), here / "itera.py", here / "onnx_functions.py"]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _stem(key: tuple) -> Path:
    assert _DIR is not None
    return _DIR / hashlib.sha256(f"{key!r} {code_version()}".encode()).hexdigest()[:32]


def _read(stem: Path, parts: Sequence[str]) -> dict[str, bytes] | None:
    if not stem.with_suffix(".entry").is_file():
        return None
    try:
        return {p: stem.with_suffix(f".{p}.onnx").read_bytes() for p in parts}
    except FileNotFoundError:  # a part deleted by hand: make the entry again
        return None


def _write(stem: Path, key: tuple, made: dict[str, bytes]) -> None:
    for part, data in [*((f".{p}.onnx", b) for p, b in made.items()), (".entry", repr(key).encode())]:
        tmp = stem.with_suffix(f"{part}.{os.getpid()}.tmp")  # the marker last: each file replaced whole
        tmp.write_bytes(data)
        os.replace(tmp, stem.with_suffix(part))


def kept(key: tuple, parts: Sequence[str], make: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
    """make()'s serialized `parts` for `key`, from memory, the trace folder, or made now and kept."""
    if key in _KEPT:
        _KEPT[key] = _KEPT.pop(key)  # now the most recently used
        return _KEPT[key]
    if _DIR is None:
        made = make()
    else:
        from filelock import FileLock  # torch's own dependency

        stem = _stem(key)
        stem.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(stem.with_suffix(".lock"))):
            made = _read(stem, parts)
            if made is None:
                made = make()
                _write(stem, key, made)
    _KEPT[key] = made
    while len(_KEPT) > 1 and sum(len(b) for m in _KEPT.values() for b in m.values()) > MAX_BYTES:
        del _KEPT[next(iter(_KEPT))]
    return made


def drop_old_entries(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently written entries of a trace folder (none in use)."""
    entries = sorted(Path(folder).glob("*.entry"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        stem = old.name.removesuffix(".entry")
        for f in old.parent.glob(f"{stem}.*"):
            f.unlink(missing_ok=True)
