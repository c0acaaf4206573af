"""A cheap ``inspect.stack`` for MetaSchedule worker processes.

TVMScript's parser calls ``inspect.stack()`` once per parsed function. The stdlib version
resolves and stats every frame's module (``inspect.getmodule``), which on these sandboxed
machines makes ``import tvm.s_tir.tensor_intrin`` take about a minute -- and every builder and
runner worker pays it again. A plain walk of ``sys._getframe()`` that keeps one line of
``code_context`` (TVMScript reads it to detect class-level decorators) gives the same answer.
"""

from __future__ import annotations

import inspect
import linecache
import sys

_ORIGINAL_STACK = inspect.stack
_ORIGINAL_OUTER = inspect.getouterframes


def _frame_infos(frame, context: int = 1):
    infos = []
    while frame is not None:
        code = frame.f_code
        lineno = frame.f_lineno or 0
        lines = None
        if context > 0:
            line = linecache.getline(code.co_filename, lineno, frame.f_globals)
            lines = [line] if line else None
        infos.append(inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines, 0))
        frame = frame.f_back
    return infos


def _fast_stack(context: int = 1):
    return _frame_infos(sys._getframe(1), context)


def _fast_outerframes(frame, context: int = 1):
    return _frame_infos(frame, context)


def install() -> None:
    """Swap in the cheap walk (idempotent). Used as the workers' ``initializer``."""
    inspect.stack = _fast_stack
    inspect.getouterframes = _fast_outerframes


def uninstall() -> None:
    inspect.stack = _ORIGINAL_STACK
    inspect.getouterframes = _ORIGINAL_OUTER
