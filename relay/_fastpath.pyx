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
from libc.stdlib cimport calloc, free, malloc, realloc

from operator import index as _index
from os import urandom as _urandom

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


# EPOLLPRI: an urgent (MSG_OOB) byte came, which splice() will not read past (read_past_urgent).
cdef unsigned int SOCKET_EVENTS = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP | EPOLLET
cdef unsigned int PAUSED_EVENTS = EPOLLPRI | EPOLLOUT | EPOLLET  # errors and hangups are reported anyway


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
            way.eof = way.shut = way.write_blocked = way.queued = way.paused = way.held = way.urgent = False
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
        cdef ssize_t n, marked
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
            if way.urgent and (n == 0 or (n < 0 and errno == EAGAIN)):
                marked = read_past_urgent(src, way.pipe_w, way.capacity)
                if marked == -2:
                    way.urgent = False  # past it: splice() reads on
                else:
                    n = marked
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
            if ready & EPOLLPRI:
                conn.way[side].urgent = True
            if ready & EPOLLERR:
                size = sizeof(error)
                error = 0
                getsockopt(conn.fd[side], SOL_SOCKET, SO_ERROR, &error, &size)
                if error:
                    self.finish(slot, ends.RESET_BY[side], False, finished)
                    continue
            if ready & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR) and not conn.way[side].write_blocked:
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


DEF PAST_MARK = 4096  # bytes read past an urgent byte at once: PIPE_BUF, so the write to the empty pipe is whole


cdef ssize_t read_past_urgent(int src, int pipe_w, size_t limit) noexcept nogil:
    """splice() stops before an urgent (MSG_OOB) byte and never reads past it: it says EAGAIN, or 0 once the
    peer's FIN came, with the rest of the stream still waiting. At such a mark, recv() reads on past it, into
    the empty pipe, as the twin's read() does: with SO_OOBINLINE (the relay's sockets) the urgent byte in its
    place, else without it. Returns the bytes put in the pipe; 0 at the end of the stream; -2 when the source
    is at no mark (the caller's reading stands); -1 with errno on a failure (EAGAIN: nothing past the mark yet)."""
    global errno
    cdef int at_mark = 0, saved = errno
    cdef char buffer[PAST_MARK]
    cdef ssize_t n
    if ioctl(src, SIOCATMARK, &at_mark) != 0 or not at_mark:
        errno = saved  # the caller's reading stands, and its errno with it
        return -2
    n = recv(src, buffer, min(limit, <size_t>PAST_MARK), MSG_DONTWAIT)
    if n > 0 and write(pipe_w, buffer, n) != n:
        return -1
    return n


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
        cdef ssize_t n, marked
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
            if n == 0 or (n < 0 and errno == EAGAIN):
                marked = read_past_urgent(self.src, self.way.pipe_w, limit - taken)
                if marked != -2:
                    n = marked
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


# -- UDP: the datagrams of associated sessions, relayed by a thread of C ----------------------------

DEF UDP_BATCH = 32  # datagrams read from one socket at once (one recvmmsg), before the others get a turn
DEF MAX_DATAGRAM = 65535
DEF CONTROL_SIZE = 64  # room for one IP_ORIGDSTADDR / IPV6_ORIGDSTADDR message
DEF MAX_REMOTES_PER_SESSION = 256  # reply sockets one session may hold
# What an epoll event of the UDP engine names: a session's slot and generation, a listener's fd with this
# bit set, or the stop eventfd.
cdef unsigned long long LISTENER_BIT = (<unsigned long long>1) << 63
cdef unsigned long long STOP_TAG = ~(<unsigned long long>0)

# Why a datagram was dropped, as the metrics name it; the index is the engine's counter.
UDP_DROPS = (
    "no-destination",  # no original destination (or port 0) came with a client's datagram
    "oversize",  # it does not fit a UDP datagram with the SOCKS5 header, or was truncated
    "send-blocked",  # the socket to the proxy was full
    "send-failed",  # sending failed otherwise
    "malformed",  # a reply's SOCKS5 header is short or wrong
    "fragment",  # a reply's SOCKS5 header has FRAG != 0: not reassembled
    "wrong-family",  # a reply from an IPv6 remote to an IPv4 client, or the other way
    "remotes-full",  # the session holds MAX_REMOTES_PER_SESSION reply sockets already
    "reply-socket",  # no reply socket could be opened (out of fds, or the cap on them)
    "queue-full",  # too many datagrams of clients without a session wait for Python
    "unasked",  # a reply from a host the client did not send to (address-dependent filtering, RFC 4787)
)
DEF DROP_NO_DESTINATION = 0
DEF DROP_OVERSIZE = 1
DEF DROP_SEND_BLOCKED = 2
DEF DROP_SEND_FAILED = 3
DEF DROP_MALFORMED = 4
DEF DROP_FRAGMENT = 5
DEF DROP_WRONG_FAMILY = 6
DEF DROP_REMOTES_FULL = 7
DEF DROP_REPLY_SOCKET = 8
DEF DROP_QUEUE_FULL = 9
DEF DROP_UNASKED = 10
DEF DROP_REASONS = 11


cdef struct UdpState:
    pthread_mutex_t lock  # held by the thread while it relays, and by every method
    bint closed
    int epfd
    int stop_fd  # written by close(): the thread returns
    int handoff_fd  # readable while handoffs wait: what Python waits on
    bint has_mark
    unsigned int mark  # SO_MARK of reply sockets
    UdpSession *sessions
    int session_capacity
    int free_session
    int *session_buckets
    unsigned int session_mask
    Reply *replies
    int reply_capacity
    int replies_open
    int free_reply
    int *reply_buckets
    unsigned int reply_mask
    Handoff *handoffs  # a queue: handoff_count entries from handoff_first, wrapping
    int handoff_capacity
    int handoff_first
    int handoff_count
    long long drops[DROP_REASONS]
    int reply_errno  # why the last reply socket could not be opened
    # What one recvmmsg() fills: UDP_BATCH datagrams of MAX_DATAGRAM bytes, their sources and controls.
    mmsghdr batch[UDP_BATCH]
    iovec parts[UDP_BATCH]
    SockAddr sources[UDP_BATCH]
    char controls[UDP_BATCH][CONTROL_SIZE]
    char *buffer


cdef inline unsigned int addr_hash(const Addr *a) noexcept nogil:
    """FNV-1a over the address and port."""
    cdef unsigned int h = 2166136261u
    cdef const unsigned char *p = <const unsigned char *>a
    cdef size_t i
    for i in range(sizeof(Addr)):
        h = (h ^ p[i]) * 16777619u
    return h


cdef inline bint addr_equal(const Addr *a, const Addr *b) noexcept nogil:
    return memcmp(a, b, sizeof(Addr)) == 0


cdef bint addr_from_sockaddr(const SockAddr *sa, Addr *a) noexcept nogil:
    memset(a, 0, sizeof(Addr))
    a.family = sa.any.sa_family
    if a.family == AF_INET:
        a.port = sa.v4.sin_port
        memcpy(a.ip, &sa.v4.sin_addr, 4)
    elif a.family == AF_INET6:
        a.port = sa.v6.sin6_port
        memcpy(a.ip, &sa.v6.sin6_addr, 16)
    else:
        return False
    return True


cdef socklen_t sockaddr_from_addr(const Addr *a, SockAddr *sa) noexcept nogil:
    memset(sa, 0, sizeof(SockAddr))
    if a.family == AF_INET:
        sa.v4.sin_family = AF_INET
        sa.v4.sin_port = a.port
        memcpy(&sa.v4.sin_addr, a.ip, 4)
        return sizeof(sockaddr_in)
    sa.v6.sin6_family = AF_INET6
    sa.v6.sin6_port = a.port
    memcpy(&sa.v6.sin6_addr, a.ip, 16)
    return sizeof(sockaddr_in6)


cdef Addr addr_from_python(object address) except *:
    """(host, port) of either family, as an Addr; ValueError if it is not an IP literal and port."""
    cdef Addr a
    host = address[0].split("%")[0].encode("ascii")
    port = address[1]
    memset(&a, 0, sizeof(Addr))
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} is not in 0-65535")
    a.port = htons(port)
    if inet_pton(AF_INET, host, a.ip) == 1:
        a.family = AF_INET
    elif inet_pton(AF_INET6, host, a.ip) == 1:
        a.family = AF_INET6
    else:
        raise ValueError(f"{address[0]!r} is not an IP address")
    return a


cdef object addr_to_python(const Addr *a):
    cdef char text[64]
    inet_ntop(a.family, a.ip, text, sizeof(text))
    return text.decode("ascii"), ntohs(a.port)


cdef int find_session(UdpState *st, const Addr *client) noexcept nogil:
    cdef int slot = st.session_buckets[addr_hash(client) & st.session_mask]
    while slot >= 0:
        if addr_equal(&st.sessions[slot].client, client):
            return slot
        slot = st.sessions[slot].next
    return -1


cdef int find_reply(UdpState *st, const Addr *remote) noexcept nogil:
    cdef int slot = st.reply_buckets[addr_hash(remote) & st.reply_mask]
    while slot >= 0:
        if addr_equal(&st.replies[slot].remote, remote):
            return slot
        slot = st.replies[slot].next
    return -1


cdef bint original_destination(msghdr *msg, Addr *dest) noexcept nogil:
    """The address a client's datagram was sent to, from IP_ORIGDSTADDR / IPV6_ORIGDSTADDR."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(msg)
    cdef SockAddr sa
    cdef size_t needed, size
    while c != NULL:
        needed, size = 0, 0
        if c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_ORIGDSTADDR:
            needed, size = 8, sizeof(sockaddr_in)  # family, port and address: what is read of it
        elif c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_ORIGDSTADDR:
            needed, size = 24, sizeof(sockaddr_in6)
        if needed and c.cmsg_len >= CMSG_LEN(needed):  # a control message cut short is not read past its end
            memset(&sa, 0, sizeof(sa))
            memcpy(&sa, CMSG_DATA(c), min(c.cmsg_len - CMSG_LEN(0), size))
            return addr_from_sockaddr(&sa, dest) and dest.port != 0
        c = CMSG_NXTHDR(msg, c)
    return False


cdef bint asked(const UdpSession *s, const Addr *remote) noexcept nogil:
    """Whether the session sent to ``remote``'s host (any port: a server may answer from another)."""
    cdef Addr host = remote[0]
    cdef int i
    host.port = 0
    for i in range(s.asked_count):
        if addr_equal(&s.asked[i], &host):
            return True
    return False


cdef void remember_asked(UdpSession *s, const Addr *dest) noexcept nogil:
    """Let replies from ``dest``'s host through; past MAX_REMOTES_PER_SESSION hosts, in place of the oldest."""
    cdef Addr host = dest[0]
    cdef Addr *grown
    cdef int capacity
    host.port = 0
    if asked(s, &host):
        return
    if s.asked_count == s.asked_capacity and s.asked_capacity < MAX_REMOTES_PER_SESSION:
        capacity = min(s.asked_capacity * 2 + 4, MAX_REMOTES_PER_SESSION)
        grown = <Addr *>realloc(s.asked, sizeof(Addr) * capacity)
        if grown != NULL:
            s.asked, s.asked_capacity = grown, capacity
    if s.asked_count < s.asked_capacity:
        s.asked[s.asked_count] = host
        s.asked_count += 1
    elif s.asked_count:
        s.asked[s.asked_next] = host
        s.asked_next = (s.asked_next + 1) % s.asked_count


cdef void send_up(UdpState *st, UdpSession *s, const Addr *dest, const char *data, Py_ssize_t size) noexcept nogil:
    """A client's datagram to the proxy's relay address, behind its SOCKS5 UDP header (RFC 1928 §7)."""
    cdef unsigned char header[22]
    cdef size_t header_size = 10 if dest.family == AF_INET else 22
    cdef iovec parts[2]
    cdef msghdr msg
    header[0] = header[1] = header[2] = 0
    header[3] = 1 if dest.family == AF_INET else 4
    memcpy(header + 4, dest.ip, header_size - 6)
    memcpy(header + header_size - 2, &dest.port, 2)
    # The largest UDP payload: 65535 less the IP and UDP headers (IPv6 has no header in its limit).
    if header_size + size > (65535 - 28 if s.family == AF_INET else 65535 - 8):
        st.drops[DROP_OVERSIZE] += 1
        return
    parts[0].iov_base = header
    parts[0].iov_len = header_size
    parts[1].iov_base = <void *>data
    parts[1].iov_len = size
    memset(&msg, 0, sizeof(msg))  # no address: the socket is connected, its route looked up once
    msg.msg_iov = parts
    msg.msg_iovlen = 2
    if sendmsg(s.udp_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
        if errno == EAGAIN:
            st.drops[DROP_SEND_BLOCKED] += 1
        elif errno == EMSGSIZE:
            st.drops[DROP_OVERSIZE] += 1
        else:
            st.drops[DROP_SEND_FAILED] += 1
        return
    remember_asked(s, dest)
    s.datagrams_up += 1
    s.bytes_up += size
    s.active = True


cdef void hand_off(UdpState *st, const Addr *client, const Addr *dest, const char *payload, Py_ssize_t size) noexcept nogil:
    """Keep a datagram of a client without a session for Python."""
    cdef Handoff *h
    cdef unsigned long long one = 1
    cdef char *data
    if st.handoff_count >= st.handoff_capacity:
        st.drops[DROP_QUEUE_FULL] += 1
        return
    data = <char *>malloc(size if size else 1)
    if data == NULL:
        st.drops[DROP_QUEUE_FULL] += 1
        return
    memcpy(data, payload, size)
    h = &st.handoffs[(st.handoff_first + st.handoff_count) % st.handoff_capacity]
    h.client = client[0]
    h.destination = dest[0]
    h.size = size
    h.data = data
    st.handoff_count += 1
    if st.handoff_count == 1:
        write(st.handoff_fd, &one, sizeof(one))


cdef int receive_batch(UdpState *st, int fd, bint from_client) noexcept nogil:
    """Read up to UDP_BATCH datagrams in one call; how many came (0 on EAGAIN or an error: an ICMP
    error for an earlier datagram, reported here and cleared; epoll says if anything is left)."""
    cdef int i, count
    for i in range(UDP_BATCH):
        st.parts[i].iov_base = st.buffer + i * MAX_DATAGRAM
        st.parts[i].iov_len = MAX_DATAGRAM
        memset(&st.batch[i].msg_hdr, 0, sizeof(msghdr))
        st.batch[i].msg_hdr.msg_iov = &st.parts[i]
        st.batch[i].msg_hdr.msg_iovlen = 1
        if from_client:  # its source, and its original destination
            st.batch[i].msg_hdr.msg_name = &st.sources[i]
            st.batch[i].msg_hdr.msg_namelen = sizeof(SockAddr)
            st.batch[i].msg_hdr.msg_control = st.controls[i]
            st.batch[i].msg_hdr.msg_controllen = CONTROL_SIZE
    count = recvmmsg(fd, st.batch, UDP_BATCH, MSG_DONTWAIT, NULL)
    return count if count > 0 else 0


cdef void from_clients(UdpState *st, int fd) noexcept nogil:
    cdef Addr client, dest
    cdef int slot, i, count = receive_batch(st, fd, True)
    cdef msghdr *msg
    cdef const char *data
    cdef Py_ssize_t size
    for i in range(count):
        msg = &st.batch[i].msg_hdr
        data = st.buffer + i * MAX_DATAGRAM
        size = st.batch[i].msg_len
        if not original_destination(msg, &dest):
            st.drops[DROP_NO_DESTINATION] += 1
            continue
        if msg.msg_flags & MSG_TRUNC or not addr_from_sockaddr(&st.sources[i], &client):
            st.drops[DROP_OVERSIZE] += 1
            continue
        slot = find_session(st, &client)
        if slot < 0:
            hand_off(st, &client, &dest, data, size)
        else:
            send_up(st, &st.sessions[slot], &dest, data, size)


cdef int decode_reply(const unsigned char *data, Py_ssize_t size, Addr *remote) noexcept nogil:
    """The header's length, with its address in ``remote``; or -1 - the drop reason."""
    cdef Py_ssize_t ip_size
    memset(remote, 0, sizeof(Addr))  # hashed and compared whole, padding too
    if size < 4 or data[0] or data[1]:
        return -1 - DROP_MALFORMED
    if data[2]:
        return -1 - DROP_FRAGMENT
    if data[3] == 1:
        ip_size = 4
        remote.family = AF_INET
    elif data[3] == 4:
        ip_size = 16
        remote.family = AF_INET6
    else:
        return -1 - DROP_MALFORMED  # a domain name (3): a reply must come from an address
    if size < 4 + ip_size + 2:
        return -1 - DROP_MALFORMED
    memcpy(remote.ip, data + 4, ip_size)
    memcpy(&remote.port, data + 4 + ip_size, 2)
    if remote.port == 0:
        return -1 - DROP_MALFORMED
    return <int>(4 + ip_size + 2)


cdef int open_reply(UdpState *st, const Addr *remote) noexcept nogil:
    """A reply socket bound to ``remote``, in a free slot; -1 (errno set) if none can be had."""
    global errno
    cdef int slot = st.free_reply
    cdef int fd, one = 1, tiny = 1
    cdef SockAddr sa
    cdef socklen_t length
    cdef unsigned int bucket
    if slot < 0:
        errno = ENFILE
        return -1
    fd = socket(remote.family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    length = sockaddr_from_addr(remote, &sa)
    if (
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0
        or (remote.family == AF_INET6 and setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
        or setsockopt(fd, SOL_IP if remote.family == AF_INET else SOL_IPV6,
                      IP_TRANSPARENT if remote.family == AF_INET else IPV6_TRANSPARENT, &one, sizeof(one)) != 0
        or (st.has_mark and setsockopt(fd, SOL_SOCKET, SO_MARK, &st.mark, sizeof(st.mark)) != 0)
        or setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &tiny, sizeof(tiny)) != 0  # it only sends
        or bind(fd, &sa.any, length) != 0
    ):
        one = errno
        close(fd)
        errno = one
        return -1
    st.free_reply = st.replies[slot].next
    st.replies_open += 1
    st.replies[slot].remote = remote[0]
    st.replies[slot].fd = fd
    st.replies[slot].users = 0
    bucket = addr_hash(remote) & st.reply_mask
    st.replies[slot].next = st.reply_buckets[bucket]
    st.reply_buckets[bucket] = slot
    return slot


cdef void release_reply(UdpState *st, int slot) noexcept nogil:
    cdef Reply *r = &st.replies[slot]
    cdef int *link
    r.users -= 1
    if r.users > 0:
        return
    link = &st.reply_buckets[addr_hash(&r.remote) & st.reply_mask]
    while link[0] >= 0 and link[0] != slot:
        link = &st.replies[link[0]].next
    if link[0] == slot:
        link[0] = r.next
    close(r.fd)
    r.fd = -1
    r.next = st.free_reply
    st.free_reply = slot
    st.replies_open -= 1


cdef int reply_socket(UdpState *st, UdpSession *s, const Addr *remote) noexcept nogil:
    """The fd replies from ``remote`` leave by, held for the session; -1 (counted) if there is none."""
    cdef int i, slot
    cdef int *grown
    for i in range(s.remote_count):
        if addr_equal(&st.replies[s.remotes[i]].remote, remote):
            return st.replies[s.remotes[i]].fd
    if remote.family != s.client.family:
        st.drops[DROP_WRONG_FAMILY] += 1
        return -1
    if not asked(s, remote):
        st.drops[DROP_UNASKED] += 1
        return -1
    if s.remote_count >= MAX_REMOTES_PER_SESSION:
        st.drops[DROP_REMOTES_FULL] += 1
        return -1
    # Past a session's first remote, a socket only while more stay free than there are sessions: one
    # client's sessions talking to many remotes cannot take what others' first remotes need. A shared one
    # too, since it stays open for this session after the one that opened it ends.
    if s.remote_count and st.reply_capacity - st.replies_open <= st.session_capacity:
        st.reply_errno = ENFILE
        st.drops[DROP_REPLY_SOCKET] += 1
        return -1
    if s.remote_count == s.remote_capacity:
        grown = <int *>realloc(s.remotes, sizeof(int) * (s.remote_capacity * 2 + 2))
        if grown == NULL:
            st.drops[DROP_REPLY_SOCKET] += 1
            return -1
        s.remotes = grown
        s.remote_capacity = s.remote_capacity * 2 + 2
    slot = find_reply(st, remote)
    if slot < 0:
        slot = open_reply(st, remote)
        if slot < 0:
            st.reply_errno = errno
            st.drops[DROP_REPLY_SOCKET] += 1
            return -1
    st.replies[slot].users += 1
    s.remotes[s.remote_count] = slot
    s.remote_count += 1
    return st.replies[slot].fd


cdef void from_proxy(UdpState *st, unsigned long long tag) noexcept nogil:
    cdef int slot = <int><unsigned int>tag
    cdef UdpSession *s = &st.sessions[slot]
    cdef Addr remote
    cdef char *data
    cdef Py_ssize_t size
    cdef int header, fd, i, count
    if not s.in_use or s.generation != <unsigned int>(tag >> 32):
        return  # ended while this event waited
    count = receive_batch(st, s.udp_fd, False)
    for i in range(count):
        data = st.buffer + i * MAX_DATAGRAM
        size = st.batch[i].msg_len
        header = decode_reply(<unsigned char *>data, size, &remote)
        if header < 0:
            st.drops[-1 - header] += 1
            continue
        fd = reply_socket(st, s, &remote)
        if fd < 0:
            continue
        if sendto(fd, data + header, size - header, MSG_DONTWAIT | MSG_NOSIGNAL, &s.client_sa.any, s.client_len) < 0:
            st.drops[DROP_SEND_FAILED] += 1
            continue
        s.datagrams_down += 1
        s.bytes_down += size - header
        s.active = True


cdef void *udp_thread(void *arg) noexcept nogil:
    cdef UdpState *st = <UdpState *>arg
    cdef epoll_event events[64]
    cdef int n, i
    cdef unsigned long long tag
    while True:
        n = epoll_wait(st.epfd, events, 64, -1)
        if n < 0:
            if errno == EINTR:
                continue
            return NULL
        pthread_mutex_lock(&st.lock)
        for i in range(n):
            tag = events[i].data.u64
            if tag == STOP_TAG:
                pthread_mutex_unlock(&st.lock)
                return NULL
            if tag & LISTENER_BIT:
                from_clients(st, <int><unsigned int>tag)
            else:
                from_proxy(st, tag)
        pthread_mutex_unlock(&st.lock)


cdef inline void lock(UdpState *st) noexcept:
    """Take the engine's lock from Python, letting other threads run while the engine's holds it."""
    with nogil:
        pthread_mutex_lock(&st.lock)


DEF UDP_MAX_ENTRIES = 1 << 22  # sessions, or reply sockets: their hash buckets stay within an int


cdef int power_of_two_above(int count) noexcept:
    cdef int size = 16
    while size < count * 2:
        size *= 2
    return size


cdef class UdpEngine:
    """The datagrams of associated UDP sessions, relayed by a thread of its own without the GIL.

    Python keeps what is slow or policy: opening each session (its SOCKS5 UDP ASSOCIATE), its idle
    time and its end. A client's datagram the engine has no session for waits in a bounded queue
    for take(); fileno() is readable while it is not empty. Once add_session() has registered a
    client, its datagrams go up behind a SOCKS5 UDP header, and the proxy's replies come back to
    it from the remote's address through transparent reply sockets the engine opens and shares.
    """

    cdef UdpState *st
    cdef bint started
    cdef pthread_t thread

    def __cinit__(self, int max_sessions, int max_reply_sockets, long long mark=-1, int queue_limit=256):
        cdef UdpState *st
        cdef int i
        cdef epoll_event event
        if not (1 <= max_sessions <= UDP_MAX_ENTRIES and 0 <= max_reply_sockets <= UDP_MAX_ENTRIES
                and queue_limit >= 1):
            raise ValueError(f"a UdpEngine needs 1 to {UDP_MAX_ENTRIES} sessions, 0 to {UDP_MAX_ENTRIES} reply "
                             "sockets and a queue")
        if not -1 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"{mark} is not a 32-bit mark (or -1: none)")
        st = <UdpState *>calloc(1, sizeof(UdpState))
        if st == NULL:
            raise MemoryError()
        pthread_mutex_init(&st.lock, NULL)
        self.st = st
        st.epfd = st.stop_fd = st.handoff_fd = -1
        st.has_mark = mark >= 0
        st.mark = <unsigned int>mark
        st.session_capacity = max_sessions
        st.reply_capacity = max_reply_sockets
        st.handoff_capacity = queue_limit
        st.session_mask = power_of_two_above(max_sessions) - 1
        st.reply_mask = power_of_two_above(max_reply_sockets) - 1
        st.sessions = <UdpSession *>calloc(max_sessions, sizeof(UdpSession))
        st.session_buckets = <int *>malloc(sizeof(int) * (st.session_mask + 1))
        st.replies = <Reply *>calloc(max_reply_sockets, sizeof(Reply))
        st.reply_buckets = <int *>malloc(sizeof(int) * (st.reply_mask + 1))
        st.handoffs = <Handoff *>calloc(queue_limit, sizeof(Handoff))
        st.buffer = <char *>malloc(UDP_BATCH * MAX_DATAGRAM)  # pages are only touched as bursts need them
        if (st.sessions == NULL or st.session_buckets == NULL or st.replies == NULL or st.reply_buckets == NULL
                or st.handoffs == NULL or st.buffer == NULL):
            raise MemoryError()
        for i in range(st.session_mask + 1):
            st.session_buckets[i] = -1
        for i in range(st.reply_mask + 1):
            st.reply_buckets[i] = -1
        for i in range(max_sessions):
            st.sessions[i].next = i + 1 if i + 1 < max_sessions else -1
        st.free_session = 0 if max_sessions else -1
        for i in range(max_reply_sockets):
            st.replies[i].fd = -1
            st.replies[i].next = i + 1 if i + 1 < max_reply_sockets else -1
        st.free_reply = 0 if max_reply_sockets else -1
        st.epfd = epoll_create1(EPOLL_CLOEXEC)
        st.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        st.handoff_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if st.epfd < 0 or st.stop_fd < 0 or st.handoff_fd < 0:
            PyErr_SetFromErrno(OSError)
        event.events = EPOLLIN
        event.data.u64 = STOP_TAG
        if epoll_ctl(st.epfd, EPOLL_CTL_ADD, st.stop_fd, &event) != 0:
            PyErr_SetFromErrno(OSError)

    def __init__(self, max_sessions, max_reply_sockets, mark=-1, queue_limit=256):
        pass

    def fileno(self):
        """Readable while take() has datagrams to give."""
        self._check_open()
        return self.st.handoff_fd

    def _check_open(self):
        if self.st == NULL or self.st.closed:
            raise ValueError("the UDP engine is closed")

    def start(self):
        """Start the thread that relays."""
        self._check_open()
        cdef sigset_t every_signal, previous
        cdef int failed
        if self.started:
            return
        # Signals go to the interpreter's thread, never to this one (which would fail a send with EINTR).
        sigfillset(&every_signal)
        pthread_sigmask(SIG_SETMASK, &every_signal, &previous)
        failed = pthread_create(&self.thread, NULL, udp_thread, self.st)
        pthread_sigmask(SIG_SETMASK, &previous, NULL)
        if failed:
            raise OSError(failed, "cannot start the UDP engine's thread")
        self.started = True

    def add_listener(self, int fd):
        """Read clients' datagrams from ``fd`` (a socket with IP_RECVORIGDSTADDR or IPV6_RECVORIGDSTADDR)."""
        cdef epoll_event event
        self._check_open()
        event.events = EPOLLIN
        event.data.u64 = LISTENER_BIT | <unsigned int>fd
        if epoll_ctl(self.st.epfd, EPOLL_CTL_ADD, fd, &event) != 0:
            PyErr_SetFromErrno(OSError)

    def add_session(self, client, int udp_fd, first=()):
        """Relay ``client``'s datagrams through ``udp_fd`` from now on, starting with ``first``
        ((destination, payload) pairs kept until now), then those of the client's still queued for
        take(), in the order they came. Returns the session's handle.

        ``udp_fd`` is connected to the proxy's UDP relay address: the kernel then takes datagrams from
        that address only, and its route is looked up once, not per datagram."""
        cdef UdpState *st = self.st
        cdef Addr client_addr, dest
        cdef int family
        cdef socklen_t family_size = sizeof(family)
        cdef UdpSession *s
        cdef int slot, i, kept
        cdef Handoff *h
        cdef epoll_event event
        cdef unsigned int bucket
        self._check_open()
        client_addr = addr_from_python(client)
        pending = [(destination, bytes(payload)) for destination, payload in first]
        for destination, payload in pending:  # raises before anything changes
            if addr_from_python(destination).port == 0:
                raise ValueError(f"{destination}: a datagram cannot go to port 0")
        lock(st)
        try:
            if find_session(st, &client_addr) >= 0:
                raise ValueError(f"{client} has a session already")
            slot = st.free_session
            if slot < 0:
                raise OverflowError("the UDP engine's sessions are all in use")
            s = &st.sessions[slot]
            if getsockopt(udp_fd, SOL_SOCKET, SO_DOMAIN, &family, &family_size) != 0:
                PyErr_SetFromErrno(OSError)
            event.events = EPOLLIN
            event.data.u64 = (<unsigned long long>s.generation << 32) | <unsigned int>slot
            if epoll_ctl(st.epfd, EPOLL_CTL_ADD, udp_fd, &event) != 0:
                PyErr_SetFromErrno(OSError)
            st.free_session = s.next
            s.client = client_addr
            s.client_len = sockaddr_from_addr(&client_addr, &s.client_sa)
            s.family = family
            s.udp_fd = udp_fd
            s.remotes = NULL
            s.remote_count = s.remote_capacity = 0
            s.asked = NULL
            s.asked_count = s.asked_capacity = s.asked_next = 0
            s.datagrams_up = s.bytes_up = s.datagrams_down = s.bytes_down = 0
            s.active = False
            s.in_use = True
            bucket = addr_hash(&client_addr) & st.session_mask
            s.next = st.session_buckets[bucket]
            st.session_buckets[bucket] = slot
            for destination, payload in pending:
                dest = addr_from_python(destination)
                send_up(st, s, &dest, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
            kept = 0  # the queue compacted in place, in order, without this client's datagrams
            for i in range(st.handoff_count):
                h = &st.handoffs[(st.handoff_first + i) % st.handoff_capacity]
                if addr_equal(&h.client, &client_addr):
                    send_up(st, s, &h.destination, h.data, h.size)
                    free(h.data)
                else:
                    st.handoffs[(st.handoff_first + kept) % st.handoff_capacity] = h[0]
                    kept += 1
            st.handoff_count = kept
            return (<long long>s.generation << 32) | slot
        finally:
            pthread_mutex_unlock(&st.lock)

    def remove_session(self, long long handle):
        """Stop relaying for a session (before its socket is closed); returns its (datagrams up, bytes up,
        datagrams down, bytes down) since the last collect() and how many remotes it had."""
        cdef UdpState *st = self.st
        cdef int slot = <int><unsigned int>handle
        cdef UdpSession *s
        cdef int *link
        cdef int i
        self._check_open()
        if not 0 <= slot < st.session_capacity:
            raise KeyError(handle)
        lock(st)
        try:
            s = &st.sessions[slot]
            if not s.in_use or s.generation != <unsigned int>(handle >> 32):
                raise KeyError(handle)
            epoll_ctl(st.epfd, EPOLL_CTL_DEL, s.udp_fd, NULL)
            link = &st.session_buckets[addr_hash(&s.client) & st.session_mask]
            while link[0] >= 0 and link[0] != slot:
                link = &st.sessions[link[0]].next
            if link[0] == slot:
                link[0] = s.next
            for i in range(s.remote_count):
                release_reply(st, s.remotes[i])
            free(s.remotes)
            free(s.asked)
            s.remotes, s.asked = NULL, NULL
            result = (s.datagrams_up, s.bytes_up, s.datagrams_down, s.bytes_down, s.remote_count)
            s.in_use = False
            s.generation = (s.generation + 1) & 0x7FFFFFFF
            s.next = st.free_session
            st.free_session = slot
            return result
        finally:
            pthread_mutex_unlock(&st.lock)

    def take(self):
        """The datagrams of clients without a session, oldest first, as (client, destination, payload)."""
        cdef UdpState *st = self.st
        cdef Handoff *h
        cdef unsigned long long count
        cdef int i
        self._check_open()
        cdef int first, waiting
        taken = []
        lock(st)
        try:
            first, waiting = st.handoff_first, st.handoff_count
            st.handoff_first = st.handoff_count = 0
            read(st.handoff_fd, &count, sizeof(count))
            try:
                for i in range(waiting):
                    h = &st.handoffs[(first + i) % st.handoff_capacity]
                    taken.append((addr_to_python(&h.client), addr_to_python(&h.destination), h.data[:h.size]))
            finally:
                for i in range(waiting):
                    free(st.handoffs[(first + i) % st.handoff_capacity].data)
        finally:
            pthread_mutex_unlock(&st.lock)
        return taken

    def collect(self):
        """What happened since the last call: ({drop reason: count}, [(handle, datagrams up, bytes up,
        datagrams down, bytes down)] of the sessions that relayed anything, the errno of the last reply
        socket that could not be opened or 0)."""
        cdef UdpState *st = self.st
        cdef UdpSession *s
        cdef int i
        self._check_open()
        drops = {}
        active = []
        lock(st)
        try:
            for i in range(DROP_REASONS):
                if st.drops[i]:
                    drops[UDP_DROPS[i]] = st.drops[i]
                    st.drops[i] = 0
            for i in range(st.session_capacity):
                s = &st.sessions[i]
                if s.in_use and s.active:
                    active.append(((<long long>s.generation << 32) | i, s.datagrams_up, s.bytes_up,
                                   s.datagrams_down, s.bytes_down))
                    s.datagrams_up = s.bytes_up = s.datagrams_down = s.bytes_down = 0
                    s.active = False
            reply_errno, st.reply_errno = st.reply_errno, 0
        finally:
            pthread_mutex_unlock(&st.lock)
        return drops, active, reply_errno

    def close(self):
        """Stop the thread and close the engine's own fds (reply sockets too); the listeners' and the
        sessions' sockets stay the caller's. Safe to call twice."""
        cdef UdpState *st = self.st
        cdef unsigned long long one = 1
        cdef int i
        if st == NULL or st.closed:
            return
        st.closed = True
        if self.started:
            write(st.stop_fd, &one, sizeof(one))
            with nogil:
                pthread_join(self.thread, NULL)
            self.started = False
        if st.replies != NULL:
            for i in range(st.reply_capacity):
                if st.replies[i].fd >= 0:
                    close(st.replies[i].fd)
                    st.replies[i].fd = -1
            st.replies_open = 0
        if st.sessions != NULL:
            for i in range(st.session_capacity):
                free(st.sessions[i].remotes)
                free(st.sessions[i].asked)
                st.sessions[i].remotes, st.sessions[i].asked = NULL, NULL
                st.sessions[i].in_use = False
        if st.handoffs != NULL:
            for i in range(st.handoff_count):
                free(st.handoffs[(st.handoff_first + i) % st.handoff_capacity].data)
        st.handoff_count = 0
        for i in (st.epfd, st.stop_fd, st.handoff_fd):
            if i >= 0:
                close(i)
        st.epfd = st.stop_fd = st.handoff_fd = -1

    def __dealloc__(self):
        cdef UdpState *st = self.st
        if st == NULL:
            return
        self.close()
        pthread_mutex_destroy(&st.lock)
        free(st.sessions)
        free(st.session_buckets)
        free(st.replies)
        free(st.reply_buckets)
        free(st.handoffs)
        free(st.buffer)
        free(st)
        self.st = NULL


# -- DNS: cache hits answered without Python -------------------------------------------------------

DEF HIT_BATCH = 64  # datagrams one answer() reads at most (one recvmmsg)
DEF HIT_RECEIVE_SIZE = 4096  # as relay.dns.service reads a query: more is not a query
DEF HIT_MAX_REPLY = 4096  # a reply sent from here fits the client's UDP limit, which is at most this
DEF HIT_MAX_ENTRIES = 1 << 22
DEF HIT_SCAN = 64  # entries a put() into a full table looks at for a stale one
DEF TOLD_SET_BITS = 14  # 16384 sets of TOLD_WAYS (client, entry) pairs, 65536 in all, as many as the name book
DEF TOLD_WAYS = 4  # holds: a LAN's pairs fit, and one evicts another rarely
DEF DNS_HEADER = 12
DEF COPIED_FLAGS = 0x0110  # RD and CD: the client's, in the reply
DEF OPT_TYPE = 41
DEF COOKIE = 10
# A client told an entry is told it again after this long at the soonest (unless untell() or a full set of the
# told table made it forget). Telling it once is most of what counts: the name book keeps a name as long as the
# first answer lasts (its TTL, aged: no later answer from the same entry lasts longer), but for a client that
# uses an answer past its TTL, for which the book keeps a name at least 10 s after it was told (an answer near
# its end is then kept up to this much less long than Python's path would); telling it again refreshes recency
# (the book's, the cache's) and a long TTL cut to the book's hour, which can wait this long.
cdef double RETELL_AFTER = 10.0


cdef struct QueryPeek:
    unsigned short id
    unsigned short flags
    unsigned short qtype
    unsigned short qclass
    int qname_size
    unsigned char lowered[255]
    bint edns
    int udp_limit


cdef inline bint plain_octet(unsigned char c) noexcept nogil:
    return (97 <= c <= 122) or (65 <= c <= 90) or (48 <= c <= 57) or c == 45 or c == 95  # a-z A-Z 0-9 - _


cdef bint peek_dns_query(const unsigned char *w, Py_ssize_t size, QueryPeek *q) noexcept nogil:
    """relay.dns.wire.peek_query in C: the same shapes taken, the same read of them; False for any other."""
    cdef Py_ssize_t at = DNS_HEADER
    cdef int length, labels = 0, additionals, option_size, i
    cdef unsigned int payload
    if size < DNS_HEADER + 5:
        return False
    q.flags = w[2] << 8 | w[3]
    additionals = w[10] << 8 | w[11]
    if q.flags & 0xF800 or (w[4] << 8 | w[5]) != 1 or w[6] or w[7] or w[8] or w[9] or additionals > 1:
        return False
    while True:
        if at >= size:
            return False
        length = w[at]
        if length == 0:
            break
        if length > 63 or at + 1 + length > size:
            return False
        for i in range(length):
            if not plain_octet(w[at + 1 + i]):
                return False
        at += 1 + length
        labels += 1
    q.qname_size = <int>(at + 1 - DNS_HEADER)
    if labels == 0 or q.qname_size > 255 or at + 5 > size:
        return False
    q.qtype = w[at + 1] << 8 | w[at + 2]
    q.qclass = w[at + 3] << 8 | w[at + 4]
    at += 5
    if not additionals:
        if at != size:
            return False
        q.edns, q.udp_limit = False, 512
    else:
        if at + 11 > size:
            return False
        payload = w[at + 3] << 8 | w[at + 4]
        if w[at] or (w[at + 1] << 8 | w[at + 2]) != OPT_TYPE or w[at + 6] or at + 11 + (w[at + 9] << 8 | w[at + 10]) != size:
            return False
        at += 11
        while at < size:
            if at + 4 > size:
                return False
            option_size = w[at + 2] << 8 | w[at + 3]
            if (w[at] << 8 | w[at + 1]) != COOKIE or not (option_size == 8 or 16 <= option_size <= 40):
                return False
            at += 4 + option_size
        if at != size:
            return False
        q.edns, q.udp_limit = True, min(max(payload, 512), 4096)
    q.id = w[0] << 8 | w[1]
    for i in range(q.qname_size):
        q.lowered[i] = w[DNS_HEADER + i] + 32 if 65 <= w[DNS_HEADER + i] <= 90 else w[DNS_HEADER + i]
    return True


cdef (int, unsigned int) checked_ttl(offset, ttl, Py_ssize_t size) except *:
    """A template's TTL field: its offset, inside a template of ``size`` bytes, and its value, 32 bits."""
    offset, ttl = _index(offset), _index(ttl)
    if not DNS_HEADER <= offset <= size - 4:
        raise ValueError("a TTL offset outside the template")
    if not 0 <= ttl <= 0xFFFFFFFF:
        raise ValueError("a TTL outside 32 bits")
    return offset, ttl


cdef inline unsigned long long hit_hash(unsigned long long seed, const unsigned char *qname, int size,
                                        unsigned short qtype, unsigned short qclass, bint edns) noexcept nogil:
    """FNV-1a (64 bits) over the question and whether the client has EDNS, from a start of the table's own, then
    murmur3's finalizer, so that every bit of a bucket number depends on the seed: names a client chose to share
    a bucket in one table spread in another, and no chain grows long enough to slow every lookup."""
    cdef unsigned long long h = 14695981039346656037ULL ^ seed
    cdef int i
    for i in range(size):
        h = (h ^ qname[i]) * 1099511628211ULL
    h = (h ^ (qtype & 0xFF)) * 1099511628211ULL
    h = (h ^ (qtype >> 8)) * 1099511628211ULL
    h = (h ^ (qclass & 0xFF)) * 1099511628211ULL
    h = (h ^ (qclass >> 8)) * 1099511628211ULL
    h = (h ^ edns) * 1099511628211ULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    return h ^ (h >> 33)


cdef inline void release(PyObject **dropped, int count) noexcept:
    """Drop what unlink() took out of the table, once the table is whole again: a finalizer run here may use it."""
    cdef int i
    for i in range(count):
        Py_XDECREF(dropped[i])
        dropped[i] = NULL


cdef inline void datagram(mmsghdr *message, iovec *part, unsigned char *data, size_t size,
                          sockaddr_in *peer) noexcept nogil:
    """Point one message of a recvmmsg/sendmmsg batch at ``size`` bytes at ``data``, from or to ``peer``."""
    part.iov_base = data
    part.iov_len = size
    memset(&message.msg_hdr, 0, sizeof(msghdr))
    message.msg_hdr.msg_name = peer
    message.msg_hdr.msg_namelen = sizeof(sockaddr_in)
    message.msg_hdr.msg_iov = part
    message.msg_hdr.msg_iovlen = 1


cdef class DnsHits:
    """Cache hits of the usual shape answered in C, a batch of datagrams at a time, on an IPv4 UDP socket.

    Python decides what may be answered here and puts it in (a reply template of relay.dns.message, with its
    cache entry's times); answer() reads what the socket holds, answers each query whose fresh template is
    here, from a client in the allowed networks, as ReplyTemplate.render would, and hands back everything
    else. It tells which client was given which entry, once per RETELL_AFTER at most per client and entry,
    so that Python can keep its books (relay.dns.names, the cache's recency) without a call per answer.
    """

    cdef HitEntry *entries
    cdef int capacity
    cdef int *buckets
    cdef unsigned int mask
    cdef unsigned long long seed  # of hit_hash: random, so that nobody outside knows which names share a bucket
    cdef int free_entry
    cdef int count
    cdef int hand  # where the last search for a stale entry ended
    cdef Told *told
    cdef Network *networks
    cdef int network_count
    cdef mmsghdr batch[HIT_BATCH]
    cdef iovec parts[HIT_BATCH]
    cdef sockaddr_in sources[HIT_BATCH]
    cdef mmsghdr replies[HIT_BATCH]
    cdef iovec reply_parts[HIT_BATCH]
    cdef unsigned char *buffer  # HIT_BATCH queries, then HIT_BATCH replies

    def __cinit__(self, int capacity, networks=()):
        cdef int i
        cdef unsigned int buckets = 1
        if not 1 <= capacity <= HIT_MAX_ENTRIES:
            raise ValueError(f"a DnsHits table holds 1 to {HIT_MAX_ENTRIES} entries")
        while buckets < <unsigned int>capacity * 2:
            buckets <<= 1
        self.entries = <HitEntry *>calloc(capacity, sizeof(HitEntry))
        self.buckets = <int *>malloc(buckets * sizeof(int))
        self.told = <Told *>calloc(TOLD_WAYS << TOLD_SET_BITS, sizeof(Told))
        self.buffer = <unsigned char *>malloc(HIT_BATCH * (HIT_RECEIVE_SIZE + HIT_MAX_REPLY))
        if self.entries == NULL or self.buckets == NULL or self.told == NULL or self.buffer == NULL:
            raise MemoryError()
        self.capacity, self.mask = capacity, buckets - 1
        self.seed = int.from_bytes(_urandom(8), "little")
        for i in range(buckets):
            self.buckets[i] = -1
        for i in range(capacity):
            self.entries[i].next = i + 1 if i + 1 < capacity else -1
        for i in range(TOLD_WAYS << TOLD_SET_BITS):
            self.told[i].entry = -1
        self.allow(networks)

    def __init__(self, int capacity, networks=()):
        """``capacity`` entries at most; ``networks`` as allow() takes them."""

    def __dealloc__(self):
        cdef PyObject *dropped[2]
        cdef int slot
        if self.entries != NULL:
            for slot in range(self.capacity):
                if self.entries[slot].in_use:
                    self.unlink(slot, dropped)
                    release(dropped, 2)  # nothing can reach a table being freed
        free(self.entries)
        free(self.buckets)
        free(self.told)
        free(self.networks)
        free(self.buffer)

    def __len__(self):
        return self.count

    def allow(self, networks):
        """Answer clients in ``networks`` only: IPv4 networks, (address bytes, prefix length) each."""
        networks = list(networks)
        cdef Network *chosen = <Network *>calloc(max(len(networks), 1), sizeof(Network))
        cdef int i = 0
        if chosen == NULL:
            raise MemoryError()
        try:
            for packed, prefix in networks:
                if not isinstance(packed, bytes) or len(packed) != 4 or not 0 <= prefix <= 32:
                    raise ValueError(f"not an IPv4 network: {packed!r}/{prefix}")
                chosen[i].mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
                chosen[i].address = int.from_bytes(packed, "big") & chosen[i].mask
                i += 1
        except BaseException:
            free(chosen)
            raise
        free(self.networks)
        self.networks, self.network_count = chosen, i

    cdef int find(self, const unsigned char *qname, int size, unsigned short qtype, unsigned short qclass,
                  bint edns) noexcept nogil:
        cdef int slot = self.buckets[hit_hash(self.seed, qname, size, qtype, qclass, edns) & self.mask]
        cdef HitEntry *e
        while slot >= 0:
            e = &self.entries[slot]
            if (e.qname_size == size and e.qtype == qtype and e.qclass == qclass and e.edns == edns
                    and memcmp(e.qname, qname, size) == 0):
                return slot
            slot = e.next
        return -1

    cdef void unlink(self, int slot, PyObject **dropped) noexcept:
        """Take an entry out of its chain and onto the free list. What it held goes to dropped[0] and dropped[1],
        for the caller to release() when done with the table: a finalizer run by the release could take the
        free slot, or the entry, from under it."""
        cdef HitEntry *e = &self.entries[slot]
        cdef int *link = &self.buckets[hit_hash(self.seed, e.qname, e.qname_size, e.qtype, e.qclass, e.edns)
                                       & self.mask]
        dropped[0], dropped[1] = e.wire, e.token
        while link[0] != slot:
            link = &self.entries[link[0]].next
        link[0] = e.next
        free(e.ttl_offsets)
        free(e.ttls)
        e.wire = e.token = NULL
        e.ttl_offsets, e.ttls = NULL, NULL
        e.in_use = False
        e.generation += 1
        e.next = self.free_entry
        self.free_entry = slot
        self.count -= 1

    def put(self, bytes qname not None, int qtype, int qclass, bint edns, bytes wire not None, ttl_offsets, ttls,
            double stored_at, double lifetime, token, double now):
        """Answer the question (``qname`` lower-cased, in wire form) asked with EDNS or without from ``wire`` (a
        ReplyTemplate's, TTLs ``ttls`` at ``ttl_offsets``) while ``stored_at`` + ``lifetime`` has not passed.
        When the table is full, an entry stale at ``now`` makes room, if one of the next HIT_SCAN looked at
        (from where the last search ended) is; else False."""
        cdef int size = len(qname), slot, i, count = len(ttl_offsets)
        cdef HitEntry *e
        cdef unsigned int bucket
        cdef int *offsets
        cdef unsigned int *values
        cdef PyObject *dropped[2]
        dropped[0] = dropped[1] = NULL
        if not 0 < size <= 255 or len(ttls) != count or len(wire) < DNS_HEADER + size:
            raise ValueError("not a template for this question")
        offsets = <int *>malloc(max(count, 1) * sizeof(int))
        values = <unsigned int *>malloc(max(count, 1) * sizeof(unsigned int))
        try:
            if offsets == NULL or values == NULL:
                raise MemoryError()
            for i in range(count):
                offsets[i], values[i] = checked_ttl(ttl_offsets[i], ttls[i], len(wire))
        except BaseException:
            free(offsets)
            free(values)
            raise
        slot = self.find(<const unsigned char *>qname, size, qtype, qclass, edns)
        if slot >= 0:
            self.unlink(slot, dropped)
        elif self.free_entry < 0:
            for i in range(min(HIT_SCAN, self.capacity)):
                self.hand = (self.hand + 1) % self.capacity
                if not now - self.entries[self.hand].stored_at < self.entries[self.hand].lifetime:
                    self.unlink(self.hand, dropped)  # stale: the slow path answers it now
                    break
            else:
                free(offsets)
                free(values)
                return False
        slot = self.free_entry
        e = &self.entries[slot]
        e.ttl_offsets, e.ttls = offsets, values
        self.free_entry = e.next
        memcpy(e.qname, <const char *>qname, size)
        e.qname_size, e.qtype, e.qclass, e.edns, e.ttl_count = size, qtype, qclass, edns, count
        e.flags = (<const unsigned char *>PyBytes_AS_STRING(wire))[2] << 8 | (<const unsigned char *>PyBytes_AS_STRING(wire))[3]
        e.stored_at, e.lifetime = stored_at, lifetime
        Py_INCREF(wire)
        Py_INCREF(token)
        e.wire, e.token = <PyObject *>wire, <PyObject *>token
        e.in_use = True
        e.generation += 1
        bucket = hit_hash(self.seed, e.qname, size, qtype, qclass, edns) & self.mask
        e.next = self.buckets[bucket]
        self.buckets[bucket] = slot
        self.count += 1
        release(dropped, 2)
        return True

    def longest_chain(self):
        """The most entries one lookup compares: the longest chain of a bucket."""
        cdef unsigned int bucket
        cdef int slot, length, longest = 0
        for bucket in range(self.mask + 1):
            length, slot = 0, self.buckets[bucket]
            while slot >= 0:
                length += 1
                slot = self.entries[slot].next
            longest = max(longest, length)
        return longest

    def forget(self, bytes qname not None, int qtype, int qclass):
        """Answer that question (with EDNS or without) no more."""
        cdef int slot
        cdef bint edns
        cdef PyObject *dropped[4]
        dropped[0] = dropped[1] = dropped[2] = dropped[3] = NULL
        if not 0 < len(qname) <= 255:
            return
        for edns in (False, True):
            slot = self.find(<const unsigned char *>qname, len(qname), qtype, qclass, edns)
            if slot >= 0:
                self.unlink(slot, dropped + 2 * edns)
        release(dropped, 4)

    def clear(self):
        cdef PyObject *dropped[2]
        cdef int slot
        held = []  # released when all is gone: a finalizer it runs finds the table empty
        for slot in range(self.capacity):
            if self.entries[slot].in_use:
                self.unlink(slot, dropped)
                held.append((<object>dropped[0], <object>dropped[1]))
                release(dropped, 2)

    def untell(self, str client not None, bytes qname not None, int qtype, int qclass):
        """Tell ``client`` (an IPv4 address) that question's answer (with EDNS or without) again when next given."""
        cdef unsigned char ip[4]
        cdef unsigned int address
        cdef int slot, way
        cdef bint edns
        cdef Told *ways
        if ("\0" in client or inet_pton(AF_INET, client.encode("ascii", "replace"), ip) != 1
                or not 0 < len(qname) <= 255):
            return
        address = <unsigned int>ip[0] << 24 | ip[1] << 16 | ip[2] << 8 | ip[3]
        for edns in (False, True):
            slot = self.find(<const unsigned char *>qname, len(qname), qtype, qclass, edns)
            if slot < 0:
                continue
            ways = self.told_set(address, slot)
            for way in range(TOLD_WAYS):
                if ways[way].entry == slot and ways[way].client == address:
                    ways[way].entry, ways[way].at = -1, 0.0

    cdef bint allowed(self, const sockaddr_in *source) noexcept nogil:
        cdef unsigned int client = ntohl(source.sin_addr.s_addr)
        cdef int i
        for i in range(self.network_count):
            if client & self.networks[i].mask == self.networks[i].address:
                return True
        return False

    cdef Told *told_set(self, unsigned int client, int slot) noexcept nogil:
        """The TOLD_WAYS places where the pair (client, entry) may be. Fibonacci hashing: the product's top bits
        depend on every bit of the client and the entry."""
        cdef unsigned int mixed = (client ^ (<unsigned int>slot * 0x9E3779B9u)) * 2654435761u
        return &self.told[(mixed >> (32 - TOLD_SET_BITS)) * TOLD_WAYS]

    cdef bint tell(self, const sockaddr_in *source, int slot, double now) noexcept nogil:
        """Whether to tell Python that this client was given this entry: not if it was told within RETELL_AFTER.
        Remembered in sets of TOLD_WAYS pairs chosen by client and entry; a new pair takes the place of its
        set's pair told longest ago."""
        cdef unsigned int client = ntohl(source.sin_addr.s_addr)
        cdef Told *ways = self.told_set(client, slot)
        cdef Told *t = ways
        cdef int way
        for way in range(TOLD_WAYS):
            if ways[way].entry == slot and ways[way].client == client:
                t = &ways[way]
                if t.generation == self.entries[slot].generation and now - t.at < RETELL_AFTER:
                    return False
                break
            if ways[way].at < t.at:
                t = &ways[way]
        t.client, t.entry, t.generation, t.at = client, slot, self.entries[slot].generation, now
        return True

    cdef int render(self, const QueryPeek *q, const unsigned char *query, int slot, double now,
                    unsigned char *out) noexcept:
        """The reply to ``q`` from entry ``slot`` into ``out``: its size, or 0 if the entry cannot give it (stale,
        or larger than the client takes over UDP)."""
        cdef HitEntry *e = &self.entries[slot]
        cdef double elapsed = now - e.stored_at, left
        cdef Py_ssize_t size = PyBytes_GET_SIZE(<object>e.wire)
        cdef unsigned int flags, aged
        cdef int i
        if not (0 <= elapsed < e.lifetime) or size > q.udp_limit or size > HIT_MAX_REPLY:
            return 0
        memcpy(out, PyBytes_AS_STRING(<object>e.wire), size)
        flags = (e.flags & ~COPIED_FLAGS) | (q.flags & COPIED_FLAGS)
        out[0], out[1], out[2], out[3] = q.id >> 8, q.id & 0xFF, flags >> 8, flags & 0xFF
        memcpy(out + DNS_HEADER, query + DNS_HEADER, q.qname_size)
        for i in range(e.ttl_count):
            left = e.ttls[i] if e.ttls[i] < e.lifetime else e.lifetime
            left -= elapsed
            aged = <unsigned int>left if left > 0 else 0
            out[e.ttl_offsets[i]] = aged >> 24
            out[e.ttl_offsets[i] + 1] = (aged >> 16) & 0xFF
            out[e.ttl_offsets[i] + 2] = (aged >> 8) & 0xFF
            out[e.ttl_offsets[i] + 3] = aged & 0xFF
        return <int>size

    def answer(self, int fd, double now, int limit=HIT_BATCH):
        """Read at most ``limit`` datagrams (up to HIT_BATCH) from ``fd`` (a non-blocking IPv4 UDP socket) and
        answer those this table can. Returns (datagrams read, [(query, client)] left to Python, [(reply,
        client)] the socket had no room for, [(client host, token)] to tell, {qtype: answers}); clients as
        (host, port). OSError if the read failed before any datagram came (BlockingIOError: none waits)."""
        cdef int received, i, slot, length, size, sending = 0, sent = 0
        cdef bint telling
        cdef QueryPeek q
        cdef unsigned char *query
        cdef unsigned char *replies = self.buffer + HIT_BATCH * HIT_RECEIVE_SIZE
        cdef int replied[HIT_BATCH]
        left, unsent, told, counts = [], [], [], {}
        limit = min(max(limit, 1), HIT_BATCH)
        for i in range(limit):
            datagram(&self.batch[i], &self.parts[i], self.buffer + i * HIT_RECEIVE_SIZE, HIT_RECEIVE_SIZE,
                     &self.sources[i])
        received = recvmmsg(fd, self.batch, limit, MSG_DONTWAIT, NULL)
        if received < 0:
            PyErr_SetFromErrno(OSError)
        for i in range(received):
            query = self.buffer + i * HIT_RECEIVE_SIZE
            length = min(<int>self.batch[i].msg_len, HIT_RECEIVE_SIZE)  # a longer one was cut, as recvfrom cuts it
            slot, size = -1, 0
            if (self.sources[i].sin_family == AF_INET and peek_dns_query(query, length, &q)
                    and self.allowed(&self.sources[i])):
                slot = self.find(q.lowered, q.qname_size, q.qtype, q.qclass, q.edns)
            if slot >= 0:
                size = self.render(&q, query, slot, now, replies + sending * HIT_MAX_REPLY)
            if size == 0:
                left.append((query[:length], self.source_of(i)))
                continue
            datagram(&self.replies[sending], &self.reply_parts[sending], replies + sending * HIT_MAX_REPLY, size,
                     &self.sources[i])
            replied[sending] = i
            sending += 1
            # The token is read before anything here allocates: the GC could run a finalizer that changes the table.
            telling = self.tell(&self.sources[i], slot, now)
            token = <object>self.entries[slot].token if telling else None
            counts[q.qtype] = counts.get(q.qtype, 0) + 1
            if telling:
                told.append((self.source_of(i)[0], token))
        while sent < sending:
            size = sendmmsg(fd, self.replies + sent, sending - sent, MSG_DONTWAIT)
            if size <= 0:
                break  # full, or an error: Python sends the rest (and tells the error)
            sent += size
        for i in range(sent, sending):
            unsent.append(((<unsigned char *>self.reply_parts[i].iov_base)[:self.reply_parts[i].iov_len],
                           self.source_of(replied[i])))
        return received, left, unsent, told, counts

    cdef object source_of(self, int i):
        cdef char text[16]
        inet_ntop(AF_INET, &self.sources[i].sin_addr, text, sizeof(text))
        return text.decode("ascii"), ntohs(self.sources[i].sin_port)
