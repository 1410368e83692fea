import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.dns.framing import MAX_FRAME, FrameError, Framer, frame
from tests.dns.support import positive, query

MESSAGES = [query(), positive(), query(id=2, use_edns=0)]
STREAM = b"".join(frame(message) for message in MESSAGES)


def test_a_whole_stream_gives_every_message():
    framer = Framer()
    assert framer.receive_data(STREAM) == MESSAGES
    assert framer.pending == 0


def test_byte_by_byte_gives_the_same_messages():
    framer = Framer()
    received = []
    for index in range(len(STREAM)):
        received += framer.receive_data(STREAM[index : index + 1])
    assert received == MESSAGES
    assert framer.pending == 0


def test_a_partial_frame_is_held_until_completed():
    framer = Framer()
    assert framer.receive_data(STREAM + frame(query())[:5]) == MESSAGES
    assert framer.pending == 5
    assert framer.receive_data(frame(query())[5:]) == [query()]
    assert framer.pending == 0


@given(st.lists(st.integers(1, len(STREAM)), max_size=10))
def test_any_split_gives_the_same_messages(cuts):
    framer = Framer()
    received = []
    start = 0
    for cut in [*sorted(cuts), len(STREAM)]:
        received += framer.receive_data(STREAM[start:cut])
        start = max(start, cut)
    assert received == MESSAGES


def test_the_largest_frame_passes_and_what_is_held_stays_bounded():
    largest = bytes(MAX_FRAME)
    framer = Framer()
    assert framer.receive_data(frame(largest)[:-1]) == []
    assert framer.pending == MAX_FRAME + 1
    assert framer.receive_data(b"\x00") == [largest]


def test_frame_refuses_what_two_bytes_cannot_say():
    with pytest.raises(ValueError):
        frame(bytes(MAX_FRAME + 1))


@pytest.mark.parametrize("length", [0, 1, 11])
def test_a_frame_too_short_for_a_header_breaks_the_stream_for_good(length):
    framer = Framer()
    with pytest.raises(FrameError):
        framer.receive_data(length.to_bytes(2, "big") + bytes(length))
    with pytest.raises(FrameError):
        framer.receive_data(frame(query()))
    assert framer.pending == 0


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes_raise_nothing_but_frame_error(chunks):
    framer = Framer()
    try:
        for chunk in chunks:
            for message in framer.receive_data(chunk):
                assert 12 <= len(message) <= MAX_FRAME
            assert framer.pending <= MAX_FRAME + 1
    except FrameError:
        pass
