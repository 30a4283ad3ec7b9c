"""Checkpoints: one self-contained file (configs, tokenizer, weights, optimizer, position).

Saved atomically (temp file in the same folder, fsync, rename) so a kill mid-save never
leaves a half-written `best.pt`/`last.pt`. Loaded with `torch.load(weights_only=True)`:
only tensors, numbers, strings, lists and dicts, never arbitrary pickled objects.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .models import build_model, config_from_dict
from itera_runtime.errors import UserError

CHECKPOINT_FORMAT = "itera-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write payload (plus the format header) to path atomically."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
               "itera_lite_version": __version__, **payload}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # 0600 (mkstemp's mode, kept on purpose): a checkpoint is one user's work in progress and
        # --resume trusts it; the exported bundle (0644) is the file meant for others (README).
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _write_failure(e, path.parent)
        if cause is None:
            raise
        raise CheckpointError(f"{path}: cannot write checkpoint ({cause})") from None


def _write_failure(e: BaseException, folder: Path) -> str | None:
    """The cause of a failed write in words, or None when it is not about the file system.

    torch.save reports a full disk as "enforce fail at inline_container.cc ... file write
    failed", without the errno; the free space of the folder tells that case apart.
    """
    if isinstance(e, OSError):
        return os.strerror(e.errno) + (" (disk full)" if e.errno == errno.ENOSPC else "") if e.errno else str(e)
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "write" in str(e).lower()):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < (1 << 20):
            return f"No space left on device (disk full): {free:,} bytes free in {folder}"
        return str(e).strip().splitlines()[0][:160]
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint; any problem is a CheckpointError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / non-zip files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable itera-lite checkpoint (corrupt, truncated or foreign file: {reason[:120]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an itera-lite checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this itera-lite supports "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade itera-lite"
        )
    for key in ("model_config", "model", "tokenizer_json"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (incomplete file?)")
    return ckpt


def weights_sha256(model) -> str:
    """sha256 over a model's parameter names and bytes: which weights made a bundle or a datastore."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(path: str | Path):
    """(model in eval mode, checkpoint dict) from a checkpoint file."""
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["model_config"])
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the stored config ({first[:160]})") from None
    return model.eval(), ckpt
