"""Logging set-up and a rate limiter for messages that can repeat thousands of times."""

import logging
import sys
import time

log = logging.getLogger("relay")
conn_log = logging.getLogger("relay.conn")  # one line per connection, shown with -v


def setup(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s relay: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    conn_log.setLevel(logging.DEBUG if verbose else logging.WARNING)


class RateLimited:
    """Logs the first of a kind of message, then at most one per ``interval`` with a count of the rest."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} more like this suppressed)"
        log.warning("%s", message)
