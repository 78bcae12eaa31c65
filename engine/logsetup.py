"""Logging for a show that runs for weeks: the console plus a rotating file.

On stage the console is enough; in a gallery nobody watches it, and after a crash the
only witness is the log. So the CLI configures, once, a console handler and a
``RotatingFileHandler`` (5 MB x 5 by default, in ``<state dir>/log/dreamdeck.log``),
which bounds the disk the log can ever take. A log folder that cannot be written is
one warning on the console, and the show runs with the console alone.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from engine.state import state_dir

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
FILE_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # a file outlives a day: keep the date
CONSOLE_DATE_FORMAT = "%H:%M:%S"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 5


class _NoTorchvisionChatter(logging.Filter):
    """transformers warns, on import, that its image processors fall back to PIL without
    torchvision. Nothing here uses an image processor (the scenes feed tensors), so the
    three lines would only scare a performer reading the console before a show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


# Library loggers whose chatter the console does without: (logger name, filter). Installed by
# setup_logging (never at import: a library user's logging is theirs) and taken off by close().
QUIET_LIBRARIES: tuple[tuple[str, logging.Filter], ...] = (
    ("transformers.utils.import_utils", _NoTorchvisionChatter()),
)


def default_log_file() -> Path:
    return state_dir() / "log" / "dreamdeck.log"


@dataclass
class LogSetup:
    """What ``setup_logging`` installed; ``close()`` takes it off again (tests, re-configuration)."""

    path: Path | None
    handlers: list[logging.Handler] = field(default_factory=list)
    logger: logging.Logger = field(default_factory=logging.getLogger)
    filters: list[tuple[logging.Logger, logging.Filter]] = field(default_factory=list)

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.handlers.clear()
        for logger, quiet in self.filters:
            logger.removeFilter(quiet)
        self.filters.clear()


def setup_logging(
    level: str | int = "info",
    log_file: Path | None = None,
    *,
    to_file: bool = True,
    max_bytes: int = MAX_BYTES,
    backups: int = BACKUPS,
    console: TextIO | None = None,
    logger: logging.Logger | None = None,
) -> LogSetup:
    """Configure the root logger (or ``logger``): console, and a rotating file unless ``to_file`` is False.

    ``log_file`` None means the default place. Handlers this function installed before
    on the same logger are replaced, so calling it twice does not log every line twice.
    """
    logger = logger or logging.getLogger()
    for handler in list(logger.handlers):
        if getattr(handler, "_dreamdeck", False):
            logger.removeHandler(handler)
            handler.close()
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    logger.setLevel(level)

    setup = LogSetup(path=None, logger=logger)
    stream = logging.StreamHandler(console or sys.stderr)
    stream.setFormatter(logging.Formatter(LOG_FORMAT, CONSOLE_DATE_FORMAT))
    setup.handlers.append(stream)

    file_error: str | None = None
    if to_file:
        path = log_file or default_log_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            rotating = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        except OSError as exc:
            file_error = f"cannot write the log file {path} ({exc}): logging to the console only"
        else:
            rotating.setFormatter(logging.Formatter(LOG_FORMAT, FILE_DATE_FORMAT))
            setup.handlers.append(rotating)
            setup.path = path

    for handler in setup.handlers:
        handler._dreamdeck = True  # type: ignore[attr-defined]  # marks ours for replacement
        logger.addHandler(handler)
    if logger is logging.getLogger():  # only the application's own logging quiets libraries
        for name, quiet in QUIET_LIBRARIES:
            library = logging.getLogger(name)
            library.addFilter(quiet)  # adding the same filter twice keeps one
            setup.filters.append((library, quiet))
    if file_error:
        logger.warning("%s", file_error)
    return setup


class RateLimitedLog:
    """At most one warning per ``interval`` seconds; the next one says how many were held back.

    A sender that floods bad messages must neither flood the log nor slow the server down
    writing it.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0
        self._lock = threading.Lock()

    def warning(self, message: str) -> bool:
        """Log ``message`` unless a line went out less than ``interval`` ago; True if logged."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._held += 1
                return False
            held, self._held = self._held, 0
            self._next = now + self._interval
        self._log.warning("%s%s", message, f" ({held} more since the last line)" if held else "")
        return True
