"""Which files in a folder are ours to replace: the one check before any tool overwrites or swaps away a folder.

Ours is what carries our marker *and* still matches what we wrote: a bundle's files as its
manifest pins them, a datastore's arrays as its datastore.json describes them, a report's or
a results folder's files as the listing we keep beside them (`LISTING`) hashes them. Anything
else in the way (a file the user added, one of ours the user edited, a symbolic link) is the
user's, and the tool refuses in one line naming it, before any work starts. `FolderLock`
keeps a folder to one writing process at a time (itera-train's run folder). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import UserError

# The listing a tool keeps in a folder it writes file by file (report, results): name → sha256.
LISTING = ".itera-files.json"
_CHUNK = 1 << 20
_NAMED = 3  # files a refusal names before "and N more"


class NotOursError(UserError):
    """A folder or file in the way that we did not write (or that changed since); one line."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, sha256: str | None, size: int | None = None) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return (size is None or path.stat().st_size == size) and (sha256 is None or _sha256(path) == sha256)
    except OSError:
        return False


def names(found: list[str]) -> str:
    """Up to three names and how many more: what a one-line refusal can hold."""
    shown = ", ".join(sorted(found)[:_NAMED])
    return shown + (f" and {len(found) - _NAMED} more" if len(found) > _NAMED else "")


def strays(folder: str | os.PathLike, expected: Mapping[str, tuple[str | None, int | None]],
           ignore: Iterable[str] = ()) -> list[str]:
    """Everything under `folder` that is not an expected file with its expected sha256 and size.

    expected: relative POSIX path → (sha256 or None for "any content", bytes or None).
    ignore: top-level names that belong to the tool whatever they hold (a marker we rewrite).
    Empty folders hold nothing to lose and are not counted; symbolic links always are.
    """
    root = Path(folder)
    skip = set(ignore)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            rel = (here / name).relative_to(root).as_posix()
            if rel in skip:
                continue
            want = expected.get(rel)
            if want is None or not _matches(here / name, *want):
                found.append(rel)
    return found


def refuse_strays(folder: str | os.PathLike, found: list[str], what: str) -> None:
    """One line naming the files of `folder` that are not ours (no-op when there are none)."""
    if found:
        raise NotOursError(f"{folder} is {what} but also holds files that are not ours or changed since we wrote "
                           f"them ({names(found)}); refusing to replace it: move them out or choose another folder")


# ------------------------------------------------------------- folders written file by file


def listed(folder: str | os.PathLike) -> dict[str, str]:
    """The folder's listing of files we wrote ({} where there is none or it is not ours)."""
    try:
        d = json.loads((Path(folder) / LISTING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = d.get("files") if isinstance(d, dict) and d.get("format") == "itera-files" else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def check_in_the_way(folder: str | os.PathLike, wanted: Iterable[str], what: str = "") -> None:
    """Refuse, in one line, if any of the names we are about to write is a file we did not write.

    wanted: names (relative to folder) this tool will create or replace; one that exists must
    be in the folder's listing with the sha256 it has now.
    """
    root = Path(folder)
    mine = listed(root)
    found = [n for n in wanted if (root / n).exists() or (root / n).is_symlink()]
    foreign = [n for n in found if n not in mine or not _matches(root / n, mine[n])]
    if foreign:
        one = len(foreign) == 1
        raise NotOursError(f"{root}: {names(foreign)} {'is' if one else 'are'} not ours (no {what or 'earlier run'} "
                           f"of ours wrote {'it' if one else 'them'}, or {'it was' if one else 'they were'} edited "
                           f"since); refusing to overwrite: move {'it' if one else 'them'} out or choose another "
                           "folder")


def record(folder: str | os.PathLike, written: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
    """Add the files just written to the folder's listing (and drop removed ones), atomically."""
    root = Path(folder)
    files = listed(root)
    for n in removed:
        files.pop(n, None)
    for n in written:
        files[n] = _sha256(root / n)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f"{LISTING}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": "itera-files", "files": dict(sorted(files.items()))}, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / LISTING)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------- a folder one process writes


class FolderLock:
    """One writer per folder: a lock file holding our pid and host, flock'd while we write.

    The kernel drops the flock when the process dies however it dies, so a lock left by a
    killed process never blocks: the next writer takes it over and says whose it was.
    """

    def __init__(self, path: str | os.PathLike, tool: str):
        self.path, self.tool = Path(path), tool
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict:
        try:
            d = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}

    def acquire(self, log=lambda msg: None) -> None:
        """Hold the lock or raise NotOursError naming the process that holds it."""
        import fcntl
        import socket
        import time

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                h = self._holder(fd)
                os.close(fd)
                who = (f"pid {h.get('pid')} on {h.get('host')}, since {h.get('started')}" if h.get("pid")
                       else "starting")
                raise NotOursError(f"{self.path.parent} is in use by another {self.tool} ({who}); wait for it to "
                                   "finish or choose another folder") from None
            try:  # the file may have been released and unlinked between our open and our flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        before = self._holder(fd)
        if before.get("pid") and (before.get("pid"), before.get("host")) != (os.getpid(), socket.gethostname()):
            log(f"note: {self.path}: taking over the lock of {self.tool} pid {before['pid']} on {before.get('host')} "
                f"(since {before.get('started')}), which no longer runs")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"tool": self.tool, "pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and let go (a no-op when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
