"""Matplotlib, imported only when a command is asked for a plot (it is an optional dependency)."""

from __future__ import annotations

from batchllm.errors import BatchLLMError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or a one-line error if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BatchLLMError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to ``path`` (format from the extension) and close it; a write failure is one line."""
    plt = pyplot()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise BatchLLMError(f"cannot write plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
