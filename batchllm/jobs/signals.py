"""Graceful stop on SIGINT / SIGTERM: finish the current step, commit what is complete, exit non-zero.

``stop_on_signals()`` installs handlers that only set a flag (``StopFlag``); the pipeline checks it
between engine steps and between stages, stops admitting work, commits every complete request and
raises ``JobInterrupted``, whose message ends with the resume command. A second signal while stopping
restores the default behaviour and re-raises it (a user pressing Ctrl-C twice means "now"); SIGKILL
needs no handling at all, because the shard protocol keeps committed work valid at any instant.

Handlers are installed only from the main thread (Python's rule); elsewhere the flag stays unset and a
signal behaves as usual. The previous handlers come back when the context exits.

Outside those stages (start-up: imports, reading the inputs' headers, Ray, the model's tokenizer, the job
folder; and after the last commit) the command line installs ``raise_on_signals``: a signal there raises
``StoppedOutsideJob``, printed as one line with exit status 128 + signal, instead of the default action
(SIGTERM killed the process with no message).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from batchllm.errors import BatchLLMError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


class JobInterrupted(BatchLLMError):
    """The job stopped on a signal after committing complete work; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, output_dir: str, committed_rows: int):
        self.signum = signum
        self.exit_code = 128 + signum
        self.output_dir = output_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after committing {committed_rows:,} rows this run; "
            f"resume with: batchllm resume {output_dir}"
        )


class StoppedOutsideJob(JobInterrupted):
    """A signal arrived while no engine work was in flight (start-up or shutdown): nothing to commit."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        self.output_dir = None
        BatchLLMError.__init__(
            self, f"stopped by {signal.Signals(signum).name} while no generation was running; committed work is "
                  "kept: run the same command again to continue")


def raise_on_signals() -> None:
    """Make SIGINT / SIGTERM raise ``StoppedOutsideJob`` in the main thread from now on (the command line
    calls this first thing; ``stop_on_signals`` takes over while a job runs, then puts this back)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        for s in _SIGNALS:  # a second signal while the first unwinds: the default action
            signal.signal(s, signal.SIG_DFL)
        raise StoppedOutsideJob(signum)

    for s in _SIGNALS:
        signal.signal(s, handler)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum is not None:  # second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
