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
 *   benchtool dns HOST PORT ZONE NAMES|miss SECONDS CONCURRENCY COUNT TIMEOUT_S SOURCES|- EXPECT|-
 *
 * PROXY_KIND is "http" (CONNECT) or "socks5" (no auth): the client then opens
 * its tunnel to HOST:PORT itself. Clients print one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/resource.h>
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

/* -- DNS queries over UDP ------------------------------------------------------- */

/* CONCURRENCY workers, each with one query of type A in flight at a time (a closed loop), for SECONDS or
 * until COUNT were sent (0: no limit); then the last answers are waited for, TIMEOUT_S at most each. NAMES
 * names h0.ZONE .. h(NAMES-1).ZONE are asked over and over (cache hits once each was asked); "miss" asks a
 * name never asked before every time (mNUMBER-TOKEN.ZONE). Worker i sends from SOURCES[i::CONCURRENCY]
 * (comma-separated addresses, one socket each) in turn. An answer counts when its ID, question and RCODE
 * (NOERROR) match and it has an answer record; one in DNS_SAMPLE_EVERY must also hold the A record EXPECT
 * (with a leading +, hit name i's is EXPECT + i).
 * Prints one JSON object: queries, answered, timeouts, bad answers by reason, qps, p50/p99/max latency in ms,
 * its own CPU seconds (load_cpu_s) and the whole machine's share of busy CPU time (machine_busy, /proc/stat),
 * both over the timed part alone. */

#define DNS_MAX_QUERY 300
#define DNS_RECEIVE_SIZE 4096
#define DNS_SAMPLE_EVERY 64
#define DNS_MAX_SOURCES 256
#define DNS_BAD_KINDS 24

struct dns_worker {
    int first_socket, sockets, turn;
    int waiting; /* a query is out, not yet answered nor given up */
    double started;
    unsigned char expect[4]; /* the A record its answer must hold */
    unsigned char query[DNS_MAX_QUERY];
    int query_size;
};

struct dns_run {
    const char *zone;
    int names; /* 0: misses */
    char token[9];
    unsigned char **pool; /* the hit names' queries, ID 0 */
    int *pool_size;
    long long sent, answered, timeouts, count;
    double deadline, timeout, last_answer;
    double *latencies;
    long long latency_room;
    uint32_t expect; /* host order */
    int has_expect, expect_counts; /* counts: hit name i's answer is expect + i */
    const char *bad_reason[DNS_BAD_KINDS];
    long long bad_count[DNS_BAD_KINDS];
    int *socket_fd, *socket_worker;
    struct dns_worker *workers;
    uint32_t random_state;
};

static uint32_t dns_random(struct dns_run *run)
{
    uint32_t x = run->random_state; /* xorshift32: IDs need no more */
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return run->random_state = x;
}

/* The query for NAME (dotted, ending with a dot), type A, class IN, RD set, no EDNS, ID 0; its size. */
static int dns_query(const char *name, unsigned char *out)
{
    static const unsigned char header[12] = {0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    int size = 12;
    memcpy(out, header, sizeof header);
    while (*name && *name != '.') {
        const char *dot = strchr(name, '.');
        int length = dot ? (int)(dot - name) : (int)strlen(name);
        if (length > 63 || size + 1 + length + 5 > DNS_MAX_QUERY) {
            fprintf(stderr, "name too long: %s\n", name);
            exit(2);
        }
        out[size++] = (unsigned char)length;
        memcpy(out + size, name, length);
        size += length;
        name += length + (dot ? 1 : 0);
    }
    out[size++] = 0;
    out[size++] = 0, out[size++] = 1; /* A */
    out[size++] = 0, out[size++] = 1; /* IN */
    return size;
}

static void dns_bad(struct dns_run *run, const char *reason)
{
    int i;
    for (i = 0; i < DNS_BAD_KINDS && run->bad_reason[i]; i++)
        if (!strcmp(run->bad_reason[i], reason)) break;
    if (i == DNS_BAD_KINDS) i--; /* more kinds than room: the last one counts the rest */
    run->bad_reason[i] = run->bad_reason[i] ? run->bad_reason[i] : reason;
    run->bad_count[i]++;
}

/* The offset past the name at ``at`` in ``reply`` (labels, or a compression pointer), or -1. */
static int dns_skip_name(const unsigned char *reply, int size, int at)
{
    while (at < size) {
        if (reply[at] == 0) return at + 1;
        if ((reply[at] & 0xC0) == 0xC0) return at + 2 <= size ? at + 2 : -1;
        if (reply[at] & 0xC0) return -1;
        at += 1 + reply[at];
    }
    return -1;
}

static int dns_holds_expected(const struct dns_worker *worker, const unsigned char *reply, int size, int at)
{
    int records = reply[6] << 8 | reply[7];
    for (int i = 0; i < records; i++) {
        at = dns_skip_name(reply, size, at);
        if (at < 0 || at + 10 > size) return 0;
        int type = reply[at] << 8 | reply[at + 1], length = reply[at + 8] << 8 | reply[at + 9];
        at += 10;
        if (at + length > size) return 0;
        if (type == 1 && length == 4 && !memcmp(reply + at, worker->expect, 4)) return 1;
        at += length;
    }
    return 0;
}

/* Why ``reply`` is not a good answer to ``query`` (same ID already), or NULL. */
static const char *dns_check(struct dns_run *run, const struct dns_worker *worker, const unsigned char *reply,
                             int size)
{
    static const char *rcodes[16] = {"rcode-0", "rcode-1", "rcode-2", "rcode-3", "rcode-4", "rcode-5",
                                     "rcode-6", "rcode-7", "rcode-8", "rcode-9", "rcode-10", "rcode-11",
                                     "rcode-12", "rcode-13", "rcode-14", "rcode-15"};
    if (size < worker->query_size || !(reply[2] & 0x80)) return "not-a-response";
    if (reply[2] & 0x02) return "truncated";
    if (reply[3] & 0x0F) return rcodes[reply[3] & 0x0F];
    for (int i = 12; i < worker->query_size; i++) /* no EDNS: the query is header + question */
        if (tolower(reply[i]) != tolower(worker->query[i])) return "other-question";
    if (!reply[6] && !reply[7]) return "no-answer";
    if (run->has_expect && run->answered % DNS_SAMPLE_EVERY == 0 &&
        !dns_holds_expected(worker, reply, size, worker->query_size))
        return "wrong-address";
    return NULL;
}

/* Send a worker's next query, unless the run is over. */
static void dns_send_next(struct dns_run *run, int number)
{
    struct dns_worker *worker = &run->workers[number];
    char name[DNS_MAX_QUERY];
    worker->waiting = 0;
    if (now() >= run->deadline || (run->count && run->sent >= run->count)) return;
    uint32_t expect = run->expect;
    if (run->names) {
        int which = (int)(run->sent % run->names);
        worker->query_size = run->pool_size[which];
        memcpy(worker->query, run->pool[which], worker->query_size);
        expect += run->expect_counts ? (uint32_t)which : 0;
    } else {
        snprintf(name, sizeof name, "m%lld-%s.%s", run->sent, run->token, run->zone);
        worker->query_size = dns_query(name, worker->query);
    }
    worker->expect[0] = expect >> 24, worker->expect[1] = expect >> 16 & 0xFF;
    worker->expect[2] = expect >> 8 & 0xFF, worker->expect[3] = expect & 0xFF;
    run->sent++;
    uint32_t id = dns_random(run);
    worker->query[0] = id >> 8 & 0xFF, worker->query[1] = id & 0xFF;
    int fd = run->socket_fd[worker->first_socket + worker->turn++ % worker->sockets];
    worker->waiting = 1;
    worker->started = now();
    if (send(fd, worker->query, worker->query_size, 0) < 0) { /* counts as lost at its timeout */ }
}

static void dns_answered(struct dns_run *run, int number, const unsigned char *reply, int size)
{
    struct dns_worker *worker = &run->workers[number];
    if (!worker->waiting || size < 2 || reply[0] != worker->query[0] || reply[1] != worker->query[1])
        return; /* late, for a query given up on */
    const char *why = dns_check(run, worker, reply, size);
    if (why) {
        dns_bad(run, why);
    } else {
        double t = now();
        if (run->answered == run->latency_room) {
            run->latency_room = run->latency_room ? run->latency_room * 2 : 1 << 16;
            run->latencies = realloc(run->latencies, run->latency_room * sizeof *run->latencies);
            if (!run->latencies) die("realloc");
        }
        run->latencies[run->answered++] = t - worker->started;
        run->last_answer = t;
    }
    dns_send_next(run, number);
}

static void machine_ticks(long long *busy, long long *total)
{
    long long fields[8] = {0};
    FILE *stat = fopen("/proc/stat", "r");
    if (!stat || fscanf(stat, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &fields[0], &fields[1], &fields[2],
                        &fields[3], &fields[4], &fields[5], &fields[6], &fields[7]) != 8)
        die("/proc/stat");
    fclose(stat);
    *total = 0;
    for (int i = 0; i < 8; i++) *total += fields[i];
    *busy = *total - fields[3] - fields[4]; /* idle, iowait */
}

static double own_cpu(void)
{
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
           usage.ru_stime.tv_usec / 1e6;
}

static double dns_percentile(const struct dns_run *run, double share)
{
    long long at = (long long)(share * run->answered);
    return run->latencies[at < run->answered ? at : run->answered - 1] * 1e3;
}

static void dns_load(char **argv)
{
    struct sockaddr_in server = ipv4(argv[2], argv[3]);
    struct dns_run run = {.zone = argv[4], .names = strcmp(argv[5], "miss") ? atoi(argv[5]) : 0,
                          .count = atoll(argv[8]), .timeout = atof(argv[9])};
    int concurrency = atoi(argv[7]);
    char *sources[DNS_MAX_SOURCES], *list = strcmp(argv[10], "-") ? strdup(argv[10]) : NULL;
    int source_count = 0;
    if (concurrency < 1 || (strcmp(argv[5], "miss") && run.names < 1) || run.zone[strlen(run.zone) - 1] != '.') {
        fprintf(stderr, "dns: CONCURRENCY and NAMES must be at least 1, ZONE must end with a dot\n");
        exit(2);
    }
    for (char *next = list ? strtok(list, ",") : NULL; next; next = strtok(NULL, ","))
        if (source_count < DNS_MAX_SOURCES) sources[source_count++] = next;
    if (strcmp(argv[11], "-")) {
        struct in_addr expect;
        run.expect_counts = argv[11][0] == '+';
        if (inet_pton(AF_INET, argv[11] + run.expect_counts, &expect) != 1) {
            fprintf(stderr, "not an IPv4 address: %s\n", argv[11]);
            exit(2);
        }
        run.expect = ntohl(expect.s_addr);
        run.has_expect = 1;
    }
    run.random_state = (uint32_t)getpid() * 2654435761u ^ (uint32_t)(now() * 1e6);
    if (!run.random_state) run.random_state = 1;
    snprintf(run.token, sizeof run.token, "%08x", dns_random(&run));
    if (run.names) {
        run.pool = calloc(run.names, sizeof *run.pool);
        run.pool_size = calloc(run.names, sizeof *run.pool_size);
        for (int i = 0; i < run.names; i++) {
            char name[DNS_MAX_QUERY];
            snprintf(name, sizeof name, "h%d.%s", i, run.zone);
            run.pool[i] = malloc(DNS_MAX_QUERY);
            run.pool_size[i] = dns_query(name, run.pool[i]);
        }
    }
    /* Worker i's sources: sources[i::concurrency], or one of them if that is none. */
    int sockets = 0;
    run.workers = calloc(concurrency, sizeof *run.workers);
    for (int i = 0; i < concurrency; i++) {
        run.workers[i].first_socket = sockets;
        run.workers[i].sockets = source_count > i ? (source_count - i + concurrency - 1) / concurrency : 1;
        sockets += run.workers[i].sockets;
    }
    run.socket_fd = calloc(sockets, sizeof *run.socket_fd);
    run.socket_worker = calloc(sockets, sizeof *run.socket_worker);
    int epoll_fd = epoll_create1(0);
    for (int i = 0; i < concurrency; i++) {
        for (int k = 0; k < run.workers[i].sockets; k++) {
            int index = run.workers[i].first_socket + k;
            int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
            if (fd < 0) die("socket");
            if (source_count) {
                const char *source = source_count > i ? sources[i + k * concurrency] : sources[i % source_count];
                struct sockaddr_in local = ipv4(source, "0");
                if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind");
            }
            if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0) die("connect");
            run.socket_fd[index] = fd;
            run.socket_worker[index] = i;
            epoll_add(epoll_fd, fd, EPOLLIN, (uint64_t)index);
        }
    }
    long long busy_before, total_before, busy_after, total_after;
    double cpu_before = own_cpu(), start = now();
    machine_ticks(&busy_before, &total_before);
    run.deadline = start + atof(argv[6]);
    for (int i = 0; i < concurrency; i++) dns_send_next(&run, i);
    struct epoll_event events[MAX_EVENTS];
    unsigned char reply[DNS_RECEIVE_SIZE];
    for (;;) {
        int waiting = 0;
        double t = now();
        for (int i = 0; i < concurrency; i++) {
            if (run.workers[i].waiting && t - run.workers[i].started > run.timeout) {
                run.timeouts++;
                dns_send_next(&run, i);
            }
            waiting += run.workers[i].waiting;
        }
        if (!waiting) break;
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, 10);
        for (int i = 0; i < ready; i++) {
            int index = (int)events[i].data.u64;
            ssize_t n;
            while ((n = recv(run.socket_fd[index], reply, sizeof reply, 0)) >= 0)
                dns_answered(&run, run.socket_worker[index], reply, (int)n);
        }
    }
    double cpu = own_cpu() - cpu_before;
    machine_ticks(&busy_after, &total_after);
    double seconds = (run.last_answer > start ? run.last_answer : start + 1e-9) - start;
    qsort(run.latencies, run.answered, sizeof *run.latencies, compare_doubles);
    printf("{\"queries\": %lld, \"answered\": %lld, \"timeouts\": %lld, \"bad\": {", run.sent, run.answered,
           run.timeouts);
    for (int i = 0; i < DNS_BAD_KINDS && run.bad_reason[i]; i++)
        printf("%s\"%s\": %lld", i ? ", " : "", run.bad_reason[i], run.bad_count[i]);
    printf("}, \"seconds\": %.6f, \"qps\": %.1f, ", seconds, run.answered / seconds);
    if (run.answered)
        printf("\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"max_ms\": %.4f, ", dns_percentile(&run, 0.50),
               dns_percentile(&run, 0.99), run.latencies[run.answered - 1] * 1e3);
    else
        printf("\"p50_ms\": null, \"p99_ms\": null, \"max_ms\": null, ");
    printf("\"load_cpu_s\": %.4f, \"machine_busy\": %.4f}\n", cpu,
           (double)(busy_after - busy_before) / (total_after > total_before ? total_after - total_before : 1));
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
    else if (!strcmp(mode, "dns") && argc == 12) dns_load(argv);
    else {
        fprintf(stderr, "usage: see the comment at the top of benchtool.c\n");
        return 2;
    }
    return 0;
}
