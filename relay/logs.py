"""Logging set-up and a rate limiter for messages that can repeat thousands of times."""

import json
import logging
import math
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
    """Logs the first of a kind of message, then at most one per ``interval`` with a count of the rest.

    Bounded whatever the clients do: at most ``max_kinds`` kinds are remembered (the one logged
    longest ago is forgotten first) and at most ``max_lines`` lines are written per ``interval``
    across all kinds; what that holds back is counted in the next line written."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic, max_kinds: int = 1024, max_lines: int = 20):
        self.interval, self.clock = interval, clock
        self.max_kinds, self.max_lines = max_kinds, max_lines
        self._kinds: dict[str, list] = {}  # key -> [when last logged, suppressed since]; oldest first
        self._window_started = -math.inf
        self._lines_in_window = 0
        self._held_back = 0  # by the overall cap, or counts of forgotten kinds

    def warning(self, key: str, message: str) -> None:
        now = self.clock()
        kind = self._kinds.get(key)
        if kind is not None and now - kind[0] < self.interval:
            kind[1] += 1
            return
        if now - self._window_started >= self.interval:
            self._window_started, self._lines_in_window = now, 0
        if self._lines_in_window >= self.max_lines:
            self._held_back += 1
            return
        self._lines_in_window += 1
        if kind is not None:
            del self._kinds[key]  # re-inserted as the newest
            if kind[1]:
                message += f" ({kind[1]} more like this suppressed)"
        self._kinds[key] = [now, 0]
        while len(self._kinds) > self.max_kinds:
            self._held_back += self._kinds.pop(next(iter(self._kinds)))[1]
        if self._held_back:
            message += f" ({self._held_back} other warnings suppressed)"
            self._held_back = 0
        log.warning("%s", message)
