"""Which session a client's datagram belongs to, and the bounds on sessions, sans-IO.

One session per client address and port (its own SOCKS5 UDP ASSOCIATE), whatever the destinations:
endpoint-independent mapping, so a client port talking to several remotes keeps one association.
A session admitted here is counted until :meth:`SessionTable.close`; the caps are on sessions
overall and per client address. Idle time is kept here against an injected clock; the Trio side
(relay.udp.service) turns :meth:`Session.idle_deadline` into a cancel scope's deadline.
"""

from collections import deque
from collections.abc import Callable


class Refused(Exception):
    """No session for this client now; ``reason`` is a short word for metrics."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Session:
    """One client address and port: its counters, its queued datagrams, and the Trio side's handle."""

    __slots__ = (
        "client",
        "opened",
        "last_active",
        "idle_timeout",
        "queued",
        "queue_limit",
        "datagrams_up",
        "bytes_up",
        "datagrams_down",
        "bytes_down",
        "remote_count",
        "handle",
    )

    def __init__(self, client: tuple[str, int], now: float, idle_timeout: float, queue_limit: int):
        self.client = client
        self.opened = self.last_active = now
        self.idle_timeout = idle_timeout
        self.queued: deque[tuple[tuple[str, int], bytes]] = deque()  # (destination, payload) until associated
        self.queue_limit = queue_limit
        self.datagrams_up = self.bytes_up = self.datagrams_down = self.bytes_down = 0
        self.remote_count = 0  # remotes it had replies from, counted as it ends
        self.handle = None  # the Trio side's

    def active(self, now: float) -> None:
        self.last_active = now

    def idle_deadline(self) -> float:
        return self.last_active + self.idle_timeout

    def queue(self, destination: tuple[str, int], payload: bytes) -> bool:
        """Keep a datagram until the association is ready; False (dropped) when the queue is full."""
        if len(self.queued) >= self.queue_limit:
            return False
        self.queued.append((destination, payload))
        return True

    def relayed(self, datagrams_up: int, bytes_up: int, datagrams_down: int, bytes_down: int) -> None:
        self.datagrams_up += datagrams_up
        self.bytes_up += bytes_up
        self.datagrams_down += datagrams_down
        self.bytes_down += bytes_down


class SessionTable:
    def __init__(
        self,
        max_sessions: int,
        max_per_source: int,
        idle_timeout: float,
        clock: Callable[[], float],
        queue_limit: int = 16,
    ):
        self.max_sessions = max_sessions
        self.max_per_source = max_per_source  # 0: no cap but the overall one
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.queue_limit = queue_limit
        self._sessions: dict[tuple[str, int], Session] = {}
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, client: tuple[str, int]) -> Session | None:
        return self._sessions.get(client)

    def open(self, client: tuple[str, int]) -> Session:
        """A new session for ``client`` (which has none), or Refused when a cap is reached."""
        if client in self._sessions:
            raise ValueError(f"{client} already has a session")
        if len(self._sessions) >= self.max_sessions:
            raise Refused("sessions-full")
        source = client[0]
        if self.max_per_source and self._per_source.get(source, 0) >= self.max_per_source:
            raise Refused("source-full")
        session = Session(client, self.clock(), self.idle_timeout, self.queue_limit)
        self._sessions[client] = session
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return session

    def close(self, session: Session) -> None:
        if self._sessions.get(session.client) is not session:
            return
        del self._sessions[session.client]
        source = session.client[0]
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]
