# cython: language_level=3, boundscheck=False, wraparound=False
"""The socket fast path, in C: original destination, transparent listeners and
a splice() flow that moves bytes socket -> pipe -> socket without copying them
through Python.

``relay/_fastpath_py.py`` is its pure-Python twin with the same API; the tests
run against both.
"""

from cpython.exc cimport PyErr_SetFromErrno

from relay._fastpath_common import AGAIN, EOF, WANT_READ, WANT_WRITE, FlowError

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
DEF POOL_MAX = 64
cdef int _pool_read[POOL_MAX]
cdef int _pool_write[POOL_MAX]
cdef int _pool_count = 0


def pooled_pipes():
    """How many empty pipes wait for reuse (for tests)."""
    return _pool_count


cdef class Flow:
    """One direction of a relayed connection: socket -> pipe -> socket.

    The pipe is drained before anything more is read, so when a read from the
    source says EAGAIN the pipe is known to be empty and the source is the one
    that would block (splice's EAGAIN cannot tell the two apart by itself).
    The pipe is created on the first step, so an idle connection holds none.
    """

    cdef int _pipe_r
    cdef int _pipe_w
    cdef readonly Py_ssize_t pending
    cdef readonly bint eof
    cdef readonly int capacity
    cdef int _wanted_size

    def __cinit__(self, int pipe_size=0):
        self._pipe_r = -1
        self._pipe_w = -1
        self._wanted_size = pipe_size

    def __dealloc__(self):
        self._release()

    cdef int _open_pipe(self) except -1:
        global _pool_count
        cdef int fds[2]
        if _pool_count > 0:
            _pool_count -= 1
            self._pipe_r = _pool_read[_pool_count]
            self._pipe_w = _pool_write[_pool_count]
        else:
            if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
                PyErr_SetFromErrno(OSError)
            self._pipe_r = fds[0]
            self._pipe_w = fds[1]
        self.capacity = fcntl(self._pipe_w, F_GETPIPE_SZ)
        if self._wanted_size > 0 and self.capacity != self._wanted_size:
            # Best effort: past /proc/sys/fs/pipe-max-size the pipe keeps its size.
            fcntl(self._pipe_w, F_SETPIPE_SZ, self._wanted_size)
            self.capacity = fcntl(self._pipe_w, F_GETPIPE_SZ)
        return 0

    cdef void _release(self):
        global _pool_count
        if self._pipe_r < 0:
            return
        if self.pending == 0 and _pool_count < POOL_MAX:
            _pool_read[_pool_count] = self._pipe_r
            _pool_write[_pool_count] = self._pipe_w
            _pool_count += 1
        else:  # bytes left in it (an aborted connection): not reusable
            close(self._pipe_r)
            close(self._pipe_w)
        self._pipe_r = -1
        self._pipe_w = -1

    def close(self):
        """Release the pipe (to the pool if it is empty); bytes still in it are dropped."""
        self._release()
        self.pending = 0

    def step(self, int src, int dst, Py_ssize_t budget):
        """Move bytes until something would block, EOF, or ``budget`` bytes moved.

        Returns (status, bytes written to dst); raises FlowError on a socket error
        (its ``moved`` is the bytes written to dst before it).
        """
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        if self._pipe_r < 0:
            self._open_pipe()
        while True:
            while self.pending > 0:
                n = splice(self._pipe_r, NULL, dst, NULL, self.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    self.pending -= n
                    moved += n
                elif n == 0 or errno == EAGAIN:
                    return WANT_WRITE, moved
                elif errno != EINTR:
                    raise FlowError(errno, False, moved)
            if self.eof:
                return EOF, moved
            if moved >= budget:
                return AGAIN, moved
            n = splice(src, NULL, self._pipe_w, NULL, self.capacity, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                self.pending = n
            elif n == 0:
                self.eof = True
                return EOF, moved
            elif errno == EAGAIN:
                return WANT_READ, moved
            elif errno != EINTR:
                raise FlowError(errno, True, moved)
