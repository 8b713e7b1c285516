/*
 * read_qd: the read groups' workload in C with liburing, the machine's limit for those groups.
 *
 *   read_qd PATH DIRECT FIXED BLOCK QD NBATCHES OFFSETS PREFIXES ROUNDS WARMUP FINAL ENTRIES
 *
 * OFFSETS holds NBATCHES x QD file offsets (native uint64), the same batches the Python
 * contenders read; PREFIXES holds the 8 bytes the file has at each of those offsets.  Round j
 * reads batch j % NBATCHES: QD reads of BLOCK bytes, all in flight at once (QD SQEs, one
 * io_uring_submit_and_wait), each into its own page-aligned buffer, then checks every read's
 * byte count, its first 8 bytes against PREFIXES and that each of the QD user_data values came
 * back once.  DIRECT=1 opens PATH with O_DIRECT; FIXED=1 registers the QD buffers
 * (io_uring_register_buffers) and reads with READ_FIXED.  Round 0 is a check, then WARMUP
 * untimed rounds, then ROUNDS timed ones.  Finally the buffers are zeroed, the last batch is read
 * once more and the QD blocks are written to FINAL, where the caller compares them in full
 * with the file.  The ring has ENTRIES SQ entries and no setup flags.  Prints one line:
 *
 *   ops_per_round=QD rounds=R round_median_ns=M round_mean_ns=A
 *
 * and exits 0, or prints what went wrong and exits 1.
 */
#define _GNU_SOURCE
#define BENCH_PROG "read_qd"
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include "bench.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct job {
    struct io_uring ring;
    int fd, fixed;
    unsigned block, qd;
    char **bufs;
    struct io_uring_cqe **cqes;
};

/* Read one batch and check it; returns 0, or -1 after printing what went wrong. */
static int one_round(struct job *j, const uint64_t *offs, const unsigned char *prefixes)
{
    for (unsigned k = 0; k < j->qd; k++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&j->ring);
        if (!sqe) {
            fprintf(stderr, "read_qd: the SQ is full\n");
            return -1;
        }
        if (j->fixed)
            io_uring_prep_read_fixed(sqe, j->fd, j->bufs[k], j->block, offs[k], (int)k);
        else
            io_uring_prep_read(sqe, j->fd, j->bufs[k], j->block, offs[k]);
        sqe->user_data = k;
    }
    int ret = io_uring_submit_and_wait(&j->ring, j->qd);
    if (ret < 0) {
        fprintf(stderr, "read_qd: io_uring_submit_and_wait: %s\n", strerror(-ret));
        return -1;
    }
    unsigned done = 0;
    uint64_t seen = 0;  /* QD <= 64: one bit per read */
    while (done < j->qd) {
        unsigned got = io_uring_peek_batch_cqe(&j->ring, j->cqes, j->qd - done);
        if (got == 0) {
            struct io_uring_cqe *cqe;
            ret = io_uring_wait_cqe_nr(&j->ring, &cqe, j->qd - done);
            if (ret < 0) {
                fprintf(stderr, "read_qd: io_uring_wait_cqe_nr: %s\n", strerror(-ret));
                return -1;
            }
            continue;
        }
        for (unsigned i = 0; i < got; i++) {
            struct io_uring_cqe *cqe = j->cqes[i];
            uint64_t k = cqe->user_data;
            if (k >= j->qd || (seen >> k) & 1) {
                fprintf(stderr, "read_qd: unexpected user_data %llu\n", (unsigned long long)k);
                return -1;
            }
            seen |= 1ULL << k;
            if (cqe->res != (int)j->block) {
                fprintf(stderr, "read_qd: read %llu returned %d (%s)\n", (unsigned long long)k,
                        cqe->res, cqe->res < 0 ? strerror(-cqe->res) : "short read");
                return -1;
            }
            if (memcmp(j->bufs[k], prefixes + 8 * k, 8) != 0) {
                fprintf(stderr, "read_qd: read %llu at offset %llu: wrong data\n",
                        (unsigned long long)k, (unsigned long long)offs[k]);
                return -1;
            }
        }
        io_uring_cq_advance(&j->ring, got);
        done += got;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 13) {
        fprintf(stderr, "usage: %s PATH DIRECT FIXED BLOCK QD NBATCHES OFFSETS PREFIXES ROUNDS "
                        "WARMUP FINAL ENTRIES\n", argv[0]);
        return 2;
    }
    struct job j = {0};
    int direct = (int)arg(argv[2], "DIRECT");
    j.fixed = (int)arg(argv[3], "FIXED");
    j.block = (unsigned)arg(argv[4], "BLOCK");
    j.qd = (unsigned)arg(argv[5], "QD");
    long nbatches = arg(argv[6], "NBATCHES");
    long rounds = arg(argv[9], "ROUNDS"), warmup = arg(argv[10], "WARMUP");
    unsigned entries = (unsigned)arg(argv[12], "ENTRIES");
    if (j.qd == 0 || j.qd > 64 || j.qd > entries || j.block == 0 || nbatches == 0 || rounds == 0) {
        fprintf(stderr, "read_qd: need 0 < QD <= min(64, ENTRIES), BLOCK, NBATCHES, ROUNDS > 0\n");
        return 2;
    }
    uint64_t *offsets = load(argv[7], (size_t)nbatches * j.qd * sizeof(uint64_t));
    unsigned char *prefixes = load(argv[8], (size_t)nbatches * j.qd * 8);

    j.fd = open(argv[1], O_RDONLY | (direct ? O_DIRECT : 0));
    if (j.fd < 0) {
        fprintf(stderr, "read_qd: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    int ret = io_uring_queue_init(entries, &j.ring, 0);
    if (ret < 0) {
        fprintf(stderr, "read_qd: io_uring_queue_init: %s\n", strerror(-ret));
        return 1;
    }
    j.bufs = calloc(j.qd, sizeof(*j.bufs));
    j.cqes = calloc(j.qd, sizeof(*j.cqes));
    struct iovec *vecs = calloc(j.qd, sizeof(*vecs));
    double *times = calloc(rounds, sizeof(*times));
    if (!j.bufs || !j.cqes || !vecs || !times) {
        fprintf(stderr, "read_qd: out of memory\n");
        return 1;
    }
    for (unsigned k = 0; k < j.qd; k++) {
        /* page-aligned: O_DIRECT needs aligned memory, and every contender reads into pages */
        if (posix_memalign((void **)&j.bufs[k], 4096, j.block) != 0) {
            fprintf(stderr, "read_qd: out of memory\n");
            return 1;
        }
        memset(j.bufs[k], 0, j.block);
        vecs[k].iov_base = j.bufs[k];
        vecs[k].iov_len = j.block;
    }
    if (j.fixed) {
        ret = io_uring_register_buffers(&j.ring, vecs, j.qd);
        if (ret < 0) {
            fprintf(stderr, "read_qd: io_uring_register_buffers: %s\n", strerror(-ret));
            return 1;
        }
    }
    for (long r = 0; r < 1 + warmup + rounds; r++) {
        long b = r % nbatches;
        double t0 = now_ns();
        if (one_round(&j, offsets + b * j.qd, prefixes + b * j.qd * 8) < 0)
            return 1;
        if (r > warmup)
            times[r - warmup - 1] = now_ns() - t0;
    }

    /* The final round, into zeroed buffers, written out for a full comparison by the caller. */
    for (unsigned k = 0; k < j.qd; k++)
        memset(j.bufs[k], 0, j.block);
    long last = nbatches - 1;
    if (one_round(&j, offsets + last * j.qd, prefixes + last * j.qd * 8) < 0)
        return 1;
    FILE *out = fopen(argv[11], "wb");
    if (!out) {
        fprintf(stderr, "read_qd: %s: %s\n", argv[11], strerror(errno));
        return 1;
    }
    for (unsigned k = 0; k < j.qd; k++)
        if (fwrite(j.bufs[k], 1, j.block, out) != j.block) {
            fprintf(stderr, "read_qd: writing %s failed\n", argv[11]);
            return 1;
        }
    if (fclose(out) != 0) {
        fprintf(stderr, "read_qd: closing %s: %s\n", argv[11], strerror(errno));
        return 1;
    }

    double total = 0;
    for (long r = 0; r < rounds; r++)
        total += times[r];
    qsort(times, rounds, sizeof(*times), cmp_double);
    double median = rounds % 2 ? times[rounds / 2] : (times[rounds / 2 - 1] + times[rounds / 2]) / 2;
    printf("ops_per_round=%u rounds=%ld round_median_ns=%.1f round_mean_ns=%.1f\n", j.qd, rounds,
           median, total / rounds);
    if (j.fixed)
        io_uring_unregister_buffers(&j.ring);
    io_uring_queue_exit(&j.ring);
    close(j.fd);
    return 0;
}
