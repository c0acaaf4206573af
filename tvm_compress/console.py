"""What reaches the user's terminal: our progress and results, not TVM's native chatter.

TVM's C++ side writes warnings a user cannot act on straight to file descriptors 1 and 2
(MetaSchedule's tensorize and vectorize complaints about its own candidates run to thousands of
lines per tuning run). ``native_output`` points those descriptors at a log file for the duration
of a command while Python's ``sys.stdout`` / ``sys.stderr`` keep writing to the terminal, and
sends Python warnings to the same log. ``Console`` prints log lines; a ``Progress`` line replaces
the previous one on a terminal instead of stacking up while the user waits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional


class Progress(str):
    """A log message about ongoing work: shown in place on a terminal, throttled elsewhere."""


class Console:
    """``console(msg)`` prints ``msg`` on stderr (resolved at call time) unless quiet."""

    # Where the terminal is not a TTY (CI logs, files), a progress line at most this often.
    PLAIN_PROGRESS_EVERY_S = 15.0

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._status = False
        self._last_plain = float("-inf")

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        stream = sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        if isinstance(msg, Progress):
            if tty:
                stream.write("\r\033[K" + str(msg)[: _width() - 1])
                stream.flush()
                self._status = True
                return
            now = time.monotonic()
            if now - self._last_plain < self.PLAIN_PROGRESS_EVERY_S:
                return
            self._last_plain = now
        elif tty and self._status:
            stream.write("\r\033[K")
        self._status = False
        print(msg, file=stream, flush=True)

    def done(self) -> None:
        """End a pending progress line (before the program's last words)."""
        if self._status and not self.quiet:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self._status = False


def _width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 100


def default_log_path(command: str) -> Path:
    from .cache import cache_root

    return cache_root() / "logs" / f"{command}.log"


@contextlib.contextmanager
def native_output(log_path: Optional[Path], verbose: bool = False) -> Iterator[Optional[Path]]:
    """Send what native code writes to fds 1 and 2, and Python warnings, to ``log_path``
    (appended) unless ``verbose``; Python's own stdout/stderr stay on the terminal. Nests: an
    inner call moves the native output to its own file."""
    if verbose or log_path is None:
        yield None
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    swapped = {}
    sink = open(log_path, "ab", buffering=0)
    try:
        # Python's streams keep the terminal: fresh streams on copies of the original fds, but only
        # where they are the real fds (pytest's capture, or an outer call, already points elsewhere).
        for name, fd in (("stdout", 1), ("stderr", 2)):
            stream = getattr(sys, name)
            if _fileno(stream) == fd:
                swapped[name] = stream
                setattr(sys, name, open(os.dup(saved[fd]), "w", buffering=1, encoding=stream.encoding,
                                        errors="backslashreplace"))
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_to(sink)
            yield log_path
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        for name, stream in swapped.items():
            getattr(sys, name).close()
            setattr(sys, name, stream)
        sink.close()


def _fileno(stream) -> Optional[int]:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _warning_to(sink):
    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        sink.write(text.encode("utf-8", "backslashreplace"))

    return show
