/*
 * echo_load: a closed-loop load generator for the TCP echo benchmarks.
 *
 *   echo_load HOST PORT CONNECTIONS MESSAGE_SIZE TOTAL_MESSAGES
 *
 * Opens CONNECTIONS connections; each sends one MESSAGE_SIZE message, waits until the whole
 * message has come back, checks every byte, and sends the next, until TOTAL_MESSAGES round
 * trips have completed across all connections.  Prints one line:
 *
 *   messages=N seconds=S msgs_per_s=R p50_us=A p99_us=B
 *
 * and exits 0, or prints what went wrong and exits 1 (a wrong byte, a closed connection).
 * Written in C with epoll so that the generator is never the bottleneck being measured.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    unsigned long seq;   /* message number on this connection: seeds its bytes */
    size_t sent, got;
    double started;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fill(unsigned char *buf, size_t n, int id, unsigned long seq)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)(id * 131 + seq * 7 + i);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS MESSAGE_SIZE TOTAL_MESSAGES\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    long total = atol(argv[5]);
    if (nconn <= 0 || size == 0 || total <= 0) {
        fprintf(stderr, "echo_load: bad arguments\n");
        return 2;
    }
    struct conn *c = calloc(nconn, sizeof(*c));
    unsigned char *out = malloc(size), *in = malloc(size), *want = malloc(size);
    double *lat = malloc(sizeof(double) * total);
    int ep = epoll_create1(0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            perror("echo_load: connect");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        c[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    long done = 0, started = 0;
    double t0 = now();
    /* Every connection starts with one message in flight (blocking sends: messages are small
       and the peer reads them). */
    for (int i = 0; i < nconn && started < total; i++, started++) {
        fill(out, size, i, 0);
        c[i].started = now();
        if (send(c[i].fd, out, size, 0) != (ssize_t)size) {
            perror("echo_load: send");
            return 1;
        }
    }
    struct epoll_event evs[256];
    while (done < total) {
        int n = epoll_wait(ep, evs, 256, 10000);
        if (n <= 0) {
            fprintf(stderr, "echo_load: no progress for 10 s (%ld of %ld done)\n", done, total);
            return 1;
        }
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            struct conn *cc = &c[i];
            ssize_t r = recv(cc->fd, in, size - cc->got, MSG_DONTWAIT);
            if (r == 0) {
                fprintf(stderr, "echo_load: connection %d closed by the server\n", i);
                return 1;
            }
            if (r < 0) {
                if (errno == EAGAIN)
                    continue;
                perror("echo_load: recv");
                return 1;
            }
            fill(want, size, i, cc->seq);
            if (memcmp(in, want + cc->got, (size_t)r) != 0) {
                fprintf(stderr, "echo_load: wrong bytes on connection %d, message %lu\n", i, cc->seq);
                return 1;
            }
            cc->got += (size_t)r;
            if (cc->got < size)
                continue;
            lat[done++] = now() - cc->started;
            cc->got = 0;
            cc->seq++;
            if (started < total) {
                started++;
                fill(out, size, i, cc->seq);
                cc->started = now();
                if (send(cc->fd, out, size, 0) != (ssize_t)size) {
                    perror("echo_load: send");
                    return 1;
                }
            }
        }
    }
    double el = now() - t0;
    qsort(lat, total, sizeof(double), cmp_double);
    printf("messages=%ld seconds=%.6f msgs_per_s=%.0f p50_us=%.1f p99_us=%.1f\n", done, el,
           done / el, lat[total / 2] * 1e6, lat[(long)(total * 0.99)] * 1e6);
    for (int i = 0; i < nconn; i++)
        close(c[i].fd);
    return 0;
}
