/* What every benchmark program in benchmarks/c shares: a clock, argument parsing, loading the
 * input files the Python side wrote, and the median of the timed rounds.  Each program defines
 * BENCH_PROG (its name, for messages) before including this file. */
#ifndef SAFERRING_BENCH_H
#define SAFERRING_BENCH_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* A non-negative integer argument, or exit status 2 naming it. */
static inline long arg(const char *text, const char *what)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, BENCH_PROG ": %s must be a non-negative integer, got %s\n", what, text);
        exit(2);
    }
    return v;
}

/* The first `size` bytes of `path` in page-aligned memory (like the Python contenders' buffers),
 * or exit status 1. */
static inline void *load(const char *path, size_t size)
{
    void *data;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || posix_memalign(&data, 4096, size) != 0) {
        fprintf(stderr, BENCH_PROG ": %s: %s\n", path, fd < 0 ? strerror(errno) : "out of memory");
        exit(1);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, (char *)data + got, size - got);
        if (n <= 0) {
            fprintf(stderr, BENCH_PROG ": %s holds fewer than %zu bytes\n", path, size);
            exit(1);
        }
        got += n;
    }
    close(fd);
    return data;
}

#endif
