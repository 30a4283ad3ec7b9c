"""itera-serve's sessions: a conversation's carried state, kept between requests, bounded, on disk.

A session is the state after the text its last request ended with (prompt and returned
reply), and that text's length and sha256, not the text. A request naming the session whose
text (the rendered chat, or the prompt) begins with exactly that text continues from the
state and computes only the rest; any other text starts the session afresh. For Itera-Lite
a session is the fixed SSM state (146 KB for the tiny preset, whatever the length of the
conversation); for the Transformer it is the filled rows of its KV buffer, growing with it.

Sessions are bounded by count and bytes, least recently used first out. With a directory
each is written through to `<id>.itera-state` (runtime/statefile.py, atomic) after every
request that changes it, deleted when evicted, and read back at start; files of bundles this
server does not serve are left alone, and their ids refused for other models; a file there that
is not a readable state file is left alone too, and its id refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .serve_api import ApiError
from .session import State
from .statefile import StateFileError, read_header, read_state, write_state

__all__ = ["Session", "SessionStore", "text_digest", "SUFFIX"]

SUFFIX = ".itera-state"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Session:
    """One conversation: the model it belongs to, its state, and which text that state has seen."""

    id: str
    bundle_sha256: str
    state: State
    text_len: int  # characters of text the state has seen
    text_sha256: str
    used: float  # time.time() of the last request

    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    def continues(self, text: str) -> bool:
        """True when `text` begins with this session's text and goes on past it."""
        return len(text) > self.text_len and text_digest(text[:self.text_len]) == self.text_sha256


class SessionStore:
    """Sessions by id, least recently used first out past `max_sessions` or `max_bytes`.

    A session is checked out by one request at a time (a second gets 409) and checked back in
    with its new state, or released unchanged when the request fails or is cancelled.
    """

    def __init__(self, max_sessions: int, max_bytes: int, directory: str | os.PathLike | None = None):
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()
        self._foreign: dict[str, str] = {}  # id -> bundle sha256 of a file whose bundle is not served
        self._unreadable: set[str] = set()  # ids whose file is not a state file of ours: never overwritten

    # -- disk --------------------------------------------------------------------------------
    def _path(self, sid: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{sid}{SUFFIX}"

    def restore(self, generators: dict) -> tuple[int, list[str]]:
        """Read the directory's session files: {bundle sha256: Generator}; (loaded, one line per file skipped)."""
        if self.directory is None:
            return 0, []
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        skipped = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            sid = path.name[:-len(SUFFIX)]
            try:
                header = read_header(path)
            except StateFileError as e:
                skipped.append(str(e))
                self._unreadable.add(sid)
                continue
            sha = header["bundle_sha256"]
            if sha not in generators:
                self._foreign[sid] = sha
                continue
            found.append((header["meta"].get("used", 0.0), sid, path, sha))
        loaded = 0
        for used, sid, path, sha in sorted(found, reverse=True):  # most recent first, until the bounds
            gen = generators[sha]
            try:
                saved = read_state(path, gen.bundle)
                meta = saved.meta
                state = gen.session.state_kind.from_arrays(saved.arrays, saved.position)
                session = Session(sid, sha, state, int(meta["text_len"]), str(meta["text_sha256"]), float(used))
            except (StateFileError, KeyError, TypeError, ValueError) as e:
                skipped.append(f"{path}: {e}")
                self._unreadable.add(sid)
                continue
            if len(self._sessions) >= self.max_sessions or self.bytes + session.nbytes > self.max_bytes:
                skipped.append(f"{path}: over the session bounds, not loaded")
                continue
            self._sessions[sid] = session
            self._sessions.move_to_end(sid, last=False)  # older ones go in front
            loaded += 1
        return loaded, skipped

    def _save(self, s: Session, gen) -> None:
        if self.directory is None:
            return
        write_state(self._path(s.id), gen.bundle, s.state.numpy(), s.state.position,
                    {"session": s.id, "text_len": s.text_len, "text_sha256": s.text_sha256, "used": s.used})

    def _drop_file(self, sid: str) -> None:
        if self.directory is not None:
            self._path(sid).unlink(missing_ok=True)

    # -- requests ----------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def checkout(self, sid: str, bundle_sha256: str, model: str) -> Session | None:
        """The session for a request (None: a new one); 409 if it is busy or another model's."""
        with self._lock:
            if sid in self._unreadable:
                raise ApiError(409, f"session {sid!r} cannot be used: {self._path(sid)} is not a session file this "
                                    "server can read, and it is not overwritten", param="session",
                               code="session_unreadable")
            owner = self._sessions[sid].bundle_sha256 if sid in self._sessions else self._foreign.get(sid)
            if owner is not None and owner != bundle_sha256:
                raise ApiError(409, f"session {sid!r} belongs to another model (bundle sha256 {owner[:12]}...), "
                                    f"not {model!r}; use a new session id", param="session",
                               code="session_model_mismatch")
            if sid in self._busy:
                raise ApiError(409, f"session {sid!r} is busy with another request; send one request per "
                                    "session at a time", param="session", code="session_busy")
            self._busy.add(sid)
            return self._sessions.get(sid)

    def release(self, sid: str) -> None:
        """End a checkout without changing the session (the request failed or was cancelled)."""
        with self._lock:
            self._busy.discard(sid)

    def checkin(self, session: Session, gen) -> bool:
        """Store a session's new state (and write it through); False when it alone exceeds max_bytes."""
        # The session stays busy until its file is written, so no other request can write or
        # evict it meanwhile (an evicted session is never busy).
        try:
            with self._lock:
                self._sessions.pop(session.id, None)
                kept = session.nbytes <= self.max_bytes
                if kept:
                    self._sessions[session.id] = session
                evicted = self._evict(keep=session.id)
            for sid in evicted:
                self._drop_file(sid)
            if not kept:
                self._drop_file(session.id)
                return False
            try:
                self._save(session, gen)
            except OSError as e:  # a full or read-only disk costs persistence, not the reply
                print(f"itera-serve: warning: session {session.id} not saved ({e.strerror or e})", file=sys.stderr)
            return True
        finally:
            self.release(session.id)

    def _evict(self, keep: str) -> list[str]:
        evicted = []
        total = self.bytes
        for sid in list(self._sessions):
            if len(self._sessions) <= self.max_sessions and total <= self.max_bytes:
                break
            if sid == keep or sid in self._busy:
                continue
            total -= self._sessions.pop(sid).nbytes
            evicted.append(sid)
        return evicted

    def new_session(self, sid: str, bundle_sha256: str, state: State, text: str) -> Session:
        return Session(sid, bundle_sha256, state, len(text), text_digest(text), time.time())

    def stats(self) -> dict:
        with self._lock:
            return {"count": len(self._sessions), "bytes": self.bytes, "max_sessions": self.max_sessions,
                    "max_bytes": self.max_bytes, "busy": len(self._busy),
                    "directory": str(self.directory) if self.directory else None}
