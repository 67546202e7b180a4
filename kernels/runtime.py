"""Where batchllm's Triton kernels run: compiled for a CUDA GPU, or in Triton's interpreter (CPU).

How Triton chooses (triton 3.x, ``triton/runtime/jit.py``): ``@triton.jit`` builds an
``InterpretedFunction`` (the kernel body run by numpy, one program after another, on tensors of any
device) when its ``TRITON_INTERPRET`` switch is on at the moment it decorates, and a ``JITFunction``
(compiled for the GPU at the first launch) otherwise. Triton's own language library (``tl.zeros``,
``tl.sum``'s combine functions, ``tl.cdiv``, ...) is decorated the same way when ``triton`` is first
imported, and an interpreted kernel cannot call a compiled helper (nor the reverse). So the choice is
one per process, and it must be made before Triton is imported.

This module is the one place batchllm makes it:

* ``use_interpreter(flag)`` decides explicitly, before any kernel module is imported (e.g.
  ``scripts/kernel_registers.py`` compiles the kernels for sm_90 on a machine without a GPU; the
  scripts' ``--smoke`` runs use the interpreter on any machine);
* otherwise ``interpreting()`` decides from the machine the first time it is asked: the interpreter
  exactly when torch sees no CUDA device.

``load_triton()`` applies the decision and returns ``(triton, triton.language)``: it sets Triton's
switch (``TRITON_INTERPRET`` = 1 or 0, inherited by child processes, which then agree) just before
Triton's first import, or checks that Triton, if something imported it already, was loaded in the
decided mode. Every kernel module takes Triton from it (``triton, tl = load_triton()``) and decorates
with ``jit``, which builds the decided kind of function whatever the environment says later. The
decision holds for the rest of the process; ``use_interpreter`` asking for the other mode raises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = ["check_device", "interpreting", "jit", "load_triton", "use_interpreter"]

_interpret: bool | None = None  # None: not decided yet


def use_interpreter(flag: bool) -> None:
    """Run the kernels in Triton's interpreter (True) or compile them for the GPU (False).

    Call before any kernel module (or Triton) is imported. Raises RuntimeError when the mode was already
    decided the other way (by an earlier call, or by a kernel module that decided from the device)."""
    global _interpret
    flag = bool(flag)
    if _interpret is not None and _interpret != flag:
        raise RuntimeError(f"the Triton kernels already {_MODES[_interpret]}; use_interpreter must be called before "
                           "the first kernel module is imported")
    _interpret = flag


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter; decided from the device on the first call when
    ``use_interpreter`` was not called (the interpreter exactly when torch sees no CUDA device)."""
    global _interpret
    if _interpret is None:
        _interpret = not torch.cuda.is_available()
    return _interpret


def load_triton() -> tuple[ModuleType, ModuleType]:
    """``(triton, triton.language)`` in the decided mode (see the module docstring).

    Raises RuntimeError when Triton was imported before the decision, in the other mode (its language
    library would then not run with batchllm's kernels)."""
    interpret = interpreting()
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.zeros, InterpretedFunction) != interpret:
        raise RuntimeError(f"Triton was imported before batchllm.kernels.runtime decided where the kernels run, and "
                           f"it does not match: the kernels {_MODES[interpret]}, Triton's language library "
                           f"does not. Import the kernels (or call use_interpreter) before importing triton")
    return triton, tl


def jit(fn: Callable | None = None, **options: Any):
    """``triton.jit`` for the decided mode: an ``InterpretedFunction`` or a ``JITFunction``, as Triton's
    own decorator builds them (the same keyword ``options``: ``do_not_specialize``, ``debug``, ...).
    Use as ``@jit`` or ``@jit(do_not_specialize=[...])``."""
    triton, _ = load_triton()

    def decorate(f: Callable):
        if interpreting():
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(f, **options)
        return triton.JITFunction(f, **options)

    return decorate if fn is None else decorate(fn)


def check_device(device: torch.device) -> None:
    """Raise ValueError when the kernels cannot run on tensors of ``device``: compiled kernels take CUDA
    tensors only (the interpreter takes any)."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{device.type} tensors need Triton's interpreter, and the kernels were compiled for the GPU "
                         "(batchllm.kernels.runtime.use_interpreter)")


_MODES = {True: "run in Triton's interpreter", False: "compile for the GPU"}
