"""The background sampling thread that energy meters share (powercap counters, Pi 5 PMIC rails).

A meter samples every `interval_s` seconds on a daemon thread between `start()` and
`close()`. The first error of the meter's own kind stops the thread and is kept in `error`,
so the caller's thread reports it on its next read rather than losing it in the sampler.
"""

from __future__ import annotations

import threading


class BackgroundSampler:
    """Mixin: subclasses set `interval_s`, `_error_type`, `_thread_name` and define `_sample()`."""

    interval_s: float
    _error_type: type[Exception] = OSError
    _thread_name = "sampler"

    def _init_sampler(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None

    def _sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except self._error_type as e:  # reported by the caller's next read
                self.error = e
                return

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
