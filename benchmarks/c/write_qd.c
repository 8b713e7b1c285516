/*
 * write_qd: the write groups' workload in C with liburing, the machine's limit for those groups.
 *
 *   write_qd PATH MODE BLOCK QD NBATCHES OFFSETS NPOOL POOL ROUNDS WARMUP ENTRIES
 *
 * OFFSETS holds NBATCHES x QD file offsets (native uint64), the batches the Python contenders
 * write; POOL holds NPOOL x QD blocks of BLOCK bytes, this contender's data.  Round j writes
 * batch j % NBATCHES from pool entry j % NPOOL: block k of the entry goes to offset k of the
 * batch, QD writes in flight at once (QD SQEs, one io_uring_submit_and_wait), each checked for
 * a full byte count.  MODE is one of:
 *
 *   none       nothing more (the writes land in the page cache)
 *   fdatasync  then one IORING_OP_FSYNC with IORING_FSYNC_DATASYNC, submitted after the writes
 *              completed, checked for 0
 *   odsync     PATH is opened with O_DSYNC: each write is durable when it completes
 *
 * Round 0 is a check, then WARMUP untimed rounds, then ROUNDS timed ones.  The caller replays
 * the same rounds into its copy of the file and compares the file with it afterwards (so every
 * write is checked where it landed).  The ring has ENTRIES SQ entries and no setup flags.  Prints
 * one line:
 *
 *   ops_per_round=QD rounds=R rounds_done=D round_median_ns=M round_mean_ns=A
 *
 * (rounds_done counts every round, the check and the warm-up included) and exits 0, or prints
 * what went wrong and exits 1.
 */
#define _GNU_SOURCE
#define BENCH_PROG "write_qd"
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include "bench.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Wait for `count` CQEs; each must have user_data below `count` (once) and result `want`. */
static int reap(struct io_uring *ring, struct io_uring_cqe **cqes, unsigned count, int want)
{
    unsigned done = 0;
    uint64_t seen = 0;
    while (done < count) {
        unsigned got = io_uring_peek_batch_cqe(ring, cqes, count - done);
        if (got == 0) {
            struct io_uring_cqe *cqe;
            int ret = io_uring_wait_cqe_nr(ring, &cqe, count - done);
            if (ret < 0) {
                fprintf(stderr, "write_qd: io_uring_wait_cqe_nr: %s\n", strerror(-ret));
                return -1;
            }
            continue;
        }
        for (unsigned i = 0; i < got; i++) {
            uint64_t k = cqes[i]->user_data;
            int res = cqes[i]->res;
            if (k >= count || (seen >> k) & 1) {
                fprintf(stderr, "write_qd: unexpected user_data %llu\n", (unsigned long long)k);
                return -1;
            }
            seen |= 1ULL << k;
            if (res != want) {
                fprintf(stderr, "write_qd: request %llu returned %d (%s)\n",
                        (unsigned long long)k, res, res < 0 ? strerror(-res) : "short write");
                return -1;
            }
        }
        io_uring_cq_advance(ring, got);
        done += got;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 12) {
        fprintf(stderr, "usage: %s PATH none|fdatasync|odsync BLOCK QD NBATCHES OFFSETS NPOOL POOL "
                        "ROUNDS WARMUP ENTRIES\n", argv[0]);
        return 2;
    }
    const char *mode = argv[2];
    int datasync = strcmp(mode, "fdatasync") == 0, odsync = strcmp(mode, "odsync") == 0;
    if (!datasync && !odsync && strcmp(mode, "none") != 0) {
        fprintf(stderr, "write_qd: MODE must be none, fdatasync or odsync, got %s\n", mode);
        return 2;
    }
    unsigned block = (unsigned)arg(argv[3], "BLOCK"), qd = (unsigned)arg(argv[4], "QD");
    long nbatches = arg(argv[5], "NBATCHES"), npool = arg(argv[7], "NPOOL");
    long rounds = arg(argv[9], "ROUNDS"), warmup = arg(argv[10], "WARMUP");
    unsigned entries = (unsigned)arg(argv[11], "ENTRIES");
    if (qd == 0 || qd > 64 || qd > entries || block == 0 || nbatches == 0 || npool == 0 ||
        rounds == 0) {
        fprintf(stderr, "write_qd: need 0 < QD <= min(64, ENTRIES), BLOCK, NBATCHES, NPOOL, "
                        "ROUNDS > 0\n");
        return 2;
    }
    uint64_t *offsets = load(argv[6], (size_t)nbatches * qd * sizeof(uint64_t));
    char *pool = load(argv[8], (size_t)npool * qd * block);

    int fd = open(argv[1], O_WRONLY | (odsync ? O_DSYNC : 0));
    if (fd < 0) {
        fprintf(stderr, "write_qd: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    struct io_uring ring;
    int ret = io_uring_queue_init(entries, &ring, 0);
    if (ret < 0) {
        fprintf(stderr, "write_qd: io_uring_queue_init: %s\n", strerror(-ret));
        return 1;
    }
    struct io_uring_cqe **cqes = calloc(qd, sizeof(*cqes));
    double *times = calloc(rounds, sizeof(*times));
    if (!cqes || !times) {
        fprintf(stderr, "write_qd: out of memory\n");
        return 1;
    }
    long total_rounds = 1 + warmup + rounds;
    for (long r = 0; r < total_rounds; r++) {
        const uint64_t *offs = offsets + (r % nbatches) * qd;
        const char *data = pool + (size_t)(r % npool) * qd * block;
        double t0 = now_ns();
        for (unsigned k = 0; k < qd; k++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            if (!sqe) {
                fprintf(stderr, "write_qd: the SQ is full\n");
                return 1;
            }
            io_uring_prep_write(sqe, fd, data + (size_t)k * block, block, offs[k]);
            sqe->user_data = k;
        }
        ret = io_uring_submit_and_wait(&ring, qd);
        if (ret < 0) {
            fprintf(stderr, "write_qd: io_uring_submit_and_wait: %s\n", strerror(-ret));
            return 1;
        }
        if (reap(&ring, cqes, qd, (int)block) < 0)
            return 1;
        if (datasync) {
            /* After the writes completed, so it covers all of them (no IOSQE_IO_DRAIN needed). */
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
            sqe->user_data = 0;
            ret = io_uring_submit_and_wait(&ring, 1);
            if (ret < 0) {
                fprintf(stderr, "write_qd: io_uring_submit_and_wait: %s\n", strerror(-ret));
                return 1;
            }
            if (reap(&ring, cqes, 1, 0) < 0)
                return 1;
        }
        if (r > warmup)
            times[r - warmup - 1] = now_ns() - t0;
    }
    double total = 0;
    for (long r = 0; r < rounds; r++)
        total += times[r];
    qsort(times, rounds, sizeof(*times), cmp_double);
    double median = rounds % 2 ? times[rounds / 2] : (times[rounds / 2 - 1] + times[rounds / 2]) / 2;
    printf("ops_per_round=%u rounds=%ld rounds_done=%ld round_median_ns=%.1f round_mean_ns=%.1f\n",
           qd, rounds, total_rounds, median, total / rounds);
    io_uring_queue_exit(&ring);
    close(fd);
    return 0;
}
