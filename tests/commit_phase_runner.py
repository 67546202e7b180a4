"""The batchllm command line with a commit-phase callback on every ``ShardWriter``, for tests that land a
signal inside a shard commit: each phase's name is appended to MARKER as the commit passes it, then the
process sleeps SECONDS there (the window the test kills it in).

    python -m tests.commit_phase_runner MARKER SECONDS [batchllm arguments...]   (from the repository root)

Exit status and output are the command line's own (``batchllm.cli.main``)."""

from __future__ import annotations

import sys
import time

from batchllm import cli
from batchllm.io.writer import ShardWriter


def main(argv: list[str]) -> None:
    marker, seconds, *args = argv
    delay = float(seconds)

    def record(phase: str) -> None:
        with open(marker, "a") as f:
            f.write(phase + "\n")
        time.sleep(delay)

    # run_job builds its writer itself: the callback reaches it as the constructor's default
    ShardWriter.__init__.__kwdefaults__["on_commit_phase"] = record
    cli.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
