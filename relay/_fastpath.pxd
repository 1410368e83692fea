# C declarations for relay/_fastpath.pyx (Linux only; _GNU_SOURCE is set by setup.py).

cdef extern from "<errno.h>":
    int errno
    int EAGAIN
    int EINTR

cdef extern from "<unistd.h>":
    int close(int fd)
    int pipe2(int *pipefd, int flags)

cdef extern from "<fcntl.h>":
    int O_NONBLOCK
    int O_CLOEXEC
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int fcntl(int fd, int cmd, ...)
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    # off_in/off_out are loff_t*; we always pass NULL (sockets and pipes have no offset).
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t length, unsigned int flags)

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int AF_INET
    int AF_INET6

cdef extern from "<netinet/in.h>":
    int SOL_IP
    int SOL_IPV6
    int IP_TRANSPARENT
    int IPV6_TRANSPARENT
    int INET_ADDRSTRLEN
    int INET6_ADDRSTRLEN
    ctypedef unsigned short in_port_t
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        in_port_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        in_port_t sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short)

cdef extern from "<arpa/inet.h>":
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<linux/netfilter_ipv4.h>":
    int SO_ORIGINAL_DST

cdef extern from "<linux/netfilter_ipv6/ip6_tables.h>":
    int IP6T_SO_ORIGINAL_DST

cdef extern from "<sys/socket.h>":
    int SOL_SOCKET
    int SO_LINGER
    int SO_ERROR
    int SHUT_WR
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    struct linger:
        int l_onoff
        int l_linger
    int shutdown(int fd, int how)
    ssize_t send(int fd, const void *buf, size_t length, int flags)

cdef extern from "<sys/epoll.h>":
    int EPOLLIN
    int EPOLLOUT
    int EPOLLERR
    int EPOLLHUP
    int EPOLLRDHUP
    unsigned int EPOLLET
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLL_CTL_MOD
    union epoll_data_t:
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

from cpython.ref cimport PyObject


# One direction of an established connection: fd[side] -> pipe -> fd[1 - side].
cdef struct Way:
    int pipe_r
    int pipe_w
    int capacity
    bint eof  # the source sent FIN
    bint shut  # ...and it was forwarded: shutdown(SHUT_WR) on the destination
    bint write_blocked  # bytes wait for room in the destination: only EPOLLOUT there moves this way
    bint queued  # in the backlog: its share of a run's budget ran out
    bint paused  # EPOLLIN is off on the source while write_blocked: its data would only wake us in vain
    bint held  # the FIN is kept from the destination until release() or abort()
    Py_ssize_t pending  # bytes in the pipe
    PyObject *first  # bytes read before the engine took over, sent before the pipe's; NULL once sent
    Py_ssize_t first_sent
    long long moved  # bytes written to the destination


# One established connection: fd[0] is the client, fd[1] the upstream.
cdef struct Conn:
    int fd[2]
    Way way[2]
    double last_active
    double idle_timeout
    double half_closed_timeout
    int pipe_size
    bint in_use
    bint half_closed
    bint hold_upstream_eof  # hold the upstream's FIN (--confirm-eof); release() clears it
    unsigned int generation  # bumped as the slot is freed, so a stale handle matches nothing
    PyObject *token
