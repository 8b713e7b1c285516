/* Behaviour probes: kernel features that the opcode probe (IORING_REGISTER_PROBE) cannot show,
   because they are flags or sub-commands of an opcode it already reports.  Each probe runs the
   smallest real request on a private throwaway ring and reads the kernel's answer; none touches a
   user's ring.  Every request here completes without waiting on anything outside the probe, and
   the wait is bounded all the same.

   Returns 1 (supported), 0 (the kernel refused it as unknown), or -errno when the probe itself
   could not run (no io_uring, no memory...).  Linked after uring.c and buffers.c. */

#include <errno.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <liburing.h>

#define SR_CAP_TIMEOUT_MULTISHOT 1
#define SR_CAP_SOCKET_COMMANDS 2
#define SR_CAP_SYNC_CANCEL 3
#define SR_CAP_BUF_RING 4
#define SR_CAP_RECV_MULTISHOT 5
#define SR_CAP_BUF_RING_INC 6

#ifndef IORING_TIMEOUT_MULTISHOT
#define IORING_TIMEOUT_MULTISHOT (1U << 6)
#endif

/* Submit the one SQE already prepared on `ring` and return its CQE's res (or -errno). */
static int sr_probe_one(struct io_uring *ring, int *res)
{
    struct io_uring_cqe *cqe = NULL;
    struct __kernel_timespec limit = {.tv_sec = 2, .tv_nsec = 0};
    int ret = io_uring_submit(ring);

    if (ret < 0)
        return ret;
    ret = io_uring_wait_cqe_timeout(ring, &cqe, &limit);
    if (ret < 0)
        return ret;
    *res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return 0;
}

/* IORING_TIMEOUT_MULTISHOT came in 6.4; older kernels reject the unknown timeout flag with
   EINVAL before arming anything.  count=1 makes the timeout fire once (res -ETIME) and end. */
static int sr_probe_timeout_multishot(struct io_uring *ring)
{
    struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 1000};
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    int res = 0, ret;

    io_uring_prep_timeout(sqe, &ts, 1, IORING_TIMEOUT_MULTISHOT);
    ret = sr_probe_one(ring, &res);
    if (ret < 0)
        return ret;
    return res == -EINVAL ? 0 : 1;
}

/* Socket commands (IORING_OP_URING_CMD on a socket) came in 6.7: before that a socket's file has
   no uring_cmd handler and the kernel answers EOPNOTSUPP.  SIOCINQ (cmd_op 0) on an unbound UDP
   socket answers 0 at once where it exists. */
static int sr_probe_socket_commands(struct io_uring *ring)
{
    struct io_uring_sqe *sqe;
    int res = 0, ret, fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -errno;
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd, NULL, 0, 0);
    sqe->off = 0; /* cmd_op shares the off field: SOCKET_URING_OP_SIOCINQ */
    ret = sr_probe_one(ring, &res);
    close(fd);
    if (ret < 0)
        return ret;
    return res >= 0 ? 1 : 0;
}

/* IORING_REGISTER_SYNC_CANCEL (register opcode 24) came in 6.0; older kernels reject the
   unknown register opcode with EINVAL.  Cancelling user_data 0 on an empty ring answers ENOENT. */
static int sr_probe_sync_cancel(struct io_uring *ring)
{
    struct sr_sync_cancel_reg reg;
    long ret;

    memset(&reg, 0, sizeof(reg));
    reg.fd = -1;
    ret = syscall(__NR_io_uring_register, ring->ring_fd, 24, &reg, 1);
    return ret < 0 && errno == EINVAL ? 0 : 1;
}

/* Provided buffer rings (IORING_REGISTER_PBUF_RING, 22) came in 5.19; older kernels reject the
   register opcode with EINVAL.  A one-entry ring on a fresh page, unregistered at once. */
static int sr_probe_buf_ring(struct io_uring *ring, unsigned flags)
{
    struct sr_buf_reg reg;
    void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    long ret;
    int err;

    if (mem == MAP_FAILED)
        return -errno;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)mem;
    reg.ring_entries = 1;
    reg.flags = (uint16_t)flags;
    ret = syscall(__NR_io_uring_register, ring->ring_fd, 22, &reg, 1);
    err = errno;
    if (ret >= 0)
        syscall(__NR_io_uring_register, ring->ring_fd, 23, &reg, 1);
    munmap(mem, 4096);
    if (ret >= 0)
        return 1;
    return err == EINVAL ? 0 : -err;
}

/* Multishot recv (IORING_RECV_MULTISHOT in the SQE's ioprio) came in 6.0; older kernels reject
   the flag with EINVAL.  One byte waits on a socketpair and one provided buffer is there to take
   it; the request ends by itself (no buffer left, or end of stream) and its final CQE (no
   IORING_CQE_F_MORE) is awaited.  The buffer is static: it outlives the probe even if the kernel
   were still to hold it. */
static char sr_probe_recv_buf[16];

static int sr_probe_recv_multishot(struct io_uring *ring)
{
    struct io_uring_cqe *cqe;
    struct io_uring_sqe *sqe;
    struct __kernel_timespec limit = {.tv_sec = 2, .tv_nsec = 0};
    int sv[2], res = 0, ret, saw_more = 0, i;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    if (write(sv[1], "x", 1) != 1 || shutdown(sv[1], SHUT_WR) < 0) {
        ret = -errno;
        goto out;
    }
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_provide_buffers(sqe, sr_probe_recv_buf, sizeof(sr_probe_recv_buf), 1, 7, 0);
    ret = sr_probe_one(ring, &res);
    if (ret < 0 || res < 0) {
        ret = ret < 0 ? ret : res;
        goto out;
    }
    sqe = io_uring_get_sqe(ring);
    io_uring_prep_rw(IORING_OP_RECV, sqe, sv[0], NULL, 0, 0);
    sqe->ioprio = 1U << 1; /* IORING_RECV_MULTISHOT */
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 7;
    ret = io_uring_submit(ring);
    if (ret < 0)
        goto out;
    for (i = 0; i < 8; i++) {
        unsigned flags;

        ret = io_uring_wait_cqe_timeout(ring, &cqe, &limit);
        if (ret < 0)
            goto out;
        res = cqe->res;
        flags = cqe->flags;
        io_uring_cqe_seen(ring, cqe);
        if (flags & IORING_CQE_F_MORE) {
            saw_more = 1;
            continue;
        }
        ret = saw_more || res != -EINVAL ? 1 : 0;
        goto out;
    }
    ret = -ETIME;
out:
    close(sv[0]);
    close(sv[1]);
    return ret;
}

int sr_probe_capability(int which)
{
    struct io_uring ring;
    int ret = io_uring_queue_init(4, &ring, 0);

    if (ret < 0)
        return ret;
    switch (which) {
    case SR_CAP_TIMEOUT_MULTISHOT:
        ret = sr_probe_timeout_multishot(&ring);
        break;
    case SR_CAP_SOCKET_COMMANDS:
        ret = sr_probe_socket_commands(&ring);
        break;
    case SR_CAP_SYNC_CANCEL:
        ret = sr_probe_sync_cancel(&ring);
        break;
    case SR_CAP_BUF_RING:
        ret = sr_probe_buf_ring(&ring, 0);
        break;
    case SR_CAP_BUF_RING_INC: /* IOU_PBUF_RING_INC (6.12): EINVAL for the unknown flag before */
        ret = sr_probe_buf_ring(&ring, 2);
        break;
    case SR_CAP_RECV_MULTISHOT:
        ret = sr_probe_recv_multishot(&ring);
        break;
    default:
        ret = -EINVAL;
    }
    io_uring_queue_exit(&ring);
    return ret;
}
