"""relay.proto.tls's record boundary: whether a FIN from an https:// proxy came between records or inside one."""

from hypothesis import given
from hypothesis import strategies as st

from relay.proto.tls import RecordBoundary


def record(size: int) -> bytes:
    return b"\x17\x03\x03" + size.to_bytes(2, "big") + bytes(size)


@given(sizes=st.lists(st.integers(0, 20000), min_size=1, max_size=6), cuts=st.lists(st.integers(1, 30000)))
def test_any_split_of_whole_records_ends_between_records(sizes, cuts):
    stream = b"".join(record(size) for size in sizes)
    boundary, position = RecordBoundary(), 0
    for cut in cuts:
        boundary.feed(stream[position : position + cut])
        position += cut
    boundary.feed(stream[position:])
    assert boundary.between_records


@given(size=st.integers(1, 20000), data=st.data())
def test_a_stream_cut_inside_a_record_or_its_header_does_not(size, data):
    stream = record(100) + record(size)
    cut = data.draw(st.integers(len(record(100)) + 1, len(stream) - 1))
    boundary = RecordBoundary()
    boundary.feed(memoryview(stream)[:cut])
    assert not boundary.between_records
