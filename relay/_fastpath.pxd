# C declarations for relay/_fastpath.pyx (Linux only; _GNU_SOURCE is set by setup.py).

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int pipe2(int *pipefd, int flags)

cdef extern from "<fcntl.h>" nogil:
    int O_NONBLOCK
    int O_CLOEXEC
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int fcntl(int fd, int cmd, ...)
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    # off_in/off_out are loff_t*; we always pass NULL (sockets and pipes have no offset).
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t length, unsigned int flags)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int AF_INET
    int AF_INET6

cdef extern from "<netinet/in.h>" nogil:
    int SOL_IP
    int SOL_IPV6
    int IP_TRANSPARENT
    int IPV6_TRANSPARENT
    int INET_ADDRSTRLEN
    int INET6_ADDRSTRLEN
    ctypedef unsigned short in_port_t
    struct in_addr:
        unsigned int s_addr  # network order
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_family
        in_port_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        in_port_t sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short)
    unsigned short htons(unsigned short)
    unsigned int ntohl(unsigned int)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<linux/netfilter_ipv4.h>" nogil:
    int SO_ORIGINAL_DST

cdef extern from "<linux/netfilter_ipv6/ip6_tables.h>" nogil:
    int IP6T_SO_ORIGINAL_DST

cdef extern from "<sys/socket.h>" nogil:
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
    ssize_t recv(int fd, void *buf, size_t length, int flags)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long SIOCATMARK

cdef extern from "<sys/epoll.h>" nogil:
    int EPOLLIN
    int EPOLLPRI
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
    bint urgent  # EPOLLPRI came: the source may hold an urgent byte, which splice() stops at
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


# -- the UDP engine ------------------------------------------------------------------------------

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int SIG_SETMASK
    int sigfillset(sigset_t *set)
    int pthread_sigmask(int how, const sigset_t *set, sigset_t *oldset)

cdef extern from "<sys/eventfd.h>" nogil:
    int EFD_NONBLOCK
    int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    int memcmp(const void *s1, const void *s2, size_t n)
    void *memset(void *s, int c, size_t n)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct sockaddr:
        unsigned short sa_family
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t length)
    int SOCK_DGRAM
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int SO_REUSEADDR
    int SO_RCVBUF
    int SO_MARK
    int SO_DOMAIN
    int MSG_TRUNC
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t addrlen)
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t sendto(int fd, const void *buf, size_t length, int flags, const sockaddr *dest, socklen_t addrlen)

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_IP
    int IPPROTO_IPV6
    int IP_ORIGDSTADDR
    int IPV6_ORIGDSTADDR
    int IPV6_V6ONLY

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<errno.h>" nogil:
    int EMSGSIZE
    int ENFILE


# An IPv4 or IPv6 address and port, comparable with memcmp: unused bytes are zero.
cdef struct Addr:
    int family
    unsigned short port  # network byte order
    unsigned char ip[16]  # IPv4 in the first 4


# A socket for both families' addresses: what sendto() and bind() take.
cdef union SockAddr:
    sockaddr any
    sockaddr_in v4
    sockaddr_in6 v6


# A transparent socket bound to a remote address, so replies leave from the address the client asked;
# shared by the sessions that talk to that remote.
cdef struct Reply:
    Addr remote
    int fd  # -1: a free slot
    int users
    int next  # the next in its hash chain, or in the free list


# One client address and port, associated: its datagrams go straight through the engine.
cdef struct UdpSession:
    Addr client
    SockAddr client_sa
    socklen_t client_len
    int family  # of udp_fd
    int udp_fd  # connected to the proxy's UDP relay address
    int *remotes  # Reply slots this session holds
    int remote_count
    int remote_capacity
    Addr *asked  # the hosts (port 0) it sent to: replies from others are dropped
    int asked_count
    int asked_capacity
    int asked_next  # once MAX_REMOTES_PER_SESSION are kept, the oldest: where the next goes
    long long datagrams_up, bytes_up, datagrams_down, bytes_down  # since the last collect()
    bint active  # a datagram either way since the last collect()
    bint in_use
    unsigned int generation
    int next  # the next in its hash chain, or in the free list


# A client's datagram the engine has no session for, kept for Python's take().
cdef struct Handoff:
    Addr client
    Addr destination
    Py_ssize_t size
    char *data


# -- DNS answers from the cache ------------------------------------------------------------------

# One cached answer the DnsHits table can give: a reply template for one question, with or without EDNS.
cdef struct HitEntry:
    bint in_use
    unsigned int generation  # bumped whenever the slot is emptied or refilled
    int next  # the next in its hash chain, or in the free list
    unsigned char qname[255]  # the question's name in wire form, lower-cased
    int qname_size
    unsigned short qtype
    unsigned short qclass
    bint edns
    PyObject *wire  # the template (bytes)
    unsigned short flags  # the template's header flags
    int ttl_count
    int *ttl_offsets
    unsigned int *ttls
    double stored_at
    double lifetime
    PyObject *token  # what Python is told the entry by


# A client told an entry lately: tell() tells it again only after RETELL_AFTER (see relay/_fastpath.pyx).
cdef struct Told:
    unsigned int client  # its IPv4 address
    int entry
    unsigned int generation
    double at


# One IPv4 network of --dns-allow.
cdef struct Network:
    unsigned int address  # IPv4, host order
    unsigned int mask
