"""The delay line's book (relay.lab.delayline.Held, Pacer): when which bytes may leave, without I/O."""

from __future__ import annotations

import pytest

from relay.lab.delayline import BULK_READ, BULK_READ_GAP, GRANULE, MAX_HELD_BYTES, Held, Pacer

DELAY = 0.05


def uncapped() -> Held:
    return Held(DELAY, Pacer(None))


def test_bytes_fall_due_one_delay_after_they_were_read():
    held = uncapped()
    held.took(100, now=10.0)
    assert held.due(10.0 + DELAY - 0.001) is None
    assert held.next_time(10.0) == pytest.approx(10.0 + DELAY)
    assert held.due(10.0 + DELAY) == 100
    held.sent(60)
    assert held.due(10.0 + DELAY) == 40
    assert held.bytes_held == 40
    held.sent(40)
    assert held.due(20.0) is None and held.bytes_held == 0


def test_nothing_leaves_before_not_before():
    held = Held(DELAY, Pacer(None), not_before=5.0)
    held.took(10, now=4.9)
    assert held.due(4.9 + DELAY) is None
    assert held.due(5.0 + DELAY) == 10


def test_the_end_leaves_after_the_bytes_ahead_of_it():
    held = uncapped()
    held.took(10, now=1.0)
    held.took(0, now=1.0)
    assert held.ended and not held.may_read(2.0)
    with pytest.raises(ValueError):
        held.sent(0)  # the 10 bytes are still ahead
    held.sent(10)
    assert held.due(1.0 + DELAY) == 0
    held.sent(0)
    assert held.done


def test_sending_more_than_is_due_is_refused():
    held = uncapped()
    held.took(10, now=1.0)
    with pytest.raises(ValueError):
        held.sent(11)


def test_reads_close_together_leave_together_at_most_a_granule_late():
    held = uncapped()
    held.took(100, now=1.0)
    held.took(100, now=1.0 + GRANULE / 2)
    assert len(held.queue) == 1
    # Merged: the first bytes leave up to a granule late, never early.
    assert held.due(1.0 + DELAY) is None
    assert held.due(1.0 + GRANULE / 2 + DELAY) == 200
    held.took(100, now=1.0 + 2 * GRANULE)
    assert len(held.queue) == 2


def test_a_bulk_read_waits_a_little_before_the_next_and_a_small_one_does_not():
    held = uncapped()
    held.took(100, now=1.0)
    assert held.may_read(1.0)
    held.took(BULK_READ, now=1.0)
    assert not held.may_read(1.0)
    assert held.next_time(1.0) == pytest.approx(1.0 + BULK_READ_GAP)
    assert held.may_read(1.0 + BULK_READ_GAP)


def test_a_full_window_stops_reading_until_bytes_leave():
    held = uncapped()
    held.took(MAX_HELD_BYTES, now=1.0)
    assert not held.may_read(2.0)
    assert held.room() == 0
    held.sent(1000)
    assert held.may_read(2.0)
    assert held.room() == 1000


def test_a_capped_rate_spaces_chunks_by_their_size():
    rate = 1_000_000.0  # bytes per second
    pacer = Pacer(rate)
    held = Held(DELAY, pacer)
    held.took(10_000, now=1.0)  # 10 ms of the line
    assert held.read_after == pytest.approx(1.01)
    assert not held.may_read(1.005)
    assert held.due(1.01 + DELAY) == 10_000
    # A second connection shares the pacer: its chunk takes the next slot.
    other = Held(DELAY, pacer)
    other.took(10_000, now=1.0)
    assert other.due(1.02 + DELAY - 0.001) is None
    assert other.due(1.02 + DELAY) == 10_000


def test_an_idle_capped_line_starts_afresh():
    pacer = Pacer(1000.0)
    assert pacer.take(10, now=1.0) == pytest.approx(1.01)
    assert pacer.take(10, now=5.0) == pytest.approx(5.01)
    assert Pacer(None).take(10**9, now=3.0) == 3.0
