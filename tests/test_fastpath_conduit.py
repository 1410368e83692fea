"""The Conduit of both fast-path twins: a counted run of bytes from one socket to another
(an HTTP body), over real TCP pairs on loopback."""

import errno
import hashlib
import os
import select
import socket
import threading

import pytest

from tests.sockpairs import hard_close, tcp_pair


@pytest.fixture
def sockets():
    """(sender, source, sink, receiver): the conduit moves source -> sink; the test writes to
    sender and reads from receiver."""
    sender, source = tcp_pair()
    sink, receiver = tcp_pair()
    for sock in (source, sink):
        sock.setblocking(False)
    yield sender, source, sink, receiver
    for sock in (sender, source, sink, receiver):
        sock.close()


def drive(conduit, source, sink, count, deadline=20.0):
    """Move ``count`` bytes as a caller would: wait where move() says it waits. Returns bytes read."""
    left = count
    poll = select.poll()
    while True:
        left -= conduit.move(left)
        if conduit.pending:
            fd, mask = sink.fileno(), select.POLLOUT
        elif left and not conduit.eof:
            fd, mask = source.fileno(), select.POLLIN
        else:
            return count - left
        poll.register(fd, mask)
        assert poll.poll(deadline * 1000), "no progress"
        poll.unregister(fd)


def send_until_closed(sock, data):
    """For a thread that floods ``sock`` while nobody reads: it ends when the test closes it."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def read_exactly(sock, count):
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "receiver saw the end early"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("size", [1, 4095, 65536, 65537, 3 << 20])
def test_exactly_the_count_goes_through_and_the_rest_stays(impl, sockets, size):
    sender, source, sink, receiver = sockets
    data, trailing = os.urandom(size), b"next request"
    writer = threading.Thread(target=sender.sendall, args=(data + trailing,))
    reader_out = {}
    reader = threading.Thread(target=lambda: reader_out.setdefault("data", read_exactly(receiver, size)))
    writer.start()
    reader.start()
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    assert drive(conduit, source, sink, size) == size
    writer.join(10)
    reader.join(10)
    assert hashlib.sha256(reader_out["data"]).digest() == hashlib.sha256(data).digest()
    assert conduit.pending == 0 and not conduit.eof
    source.setblocking(True)
    assert read_exactly(source, len(trailing)) == trailing  # not one byte past the count was taken
    conduit.close()


def test_move_returns_what_it_read_and_waits_for_room(impl, sockets):
    sender, source, sink, receiver = sockets
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    assert conduit.move(1000) == 0 and conduit.pending == 0  # nothing to read yet
    threading.Thread(target=send_until_closed, args=(sender, os.urandom(16 << 20)), daemon=True).start()
    taken = 0
    for _ in range(10000):  # nobody reads the sink: it fills up, then move() holds bytes pending
        taken += conduit.move((16 << 20) - taken)
        if conduit.pending:
            break
    assert conduit.pending > 0 and 0 < taken < 16 << 20
    held = conduit.pending
    assert conduit.move((16 << 20) - taken) == 0 and conduit.pending == held  # full: reads nothing more
    conduit.close()


def test_an_end_of_data_before_the_count(impl, sockets):
    sender, source, sink, receiver = sockets
    sender.sendall(b"x" * 100)
    sender.shutdown(socket.SHUT_WR)
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    assert drive(conduit, source, sink, 1000) == 100
    assert conduit.eof and conduit.pending == 0
    assert read_exactly(receiver, 100) == b"x" * 100


def test_a_reset_source_is_the_source_s_failure(impl, sockets):
    sender, source, sink, receiver = sockets
    hard_close(sender)
    select.select([source], [], [], 5)
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    with pytest.raises(OSError) as caught:
        conduit.move(100)
    assert caught.value.errno == errno.ECONNRESET and conduit.failed_side == 0


def test_a_reset_destination_is_the_destination_s_failure(impl, sockets):
    sender, source, sink, receiver = sockets
    hard_close(receiver)
    select.select([sink], [], [], 5)
    sender.sendall(b"y" * 5000)
    select.select([source], [], [], 5)
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    with pytest.raises(OSError) as caught:
        for _ in range(100):
            conduit.move(5000)
    assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE) and conduit.failed_side == 1


def test_the_pipe_goes_back_to_the_pool_only_empty(impl, sockets):
    sender, source, sink, receiver = sockets
    sender.sendall(b"z" * 10)
    select.select([source], [], [], 5)
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    pooled = impl.pooled_pipes()
    assert conduit.move(10) == 10 and conduit.pending == 0
    assert impl.pooled_pipes() >= min(pooled, impl.POOL_MAX - 1)  # the count was read: given back
    threading.Thread(target=send_until_closed, args=(sender, os.urandom(16 << 20)), daemon=True).start()
    for _ in range(10000):
        conduit.move(16 << 20)
        if conduit.pending:
            break
    assert conduit.pending
    holding = impl.pooled_pipes()
    conduit.close()  # with bytes in it: dropped, never pooled stale
    assert impl.pooled_pipes() == holding


def test_a_body_with_an_urgent_byte_goes_through_whole_and_counted(impl, sockets):
    """splice() stops at an urgent (MSG_OOB) byte for good: the conduit reads past it, the byte in its place
    (the relay's sockets have SO_OOBINLINE), so the body's length still frames what follows it."""
    sender, source, sink, receiver = sockets
    source.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    sender.send(b"abc!", socket.MSG_OOB)
    sender.sendall(b"def" + b"next request")
    conduit = impl.Conduit(source.fileno(), sink.fileno())
    assert drive(conduit, source, sink, 7, deadline=5) == 7
    receiver.settimeout(5)
    assert read_exactly(receiver, 7) == b"abc!def"
    conduit.close()
    assert source.recv(100) == b"next request"
