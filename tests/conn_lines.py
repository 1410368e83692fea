"""The per-connection log lines (-v) a test makes, as their fields."""

import logging
from contextlib import contextmanager

from relay.logs import conn_log


@contextmanager
def conn_lines():
    """Yields a list that gets the fields of each connection's log line while the block runs."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.fields)

    handler, level = Collect(), conn_log.level
    conn_log.addHandler(handler)
    conn_log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        conn_log.removeHandler(handler)
        conn_log.setLevel(level)
