"""Helpers for job tests that interrupt a run."""

from __future__ import annotations

import os
import signal


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
