/*
 * nop_batch: the nop-batchN workload in C with liburing, the machine's limit for that group.
 *
 *   nop_batch BATCH ROUNDS ITERATIONS WARMUP ENTRIES
 *
 * One call: queue BATCH NOPs (user_data 0..BATCH-1), io_uring_submit_and_wait for all of them,
 * reap them with io_uring_peek_batch_cqe, check that every result is 0 and that the user_data
 * values sum to 0+1+...+BATCH-1.  A timed round is ITERATIONS calls, as pytest-benchmark's
 * pedantic(iterations=...) does for the Python contenders; WARMUP untimed rounds come first.
 * The ring has ENTRIES SQ entries and no setup flags, like the Python contenders' rings.
 * Prints one line, times being per call (one batch):
 *
 *   ops_per_round=B rounds=R round_median_ns=M round_mean_ns=A
 *
 * and exits 0, or prints what went wrong and exits 1.
 */
#define _GNU_SOURCE
#define BENCH_PROG "nop_batch"
#include <liburing.h>
#include "bench.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* One batch; returns 0, or -1 after printing what went wrong. */
static int one_batch(struct io_uring *ring, unsigned batch, struct io_uring_cqe **cqes)
{
    for (unsigned i = 0; i < batch; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe) {
            fprintf(stderr, "nop_batch: the SQ is full\n");
            return -1;
        }
        io_uring_prep_nop(sqe);
        sqe->user_data = i;
    }
    int ret = io_uring_submit_and_wait(ring, batch);
    if (ret < 0) {
        fprintf(stderr, "nop_batch: io_uring_submit_and_wait: %s\n", strerror(-ret));
        return -1;
    }
    unsigned done = 0;
    unsigned long long sum = 0;
    while (done < batch) {
        unsigned got = io_uring_peek_batch_cqe(ring, cqes, batch - done);
        if (got == 0) {
            /* not reached in practice: submit_and_wait returned with all of them posted */
            struct io_uring_cqe *cqe;
            ret = io_uring_wait_cqe_nr(ring, &cqe, batch - done);
            if (ret < 0) {
                fprintf(stderr, "nop_batch: io_uring_wait_cqe_nr: %s\n", strerror(-ret));
                return -1;
            }
            continue;
        }
        for (unsigned j = 0; j < got; j++) {
            if (cqes[j]->res != 0) {
                fprintf(stderr, "nop_batch: a NOP returned %d\n", cqes[j]->res);
                return -1;
            }
            sum += cqes[j]->user_data;
        }
        io_uring_cq_advance(ring, got);
        done += got;
    }
    if (sum != (unsigned long long)batch * (batch - 1) / 2) {
        fprintf(stderr, "nop_batch: user_data values sum to %llu, not %u*%u/2\n", sum, batch,
                batch - 1);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s BATCH ROUNDS ITERATIONS WARMUP ENTRIES\n", argv[0]);
        return 2;
    }
    unsigned batch = (unsigned)arg(argv[1], "BATCH");
    long rounds = arg(argv[2], "ROUNDS"), iterations = arg(argv[3], "ITERATIONS");
    long warmup = arg(argv[4], "WARMUP");
    unsigned entries = (unsigned)arg(argv[5], "ENTRIES");
    if (batch == 0 || batch > entries || rounds == 0 || iterations == 0) {
        fprintf(stderr, "nop_batch: need 0 < BATCH <= ENTRIES, ROUNDS > 0, ITERATIONS > 0\n");
        return 2;
    }
    struct io_uring ring;
    int ret = io_uring_queue_init(entries, &ring, 0);
    if (ret < 0) {
        fprintf(stderr, "nop_batch: io_uring_queue_init: %s\n", strerror(-ret));
        return 1;
    }
    struct io_uring_cqe **cqes = calloc(batch, sizeof(*cqes));
    double *times = calloc(rounds, sizeof(*times));
    if (!cqes || !times) {
        fprintf(stderr, "nop_batch: out of memory\n");
        return 1;
    }
    for (long r = 0; r < warmup + rounds; r++) {
        double t0 = now_ns();
        for (long i = 0; i < iterations; i++)
            if (one_batch(&ring, batch, cqes) < 0)
                return 1;
        if (r >= warmup)
            times[r - warmup] = (now_ns() - t0) / iterations;
    }
    double total = 0;
    for (long r = 0; r < rounds; r++)
        total += times[r];
    qsort(times, rounds, sizeof(*times), cmp_double);
    double median = rounds % 2 ? times[rounds / 2] : (times[rounds / 2 - 1] + times[rounds / 2]) / 2;
    printf("ops_per_round=%u rounds=%ld round_median_ns=%.1f round_mean_ns=%.1f\n", batch, rounds,
           median, total / rounds);
    io_uring_queue_exit(&ring);
    free(cqes);
    free(times);
    return 0;
}
