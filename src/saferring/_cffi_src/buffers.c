/* Kernel-managed buffers: registered (fixed) buffers and provided buffer rings.

   Python owns every byte here (page-aligned anonymous mmaps, one per buffer, so that each
   buffer's outstanding memoryviews can be counted on its own) and keeps it alive for as long as
   the kernel may use it; these functions only hand addresses to the kernel.  Written against the
   kernel ABI where liburing 2.3 lacks a helper.  Linked into the same module as uring.c. */

#include <stdlib.h>
#include <sys/uio.h>

/* IORING_REGISTER_BUFFERS: one iovec per buffer, all `size` bytes.  The kernel pins the pages
   (accounted against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK: -ENOMEM past it). */
int sr_register_buffers(sr_ring *r, const uint64_t *addrs, unsigned size, unsigned n)
{
    struct iovec *iov;
    unsigned i;
    int usable = sr_usable(r), ret;

    if (usable)
        return usable;
    iov = calloc(n ? n : 1, sizeof(*iov));
    if (iov == NULL)
        return -ENOMEM;
    for (i = 0; i < n; i++) {
        iov[i].iov_base = (void *)(uintptr_t)addrs[i];
        iov[i].iov_len = size;
    }
    ret = io_uring_register_buffers(&r->ring, iov, n);
    free(iov);
    return ret;
}

int sr_unregister_buffers(sr_ring *r)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_unregister_buffers(&r->ring);
}

/* IORING_(UN)REGISTER_PBUF_RING (22/23, Linux 5.19).  Older kernels answer -EINVAL: the caller
   falls back to IORING_OP_PROVIDE_BUFFERS.  The ring memory must be page-aligned and stay
   mapped until it is unregistered or the ring exits. */
struct sr_buf_reg {
    uint64_t ring_addr;
    uint32_t ring_entries;
    uint16_t bgid;
    uint16_t flags;
    uint64_t resv[3];
};

int sr_register_buf_ring(sr_ring *r, uint64_t ring_addr, unsigned entries, unsigned bgid,
                         unsigned flags)
{
    struct sr_buf_reg reg;

    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = ring_addr;
    reg.ring_entries = entries;
    reg.bgid = (uint16_t)bgid;
    reg.flags = (uint16_t)flags; /* IOU_PBUF_RING_INC (2, Linux 6.12): -EINVAL before */
    return sr_register_raw(r, 22 /* IORING_REGISTER_PBUF_RING */, &reg, 1);
}

int sr_unregister_buf_ring(sr_ring *r, unsigned bgid)
{
    struct sr_buf_reg reg;

    memset(&reg, 0, sizeof(reg));
    reg.bgid = (uint16_t)bgid;
    return sr_register_raw(r, 23 /* IORING_UNREGISTER_PBUF_RING */, &reg, 1);
}

/* Hand buffers `bids[0..n)` (each `size` bytes at addrs[bid]) to the kernel through a buffer
   ring of `mask + 1` entries: write the entries past the tail, then publish the new tail with a
   release store, as the kernel reads the entries only up to the tail it sees. */
void sr_buf_ring_provide(uint64_t ring_addr, unsigned mask, const uint64_t *addrs, unsigned size,
                         const uint16_t *bids, unsigned n)
{
    struct io_uring_buf_ring *br = (struct io_uring_buf_ring *)(uintptr_t)ring_addr;
    unsigned i;

    for (i = 0; i < n; i++)
        io_uring_buf_ring_add(br, (void *)(uintptr_t)addrs[bids[i]], size, bids[i], (int)mask,
                              (int)i);
    io_uring_buf_ring_advance(br, (int)n);
}

/* One buffer back on the ring (the common case: a receive's buffer released by its owner). */
void sr_buf_ring_provide_one(uint64_t ring_addr, unsigned mask, uint64_t addr, unsigned size,
                             unsigned bid)
{
    struct io_uring_buf_ring *br = (struct io_uring_buf_ring *)(uintptr_t)ring_addr;

    io_uring_buf_ring_add(br, (void *)(uintptr_t)addr, size, (unsigned short)bid, (int)mask, 0);
    io_uring_buf_ring_advance(br, 1);
}

/* A batch of fixed-buffer reads or writes: member m uses registered buffer index[m] (at
   addrs[m], `len` bytes) and file offset offs[m].  Shaped like sr_prep_rw_blocks. */
int sr_prep_fixed_blocks(sr_ring *r, sr_batch *b, unsigned count, int opcode, int fd,
                         const uint64_t *addrs, const uint16_t *index, unsigned len,
                         const uint64_t *offs)
{
    unsigned i;
    int err = 0;

    for (i = 0; i < count && b->prepared < b->n; i++) {
        unsigned m = b->prepared;
        struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);
        if (!sqe)
            break;
        io_uring_prep_rw(opcode, sqe, fd, (void *)(uintptr_t)addrs[m], len, offs[m]);
        sqe->buf_index = index[m];
        sr_finish_sqe(r, sqe, sr_member_ud(b, m), b->ud);
        b->prepared++;
    }
    return i ? (int)i : err;
}
