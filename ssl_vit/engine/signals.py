"""SIGTERM and SIGINT ask the loop to stop after the current step, write a checkpoint and exit.

A cluster scheduler sends SIGTERM before it pre-empts a job; Ctrl-C sends SIGINT. Either one only
sets a flag; the loop finishes the step it is in, agrees with the other processes to stop, saves,
and raises `TrainingInterrupted`. A second signal falls back to the default behaviour (stop now).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; `signum` says which signal."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)
        for sig, handler in self._previous.items():  # a second signal acts at once
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
