"""One thread per bundle that runs its requests' generations, round by round.

Up to `parallel` generations of a bundle are active; in each round every one of them
advances by one token, so a short request is not stuck behind a long one and every client
sees its first token after at most `parallel` prefills. With `batch` (a bundle whose state has
a fixed shape, serve_batch.py) the round's decode steps are one graph call over all decoding
requests; otherwise each request runs its own step in turn. Up to `queue` more requests
wait; past that a request is refused at once with 503.

A job ends when its generation ends, when its client goes away (`cancel`), or at its
deadline; either way its session is released and its slot taken by the next job at once.
The generation's events go back to the asyncio side through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .generate import Generation, Generator
from .serve_api import ApiError
from .serve_batch import BatchSlot, DecodeBatch
from .serve_sessions import Session, SessionStore
from .session import State

__all__ = ["Job", "Worker"]


@dataclass
class Job:
    """One request's generation and the channel its events go back on."""

    generator: Generator
    text: str  # the request's whole text (prompt or rendered chat)
    new_text: str  # what the model has not seen: text after the session's part
    prompt_ids: list[int]  # new_text, tokenized
    max_tokens: int
    sampling: Any
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() past which the job stops
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    state: State | None = None  # the session's state to continue from
    session_id: str | None = None
    cached_tokens: int = 0
    store: SessionStore | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    slot: BatchSlot | None = None  # the job's row in the worker's batch, while it decodes
    final: tuple[str, Any] | None = None  # the last event, sent once the job has left its slot

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: the server is going down
            pass

    def release_session(self) -> None:
        if self.store is not None and self.session_id is not None:
            self.store.release(self.session_id)
            self.session_id = None


class Worker:
    """The generations of one bundle, run in one thread; `submit` refuses when full."""

    def __init__(self, name: str, parallel: int, queue: int, batch: DecodeBatch | None = None):
        self.name, self.parallel, self.queue_size = name, parallel, queue
        self.batch = batch
        if batch is not None and batch.capacity < parallel:
            raise ValueError(f"a batch of {batch.capacity} rows cannot hold {parallel} generations")
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"itera-serve {name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ApiError(503, "server is shutting down", type="server_error", code="shutting_down")
            if len(self._active) + len(self._waiting) >= self.parallel + self.queue_size:
                raise ApiError(503, f"server busy: {len(self._active)} requests running and {len(self._waiting)} "
                                    f"waiting on model {self.name!r} (the most allowed); retry later",
                               type="server_error", code="queue_full", headers={"Retry-After": "1"})
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "parallel": self.parallel,
                    "queue": self.queue_size, "batched": self.batch is not None}

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._active]:
                job.cancel.set()
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._waiting:
                    self._cond.wait()
                while self._waiting and len(self._active) < self.parallel:
                    self._active.append(self._waiting.popleft())
                if self._stopping and not self._active:
                    return
                jobs = list(self._active)
            if self.batch is not None and not self._batch_step(jobs):
                continue
            for job in jobs:
                if not self._advance(job):
                    with self._cond:
                        self._active.remove(job)
                    if job.final is not None:  # after the slot is free: a client told "done" sees it free
                        job.emit(*job.final)

    def _batch_step(self, jobs: list[Job]) -> bool:
        """The round's decode steps as one graph call; False (every batched job failed) on an error."""
        assert self.batch is not None
        feed = {job.slot: job.generation.token_ids[-1] for job in jobs
                if job.slot is not None and job.generation is not None}
        try:
            if feed:
                self.batch.run(feed)
            return True
        except Exception as e:  # a bug: the batched requests get a 500, the server keeps serving
            traceback.print_exc(file=sys.stderr)
            for job in jobs:
                if job.slot is not None:
                    self._close(job)
                    job.final = ("error", ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                                                   code="internal_error"))
                    with self._cond:
                        self._active.remove(job)
                    job.emit(*job.final)
            return False

    def _join(self, job: Job, state: State) -> BatchSlot:
        assert self.batch is not None
        job.slot = self.batch.join(state)
        return job.slot

    def _advance(self, job: Job) -> bool:
        """One piece of text for `job`; False when the job is over (done, failed, cancelled, timed out)."""
        try:
            if job.cancel.is_set():
                self._close(job)
                return False
            if time.monotonic() > job.deadline:
                self._close(job)
                job.final = ("error", ApiError(504, "the request took longer than the server's --request-timeout",
                                           type="server_error", code="timeout"))
                return False
            if job.generation is None:
                join = (lambda state: self._join(job, state)) if self.batch is not None else None
                job.generation = job.generator.generate(job.new_text, job.max_tokens, job.sampling, job.stop,
                                                        state=job.state, keep_state=job.session_id is not None,
                                                        prompt_ids=job.prompt_ids, decoder=join)
            try:
                piece = next(job.generation)
            except StopIteration:
                self._leave(job)
                self._finish(job)
                return False
            if piece:  # a batched generation also yields "" for a token that made no text yet
                job.emit("piece", piece)
            return True
        except Exception as e:  # a bug: the request gets a 500, the server keeps serving
            traceback.print_exc(file=sys.stderr)
            self._close(job)
            job.final = ("error", ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                                           code="internal_error"))
            return False

    def _leave(self, job: Job) -> None:
        if job.slot is not None and self.batch is not None:
            self.batch.leave(job.slot)
        job.slot = None

    def _close(self, job: Job) -> None:
        self._leave(job)
        if job.generation is not None:
            close = getattr(job.generation._pieces, "close", None)
            if close is not None:
                close()
        job.release_session()

    def _finish(self, job: Job) -> None:
        gen = job.generation
        assert gen is not None and gen.stats is not None
        stats = gen.stats
        info: dict[str, Any] = {"stats": stats, "prompt_tokens": job.cached_tokens + len(job.prompt_ids),
                                "cached_tokens": job.cached_tokens, "session": None}
        if job.session_id is not None and job.store is not None:
            state = gen.state  # the reply prefilled on top of the state after the prompt
            sha = job.generator.bundle.sha256
            session: Session = job.store.new_session(job.session_id, sha, state, job.text + stats.text)
            kept = job.store.checkin(session, job.generator)
            info["session"] = {"id": session.id, "cached_tokens": job.cached_tokens, "tokens": state.position,
                               "state_bytes": session.nbytes, "kept": kept}
            job.session_id = None
        job.final = ("done", info)
