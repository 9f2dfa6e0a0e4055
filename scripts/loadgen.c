/*
 * loadgen: a small epoll load generator for line protocols, used by scripts/bench.
 *
 * Each of CONNECTIONS slots sends REQUEST (one line), waits for one reply line,
 * records the round trip, and sends again, for SECONDS. In "connect" mode each
 * slot opens a new TCP connection per request (the PHP original's pattern).
 * Prints one JSON object: count, errors, elapsed seconds, p50/p99 latency in
 * microseconds, and the CPU seconds this process used, so the reader can see
 * whether the generator itself was the bottleneck.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 * Usage: loadgen HOST PORT CONNECTIONS SECONDS persistent|connect REQUEST_LINE
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

#define MAX_US 2000000 /* latency histogram range: 1 us buckets up to 2 s */

typedef struct {
    int fd;
    double sent_at;
    size_t have; /* bytes of the current reply received so far (up to the newline) */
} slot_t;

static struct sockaddr_in server;
static const char *request;
static size_t request_len;
static int reconnect_each;
static int epfd;
static uint32_t *histogram;
static long count, errors;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_connection(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Blocking connect: on loopback it completes at once, and it keeps the
       code short. The socket is made non-blocking afterwards. */
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static int send_request(slot_t *slot, int index) {
    if (slot->fd < 0) {
        slot->fd = open_connection();
        if (slot->fd < 0) return -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
        epoll_ctl(epfd, EPOLL_CTL_ADD, slot->fd, &ev);
    }
    slot->sent_at = now();
    slot->have = 0;
    /* The request is small: one write fits the socket buffer. */
    if (write(slot->fd, request, request_len) != (ssize_t)request_len) return -1;
    return 0;
}

static void drop(slot_t *slot) {
    if (slot->fd >= 0) {
        /* Close with a reset: connect-per-request would otherwise leave a
           TIME_WAIT socket per request and run out of local ports. */
        struct linger hard = {.l_onoff = 1, .l_linger = 0};
        setsockopt(slot->fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
        epoll_ctl(epfd, EPOLL_CTL_DEL, slot->fd, NULL);
        close(slot->fd);
        slot->fd = -1;
    }
}

static long percentile(double p) {
    long target = (long)(count * p), seen = 0;
    for (long us = 0; us < MAX_US; us++) {
        seen += histogram[us];
        if (seen > target) return us;
    }
    return MAX_US;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SECONDS persistent|connect LINE\n",
                argv[0]);
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &server.sin_addr);
    int connections = atoi(argv[3]);
    double seconds = atof(argv[4]);
    reconnect_each = strcmp(argv[5], "connect") == 0;
    char *line = malloc(strlen(argv[6]) + 2);
    sprintf(line, "%s\n", argv[6]);
    request = line;
    request_len = strlen(line);
    histogram = calloc(MAX_US + 1, sizeof *histogram);
    slot_t *slots = calloc((size_t)connections, sizeof *slots);
    epfd = epoll_create1(0);

    for (int i = 0; i < connections; i++) {
        slots[i].fd = -1;
        if (send_request(&slots[i], i) < 0) errors++;
    }
    double start = now(), deadline = start + seconds;
    struct epoll_event events[512];
    char buffer[65536];
    while (now() < deadline) {
        int n = epoll_wait(epfd, events, 512, 100);
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            slot_t *slot = &slots[i];
            ssize_t got = read(slot->fd, buffer, sizeof buffer);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                errors++;
                drop(slot);
                if (send_request(slot, i) < 0) { errors++; drop(slot); }
                continue;
            }
            if (!memchr(buffer, '\n', (size_t)got)) { slot->have += (size_t)got; continue; }
            long us = (long)((now() - slot->sent_at) * 1e6);
            histogram[us < MAX_US ? us : MAX_US]++;
            count++;
            if (reconnect_each) drop(slot);
            if (send_request(slot, i) < 0) { errors++; drop(slot); }
        }
        /* Slots whose connect failed are retried here. */
        for (int i = 0; i < connections; i++)
            if (slots[i].fd < 0 && send_request(&slots[i], i) < 0) { errors++; drop(&slots[i]); }
    }
    double elapsed = now() - start;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 +
                 usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    printf("{\"count\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"p50_us\": %ld, "
           "\"p99_us\": %ld, \"cpu_seconds\": %.3f}\n",
           count, errors, elapsed, percentile(0.50), percentile(0.99), cpu);
    return 0;
}
