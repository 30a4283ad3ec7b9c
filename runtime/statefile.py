"""Carried state on disk: one file per state, tied to the bundle that made it, never pickled.

A state file is an uncompressed zip of `header.json` and one `.npy` per state tensor, in
manifest order (batch 1; a kv_buffer keeps its filled rows only):

    header.json: {"format": "itera-state", "format_version": 1,
                  "bundle_sha256": "<sha256 of the bundle's manifest.json>",
                  "family": str, "state_kind": str, "position": int,   # tokens the state has seen
                  "tensors": [{"name": "past.0.conv", "dtype": "float32", "shape": [1, 3, 384]}, ...],
                  "meta": {...}}                                       # the caller's own fields
    0.npy, 1.npy, ...

Reading checks the bundle's hash first (a state is never loaded into another model), then
every tensor's dtype and shape against the manifest before a byte of it is read, so a
tampered or foreign file is one line, not a huge allocation. Files are written to a
temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import KV_BUFFER_AXIS, Bundle
from .errors import UserError

__all__ = ["STATE_FORMAT", "STATE_FORMAT_VERSION", "StateFile", "StateFileError", "read_state", "write_state",
           "expected_shapes"]

STATE_FORMAT = "itera-state"
STATE_FORMAT_VERSION = 1
_HEADER = "header.json"
_HEADER_MAX = 1 << 20  # a header is a few hundred bytes; more is not ours
_NPY_HEADER_MAX = 1 << 16


class StateFileError(UserError, ValueError):
    """A state file that cannot be used with this bundle (foreign, tampered, another model's)."""


@dataclass
class StateFile:
    """What a state file holds: the tensors, how many tokens they have seen, the caller's fields."""

    arrays: list[np.ndarray]
    position: int
    meta: dict[str, Any] = field(default_factory=dict)
    bundle_sha256: str = ""


def expected_shapes(bundle: Bundle, position: int) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each state tensor at batch 1 after `position` tokens, as stored."""
    out = []
    kind = bundle.state_kind
    for spec in bundle.state:
        shape = []
        for axis, d in enumerate(spec.shape):
            if d == "batch":
                shape.append(1)
            elif axis == KV_BUFFER_AXIS and (kind == "kv_buffer" or spec.is_kv_buffer):
                shape.append(position)  # the filled rows
            elif isinstance(d, str):  # a kv_cache's past_sequence
                shape.append(position)
            else:
                shape.append(int(d))
        out.append((spec.input, np.dtype(spec.dtype), tuple(shape)))
    return out


def write_state(path: str | os.PathLike, bundle: Bundle, arrays: list[np.ndarray], position: int,
                meta: dict[str, Any] | None = None) -> Path:
    """Write a state file atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    expected = expected_shapes(bundle, position)
    if len(arrays) != len(expected):
        raise ValueError(f"state has {len(arrays)} tensors, the bundle's manifest names {len(expected)}")
    for a, (name, dtype, shape) in zip(arrays, expected):
        if a.dtype != dtype or tuple(a.shape) != shape:
            raise ValueError(f"state tensor {name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
    header = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "bundle_sha256": bundle.sha256,
              "family": bundle.family, "state_kind": bundle.state_kind, "position": int(position),
              "tensors": [{"name": n, "dtype": d.name, "shape": list(s)} for n, d, s in expected],
              "meta": dict(meta or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                z.writestr(_HEADER, json.dumps(header, sort_keys=True))
                for i, a in enumerate(arrays):
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
                    z.writestr(f"{i}.npy", buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a state file (no tensors read); StateFileError if it is not one of ours."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            return _header(z, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        raise StateFileError(f"{path}: not an itera state file (not a zip archive)") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None


def _header(z: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    try:
        info = z.getinfo(_HEADER)
    except KeyError:
        raise StateFileError(f"{path}: not an itera state file (no {_HEADER})") from None
    if info.file_size > _HEADER_MAX:
        raise StateFileError(f"{path}: not an itera state file ({_HEADER} of {info.file_size} bytes)")
    try:
        h = json.loads(z.open(info).read(_HEADER_MAX + 1).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise StateFileError(f"{path}: not an itera state file (bad {_HEADER}: {e})") from None
    if not isinstance(h, dict) or h.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path}: not an itera state file")
    version = h.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateFileError(f"{path}: bad format_version {version!r}")
    if version > STATE_FORMAT_VERSION:
        raise StateFileError(f"{path}: state format version {version} is newer than this runtime reads "
                             f"({STATE_FORMAT_VERSION}); upgrade itera-lite")
    position = h.get("position")
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise StateFileError(f"{path}: bad position {position!r}")
    if not isinstance(h.get("meta", {}), dict) or not isinstance(h.get("bundle_sha256"), str):
        raise StateFileError(f"{path}: not an itera state file (bad meta or bundle_sha256)")
    return h


def read_state(path: str | os.PathLike, bundle: Bundle) -> StateFile:
    """Read a state file made with `bundle`; StateFileError (one line) for anything else."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            h = _header(z, path)
            if h["bundle_sha256"] != bundle.sha256:
                raise StateFileError(f"{path}: state of another model (bundle sha256 {h['bundle_sha256'][:12]}..., "
                                     f"this bundle is {bundle.sha256[:12]}...)")
            position = h["position"]
            if bundle.max_seq_len and bundle.state_kind in ("kv_buffer", "kv_cache", "hybrid") and position > bundle.max_seq_len:
                raise StateFileError(f"{path}: position {position} exceeds the model's max_seq_len {bundle.max_seq_len}")
            arrays = [_read_npy(z, f"{i}.npy", name, dtype, shape, path)
                      for i, (name, dtype, shape) in enumerate(expected_shapes(bundle, position))]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        raise StateFileError(f"{path}: not an itera state file (not a zip archive)") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None
    return StateFile(arrays, position, dict(h.get("meta") or {}), h["bundle_sha256"])


def _read_npy(z: zipfile.ZipFile, member: str, name: str, dtype: np.dtype, shape: tuple[int, ...],
              path: Path) -> np.ndarray:
    try:
        info = z.getinfo(member)
    except KeyError:
        raise StateFileError(f"{path}: tensor {name} ({member}) is missing") from None
    expected_bytes = int(np.prod(shape)) * dtype.itemsize
    if info.file_size > expected_bytes + _NPY_HEADER_MAX:
        raise StateFileError(f"{path}: tensor {name} is {info.file_size} bytes, expected about {expected_bytes}")
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            else:
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise StateFileError(f"{path}: tensor {name} is not a .npy array ({e})") from None
        if got_dtype != dtype or tuple(got_shape) != shape or fortran:
            raise StateFileError(f"{path}: tensor {name} is {got_dtype}{list(got_shape)}, this bundle's state "
                                 f"needs {dtype}{list(shape)} (a state of another model or position?)")
        data = f.read(expected_bytes + 1)
    if len(data) != expected_bytes:
        raise StateFileError(f"{path}: tensor {name} has {len(data)} bytes of data, expected {expected_bytes}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
