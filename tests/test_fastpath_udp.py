"""The UdpEngine of both fast-path twins, over real UDP sockets on loopback: what it hands to Python,
what it relays each way once a session is registered, in which order, and what it drops.

Without TPROXY a listener's "original destination" is simply the address the datagram was sent to.
Reply sockets are transparent (IP_TRANSPARENT), so the tests that open them need root.
"""

import fcntl
import os
import select
import socket
import struct
import termios
import time

import pytest

from relay.udp.datagram import header
from tests.root import require_root

IP_RECVORIGDSTADDR = 20
REMOTE = ("127.0.0.7", 5353)  # where the fake proxy says replies come from
TIMEOUT = 5.0


def udp_socket(host="127.0.0.1", blocking=True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT if blocking else 0)
    return sock


class Lab:
    """A listener, a client, the session's socket to the proxy and the proxy's relay address, all on loopback."""

    def __init__(self, impl, **engine_args):
        self.listener = udp_socket(blocking=False)
        self.listener.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        self.client = udp_socket()
        self.proxy = udp_socket()  # the proxy's UDP relay address
        self.upstream = udp_socket(blocking=False)  # the session's socket to it, connected as the relay does
        self.upstream.connect(self.proxy.getsockname())
        self.engine = impl.UdpEngine(engine_args.pop("max_sessions", 4), engine_args.pop("max_reply", 4), **engine_args)
        self.engine.add_listener(self.listener.fileno())
        self.engine.start()

    @property
    def client_address(self):
        return self.client.getsockname()

    @property
    def destination(self):
        return self.listener.getsockname()

    def register(self, first=()):
        return self.engine.add_session(self.client_address, self.upstream.fileno(), first)

    def register_asking(self, *remotes):
        """A session that has sent to ``remotes``' hosts (a datagram each, as the client's first ones), whose
        replies it may then take."""
        return self.register(first=[(remote, b"asking") for remote in remotes])

    def wait_handoff(self, count: int) -> list:
        taken = []
        while len(taken) < count:
            assert select.select([self.engine.fileno()], [], [], TIMEOUT)[0], f"{len(taken)} of {count} handed off"
            taken += self.engine.take()
        return taken

    def close(self):
        self.engine.close()
        for sock in (self.listener, self.client, self.proxy, self.upstream):
            sock.close()


@pytest.fixture
def lab(impl):
    made = []

    def make(**engine_args):
        made.append(Lab(impl, **engine_args))
        return made[-1]

    yield make
    for one in made:
        one.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_datagrams_of_a_client_without_a_session_are_handed_off_in_order(lab):
    lab = lab()
    for number in range(3):
        lab.client.sendto(b"datagram %d" % number, lab.destination)
    taken = lab.wait_handoff(3)
    assert taken == [(lab.client_address, lab.destination, b"datagram %d" % n) for n in range(3)]
    assert lab.engine.take() == []
    assert not select.select([lab.engine.fileno()], [], [], 0)[0]  # drained: not readable any more


def test_a_registered_session_relays_first_the_kept_then_the_queued_then_new_datagrams(lab):
    lab = lab()
    lab.client.sendto(b"queued", lab.destination)  # waits in the engine, never taken
    lab.client.sendto(b"queued too", lab.destination)
    select.select([lab.engine.fileno()], [], [], TIMEOUT)
    lab.register(first=[(("10.1.2.3", 80), b"kept by python")])
    lab.client.sendto(b"new", lab.destination)
    received = [lab.proxy.recvfrom(70000) for _ in range(4)]
    dest = header(*lab.destination)
    assert [data for data, _ in received] == [
        header("10.1.2.3", 80) + b"kept by python",
        dest + b"queued",
        dest + b"queued too",
        dest + b"new",
    ]
    assert {source for _, source in received} == {lab.upstream.getsockname()}
    assert lab.engine.take() == []


def test_replies_come_back_from_the_remote_address_and_are_counted(lab):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab()
    base = open_fds()
    handle = lab.register_asking(REMOTE)
    lab.client.sendto(b"x" * 100, lab.destination)
    assert lab.proxy.recvfrom(70000)[0] == header(*REMOTE) + b"asking"
    assert lab.proxy.recvfrom(70000)[0] == header(*lab.destination) + b"x" * 100
    for payload in (b"one", b"", bytes(range(256)) * 200):
        lab.proxy.sendto(header(*REMOTE) + payload, lab.upstream.getsockname())
        assert lab.client.recvfrom(70000) == (payload, REMOTE)
    assert open_fds() == base + 1  # one reply socket, held for the session
    drops, active, reply_errno = lab.engine.collect()
    assert drops == {} and reply_errno == 0
    assert active == [(handle, 2, 106, 3, 3 + 51200)]
    assert lab.engine.collect()[1] == []  # counted once
    lab.client.sendto(b"more", lab.destination)
    lab.proxy.recvfrom(70000)
    assert lab.engine.remove_session(handle) == (1, 4, 0, 0, 1)
    assert open_fds() == base  # the reply socket closed with its last session
    lab.client.sendto(b"after", lab.destination)
    assert lab.wait_handoff(1) == [(lab.client_address, lab.destination, b"after")]


def test_two_sessions_share_one_reply_socket_per_remote(lab, impl):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab()
    other_client = udp_socket()
    other_upstream = udp_socket(blocking=False)
    other_upstream.connect(lab.proxy.getsockname())
    try:
        base = open_fds()
        first = lab.register_asking(REMOTE)
        second = lab.engine.add_session(other_client.getsockname(), other_upstream.fileno(), [(REMOTE, b"asking")])
        lab.proxy.sendto(header(*REMOTE) + b"to first", lab.upstream.getsockname())
        lab.proxy.sendto(header(*REMOTE) + b"to second", other_upstream.getsockname())
        assert lab.client.recvfrom(100) == (b"to first", REMOTE)
        assert other_client.recvfrom(100) == (b"to second", REMOTE)
        assert open_fds() == base + 1
        lab.engine.remove_session(first)
        assert open_fds() == base + 1  # the second still holds it
        lab.proxy.sendto(header(*REMOTE) + b"still", other_upstream.getsockname())
        assert other_client.recvfrom(100) == (b"still", REMOTE)
        lab.engine.remove_session(second)
        assert open_fds() == base
    finally:
        other_client.close()
        other_upstream.close()


BAD_REPLIES = [
    (b"\x00\x00\x00", "malformed"),  # shorter than any header
    (b"\x00\x01\x00\x01" + bytes(6) + b"x", "malformed"),  # reserved bytes not zero
    (b"\x00\x00\x01" + header(*REMOTE)[3:] + b"x", "fragment"),
    (b"\x00\x00\x00\x03\x04name\x00\x35x", "malformed"),  # a domain name as the source
    (b"\x00\x00\x00\x09" + bytes(6), "malformed"),  # an unknown address type
    (b"\x00\x00\x00\x01\x7f\x00", "malformed"),  # the address cut short
    (header(*REMOTE)[:-2] + b"\0\0x", "malformed"),  # port 0
    (header("::1", 53) + b"x", "wrong-family"),  # an IPv6 remote for an IPv4 client
]


def test_only_well_formed_replies_from_the_relay_address_reach_the_client(lab):
    """A stranger's datagram never reaches the engine (the socket is connected); the rest are counted."""
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab()
    lab.register_asking(REMOTE)
    stranger = udp_socket()
    try:
        stranger.sendto(header(*REMOTE) + b"from a stranger", lab.upstream.getsockname())
        for data, _ in BAD_REPLIES:
            lab.proxy.sendto(data, lab.upstream.getsockname())
        lab.proxy.sendto(header(*REMOTE) + b"good", lab.upstream.getsockname())
        assert lab.client.recvfrom(100) == (b"good", REMOTE)  # the first and only one
    finally:
        stranger.close()
    expected = {}
    for _, reason in BAD_REPLIES:
        expected[reason] = expected.get(reason, 0) + 1
    assert lab.engine.collect()[0] == expected


def test_a_datagram_too_large_for_its_header_is_dropped_as_oversize(lab):
    lab = lab()
    lab.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    lab.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    lab.register()
    lab.client.sendto(b"x" * (65507 - 9), lab.destination)  # 10 bytes of header would make it 65508
    lab.client.sendto(b"x" * (65507 - 10), lab.destination)
    data, _ = lab.proxy.recvfrom(70000)
    assert len(data) == 65507
    assert lab.engine.collect()[0] == {"oversize": 1}


def test_past_the_queue_limit_datagrams_without_a_session_are_dropped(lab):
    lab = lab(queue_limit=2)
    for number in range(3):
        lab.client.sendto(b"%d" % number, lab.destination)
    deadline = time.monotonic() + TIMEOUT
    # Nothing is taken before the engine has read all three: taken earlier, the queue would have room.
    while struct.unpack("i", fcntl.ioctl(lab.listener, termios.FIONREAD, bytes(4)))[0]:
        assert time.monotonic() < deadline, "the engine did not read the listener"
        time.sleep(0.01)
    taken = lab.wait_handoff(2)
    assert [payload for _, _, payload in taken] == [b"0", b"1"]
    assert lab.engine.collect()[0] == {"queue-full": 1}


def test_the_reply_socket_cap_drops_replies_and_says_why(lab):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab(max_reply=1)
    lab.register_asking(REMOTE, ("127.0.0.8", 53))
    lab.proxy.sendto(header(*REMOTE) + b"first remote", lab.upstream.getsockname())
    assert lab.client.recvfrom(100) == (b"first remote", REMOTE)
    lab.proxy.sendto(header("127.0.0.8", 53) + b"second remote", lab.upstream.getsockname())
    lab.proxy.sendto(header(*REMOTE) + b"first again", lab.upstream.getsockname())
    assert lab.client.recvfrom(100) == (b"first again", REMOTE)
    drops, _, reply_errno = lab.engine.collect()
    assert drops == {"reply-socket": 1} and reply_errno == 23  # ENFILE


class OtherClient:
    """One more client with its session's socket to the proxy and the proxy's relay address, on the lab's engine."""

    def __init__(self, lab, remotes):
        self.client, self.proxy, self.upstream = udp_socket(), udp_socket(), udp_socket(blocking=False)
        self.upstream.connect(self.proxy.getsockname())
        self.handle = lab.engine.add_session(
            self.client.getsockname(), self.upstream.fileno(), [(remote, b"asking") for remote in remotes]
        )

    def replies(self, *remotes) -> list:
        """Replies from each of ``remotes`` in turn, then what reached the client: the last remote's reply
        must, so that every reply before it on the same socket has been relayed or dropped."""
        for number, remote in enumerate(remotes):
            self.proxy.sendto(header(*remote) + b"%d" % number, self.upstream.getsockname())
        received = []
        while not received or received[-1][0] != b"%d" % (len(remotes) - 1):
            received.append(self.client.recvfrom(100))
        return [source for _, source in received]

    def close(self):
        for sock in (self.client, self.proxy, self.upstream):
            sock.close()


@pytest.fixture
def other_clients(lab):
    made = []

    def make(lab, *remotes):
        made.append(OtherClient(lab, remotes))
        return made[-1]

    yield make
    for one in made:
        one.close()


def remotes(first: int, count: int) -> list:
    return [(f"127.0.0.{host}", 53) for host in range(first, first + count)]


def test_one_session_talking_to_many_remotes_leaves_reply_sockets_for_others_first_remotes(lab, other_clients):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab(max_sessions=2, max_reply=4)  # two sockets stay free for the two sessions' first remotes
    many = remotes(7, 4)
    greedy = other_clients(lab, *many)
    assert greedy.replies(*many, many[0]) == [*many[:2], many[0]]  # its 3rd and 4th remotes got none
    new, shared = remotes(11, 2), many[0]
    other = other_clients(lab, *new, shared)
    # Its first remote has a socket; past the reserve, neither a new one nor one open already.
    assert other.replies(*new, shared, new[0]) == [new[0], new[0]]
    assert greedy.replies(many[1]) == [many[1]]  # still held
    drops, _, reply_errno = lab.engine.collect()
    assert drops == {"reply-socket": 4} and reply_errno == 23  # ENFILE


def test_shared_reply_sockets_outliving_their_sessions_leave_one_for_a_first_remote(lab, other_clients):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab(max_sessions=2, max_reply=4)
    r0, r1, r2, r3, r4 = remotes(7, 5)
    first = other_clients(lab, r0, r1)
    assert first.replies(r0, r1) == [r0, r1]
    second = other_clients(lab, r2, r0, r1)
    second.replies(r2, r0, r1, r2)  # r0 and r1 would be shared, staying open for it after the first ends
    lab.engine.remove_session(first.handle)
    third = other_clients(lab, r3, r0, r1, r2)
    third.replies(r3, r0, r1, r2, r3)
    lab.engine.remove_session(second.handle)
    last = other_clients(lab, r4)
    assert last.replies(r4) == [r4]


def test_handles_and_bounds(lab):
    lab = lab(max_sessions=1)
    handle = lab.register()
    with pytest.raises(ValueError):
        lab.register()  # the same client twice
    other = udp_socket()
    try:
        with pytest.raises(OverflowError):
            lab.engine.add_session(other.getsockname(), other.fileno())
    finally:
        other.close()
    with pytest.raises(ValueError):
        lab.engine.add_session(("not an address", 1), lab.upstream.fileno())
    lab.engine.remove_session(handle)
    with pytest.raises(KeyError):
        lab.engine.remove_session(handle)  # stale: the slot's generation moved on
    again = lab.register()
    assert again != handle


def test_both_twins_count_drops_by_the_same_words(extension):
    from relay import _fastpath_py

    assert extension.UDP_DROPS == _fastpath_py.UDP_DROPS


@pytest.mark.parametrize("sizes", [(0, 1, 1), (1, -1, 1), (1, 1, 0)])
def test_an_engine_needs_a_session_and_a_queue(impl, sizes):
    with pytest.raises(ValueError):
        impl.UdpEngine(*sizes[:2], queue_limit=sizes[2])


def test_any_32_bit_mark_is_taken_and_nothing_else(impl):
    impl.UdpEngine(1, 1, mark=0xFFFFFFFF).close()
    for mark in (-2, 1 << 32):
        with pytest.raises(ValueError):
            impl.UdpEngine(1, 1, mark=mark)


def test_reply_sockets_carry_a_mark_with_the_top_bit_set(impl, lab):
    """The mark is what keeps replies out of the relay's own TPROXY rules; high marks are common."""
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab(mark=0x80000001)
    lab.register_asking(REMOTE)
    lab.proxy.sendto(header(*REMOTE) + b"marked", lab.upstream.getsockname())
    assert lab.client.recvfrom(100) == (b"marked", REMOTE)
    assert lab.engine.collect()[0] == {}  # no reply-socket drop: SO_MARK with the top bit set was taken


def test_kept_datagrams_to_port_0_are_refused_before_the_session_is_registered(lab):
    lab = lab()
    with pytest.raises(ValueError):
        lab.register(first=[(("10.1.2.3", 53), b"fine"), (("10.1.2.3", 0), b"nowhere")])
    lab.register()  # nothing was registered by the refused call
    lab.client.sendto(b"through", lab.destination)
    assert lab.proxy.recvfrom(100)[0] == header(*lab.destination) + b"through"


def test_close_stops_the_thread_and_leaves_the_callers_sockets_open(lab):
    lab = lab()
    lab.register()
    lab.engine.close()
    lab.engine.close()
    with pytest.raises(ValueError):
        lab.engine.take()
    for sock in (lab.listener, lab.upstream):
        sock.getsockname()  # still open: the engine never closes what it was given
    lab.client.sendto(b"after close", lab.destination)
    assert select.select([lab.listener], [], [], TIMEOUT)[0]
    assert lab.listener.recvfrom(100)[0] == b"after close"  # nobody reads it any more


def test_sessions_come_and_go_under_traffic_both_ways_and_leave_no_fd(lab):
    """Sessions registered and removed again and again (their sockets closed and their fds reused at once)
    while datagrams flow both ways: nothing crashes, nothing goes to a removed session's client, no fd is
    left. Bounded: 300 turns."""
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab(max_sessions=2)
    lab.client.settimeout(0)
    base = open_fds()
    for turn in range(300):
        upstream = udp_socket(blocking=False)
        upstream.connect(lab.proxy.getsockname())
        handle = lab.engine.add_session(lab.client_address, upstream.fileno(), [(REMOTE, b"asking")])
        for _ in range(3):
            lab.client.sendto(b"up %d" % turn, lab.destination)
            lab.proxy.sendto(header(*REMOTE) + b"down %d" % turn, upstream.getsockname())
        lab.engine.remove_session(handle)
        upstream.close()
    lab.engine.collect()
    lab.engine.take()
    assert open_fds() == base  # every reply socket closed with its last session
    received = []
    while True:
        try:
            received.append(lab.client.recv(100))
        except BlockingIOError:
            break
    assert all(data.startswith(b"down ") for data in received)


def test_replies_come_only_from_hosts_the_session_sent_to(lab):
    """Address-dependent filtering: any port of a host asked, nothing from another host, the router's own
    listener included (a reply socket bound there would take the listener's datagrams)."""
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab()
    lab.register_asking(REMOTE)
    for source in (("127.0.0.9", 5353), lab.destination):
        lab.proxy.sendto(header(*source) + b"unasked", lab.upstream.getsockname())
    other_port = (REMOTE[0], 7777)
    lab.proxy.sendto(header(*other_port) + b"another port", lab.upstream.getsockname())
    assert lab.client.recvfrom(100) == (b"another port", other_port)
    assert lab.engine.collect()[0] == {"unasked": 2}
    lab.proxy.recvfrom(100)  # the session's own first datagram
    lab.client.sendto(b"still relayed", lab.destination)
    assert lab.proxy.recvfrom(100)[0] == header(*lab.destination) + b"still relayed"


def test_a_session_takes_replies_from_the_last_256_hosts_it_sent_to(lab):
    require_root("reply sockets are transparent (IP_TRANSPARENT)")
    lab = lab()
    hosts = [(f"127.1.{number // 200}.{number % 200 + 1}", 53) for number in range(257)]
    lab.register_asking(*hosts)
    lab.proxy.sendto(header(*hosts[0]) + b"forgotten", lab.upstream.getsockname())
    lab.proxy.sendto(header(*hosts[1]) + b"kept", lab.upstream.getsockname())
    assert lab.client.recvfrom(100) == (b"kept", hosts[1])
    assert lab.engine.collect()[0] == {"unasked": 1}


def test_sizes_past_the_engines_bounds_are_refused(impl):
    for sessions, replies in ((1 << 23, 1), (1, 600_000_000)):  # the second once looped for ever in C
        with pytest.raises(ValueError):
            impl.UdpEngine(sessions, replies)


def test_a_session_whose_socket_was_closed_first_is_removed_alike(lab):
    lab = lab()
    upstream = udp_socket(blocking=False)
    handle = lab.engine.add_session(("127.0.0.1", 9), upstream.fileno())
    upstream.close()
    assert lab.engine.remove_session(handle)[:4] == (0, 0, 0, 0)
    lab.engine.add_session(("127.0.0.1", 9), lab.upstream.fileno())  # its slot and client are free again
