"""Ctrl-C that waits for a consistent state: the training loop stops between two steps.

A ``KeyboardInterrupt`` raised in the middle of an optimizer step leaves half-updated weights,
optimizer moments, random generators and noise banks behind; a checkpoint of that state cannot
be resumed exactly. Inside :class:`DeferredInterrupt`, the first SIGINT only sets a flag; the
loop calls :meth:`DeferredInterrupt.check` at each step boundary, which raises
``KeyboardInterrupt`` there. A second SIGINT raises at once (for a step that hangs); the loop
then knows the state is torn (:attr:`DeferredInterrupt.torn`) and saves nothing new.

Only the main thread of a process can own a signal handler; elsewhere (a worker thread, a host
that installed a C-level handler) the context does nothing and Ctrl-C behaves as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)


class DeferredInterrupt:
    """Defer SIGINT to the next :meth:`check` while the context is open.

    ``sync``: called with the local flag at each check, returns whether any process asked to
    stop (several processes must stop at the same step, or the others wait forever in the next
    collective).
    """

    def __init__(self, sync=None) -> None:
        self.requested = False
        self.torn = False  # the second Ctrl-C interrupted a step: the in-memory state is inconsistent
        self._sync = sync
        self._previous = None
        self._installed = False

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:  # None: installed from C, which we could not put back
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.torn = True
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after the current step (press again to stop at once, "
                    "losing the steps since the last checkpoint)")

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was asked for (here or, with ``sync``, anywhere)."""
        requested = self._sync(self.requested) if self._sync is not None else self.requested
        if requested:
            self.requested = True
            raise KeyboardInterrupt
