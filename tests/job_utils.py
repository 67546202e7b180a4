"""Helpers for job tests: interrupting a run, running the command line in-process."""

from __future__ import annotations

import os
import signal

from batchllm.cli import main


class SigintAt:
    """A ``run_job`` progress hook that sends this process SIGINT at the n-th ``event``; ``seen`` counts
    every such event, so a test can check none came after the signal."""

    def __init__(self, event: str, n: int):
        self.event, self.n, self.seen = event, n, 0

    def __call__(self, event: str, info: dict) -> None:
        if event == self.event:
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGINT)


def run_main(args, capsys, stdout: bool = False) -> tuple[int, str]:
    """The real entry point in-process: its exit status and stderr (``stdout``: stdout + stderr), with the
    signal handlers restored after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    got = capsys.readouterr()
    return code, (got.out + got.err) if stdout else got.err
