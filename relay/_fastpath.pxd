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
