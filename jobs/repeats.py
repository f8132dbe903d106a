"""A repeated error is logged once, then counted: an outage is two log lines, not one per retry."""

from __future__ import annotations

import logging


class Repeats:
    """For one caller (a thread, or an event loop): `failed` logs the first error of a run of failures
    (with its traceback when asked) and counts the rest; `ok` ends the run, logging how many there were."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str):
        self.logger, self.what = logger, what
        self.count = 0

    def failed(self, err: BaseException, traceback: bool = False) -> None:
        self.count += 1
        if self.count == 1:
            self.logger.warning(
                "%s: %s: %s (logged once; repeats are counted)",
                self.what,
                type(err).__name__,
                err,
                exc_info=err if traceback else None,
            )

    def ok(self) -> None:
        if self.count:
            self.logger.warning("%s: working again after %d failure(s)", self.what, self.count)
            self.count = 0
