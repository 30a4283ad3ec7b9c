"""Putting a finished bundle folder in place without ever losing what was there.

The exporter builds a bundle in a hidden temp folder beside its destination and only then
publishes it here. `--force` may replace a bundle of ours and nothing else: never `.`, a
folder holding the working directory, `/`, the home folder, a file, or a folder of other
things. A replacement is one atomic swap (renameat2 RENAME_EXCHANGE) where the kernel
has it, so a reader sees the old bundle or the new one, never half of either.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from itera_runtime.bundle import MANIFEST_NAME, BundleError, is_bundle, sha256_file
from itera_runtime.errors import UserError
from itera_runtime.manifest import Manifest
from itera_runtime.owned import NotOursError, refuse_strays, strays


class PublishError(UserError):
    """A destination we may not write or replace; one line."""


def _protected(out: Path) -> str | None:
    """Why `out` may never be replaced, or None."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "it is the filesystem root"
    if real == Path.home().resolve():
        return "it is the home folder"
    if real == cwd or real in cwd.parents:
        return "it holds the current working directory"
    return None


def check_destination(out: Path, force: bool) -> None:
    """Refuse, before any work, a destination this export may not write."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink():
        raise PublishError(f"{out} is a symbolic link; give the real folder or another name")
    if not out.is_dir():
        raise PublishError(f"{out} is a file, not a bundle folder; refused")
    if not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    if not force:
        raise PublishError(f"{out} already exists; pass --force to replace it (only a bundle is ever replaced)")
    why = _protected(out)
    if why:
        raise PublishError(f"{out}: refusing to replace it ({why})")
    if not is_bundle(out):
        raise PublishError(f"{out} is not an itera bundle (no {MANIFEST_NAME} of ours); --force replaces "
                           "only bundles, so nothing was written")
    try:
        refuse_strays(out, bundle_strays(out), "an itera bundle")
    except NotOursError as e:
        raise PublishError(str(e)) from None


def bundle_strays(folder: Path) -> list[str]:
    """Files of a bundle folder that its manifest does not pin as they are now (the user's)."""
    mpath = folder / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"), str(mpath))
    except (OSError, ValueError, BundleError) as e:
        raise PublishError(f"{folder} looks like a bundle but its {MANIFEST_NAME} does not read as ours "
                           f"({e}); refusing to replace it") from None
    return strays(folder, {n: (f.sha256, f.bytes) for n, f in manifest.files.items()}, ignore=(MANIFEST_NAME,))


def _temp_prefix(out: Path) -> str:
    return f".{out.name}."


def make_temp_dir(out: Path) -> Path:
    """A hidden temp folder beside `out`, named with our pid so a later run knows it is stale."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove temp folders of our own naming for `out` whose export process is gone."""
    removed = []
    prefix = _temp_prefix(out)
    for p in out.parent.glob(f"{prefix}*.tmp"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if p.is_dir() and not p.is_symlink() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def manifest_digest(folder: Path) -> str | None:
    """sha256 of a folder's manifest (identifies one export), or None when it has none."""
    try:
        return sha256_file(folder / MANIFEST_NAME)
    except OSError:
        return None


@contextmanager
def _locked(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path, seen_at_start: str | None, log=lambda msg: None) -> None:
    """Move the finished bundle `tmp` to `out`, replacing only a bundle.

    seen_at_start: manifest_digest(out) when this export started. If another export
    published to `out` meanwhile, this one still wins (last writer wins) and says so.
    """
    with _locked(out.parent):
        if out.exists():
            check_destination(out, force=True)  # it may have changed since we started
            if manifest_digest(out) != seen_at_start:
                log(f"note: another export wrote {out} while this one ran; it is replaced by this one "
                    "(last writer wins)")
            if not any(out.iterdir()):
                out.rmdir()
        if not out.exists():
            tmp.rename(out)
            return
        if _exchange(tmp, out):
            shutil.rmtree(tmp)  # now holds the bundle we replaced
            return
        old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.old.", suffix=".tmp", dir=out.parent))
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
