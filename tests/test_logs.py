"""The warning rate limiter: what it logs, and that nothing a client does grows it without bound."""

import logging
import re

import pytest

from relay.logs import RateLimited, log


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def lines():
    captured = []

    class Collect(logging.Handler):
        def emit(self, record):
            captured.append(record.getMessage())

    handler = Collect()
    log.addHandler(handler)
    try:
        yield captured
    finally:
        log.removeHandler(handler)


def accounted(lines) -> int:
    """Warnings the lines stand for: each line itself plus the counts it reports."""
    return len(lines) + sum(int(n) for line in lines for n in re.findall(r"\((\d+) (?:more|other)", line))


def test_first_of_a_kind_then_one_per_interval_with_a_count(lines):
    clock = Clock()
    limiter = RateLimited(interval=10, clock=clock)
    for _ in range(5):
        limiter.warning("a", "A happened")
    limiter.warning("b", "B happened")
    clock.now += 10
    limiter.warning("a", "A happened")
    assert lines == ["A happened", "B happened", "A happened (4 more like this suppressed)"]


def test_a_flood_of_distinct_kinds_is_bounded_in_memory_and_lines(lines):
    """800 000 refused destinations from one client took 89 MB and wrote 800 000 lines."""
    clock = Clock()
    limiter = RateLimited(interval=60, clock=clock, max_kinds=1024, max_lines=20)
    calls = 200_000
    for n in range(calls):
        clock.now += 0.001  # 1000 a second: 200 s in all
        limiter.warning(f"dst 169.254.{n >> 8 & 255}.{n & 255}:{n}", "refused")
        assert len(limiter._kinds) <= 1024
    assert len(lines) <= (200 // 60 + 1) * 20
    clock.now += 60
    limiter.warning("last", "refused")  # carries the count of everything held back
    assert accounted(lines) == calls + 1


def test_repeats_of_forgotten_kinds_are_still_counted(lines):
    clock = Clock()
    limiter = RateLimited(interval=10, clock=clock, max_kinds=2, max_lines=100)
    limiter.warning("a", "A")
    for _ in range(3):
        limiter.warning("a", "A")  # suppressed
    limiter.warning("b", "B")
    limiter.warning("c", "C")  # forgets "a" and its 3
    assert len(limiter._kinds) == 2
    assert lines[-1] == "C (3 other warnings suppressed)"
    assert accounted(lines) == 6
