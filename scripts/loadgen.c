/*
 * loadgen: a small epoll load generator, used by scripts/bench.
 *
 * CONNECTIONS slots each keep INFLIGHT requests outstanding: send REQUEST,
 * and for every reply record the round trip and send it again, for SECONDS.
 * Modes:
 *   persistent  one JSON line per request, one line per reply (task port)
 *   connect     the same, with a new TCP connection per request (INFLIGHT 1)
 *   websocket   a WebSocket (GET /ws) per slot; REQUEST is sent as a masked
 *               text frame and every text frame back counts as one reply
 * Prints one JSON object: count, errors, elapsed seconds, p50/p99 latency in
 * microseconds, the CPU seconds this process used (so the reader can see
 * whether the generator itself was the bottleneck), and "starved": how many
 * slots had a whole second of the run in which none of their requests
 * completed (0 means every connection made progress every second).
 *
 * Built with -DLOADGEN_TLS (and -lssl -lcrypto), persistent and connect run
 * over TLS: each connection does a full handshake (no session resumption),
 * without verifying the server's certificate (loopback benchmarks only).
 *
 * Build: cc -O2 -o loadgen loadgen.c
 *        cc -O2 -DLOADGEN_TLS -o loadgen-tls loadgen.c -lssl -lcrypto
 * Usage: loadgen HOST PORT CONNECTIONS SECONDS MODE REQUEST [INFLIGHT]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef LOADGEN_TLS
#include <openssl/ssl.h>
#define TLS_BUILD 1
#else
#define TLS_BUILD 0
#endif

#define MAX_US 2000000 /* latency histogram range: 1 us buckets up to 2 s */
#define MAX_INFLIGHT 64
#define BUF_SIZE 16384

enum mode { PERSISTENT, CONNECT, WEBSOCKET };

typedef struct {
    int fd;
#ifdef LOADGEN_TLS
    SSL *tls;
#endif
    double sent_at[MAX_INFLIGHT]; /* send times of outstanding requests, oldest first */
    int head, count;
    size_t have;                  /* websocket: bytes of unparsed frames in buf */
    unsigned char buf[BUF_SIZE];
} slot_t;

static struct sockaddr_in server;
static char *request;
static size_t request_len;
static enum mode mode;
static int inflight = 1;
static int epfd;
static uint32_t *histogram;
static uint32_t *per_second; /* completions per slot per whole second of the run */
static int run_seconds;
static double started_at;
static long count, errors;
static char host_header[128];
#ifdef LOADGEN_TLS
static SSL_CTX *tls_context;
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int websocket_handshake(int fd) {
    char text[512], reply[4096];
    int n = snprintf(text, sizeof text,
                     "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", host_header);
    if (write(fd, text, (size_t)n) != n) return -1;
    size_t got = 0;
    while (got < sizeof reply - 1) {
        ssize_t r = read(fd, reply + got, 1); /* byte by byte: stop exactly at the headers' end */
        if (r <= 0) return -1;
        got += (size_t)r;
        reply[got] = 0;
        if (got >= 4 && memcmp(reply + got - 4, "\r\n\r\n", 4) == 0)
            return strstr(reply, " 101 ") ? 0 : -1;
    }
    return -1;
}

static int open_connection(slot_t *slot) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct timeval limit = {.tv_sec = 5};
    if (fd < 0) return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    /* Blocking connect (and handshake): on loopback they complete at once and
       it keeps the code short. The socket is made non-blocking afterwards. */
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0 ||
        (mode == WEBSOCKET && websocket_handshake(fd) < 0)) {
        close(fd);
        return -1;
    }
#ifdef LOADGEN_TLS
    slot->tls = SSL_new(tls_context);
    SSL_set_fd(slot->tls, fd);
    if (SSL_connect(slot->tls) != 1) {
        SSL_free(slot->tls);
        slot->tls = NULL;
        close(fd);
        return -1;
    }
#else
    (void)slot;
#endif
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

/* write() or SSL_write() all of data; the requests are small. */
static int send_all(slot_t *slot, const char *data, size_t length) {
#ifdef LOADGEN_TLS
    for (;;) {
        int n = SSL_write(slot->tls, data, (int)length);
        if (n == (int)length) return 0;
        int why = SSL_get_error(slot->tls, n);
        if (why != SSL_ERROR_WANT_WRITE && why != SSL_ERROR_WANT_READ) return -1;
    }
#else
    return write(slot->fd, data, length) == (ssize_t)length ? 0 : -1;
#endif
}

/* read() or SSL_read(): bytes read, 0 at the end, -2 when nothing is ready. */
static ssize_t receive(slot_t *slot, unsigned char *buffer, size_t size) {
#ifdef LOADGEN_TLS
    int n = SSL_read(slot->tls, buffer, (int)size);
    if (n > 0) return n;
    int why = SSL_get_error(slot->tls, n);
    return why == SSL_ERROR_WANT_READ || why == SSL_ERROR_WANT_WRITE ? -2 : 0;
#else
    ssize_t n = read(slot->fd, buffer, size);
    return n < 0 && errno == EAGAIN ? -2 : n < 0 ? 0 : n;
#endif
}

static int send_request(slot_t *slot, int index) {
    if (slot->fd < 0) {
        slot->fd = open_connection(slot);
        if (slot->fd < 0) return -1;
        slot->head = slot->count = 0;
        slot->have = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
        epoll_ctl(epfd, EPOLL_CTL_ADD, slot->fd, &ev);
    }
    slot->sent_at[(slot->head + slot->count) % MAX_INFLIGHT] = now();
    slot->count++;
    /* The request is small: one write fits the socket buffer. */
    return send_all(slot, request, request_len);
}

static void drop(slot_t *slot) {
    if (slot->fd >= 0) {
        /* Close with a reset: connect-per-request would otherwise leave a
           TIME_WAIT socket per request and run out of local ports. */
        struct linger hard = {.l_onoff = 1, .l_linger = 0};
        setsockopt(slot->fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
        epoll_ctl(epfd, EPOLL_CTL_DEL, slot->fd, NULL);
#ifdef LOADGEN_TLS
        SSL_free(slot->tls);
        slot->tls = NULL;
#endif
        close(slot->fd);
        slot->fd = -1;
    }
}

static void record_reply(slot_t *slot, int index) {
    if (!slot->count) return;
    double at = now();
    int second = (int)(at - started_at);
    if (second < run_seconds) per_second[(size_t)index * run_seconds + second]++;
    long us = (long)((at - slot->sent_at[slot->head]) * 1e6);
    histogram[us < MAX_US ? us : MAX_US]++;
    count++;
    slot->head = (slot->head + 1) % MAX_INFLIGHT;
    slot->count--;
}

/* Count the complete replies in what was just read; returns how many. */
static int take_replies(slot_t *slot, const unsigned char *data, size_t got) {
    int replies = 0;
    if (mode != WEBSOCKET) {
        for (size_t i = 0; i < got; i++)
            if (data[i] == '\n') replies++;
        return replies;
    }
    if (slot->have + got > BUF_SIZE) return -1;
    memcpy(slot->buf + slot->have, data, got);
    slot->have += got;
    size_t at = 0;
    while (slot->have - at >= 2) {
        const unsigned char *frame = slot->buf + at;
        size_t length = frame[1] & 0x7f, header = 2;
        if (length == 126) {
            if (slot->have - at < 4) break;
            length = (size_t)frame[2] << 8 | frame[3];
            header = 4;
        } else if (length == 127) {
            return -1; /* replies here are small; a huge one is an error */
        }
        if (slot->have - at < header + length) break;
        if ((frame[0] & 0x0f) == 1) replies++;
        else if ((frame[0] & 0x0f) == 8) return -1; /* the server closed */
        at += header + length;
    }
    memmove(slot->buf, slot->buf + at, slot->have - at);
    slot->have -= at;
    return replies;
}

static long percentile(double p) {
    long target = (long)(count * p), seen = 0;
    for (long us = 0; us < MAX_US; us++) {
        seen += histogram[us];
        if (seen > target) return us;
    }
    return MAX_US;
}

static void build_request(const char *text) {
    size_t n = strlen(text);
    request = malloc(n + 16);
    if (mode != WEBSOCKET) {
        sprintf(request, "%s\n", text);
        request_len = n + 1;
        return;
    }
    /* A masked text frame; the all-zero mask leaves the payload as it is. */
    unsigned char *frame = (unsigned char *)request;
    size_t at = 0;
    frame[at++] = 0x81;
    if (n < 126) {
        frame[at++] = 0x80 | (unsigned char)n;
    } else {
        frame[at++] = 0x80 | 126;
        frame[at++] = (unsigned char)(n >> 8);
        frame[at++] = (unsigned char)n;
    }
    memset(frame + at, 0, 4);
    at += 4;
    memcpy(frame + at, text, n);
    request_len = at + n;
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SECONDS "
                        "persistent|connect|websocket REQUEST [INFLIGHT]\n", argv[0]);
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &server.sin_addr);
    snprintf(host_header, sizeof host_header, "%s:%s", argv[1], argv[2]);
    int connections = atoi(argv[3]);
    double seconds = atof(argv[4]);
    mode = strcmp(argv[5], "connect") == 0 ? CONNECT :
           strcmp(argv[5], "websocket") == 0 ? WEBSOCKET : PERSISTENT;
    if (argc == 8) inflight = atoi(argv[7]);
    if (inflight < 1 || inflight > MAX_INFLIGHT || (mode == CONNECT && inflight != 1)) {
        fprintf(stderr, "INFLIGHT must be 1..%d (1 with connect)\n", MAX_INFLIGHT);
        return 2;
    }
    build_request(argv[6]);
#ifdef LOADGEN_TLS
    if (mode == WEBSOCKET) {
        fprintf(stderr, "the TLS build speaks persistent and connect only\n");
        return 2;
    }
    tls_context = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(tls_context, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(tls_context, SSL_SESS_CACHE_OFF);
#endif
    histogram = calloc(MAX_US + 1, sizeof *histogram);
    run_seconds = (int)seconds; /* whole seconds only: the last partial one is not judged */
    per_second = calloc((size_t)connections * (run_seconds ? run_seconds : 1), sizeof *per_second);
    slot_t *slots = calloc((size_t)connections, sizeof *slots);
    epfd = epoll_create1(0);

    for (int i = 0; i < connections; i++) {
        slots[i].fd = -1;
        for (int k = 0; k < inflight; k++)
            if (send_request(&slots[i], i) < 0) { errors++; drop(&slots[i]); break; }
    }
    double start = now(), deadline = start + seconds;
    started_at = start;
    struct epoll_event events[512];
    unsigned char buffer[65536];
    while (now() < deadline) {
        int n = epoll_wait(epfd, events, 512, 100);
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            slot_t *slot = &slots[i];
            /* TLS may hold more decrypted records than one read returns, and
               epoll would not report them again: read until nothing is ready. */
            for (;;) {
                ssize_t got = receive(slot, buffer, sizeof buffer);
                if (got == -2) break;
                int replies = got > 0 ? take_replies(slot, buffer, (size_t)got) : -1;
                if (replies < 0) {
                    errors++;
                    drop(slot);
                    break; /* reopened below */
                }
                for (int r = 0; r < replies && slot->fd >= 0; r++) {
                    record_reply(slot, i);
                    if (mode == CONNECT) drop(slot);
                    if (send_request(slot, i) < 0) { errors++; drop(slot); break; }
                }
                if (slot->fd < 0 || mode == CONNECT || !TLS_BUILD) break;
            }
        }
        /* Slots whose connection failed or closed start over here. */
        for (int i = 0; i < connections; i++) {
            if (slots[i].fd >= 0) continue;
            slots[i].count = 0;
            for (int k = 0; k < inflight; k++)
                if (send_request(&slots[i], i) < 0) { errors++; drop(&slots[i]); break; }
        }
    }
    double elapsed = now() - start;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 +
                 usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    long starved = 0;
    for (int i = 0; i < connections; i++)
        for (int second = 0; second < run_seconds; second++)
            if (!per_second[(size_t)i * run_seconds + second]) { starved++; break; }
    printf("{\"count\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"p50_us\": %ld, "
           "\"p99_us\": %ld, \"cpu_seconds\": %.3f, \"starved\": %ld}\n",
           count, errors, elapsed, percentile(0.50), percentile(0.99), cpu, starved);
    return 0;
}
