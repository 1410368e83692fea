# cython: language_level=3, boundscheck=False, wraparound=False
"""The socket fast path, in C: original destination, transparent listeners and
the Engine that relays established connections with splice(), socket -> pipe
-> socket, without copying bytes through Python.

``relay/_fastpath_py.py`` is its pure-Python twin with the same API
(``_fastpath.pyi``); the tests run against both. Policy stays in Python: the
words a connection ends with (relay/ends.py), and whether a held FIN is
genuine (relay/net/pump.py).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetFromErrno
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdlib cimport free, realloc

from relay import ends

NAME = "cython"


def original_dst(sock):
    """The address a REDIRECTed connection was sent to, as (host, port)."""
    cdef int fd = sock.fileno()
    cdef sockaddr_in a4
    cdef sockaddr_in6 a6
    cdef socklen_t size
    cdef char text[64]
    if sock.family == AF_INET:
        size = sizeof(a4)
        if getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &a4, &size) != 0:
            PyErr_SetFromErrno(OSError)
        inet_ntop(AF_INET, &a4.sin_addr, text, sizeof(text))
        return text.decode("ascii"), ntohs(a4.sin_port)
    size = sizeof(a6)
    if getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &a6, &size) != 0:
        PyErr_SetFromErrno(OSError)
    inet_ntop(AF_INET6, &a6.sin6_addr, text, sizeof(text))
    return text.decode("ascii"), ntohs(a6.sin6_port)


def set_transparent(sock):
    """Let a TPROXY listener accept connections addressed to any IP (needs CAP_NET_ADMIN)."""
    cdef int one = 1
    cdef int fd = sock.fileno()
    cdef int rc
    if sock.family == AF_INET:
        rc = setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one))
    else:
        rc = setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))
    if rc != 0:
        PyErr_SetFromErrno(OSError)


# Empty pipes kept for the next connection, so a short connection costs no
# pipe2()/fcntl()/close() calls. Only pipes known to be empty come back here.
cpdef enum:
    POOL_MAX = 64
cdef int _pool_read[POOL_MAX]
cdef int _pool_write[POOL_MAX]
cdef int _pool_capacity[POOL_MAX]
cdef int _pool_count = 0


def pooled_pipes():
    """How many empty pipes wait for reuse (for tests)."""
    return _pool_count


cdef int take_pipe(Way *way, int wanted) noexcept:
    """Give ``way`` an empty pipe (pooled if any); -1 with errno set if none can be had."""
    global _pool_count
    cdef int fds[2]
    if _pool_count > 0:
        _pool_count -= 1
        way.pipe_r = _pool_read[_pool_count]
        way.pipe_w = _pool_write[_pool_count]
        way.capacity = _pool_capacity[_pool_count]
    else:
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
            return -1
        way.pipe_r = fds[0]
        way.pipe_w = fds[1]
        way.capacity = fcntl(fds[1], F_GETPIPE_SZ)
    if wanted > 0 and way.capacity != wanted:
        # Best effort: past /proc/sys/fs/pipe-max-size the pipe keeps its size.
        fcntl(way.pipe_w, F_SETPIPE_SZ, wanted)
        way.capacity = fcntl(way.pipe_w, F_GETPIPE_SZ)
    return 0


cdef void give_back_pipe(Way *way) noexcept:
    """To the pool if it is empty; closed if bytes are left in it (an aborted connection)."""
    global _pool_count
    if way.pipe_r < 0:
        return
    if way.pending == 0 and _pool_count < POOL_MAX:
        _pool_read[_pool_count] = way.pipe_r
        _pool_write[_pool_count] = way.pipe_w
        _pool_capacity[_pool_count] = way.capacity
        _pool_count += 1
    else:
        close(way.pipe_r)
        close(way.pipe_w)
    way.pipe_r = way.pipe_w = -1
    way.pending = 0


DEF MAX_EVENTS = 256
# What advancing one way came to.
DEF WAITING = 0  # for the source to have bytes or the destination to have room
DEF FINISHED = 1  # the FIN went through: this way is done
DEF OUT_OF_BUDGET = 2  # more to do, in the next run
DEF FAILED = 3  # a reset or error: the connection ends (see Engine._failure)
DEF HELD = 4  # the upstream's FIN arrived and waits for release()
# Who failed: the sides 0 (client) and 1 (upstream), or the relay itself.
DEF LOCAL = 2

cdef inline long long handle_of(Conn *conn, int slot) noexcept:
    """What names a connection to Python: its slot, and the slot's generation (31 bits, so it stays positive)."""
    return (<long long>(conn.generation & 0x7fffffff) << 32) | slot


cdef unsigned int SOCKET_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
cdef unsigned int PAUSED_EVENTS = EPOLLOUT | EPOLLET  # errors and hangups are reported anyway


cdef class Engine:
    """Established connections, spliced in C and woken through one epoll fd.

    Each socket is registered once, edge-triggered, so no epoll_ctl is needed
    as a connection moves between reading and writing: a way reads until the
    source is empty (EAGAIN with an empty pipe) or the destination is full,
    and only the edge that can unblock it moves it again. Nothing here reads a
    clock: callers pass ``now``.
    """

    cdef int epfd
    cdef Conn *conns
    cdef int size  # slots in conns
    cdef int *free_slots
    cdef int free_count
    cdef int *backlog  # ways (slot * 2 + side) whose budget ran out
    cdef int backlog_count
    cdef int _failure  # set by advance() when it returns FAILED
    cdef readonly double next_deadline  # no connection times out before this (inf: none can)
    cdef readonly Py_ssize_t moved  # bytes moved by the last run()
    cdef int _failure_errno
    cdef list held  # (handle, token) of upstream FINs not yet reported by take_held()

    def __cinit__(self):
        self.next_deadline = float("inf")
        self.held = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)

    def __init__(self):
        """Takes no arguments (with __cinit__ alone, Cython would ignore any)."""

    def __dealloc__(self):
        cdef int slot, side
        for slot in range(self.size):
            if self.conns[slot].in_use:  # close() was not called: no one is told, but nothing leaks
                for side in range(2):
                    close(self.conns[slot].fd[side])
                    give_back_pipe(&self.conns[slot].way[side])
                    Py_XDECREF(self.conns[slot].way[side].first)
                Py_XDECREF(self.conns[slot].token)
        free(self.conns)
        free(self.free_slots)
        free(self.backlog)
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    def __len__(self):
        return self.size - self.free_count

    @property
    def backlogged(self):
        """True if some way has work left that no epoll event will announce: run() again soon."""
        return self.backlog_count > 0

    cdef int grow(self) except -1:
        cdef int new_size = self.size * 2 if self.size else 64
        cdef int slot
        cdef Conn *conns = <Conn *>realloc(self.conns, new_size * sizeof(Conn))
        if conns == NULL:
            raise MemoryError()
        self.conns = conns
        cdef int *free_slots = <int *>realloc(self.free_slots, new_size * sizeof(int))
        if free_slots == NULL:
            raise MemoryError()
        self.free_slots = free_slots
        cdef int *backlog = <int *>realloc(self.backlog, 2 * new_size * sizeof(int))
        if backlog == NULL:
            raise MemoryError()
        self.backlog = backlog
        for slot in range(new_size - 1, self.size - 1, -1):
            self.conns[slot].in_use = False
            self.conns[slot].generation = 0
            self.free_slots[self.free_count] = slot
            self.free_count += 1
        self.size = new_size
        return 0

    def add(self, int client_fd, int upstream_fd, token, double now, double idle_timeout,
            double half_closed_timeout, int pipe_size=0, bytes to_upstream_first=b"", bytes to_client_first=b"",
            bint hold_upstream_eof=False):
        """Take over a connection: on success the engine owns (and will close) both fds.

        Both must be non-blocking sockets (splice would block on the socket otherwise).
        With ``hold_upstream_eof``, the upstream's FIN is held: see take_held().
        Returns the connection's handle.
        """
        cdef int side
        cdef epoll_event event
        cdef Way *way
        cdef int error
        if self.free_count == 0:
            self.grow()
        cdef int slot = self.free_slots[self.free_count - 1]
        cdef Conn *conn = &self.conns[slot]
        cdef bytes first
        event.events = SOCKET_EVENTS
        conn.fd[0] = client_fd
        conn.fd[1] = upstream_fd
        for side in range(2):
            event.data.u64 = slot * 2 + side
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, conn.fd[side], &event) != 0:
                error = errno
                if side == 1:
                    epoll_ctl(self.epfd, EPOLL_CTL_DEL, client_fd, &event)
                errno = error
                PyErr_SetFromErrno(OSError)  # the fds stay the caller's
        self.free_count -= 1
        for side in range(2):
            way = &conn.way[side]
            way.pipe_r = way.pipe_w = -1
            way.capacity = way.pending = way.first_sent = way.moved = 0
            way.eof = way.shut = way.write_blocked = way.queued = way.paused = way.held = False
            first = to_upstream_first if side == 0 else to_client_first
            way.first = NULL
            if first:
                Py_INCREF(first)
                way.first = <PyObject *>first
        conn.last_active = now
        self.next_deadline = min(self.next_deadline, now + idle_timeout)
        conn.idle_timeout = idle_timeout
        conn.half_closed_timeout = half_closed_timeout
        conn.pipe_size = pipe_size
        conn.half_closed = False
        conn.hold_upstream_eof = hold_upstream_eof
        Py_INCREF(token)
        conn.token = <PyObject *>token
        conn.in_use = True
        return handle_of(conn, slot)

    cdef int fail(self, int who, int error) noexcept:
        self._failure = who
        self._failure_errno = error
        return FAILED

    cdef int advance(self, Conn *conn, int side, Py_ssize_t *budget, double now) noexcept:
        """Move one way's bytes until it blocks, finishes, fails or the budget is spent.

        The pipe is drained before more is read, so EAGAIN on a read means the
        source is empty, never that the pipe is full (splice cannot tell them apart).
        """
        cdef Way *way = &conn.way[side]
        cdef int src = conn.fd[side]
        cdef int dst = conn.fd[1 - side]
        cdef ssize_t n
        cdef object first
        if way.shut:
            return FINISHED
        if way.held:
            return WAITING  # nothing moves this way until release()
        while True:
            while way.first != NULL:
                first = <object>way.first
                n = send(dst, PyBytes_AS_STRING(first) + way.first_sent,
                         PyBytes_GET_SIZE(first) - way.first_sent, MSG_NOSIGNAL | MSG_DONTWAIT)
                if n > 0:
                    way.first_sent += n
                    way.moved += n
                    budget[0] -= n
                    conn.last_active = now
                    if way.first_sent == PyBytes_GET_SIZE(first):
                        Py_XDECREF(way.first)
                        way.first = NULL
                elif errno == EAGAIN:
                    way.write_blocked = True
                    return WAITING
                elif errno != EINTR:
                    return self.fail(1 - side, errno)
            while way.pending > 0:
                n = splice(way.pipe_r, NULL, dst, NULL, way.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    way.pending -= n
                    way.moved += n
                    budget[0] -= n
                    conn.last_active = now
                elif n == 0 or errno == EAGAIN:
                    way.write_blocked = True
                    return WAITING
                elif errno != EINTR:
                    return self.fail(1 - side, errno)
            way.write_blocked = False
            if way.eof:
                give_back_pipe(way)
                if side == 1 and conn.hold_upstream_eof:
                    way.held = True
                    return HELD
                if shutdown(dst, SHUT_WR) != 0:
                    return self.fail(1 - side, errno)
                way.shut = True
                if not conn.half_closed:
                    # From now on the silence allowed is the (shorter) half-closed timeout.
                    conn.half_closed = True
                    conn.last_active = now
                    self.next_deadline = min(self.next_deadline, now + min(conn.idle_timeout, conn.half_closed_timeout))
                return FINISHED
            if budget[0] <= 0:
                return OUT_OF_BUDGET
            if way.pipe_r < 0 and take_pipe(way, conn.pipe_size) != 0:
                return self.fail(LOCAL, errno)
            n = splice(src, NULL, way.pipe_w, NULL, way.capacity, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                way.pending = n
            elif n == 0:
                way.eof = True
            elif errno == EAGAIN:
                give_back_pipe(way)  # empty: an idle connection holds no pipe
                return WAITING
            elif errno != EINTR:
                return self.fail(side, errno)

    cdef int step(self, int slot, int side, Py_ssize_t *budget, double now, list finished) except -1:
        """Advance one way; end the connection if that finished or failed it."""
        cdef Conn *conn = &self.conns[slot]
        cdef int outcome
        if budget[0] <= 0:
            outcome = OUT_OF_BUDGET  # no I/O at all: the way just waits for the next run
        else:
            outcome = self.advance(conn, side, budget, now)
        if outcome == OUT_OF_BUDGET:
            if not conn.way[side].queued:
                conn.way[side].queued = True
                self.backlog[self.backlog_count] = slot * 2 + side
                self.backlog_count += 1
        elif outcome == FAILED:
            if self._failure == LOCAL:
                self.finish(slot, ends.local_failure(self._failure_errno), False, finished)
            else:
                self.finish(slot, ends.RESET_BY[self._failure], False, finished)
        elif outcome == FINISHED and conn.way[1 - side].shut:
            self.finish(slot, ends.CLOSED, True, finished)
        elif outcome == HELD:
            self.held.append((handle_of(conn, slot), <object>conn.token))
        elif conn.way[side].paused != conn.way[side].write_blocked:
            self.pause_reading(slot, side, conn.way[side].write_blocked)
        return 0

    cdef void pause_reading(self, int slot, int side, bint paused) noexcept:
        """While a way waits for room in its destination, its source's data must not wake the engine.

        Turning EPOLLIN back on reports the source at once if it has data, so no edge is lost.
        """
        cdef epoll_event event
        event.events = PAUSED_EVENTS if paused else SOCKET_EVENTS
        event.data.u64 = slot * 2 + side
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.conns[slot].fd[side], &event) == 0:
            self.conns[slot].way[side].paused = paused

    cdef int finish(self, int slot, str ended, bint clean, list finished) except -1:
        """Close both sockets (with a reset unless ``clean``) and report the connection ended ``ended``."""
        cdef Conn *conn = &self.conns[slot]
        cdef linger reset_now
        cdef int side
        reset_now.l_onoff = 1
        reset_now.l_linger = 0
        for side in range(2):
            # We hold the only descriptor of each socket, so closing also unregisters it from epoll.
            if not clean:
                setsockopt(conn.fd[side], SOL_SOCKET, SO_LINGER, &reset_now, sizeof(reset_now))
            close(conn.fd[side])
            give_back_pipe(&conn.way[side])
            Py_XDECREF(conn.way[side].first)
            conn.way[side].first = NULL
        token = <object>conn.token
        Py_XDECREF(conn.token)
        conn.token = NULL
        conn.in_use = False
        conn.generation += 1
        self.free_slots[self.free_count] = slot
        self.free_count += 1
        finished.append((token, ended, conn.way[0].moved, conn.way[1].moved))
        return 0

    def run(self, double now, Py_ssize_t budget):
        """Handle what is ready (never blocks); returns the connections that ended, as
        (token, ended, sent_up, sent_down). Stops after about ``budget`` bytes: see ``backlogged``;
        ``moved`` then says how many bytes it moved."""
        cdef list finished = []
        cdef Py_ssize_t left = budget
        self.moved = 0  # and stays 0 if the run fails
        self._run(now, &left, finished)
        self.moved = budget - left
        return finished

    cdef int _run(self, double now, Py_ssize_t *budget, list finished) except -1:
        """run()'s work, spending ``budget`` as bytes move."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int count, i, entry, slot, side, error
        cdef unsigned int ready
        cdef socklen_t size
        cdef Conn *conn
        count = self.backlog_count
        self.backlog_count = 0
        for i in range(count):  # each re-queues at most itself, behind what was already read
            entry = self.backlog[i]
            slot, side = entry >> 1, entry & 1
            if self.conns[slot].in_use and self.conns[slot].way[side].queued:
                self.conns[slot].way[side].queued = False
                self.step(slot, side, budget, now, finished)
        if budget[0] <= 0:
            return 0  # edge-triggered events wait in the kernel's ready list, not lost
        count = epoll_wait(self.epfd, events, MAX_EVENTS, 0)
        if count < 0:
            if errno == EINTR:
                return 0
            PyErr_SetFromErrno(OSError)
        for i in range(count):
            slot, side = events[i].data.u64 >> 1, events[i].data.u64 & 1
            conn = &self.conns[slot]
            if not conn.in_use:
                continue  # it ended earlier in this batch
            ready = events[i].events
            if ready & EPOLLERR:
                size = sizeof(error)
                error = 0
                getsockopt(conn.fd[side], SOL_SOCKET, SO_ERROR, &error, &size)
                if error:
                    self.finish(slot, ends.RESET_BY[side], False, finished)
                    continue
            if ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR) and not conn.way[side].write_blocked:
                self.step(slot, side, budget, now, finished)
            if (ready & (EPOLLOUT | EPOLLERR) and conn.in_use
                    and (conn.way[1 - side].write_blocked or conn.way[1 - side].first != NULL)):
                self.step(slot, 1 - side, budget, now, finished)
        return 0

    cdef int live_slot(self, long long handle) noexcept:
        """The slot of the connection ``handle`` names, or -1 if that connection has ended."""
        cdef long long slot = handle & 0xffffffff
        if slot >= self.size or not self.conns[slot].in_use or handle_of(&self.conns[slot], slot) != handle:
            return -1
        return slot

    def counts(self):
        """(token, sent_up, sent_down) of every connection relaying now, so far: read on demand (the status page),
        at no cost to the relaying itself."""
        cdef list counts = []
        cdef int slot
        for slot in range(self.size):
            if self.conns[slot].in_use:
                counts.append((<object>self.conns[slot].token, self.conns[slot].way[0].moved,
                               self.conns[slot].way[1].moved))
        return counts

    def take_held(self):
        """The upstream FINs held since the last call, as (handle, token): each waits for release()
        or abort(). A connection that ended meanwhile (in the same run, or by expire()) is left out."""
        cdef list held = [(handle, token) for handle, token in self.held if self.live_slot(handle) >= 0]
        self.held = []
        return held

    def release(self, long long handle, double now):
        """Forward a held upstream FIN. Returns the connections that ended, as run() does; a handle
        whose FIN is not held, or whose connection already ended (a reset, a timeout), is ignored."""
        cdef list finished = []
        cdef Py_ssize_t budget = 1 << 30  # only the FIN is left to move
        cdef int slot = self.live_slot(handle)
        if slot < 0 or not self.conns[slot].way[1].held:
            return finished
        self.conns[slot].way[1].held = False
        self.conns[slot].hold_upstream_eof = False  # the upstream has no other FIN to hold
        self.step(slot, 1, &budget, now, finished)
        return finished

    def abort(self, long long handle, str ended not None):
        """Reset both sides of a connection (one whose FIN is held, say) and report it ended ``ended``,
        as run() does; a handle whose connection already ended is ignored."""
        cdef list finished = []
        cdef int slot = self.live_slot(handle)
        if slot >= 0:
            self.finish(slot, ended, False, finished)
        return finished

    def reclaim(self, str ended not None):
        """Reset the connection idle longest among those whose client has not sent a byte, and
        report it ended ``ended``, as run() does; nothing if every client has spoken."""
        cdef list finished = []
        cdef int slot, chosen = -1
        cdef Conn *conn
        for slot in range(self.size):
            conn = &self.conns[slot]
            if (conn.in_use and conn.way[0].moved == 0 and conn.way[0].pending == 0 and conn.way[0].first == NULL
                    and (chosen < 0 or conn.last_active < self.conns[chosen].last_active)):
                chosen = slot
        if chosen >= 0:
            self.finish(chosen, ended, False, finished)
        return finished

    def expire(self, double now):
        """End the connections silent for longer than their timeout; returns them as run() does."""
        cdef list finished = []
        cdef double limit, deadline, next_deadline = float("inf")
        cdef int slot
        cdef Conn *conn
        for slot in range(self.size):
            conn = &self.conns[slot]
            if not conn.in_use:
                continue
            limit = conn.idle_timeout
            if conn.half_closed and conn.half_closed_timeout < limit:
                limit = conn.half_closed_timeout
            deadline = conn.last_active + limit
            if deadline <= now:
                self.finish(slot, ends.HALF_CLOSED_TIMEOUT if conn.half_closed else ends.IDLE_TIMEOUT, False, finished)
            elif deadline < next_deadline:
                next_deadline = deadline
        self.next_deadline = next_deadline
        return finished

    def close(self):
        """Reset every connection left (shutdown); returns them as run() does, ended ends.CANCELLED."""
        cdef list finished = []
        cdef int slot
        for slot in range(self.size):
            if self.conns[slot].in_use:
                self.finish(slot, ends.CANCELLED, False, finished)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        self.next_deadline = float("inf")
        self.backlog_count = 0
        self.held = []
        return finished


cdef class Conduit:
    """One direction, src -> pipe -> dst, for a counted run of bytes: an HTTP body or chunk whose
    length its head told. The caller says how many bytes may still be read; the pipe is drained
    before more is read, as in the Engine. Neither fd is owned: the caller closes them.
    """

    cdef Way way
    cdef int src
    cdef int dst
    cdef int pipe_size
    cdef readonly bint eof  # the source ended before the count was read
    cdef readonly int failed_side  # after an OSError from move(): 0 the source's, 1 the destination's

    def __cinit__(self):
        self.way.pipe_r = self.way.pipe_w = -1
        self.way.pending = 0

    def __init__(self, int src_fd, int dst_fd, int pipe_size=0):
        self.src = src_fd
        self.dst = dst_fd
        self.pipe_size = pipe_size
        self.eof = False
        self.failed_side = -1

    def __dealloc__(self):
        give_back_pipe(&self.way)

    @property
    def pending(self):
        """Bytes read from the source and not yet written: while there are, move() waits to write."""
        return self.way.pending

    def move(self, Py_ssize_t limit):
        """Write what is pending, then read at most ``limit`` bytes and write them, until the source
        is empty, the destination full, or the count read; returns the bytes read from the source."""
        cdef Py_ssize_t taken = 0
        cdef ssize_t n
        while True:
            while self.way.pending > 0:
                n = splice(self.way.pipe_r, NULL, self.dst, NULL, self.way.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    self.way.pending -= n
                elif n == 0 or errno == EAGAIN:
                    return taken
                elif errno != EINTR:
                    self.failed_side = 1
                    PyErr_SetFromErrno(OSError)
            if limit - taken <= 0 or self.eof:
                give_back_pipe(&self.way)
                return taken
            if self.way.pipe_r < 0 and take_pipe(&self.way, self.pipe_size) != 0:
                self.failed_side = -1
                PyErr_SetFromErrno(OSError)
            n = splice(self.src, NULL, self.way.pipe_w, NULL, min(limit - taken, <Py_ssize_t>self.way.capacity),
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                self.way.pending = n
                taken += n
            elif n == 0:
                self.eof = True
            elif errno == EAGAIN:
                give_back_pipe(&self.way)  # empty: a waiting body holds no pipe
                return taken
            elif errno != EINTR:
                self.failed_side = 0
                PyErr_SetFromErrno(OSError)

    def close(self):
        """Give the pipe back (to the pool if empty; bytes left in it are dropped)."""
        give_back_pipe(&self.way)
