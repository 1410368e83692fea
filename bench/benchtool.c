/* Load generators and servers for bench/run.py, compiled with gcc at run time.
 *
 * In C so that neither side is the bottleneck the benchmark measures.
 *
 *   benchtool serve-short PORT      read 100 bytes, answer 100 bytes, close (epoll)
 *   benchtool serve-hold PORT       accept and keep connections until the peer closes (epoll)
 *   benchtool serve-bulk PORT       first byte 'U': discard until EOF; 'D': send until the peer goes
 *   benchtool serve-http PORT       HTTP/1.1 keep-alive: GET /bytes/N answers N bytes; a request with a
 *                                   Content-Length body (POST, PUT) is read and answered "ok"
 *   benchtool short HOST PORT COUNT CONCURRENCY TIMEOUT_S [PROXY_KIND PROXY_HOST PROXY_PORT]
 *   benchtool hold HOST PORT COUNT LIFETIME_S
 *   benchtool bulk HOST PORT SECONDS STREAMS up|down [PROXY_KIND PROXY_HOST PROXY_PORT]
 *
 * PROXY_KIND is "http" (CONNECT) or "socks5" (no auth): the client then opens
 * its tunnel to HOST:PORT itself. Clients print one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MESSAGE_SIZE 100
#define BULK_BUFFER (128 * 1024) /* iperf3's default */
#define MAX_EVENTS 256
#define HOLD_CONNECTS_IN_FLIGHT 256

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static struct sockaddr_in ipv4(const char *host, const char *port)
{
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", host);
        exit(2);
    }
    return address;
}

static int listener(const char *port, int socket_flags)
{
    int fd = socket(AF_INET, SOCK_STREAM | socket_flags, 0);
    int one = 1;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void epoll_add(int epoll_fd, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event event = {.events = events, .data.u64 = data};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0) die("epoll_ctl");
}

/* -- servers ------------------------------------------------------------- */

/* serve-short and serve-hold: one epoll loop; with answer_after set, a
 * connection that has sent that many bytes gets as many back and is closed. */
static void serve_epoll(const char *port, int answer_after)
{
    static int received[1 << 17]; /* by fd; RLIMIT_NOFILE stays below this */
    static char reply[MESSAGE_SIZE], scratch[4096];
    struct epoll_event events[MAX_EVENTS];
    int listen_fd = listener(port, SOCK_NONBLOCK), epoll_fd = epoll_create1(0);
    memset(reply, 'r', sizeof reply);
    epoll_add(epoll_fd, listen_fd, EPOLLIN, (uint64_t)listen_fd);
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, -1);
        for (int i = 0; i < ready; i++) {
            int fd = (int)events[i].data.u64;
            if (fd == listen_fd) {
                int conn;
                while ((conn = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    received[conn] = 0;
                    epoll_add(epoll_fd, conn, EPOLLIN, (uint64_t)conn);
                }
                continue;
            }
            ssize_t n = read(fd, scratch, sizeof scratch);
            if (n <= 0) {
                if (n < 0 && errno == EAGAIN) continue;
                close(fd);
                continue;
            }
            received[fd] += n;
            if (answer_after && received[fd] >= answer_after) {
                if (write(fd, reply, sizeof reply) < 0) { /* the client is gone: nothing to do */ }
                close(fd);
            }
        }
    }
}

static void *serve_bulk_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    static char source[BULK_BUFFER];
    char command, sink[BULK_BUFFER];
    if (read(fd, &command, 1) == 1) {
        if (command == 'U')
            while (read(fd, sink, sizeof sink) > 0) {}
        else if (command == 'D')
            while (write(fd, source, sizeof source) > 0) {}
    }
    close(fd);
    return NULL;
}

#define HTTP_HEAD_MAX 16384

/* The value of a header line "name: value" in head, as a number; -1 if absent. */
static long long header_number(const char *head, const char *name)
{
    size_t length = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n"))
        if (!strncasecmp(line + 2, name, length) && line[2 + length] == ':')
            return atoll(line + 3 + length);
    return -1;
}

static void *serve_http_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    static char zeros[BULK_BUFFER];
    char head[HTTP_HEAD_MAX + 1], sink[BULK_BUFFER];
    size_t have = 0;
    for (;;) {
        char *end;
        head[have] = 0;
        while (!(end = strstr(head, "\r\n\r\n"))) {
            ssize_t n = have < HTTP_HEAD_MAX ? read(fd, head + have, HTTP_HEAD_MAX - have) : -1;
            if (n <= 0) goto done;
            have += n;
            head[have] = 0;
        }
        end += 4;
        *(end - 2) = 0; /* the head as a string, its last CRLF kept for header_number */
        long long body = header_number(head, "Content-Length");
        size_t extra = have - (end - head); /* bytes read past the head: the body's first */
        long long left = body > 0 ? body - (long long)extra : 0;
        if (left < 0) { /* the next request began too: not sent by our clients */
            goto done;
        }
        have = 0;
        while (left > 0) {
            ssize_t n = read(fd, sink, left < (long long)sizeof sink ? (size_t)left : sizeof sink);
            if (n <= 0) goto done;
            left -= n;
        }
        long long size = 0;
        if (!strncmp(head, "GET /bytes/", 11)) size = atoll(head + 11);
        char reply[128];
        int length = size ? snprintf(reply, sizeof reply, "HTTP/1.1 200 OK\r\nContent-Length: %lld\r\n\r\n", size)
                          : snprintf(reply, sizeof reply, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        if (write(fd, reply, length) != length) goto done;
        while (size > 0) {
            ssize_t n = write(fd, zeros, size < (long long)sizeof zeros ? (size_t)size : sizeof zeros);
            if (n <= 0) goto done;
            size -= n;
        }
    }
done:
    close(fd);
    return NULL;
}

static void serve_threads(const char *port, void *(*serve)(void *))
{
    /* Blocking: one thread per (long) connection is simplest here. */
    int listen_fd = listener(port, 0);
    for (;;) {
        pthread_t thread;
        int conn = accept(listen_fd, NULL, NULL);
        if (conn < 0) continue;
        if (pthread_create(&thread, NULL, serve, (void *)(intptr_t)conn) != 0) close(conn);
        else pthread_detach(thread);
    }
}

/* -- opening a tunnel through a proxy (client side) -------------------------- */

enum proxy_kind { PROXY_NONE, PROXY_HTTP, PROXY_SOCKS5 };
enum step { STEP_NEED_MORE, STEP_SEND, STEP_OPEN, STEP_FAIL };

struct target {
    struct sockaddr_in connect_to; /* the proxy, or the destination itself */
    struct sockaddr_in destination;
    enum proxy_kind proxy;
};

/* Destination in argv[2..3]; the proxy, if any, in argv[7..9]. */
static struct target parse_target(int argc, char **argv)
{
    struct target target = {.destination = ipv4(argv[2], argv[3]), .proxy = PROXY_NONE};
    target.connect_to = target.destination;
    if (argc == 10) {
        if (!strcmp(argv[7], "http")) target.proxy = PROXY_HTTP;
        else if (!strcmp(argv[7], "socks5")) target.proxy = PROXY_SOCKS5;
        else {
            fprintf(stderr, "unknown proxy kind %s\n", argv[7]);
            exit(2);
        }
        target.connect_to = ipv4(argv[8], argv[9]);
    }
    return target;
}

/* The proxy's first message (empty without a proxy). */
static size_t proxy_greeting(const struct target *target, char *out)
{
    char host[INET_ADDRSTRLEN];
    int port = ntohs(target->destination.sin_port);
    inet_ntop(AF_INET, &target->destination.sin_addr, host, sizeof host);
    switch (target->proxy) {
    case PROXY_HTTP:
        return sprintf(out, "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n", host, port, host, port);
    case PROXY_SOCKS5:
        memcpy(out, "\x05\x01\x00", 3); /* version 5, one method: no authentication */
        return 3;
    default:
        return 0;
    }
}

/* Given all the proxy has answered since our last message, what next:
 * STEP_SEND puts the next message in out (the caller then forgets the answer). */
static enum step proxy_step(const struct target *target, int *phase, const char *in, size_t in_len,
                            char *out, size_t *out_len)
{
    if (target->proxy == PROXY_HTTP) {
        if (!memmem(in, in_len, "\r\n\r\n", 4)) return STEP_NEED_MORE;
        return in_len > 12 && !memcmp(in, "HTTP/1.", 7) && !memcmp(in + 9, "200", 3) ? STEP_OPEN : STEP_FAIL;
    }
    if (*phase == 0) {
        if (in_len < 2) return STEP_NEED_MORE;
        if (in[0] != 5 || in[1] != 0) return STEP_FAIL;
        memcpy(out, "\x05\x01\x00\x01", 4); /* CONNECT to an IPv4 address */
        memcpy(out + 4, &target->destination.sin_addr, 4);
        memcpy(out + 8, &target->destination.sin_port, 2);
        *out_len = 10;
        *phase = 1;
        return STEP_SEND;
    }
    if (in_len < 4) return STEP_NEED_MORE;
    if (in_len < (in[3] == 4 ? 22u : 10u)) return STEP_NEED_MORE;
    return in[0] == 5 && in[1] == 0 ? STEP_OPEN : STEP_FAIL;
}

static int write_all(int fd, const char *data, size_t size)
{
    return write(fd, data, size) == (ssize_t)size ? 0 : -1; /* small messages: one write */
}

/* -- short connections ----------------------------------------------------- */

enum short_state { CONNECTING, HANDSHAKE, EXCHANGE };

struct short_conn {
    int fd, phase;
    enum short_state state;
    double started;
    size_t have;
    char buffer[512];
};

struct short_run {
    struct target target;
    int epoll_fd, count, launched, ok, errors, active;
    double *latencies;
    struct short_conn *slots;
    char first_error[128];
};

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *sorted, int count, double fraction)
{
    return count ? sorted[(int)(fraction * (count - 1) + 0.5)] : 0;
}

/* Ends a slot's connection (a success if error is NULL), then starts the next one in it. */
static void short_finish(struct short_run *run, int slot, const char *error)
{
    struct short_conn *conn = &run->slots[slot];
    for (;;) {
        if (conn->fd >= 0) {
            close(conn->fd);
            conn->fd = -1;
            run->active--;
            if (error) {
                if (!run->errors++) snprintf(run->first_error, sizeof run->first_error, "%s", error);
            } else {
                run->latencies[run->ok++] = now() - conn->started;
            }
        }
        if (run->launched >= run->count) return;
        run->launched++;
        *conn = (struct short_conn){.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), .started = now()};
        if (conn->fd < 0) {
            if (!run->errors++) snprintf(run->first_error, sizeof run->first_error, "socket: %s", strerror(errno));
            continue;
        }
        run->active++;
        if (connect(conn->fd, (struct sockaddr *)&run->target.connect_to, sizeof run->target.connect_to) < 0 &&
            errno != EINPROGRESS) {
            error = strerror(errno);
            continue;
        }
        epoll_add(run->epoll_fd, conn->fd, EPOLLOUT | EPOLLIN, (uint64_t)slot);
        return;
    }
}

/* One readiness event of a slot's connection. */
static char short_payload[MESSAGE_SIZE];

static void short_event(struct short_run *run, int slot)
{
    struct short_conn *conn = &run->slots[slot];
    char message[512];
    size_t size = 0;
    if (conn->state == CONNECTING) {
        int error = 0;
        socklen_t length = sizeof error;
        getsockopt(conn->fd, SOL_SOCKET, SO_ERROR, &error, &length);
        if (error) return short_finish(run, slot, strerror(error));
        struct epoll_event only_in = {.events = EPOLLIN, .data.u64 = (uint64_t)slot};
        epoll_ctl(run->epoll_fd, EPOLL_CTL_MOD, conn->fd, &only_in);
        size = proxy_greeting(&run->target, message);
        conn->state = size ? HANDSHAKE : EXCHANGE;
        if (write_all(conn->fd, size ? message : short_payload, size ? size : sizeof short_payload) < 0)
            short_finish(run, slot, "write");
        return;
    }
    ssize_t n = read(conn->fd, conn->buffer + conn->have, sizeof conn->buffer - conn->have);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) return short_finish(run, slot, n ? strerror(errno) : "closed early");
    conn->have += n;
    if (conn->state == EXCHANGE) {
        if (conn->have >= MESSAGE_SIZE) short_finish(run, slot, NULL);
        return;
    }
    switch (proxy_step(&run->target, &conn->phase, conn->buffer, conn->have, message, &size)) {
    case STEP_NEED_MORE:
        break;
    case STEP_SEND:
        conn->have = 0;
        if (write_all(conn->fd, message, size) < 0) short_finish(run, slot, "write");
        break;
    case STEP_OPEN:
        conn->have = 0;
        conn->state = EXCHANGE;
        if (write_all(conn->fd, short_payload, sizeof short_payload) < 0) short_finish(run, slot, "write");
        break;
    case STEP_FAIL:
        short_finish(run, slot, "proxy refused");
        break;
    }
}

static void short_connections(int argc, char **argv)
{
    int concurrency = atoi(argv[5]);
    struct short_run run = {.target = parse_target(argc, argv), .epoll_fd = epoll_create1(0),
                            .count = atoi(argv[4])};
    struct epoll_event events[MAX_EVENTS];
    double start = now(), deadline = start + atof(argv[6]);
    memset(short_payload, 'q', sizeof short_payload);
    run.latencies = calloc(run.count, sizeof *run.latencies);
    run.slots = calloc(concurrency, sizeof *run.slots);
    for (int slot = 0; slot < concurrency; slot++) {
        run.slots[slot].fd = -1;
        short_finish(&run, slot, NULL);
    }
    while (run.active > 0 && now() < deadline) {
        int ready = epoll_wait(run.epoll_fd, events, MAX_EVENTS, 100);
        for (int i = 0; i < ready; i++) {
            int slot = (int)events[i].data.u64;
            if (run.slots[slot].fd >= 0) /* else finished by an earlier event of this batch */
                short_event(&run, slot);
        }
    }
    double seconds = now() - start;
    qsort(run.latencies, run.ok, sizeof *run.latencies, compare_doubles);
    printf("{\"ok\": %d, \"errors\": %d, \"unfinished\": %d, \"seconds\": %.6f, \"conn_per_s\": %.1f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"first_error\": \"%s\"}\n",
           run.ok, run.errors, run.count - run.ok - run.errors, seconds, run.ok / seconds,
           percentile(run.latencies, run.ok, 0.50) * 1e3, percentile(run.latencies, run.ok, 0.99) * 1e3,
           run.first_error);
}

/* -- idle connections ---------------------------------------------------------- */

static void hold(char **argv)
{
    struct sockaddr_in destination = ipv4(argv[2], argv[3]);
    int count = atoi(argv[4]), in_flight = 0, opened = 0, connected = 0, errors = 0;
    int epoll_fd = epoll_create1(0);
    struct epoll_event events[MAX_EVENTS];
    alarm(atoi(argv[5])); /* never outlive the benchmark: exiting closes everything */
    while (connected + errors < count) {
        while (opened < count && in_flight < HOLD_CONNECTS_IN_FLIGHT) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            opened++;
            if (fd < 0 || (connect(fd, (struct sockaddr *)&destination, sizeof destination) < 0 &&
                           errno != EINPROGRESS)) {
                errors++;
                if (fd >= 0) close(fd);
                continue;
            }
            epoll_add(epoll_fd, fd, EPOLLOUT, (uint64_t)fd);
            in_flight++;
        }
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, 1000);
        for (int i = 0; i < ready; i++) {
            int fd = (int)events[i].data.u64, error = 0;
            socklen_t length = sizeof error;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
            epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
            in_flight--;
            if (error) {
                errors++;
                close(fd);
            } else {
                connected++;
            }
        }
    }
    printf("{\"connected\": %d, \"errors\": %d}\n", connected, errors);
    fflush(stdout);
    for (;;) pause();
}

/* -- bulk throughput ------------------------------------------------------------ */

struct bulk_stream {
    pthread_t thread;
    const struct target *target;
    pthread_barrier_t *start_line;
    int upload, fd;
    double seconds;
    long long bytes;
    const char *error;
};

static int open_tunnel(const struct target *target)
{
    char message[512], answer[512];
    size_t have = 0, size = proxy_greeting(target, message);
    int phase = 0, fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0 || connect(fd, (const struct sockaddr *)&target->connect_to, sizeof target->connect_to) < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!size) return fd;
    if (write_all(fd, message, size) < 0) return -1;
    for (;;) {
        ssize_t n = read(fd, answer + have, sizeof answer - have);
        if (n <= 0) return -1;
        have += n;
        switch (proxy_step(target, &phase, answer, have, message, &size)) {
        case STEP_NEED_MORE:
            break;
        case STEP_SEND:
            have = 0;
            if (write_all(fd, message, size) < 0) return -1;
            break;
        case STEP_OPEN:
            return fd;
        case STEP_FAIL:
            return -1;
        }
    }
}

static void *bulk_stream(void *arg)
{
    struct bulk_stream *stream = arg;
    static char buffer[BULK_BUFFER]; /* contents do not matter; shared by the senders */
    char receive[BULK_BUFFER];
    stream->fd = open_tunnel(stream->target);
    if (stream->fd < 0 || write_all(stream->fd, stream->upload ? "U" : "D", 1) < 0)
        stream->error = "cannot open the stream";
    pthread_barrier_wait(stream->start_line);
    double start = now(), end = start + stream->seconds, t = start;
    while (!stream->error && t < end) {
        ssize_t n = stream->upload ? write(stream->fd, buffer, sizeof buffer)
                                   : read(stream->fd, receive, sizeof receive);
        if (n <= 0) stream->error = "stream ended early";
        else stream->bytes += n;
        t = now();
    }
    stream->seconds = t - start;
    if (stream->fd >= 0) close(stream->fd);
    return NULL;
}

static void bulk(int argc, char **argv)
{
    struct target target = parse_target(argc, argv);
    int streams = atoi(argv[5]);
    struct bulk_stream *all = calloc(streams, sizeof *all);
    pthread_barrier_t start_line;
    long long bytes = 0;
    double seconds = 0;
    const char *error = NULL;
    signal(SIGPIPE, SIG_IGN);
    pthread_barrier_init(&start_line, NULL, streams);
    for (int i = 0; i < streams; i++) {
        all[i] = (struct bulk_stream){.target = &target, .start_line = &start_line,
                                      .upload = !strcmp(argv[6], "up"), .seconds = atof(argv[4])};
        if (pthread_create(&all[i].thread, NULL, bulk_stream, &all[i]) != 0) die("pthread_create");
    }
    for (int i = 0; i < streams; i++) {
        pthread_join(all[i].thread, NULL);
        bytes += all[i].bytes;
        if (all[i].seconds > seconds) seconds = all[i].seconds;
        if (all[i].error) error = all[i].error;
    }
    printf("{\"bytes\": %lld, \"seconds\": %.6f, \"gbit_s\": %.4f, \"error\": %s%s%s}\n", bytes, seconds,
           seconds > 0 ? bytes * 8 / seconds / 1e9 : 0.0, error ? "\"" : "", error ? error : "null",
           error ? "\"" : "");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(mode, "serve-short") && argc == 3) serve_epoll(argv[2], MESSAGE_SIZE);
    else if (!strcmp(mode, "serve-hold") && argc == 3) serve_epoll(argv[2], 0);
    else if (!strcmp(mode, "serve-bulk") && argc == 3) serve_threads(argv[2], serve_bulk_connection);
    else if (!strcmp(mode, "serve-http") && argc == 3) serve_threads(argv[2], serve_http_connection);
    else if (!strcmp(mode, "short") && (argc == 7 || argc == 10)) short_connections(argc, argv);
    else if (!strcmp(mode, "hold") && argc == 6) hold(argv);
    else if (!strcmp(mode, "bulk") && (argc == 7 || argc == 10)) bulk(argc, argv);
    else {
        fprintf(stderr, "usage: see the comment at the top of benchtool.c\n");
        return 2;
    }
    return 0;
}
