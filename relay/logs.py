"""Logging set-up and a rate limiter for messages that can repeat thousands of times."""

import json
import logging
import sys
import time

log = logging.getLogger("relay")
conn_log = logging.getLogger("relay.conn")  # one line per connection, shown with -v


class JsonFormatter(logging.Formatter):
    """One JSON object per line; per-connection lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        return json.dumps(entry)


def setup(verbose: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
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
