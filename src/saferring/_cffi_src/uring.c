/*
 * saferring's C hot path, compiled into saferring._uring by build_ffi.py.
 *
 * Python pays for every crossing into C (argument conversion, GIL release and re-acquire), so
 * the work that happens once per operation is done here in one call each:
 *   - sr_prep*: take an SQE (flushing the SQ to the kernel when it is full), fill it from the
 *     kernel ABI, stamp its user_data.  Written against the ABI rather than liburing's prep
 *     helpers so that ops newer than the installed liburing still work (the kernel's probe, not
 *     the header, decides what exists).
 *   - sr_reap: submit what is pending, wait for enough completions, and copy every available CQE
 *     into three flat arrays the caller owns, advancing the CQ once.
 *
 * Nothing here allocates or frees memory the kernel may touch: the Python layer owns (pins) all
 * of it and releases it only after the operation's final CQE has been copied out by sr_reap.
 */
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <liburing.h>

/* The installed liburing's version; build_ffi.py passes SR_LIBURING_VERSION_{MAJOR,MINOR} when it
   could read them (pkg-config), liburing >= 2.4 also says so itself. */
#if defined(IO_URING_VERSION_MAJOR)
#define SR_LIBURING_VER_MAJOR IO_URING_VERSION_MAJOR
#define SR_LIBURING_VER_MINOR IO_URING_VERSION_MINOR
#elif defined(SR_LIBURING_VERSION_MAJOR)
#define SR_LIBURING_VER_MAJOR SR_LIBURING_VERSION_MAJOR
#define SR_LIBURING_VER_MINOR SR_LIBURING_VERSION_MINOR
#else
#define SR_LIBURING_VER_MAJOR 0
#define SR_LIBURING_VER_MINOR 0
#endif
#define SR_LIBURING_AT_LEAST(maj, min) \
    (SR_LIBURING_VER_MAJOR > (maj) || (SR_LIBURING_VER_MAJOR == (maj) && SR_LIBURING_VER_MINOR >= (min)))

static const int SR_LIBURING_MAJOR = SR_LIBURING_VER_MAJOR;
static const int SR_LIBURING_MINOR = SR_LIBURING_VER_MINOR;

/* io_uring_get_events() arrived in liburing 2.3; before it, the same syscall by hand. */
#if SR_LIBURING_AT_LEAST(2, 3)
static const int SR_HAS_GET_EVENTS = 1;
#else
static const int SR_HAS_GET_EVENTS = 0;
#endif
#if SR_LIBURING_AT_LEAST(2, 2)
static const int SR_HAS_REGISTER_RING_FD = 1;
#else
static const int SR_HAS_REGISTER_RING_FD = 0;
#endif

/* Kernel ABI values (stable forever once released); older headers may lack the names. */
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_TASKRUN_FLAG
#define IORING_SETUP_TASKRUN_FLAG (1U << 9)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#ifndef IORING_SQ_TASKRUN
#define IORING_SQ_TASKRUN (1U << 2)
#endif
static const unsigned SR_SETUP_SUBMIT_ALL = IORING_SETUP_SUBMIT_ALL;
static const unsigned SR_SETUP_COOP_TASKRUN = IORING_SETUP_COOP_TASKRUN;
static const unsigned SR_SETUP_TASKRUN_FLAG = IORING_SETUP_TASKRUN_FLAG;
static const unsigned SR_SETUP_SINGLE_ISSUER = IORING_SETUP_SINGLE_ISSUER;
static const unsigned SR_SETUP_DEFER_TASKRUN = IORING_SETUP_DEFER_TASKRUN;

#ifndef SR_BUILD_STAMP
#error "build_ffi.py defines SR_BUILD_STAMP (the package version this module was built for)"
#endif

/* A batch: one registry entry on the Python side for n SQEs.  Member i carries the user_data
   SR_UD_BATCH | id << SR_BATCH_INDEX_BITS | i; sr_reap files each member's result into res[i]
   in C and reports the batch to Python once, when its last member's CQE has arrived.  The id is
   looked up in the ring's own table, never trusted as a pointer: a CQE whose user_data merely
   looks like a member (a forged MSG_RING, say) is passed through to Python, which ignores it. */
#define SR_UD_BATCH (1ULL << 63)
#define SR_BATCH_INDEX_BITS 16
#define SR_BATCH_MAX_MEMBERS (1U << SR_BATCH_INDEX_BITS)
#define SR_BATCH_TABLE 4096
#define SR_RES_PENDING INT32_MIN /* never a real res: -errno or a count */

/* Tags in the top bits of a user_data (saferring's own ops count up from 1 and never reach them):
   SR_UD_FLAGS marks an op that needs every CQE with its flags (multishot, zero-copy send: more
   than one CQE per request), SR_UD_MSG a value another ring posted with MSG_RING.  The fast path
   (plain ops, one CQE each) never sees either. */
#define SR_UD_MSG (1ULL << 62)
#define SR_UD_FLAGS (1ULL << 61)
#define SR_UD_TAGS (SR_UD_MSG | SR_UD_FLAGS)

typedef struct {
    uint64_t ud;         /* the batch's own user_data: its key in the Python registry */
    uint64_t id;         /* carried by the members' user_data */
    uint32_t n;
    uint32_t remaining;  /* members whose CQE has not arrived */
    uint32_t prepared;   /* members whose SQE has been written (always a prefix) */
    int32_t first_error; /* the first failing member's res (0: none yet) */
    uint32_t first_error_index;
    int32_t res[];       /* n results, SR_RES_PENDING until the member's CQE arrives */
} sr_batch;

/* Bumped in every forked child.  A ring remembers the generation it was created in; in a child
   every entry point refuses it (-ECHILD) before touching the queues it shares with the parent,
   even when the fork happened in the middle of a ring call (from a finaliser, say). */
static volatile unsigned long sr_fork_generation;
static pthread_once_t sr_atfork_once = PTHREAD_ONCE_INIT;
static void sr_after_fork_child(void) { sr_fork_generation++; }
static void sr_install_atfork(void) { pthread_atfork(NULL, NULL, sr_after_fork_child); }

typedef struct {
    struct io_uring ring;
    uint64_t prepared_ud;
    uint64_t submitted_ud;
    uint64_t n_submitted;
    unsigned sq_entries;
    unsigned cq_entries;
    unsigned setup_flags;
    unsigned features;
    int initialized;
    unsigned sq_mask;
    unsigned last_head; /* SQ head (or flushed tail under SQPOLL) at the last accounting */
    int cq_guard;       /* kernel drops CQEs on overflow (no IORING_FEAT_NODROP, < 5.5) */
    uint64_t n_consumed; /* CQEs taken off the CQ (ours, batch members included) */
    unsigned unacked;    /* CQEs copied out by sr_reap that Python has not taken charge of */
    unsigned long generation; /* sr_fork_generation when the ring was created */
    uint64_t next_batch_id;
    sr_batch *batches[SR_BATCH_TABLE];
    uint64_t n_prepared;
    unsigned n_flagged;  /* CQEs of the last sr_reap that Python must read with their flags */
    unsigned chain_flags; /* IOSQE_IO_LINK or _HARDLINK while a chain is open, else 0 */
    unsigned chain_len;   /* SQEs in the open chain */
    unsigned chain_drain; /* IOSQE_IO_DRAIN for the chain's first SQE */
    struct io_uring_sqe *last_sqe; /* the newest SQE written, for link_timeout and chains */
    uint64_t last_ud;
    unsigned personality; /* registered credentials every new SQE runs with (0: the caller's) */
} sr_ring;

/* 0 if the ring may be driven from here; -EBADF once torn down, -ECHILD in a forked child. */
static inline int sr_usable(const sr_ring *r)
{
    if (!r->initialized)
        return -EBADF;
    if (r->generation != sr_fork_generation)
        return -ECHILD;
    return 0;
}

static inline sr_batch *sr_batch_of(sr_ring *r, uint64_t ud, uint32_t *index)
{
    uint64_t id = (ud & ~SR_UD_BATCH) >> SR_BATCH_INDEX_BITS;
    sr_batch *b = r->batches[id % SR_BATCH_TABLE];

    *index = (uint32_t)(ud & (SR_BATCH_MAX_MEMBERS - 1));
    if (b && b->id == id && *index < b->n)
        return b;
    return NULL;
}

static const char *sr_build_stamp(void) { return SR_BUILD_STAMP; }

static int sr_ring_init(sr_ring *r, unsigned entries, unsigned flags, unsigned sq_thread_idle,
                        unsigned cq_entries)
{
    struct io_uring_params p;
    int ret;

    pthread_once(&sr_atfork_once, sr_install_atfork);
    memset(r, 0, sizeof(*r));
    r->generation = sr_fork_generation;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    p.sq_thread_idle = sq_thread_idle;
    if (cq_entries) {
        p.flags |= IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
    }
    ret = io_uring_queue_init_params(entries, &r->ring, &p);
    if (ret < 0)
        return ret;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->setup_flags = r->ring.flags;
    r->features = p.features;
    r->sq_mask = *r->ring.sq.kring_mask;
    r->cq_guard = !(p.features & IORING_FEAT_NODROP);
    r->last_head = (r->ring.flags & IORING_SETUP_SQPOLL) ? *r->ring.sq.ktail : *r->ring.sq.khead;
    r->initialized = 1;
    return 0;
}

static void sr_ring_exit(sr_ring *r)
{
    if (r->initialized) {
        io_uring_queue_exit(&r->ring);
        r->initialized = 0;
    }
}

/* Fill supported[op] with 1 for every opcode the running kernel's probe reports.  Returns the
   number of opcodes the kernel knows (last_op + 1), or -errno when the kernel has no probe
   (IORING_REGISTER_PROBE came in 5.6). */
static int sr_probe(sr_ring *r, uint8_t *supported, unsigned n)
{
    struct io_uring_probe *probe;
    unsigned op, last;

    if (sr_usable(r))
        return -EBADF;
    probe = io_uring_get_probe_ring(&r->ring);
    if (!probe)
        return -EOPNOTSUPP;
    last = probe->last_op;
    for (op = 0; op < n; op++)
        supported[op] = (op <= last && op < probe->ops_len &&
                         (probe->ops[op].flags & IO_URING_OP_SUPPORTED)) ? 1 : 0;
    io_uring_free_probe(probe);
    return (int)last + 1;
}

/* Record how far the kernel has consumed the SQ.  The kernel takes SQEs strictly in ring order and
   user_data only grows, so "the newest SQE handed over" is a watermark: every op whose user_data is
   at or below it has been submitted.  Reading the consumed slot is safe because nothing prepares a
   new SQE between the submit and this call (the ring has a single owner thread). */
static void sr_account(sr_ring *r)
{
    unsigned head, delta;
    uint64_t ud;

    if (r->ring.flags & IORING_SETUP_SQPOLL)
        head = io_uring_smp_load_acquire(r->ring.sq.ktail); /* flushed = handed over */
    else
        head = io_uring_smp_load_acquire(r->ring.sq.khead);
    delta = head - r->last_head;
    if (!delta)
        return;
    r->last_head = head;
    r->n_submitted += delta;
    ud = r->ring.sq.sqes[(head - 1) & r->sq_mask].user_data;
    if (ud == LIBURING_UDATA_TIMEOUT) {
        /* liburing's own timeout SQE (old kernels, timed waits) is queued after all of ours. */
        r->submitted_ud = r->prepared_ud;
    } else if (ud & SR_UD_BATCH) {
        uint32_t index;
        sr_batch *b = sr_batch_of(r, ud, &index);
        if (b)
            r->submitted_ud = b->ud;
    } else {
        r->submitted_ud = ud & ~SR_UD_TAGS;
    }
}

static int sr_submit(sr_ring *r)
{
    int ret;

    if ((ret = sr_usable(r)) != 0)
        return ret;
    if (r->chain_flags)
        return -EINPROGRESS; /* a half-written chain must not reach the kernel */
    ret = io_uring_submit(&r->ring);
    sr_account(r);
    return ret;
}

/* The SQ filled up while a chain is open: hand the kernel the SQEs queued before the chain's
   first one, and only those.  liburing publishes everything up to sq.sqe_tail, so the tail is
   pulled back to the chain's start for the call and restored after it; the chain's SQEs (the
   last chain_len written: every SQE goes through sr_finish_sqe) stay unpublished.  Returns
   what io_uring_submit returned (0 if nothing before the chain waits for the kernel). */
static int sr_submit_before_chain(sr_ring *r)
{
    struct io_uring_sq *sq = &r->ring.sq;
    unsigned tail = sq->sqe_tail;
    unsigned start = tail - r->chain_len;
    int ret;

    /* Published earlier but not taken (the kernel refused with -EBUSY, say) counts as waiting
       too: io_uring_submit offers those again. */
    if (start == io_uring_smp_load_acquire(sq->khead))
        return 0;
    sq->sqe_tail = start;
    ret = io_uring_submit(&r->ring);
    sq->sqe_tail = tail;
    if (ret > 0 && (r->ring.flags & IORING_SETUP_SQPOLL)) {
        /* The SQ thread takes them in its own time, and IORING_ENTER_SQ_WAIT would not wait:
           the kernel does not see the chain's SQEs, so to it the SQ is not full.  Give the
           thread up to a second (it polls; io_uring_submit woke it if it slept). */
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (io_uring_smp_load_acquire(sq->khead) != start) {
            sched_yield();
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - t0.tv_sec) * 1000000000L + (now.tv_nsec - t0.tv_nsec) >= 1000000000L)
                break;
        }
    }
    sr_account(r);
    return ret;
}

/* SQEs written but not yet handed to the kernel (0 on a torn-down ring): lets the asyncio
   driver see that a completion it just dispatched re-armed a request. */
unsigned sr_sq_pending(sr_ring *r)
{
    if (sr_usable(r) != 0)
        return 0;
    return io_uring_sq_ready(&r->ring);
}

/* An SQE, flushing a full SQ to the kernel first.  NULL with *err set when the kernel would not
   take more (e.g. -EBUSY while its CQ overflow backlog is full): the caller reaps and retries. */
/* How much of the CQ the pre-5.5 guard lets each kind of request use: user requests leave a
   quarter free so that cancel requests (which close() depends on) can always be queued. */
#define SR_LIMIT_USER 0
#define SR_LIMIT_INTERNAL 1

static inline struct io_uring_sqe *sr_get_sqe(sr_ring *r, int *err, int kind)
{
    struct io_uring_sqe *sqe;
    int ret;

    if ((ret = sr_usable(r)) != 0) {
        *err = ret; /* torn down, or a forked child: refuse before touching the queues */
        return NULL;
    }
    /* Before 5.5 a full CQ drops completions, and a dropped completion would leave its op (and
       its pins) in flight forever: never have more requests out than the CQ can hold. */
    if (r->cq_guard) {
        int64_t limit = kind == SR_LIMIT_USER ? r->cq_entries - r->cq_entries / 4 : r->cq_entries;
        if ((int64_t)(r->n_prepared - r->n_consumed) >= limit) {
            *err = r->chain_flags ? -ENOSPC : -EBUSY;
            return NULL;
        }
    }
    r->n_prepared++;
    sqe = io_uring_get_sqe(&r->ring);
    if (sqe)
        return sqe;
    if (r->chain_flags) {
        /* Flushing would hand the kernel half a chain (it would run the part it got as a
           complete chain): only what was queued before the chain may go, and the chain itself
           must fit in the SQ. */
        if (sr_submit_before_chain(r) > 0) {
            sqe = io_uring_get_sqe(&r->ring);
            if (sqe)
                return sqe;
        }
        /* Nothing before the chain, or the kernel would not take it now: the caller cannot
           reap to make room while the chain is open (that would submit half of it). */
        *err = -ENOSPC;
        r->n_prepared--;
        return NULL;
    }
    ret = sr_submit(r);
    if (ret < 0) {
        *err = ret;
        r->n_prepared--;
        return NULL;
    }
    if (r->ring.flags & IORING_SETUP_SQPOLL)
        io_uring_sqring_wait(&r->ring);
    sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        *err = -EBUSY;
        r->n_prepared--;
    }
    return sqe;
}

/* Stamp a written SQE: its user_data, the chain's link flag, and the bookkeeping that rollback
   (prepared_ud), link_timeout and chain_end read. */
static inline void sr_finish_sqe(sr_ring *r, struct io_uring_sqe *sqe, uint64_t ud, uint64_t owner)
{
    sqe->user_data = ud;
    if (r->personality)
        sqe->personality = (uint16_t)r->personality;
    if (r->chain_flags) {
        sqe->flags |= (uint8_t)r->chain_flags;
        if (r->chain_len++ == 0)
            sqe->flags |= (uint8_t)r->chain_drain;
    }
    r->last_sqe = sqe;
    r->last_ud = ud;
    r->prepared_ud = owner;
}

int sr_prep_nop(sr_ring *r, uint64_t ud)
{
    int err = 0;
    struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);

    if (!sqe)
        return err;
    io_uring_prep_rw(IORING_OP_NOP, sqe, -1, NULL, 0, 0);
    sr_finish_sqe(r, sqe, ud, ud);
    return 0;
}

/* Any opcode from the kernel ABI.  op_flags lands in the per-op flags union (rw_flags,
   fsync_flags, open_flags, statx_flags, timeout_flags, ...: one 32-bit field). */
int sr_prep(sr_ring *r, uint64_t ud, int opcode, int fd, const void *addr, unsigned len,
            int64_t off, unsigned op_flags, unsigned sqe_flags)
{
    int err = 0;
    struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);

    if (!sqe)
        return err;
    io_uring_prep_rw(opcode, sqe, fd, addr, len, (uint64_t)off); /* -1: the file position */
    sqe->rw_flags = op_flags;
    sqe->flags = (uint8_t)sqe_flags;
    sr_finish_sqe(r, sqe, ud, ud);
    return 0;
}

/* The kernel ABI's SQE, field by field (include/uapi/linux/io_uring.h; stable once released).
   Written through this layout rather than liburing's struct so that fields newer than the
   installed headers (addr3, optlen, addr_len...) can be filled under their ABI positions. */
struct sr_sqe_abi {
    uint8_t opcode;
    uint8_t flags;
    uint16_t ioprio;
    int32_t fd;
    uint64_t off;       /* off / addr2 / cmd_op */
    uint64_t addr;      /* addr / splice_off_in / {level, optname} */
    uint32_t len;
    uint32_t op_flags;  /* rw_flags, poll32_events, msg_flags, timeout_flags, ... */
    uint64_t user_data;
    uint16_t buf_index; /* buf_index / buf_group */
    uint16_t personality;
    uint32_t file_index; /* splice_fd_in / file_index / optlen / {addr_len, pad} */
    uint64_t addr3;     /* addr3 / optval */
    uint64_t pad2;
};
_Static_assert(sizeof(struct sr_sqe_abi) == 64, "the io_uring SQE is 64 bytes");

/* Any request, every field given: what the safe layer uses for everything but its hot ops. */
int sr_prep_ext(sr_ring *r, uint64_t ud, int opcode, int fd, uint64_t addr, unsigned len,
                uint64_t off, unsigned op_flags, unsigned sqe_flags, unsigned ioprio,
                unsigned buf_index, unsigned file_index, uint64_t addr3, unsigned personality)
{
    int err = 0;
    struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);
    struct sr_sqe_abi *a;

    if (!sqe)
        return err;
    a = (struct sr_sqe_abi *)sqe;
    memset(a, 0, sizeof(*a));
    a->opcode = (uint8_t)opcode;
    a->flags = (uint8_t)sqe_flags;
    a->ioprio = (uint16_t)ioprio;
    a->fd = fd;
    a->off = off;
    a->addr = addr;
    a->len = len;
    a->op_flags = op_flags;
    a->buf_index = (uint16_t)buf_index;
    a->personality = (uint16_t)personality;
    a->file_index = file_index;
    a->addr3 = addr3;
    sr_finish_sqe(r, sqe, ud, ud);
    return 0;
}

/* Socket commands (IORING_OP_URING_CMD on a socket, Linux 6.7): level and optname share the
   addr field, in the kernel struct's member order whatever the byte order. */
int sr_prep_cmd_sock(sr_ring *r, uint64_t ud, unsigned cmd_op, int fd, unsigned level,
                     unsigned optname, uint64_t optval, unsigned optlen, unsigned sqe_flags)
{
    union { uint64_t u64; struct { uint32_t level; uint32_t optname; } s; } addr;
    union { uint64_t u64; struct { uint32_t cmd_op; uint32_t pad; } s; } off;

    addr.s.level = level;
    addr.s.optname = optname;
    off.s.cmd_op = cmd_op;
    off.s.pad = 0;
    return sr_prep_ext(r, ud, IORING_OP_URING_CMD, fd, addr.u64, 0, off.u64, 0, sqe_flags, 0, 0,
                       optlen, optval, 0);
}

/* The 16-bit addr_len of a send_zc/sendto that carries a destination (first half of the
   file_index word, in struct order). */
unsigned sr_addr_len_word(unsigned addr_len)
{
    union { uint32_t u32; struct { uint16_t addr_len; uint16_t pad; } s; } w;

    w.s.addr_len = (uint16_t)addr_len;
    w.s.pad = 0;
    return w.u32;
}

/* poll32_events are stored word-swapped on big-endian machines (the ABI kept the old 16-bit
   poll_events field in place). */
unsigned sr_poll_mask(unsigned mask)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return (mask << 16) | (mask >> 16);
#else
    return mask;
#endif
}

/* Put a LINK_TIMEOUT right behind the newest SQE, which must belong to target_ud and must not
   have reached the kernel yet.  -ESRCH: the target is not the newest unsubmitted SQE; -ENOSPC:
   no SQE is free without flushing (which would send the target unlinked). */
int sr_prep_link_timeout(sr_ring *r, uint64_t ud, uint64_t target_ud, const void *ts,
                         unsigned timeout_flags)
{
    struct io_uring_sq *sq = &r->ring.sq;
    struct io_uring_sqe *sqe;
    int usable = sr_usable(r);

    if (usable)
        return usable;
    if (!r->last_sqe || r->last_ud != target_ud || sq->sqe_tail == sq->sqe_head ||
        r->last_sqe != &sq->sqes[(sq->sqe_tail - 1) & r->sq_mask])
        return -ESRCH;
    if (io_uring_sq_space_left(&r->ring) < 1)
        return -ENOSPC;
    r->last_sqe->flags |= IOSQE_IO_LINK;
    r->n_prepared++;
    sqe = io_uring_get_sqe(&r->ring);
    io_uring_prep_rw(IORING_OP_LINK_TIMEOUT, sqe, -1, ts, 1, 0);
    sqe->timeout_flags = timeout_flags;
    sr_finish_sqe(r, sqe, ud, ud);
    return 0;
}

/* Chains: every SQE written between sr_chain_begin and sr_chain_end carries link_flag, except
   the last, whose flag sr_chain_end removes.  No SQE of the chain reaches the kernel in between
   (see sr_get_sqe, sr_submit, sr_reap; only SQEs queued before it may, to make room), so the
   kernel always sees the whole chain at once. */
int sr_chain_begin(sr_ring *r, unsigned link_flag, unsigned drain)
{
    int usable = sr_usable(r);

    if (usable)
        return usable;
    if (r->chain_flags)
        return -EINPROGRESS;
    r->chain_flags = link_flag;
    r->chain_drain = drain ? IOSQE_IO_DRAIN : 0;
    r->chain_len = 0;
    return 0;
}

int sr_chain_end(sr_ring *r)
{
    unsigned n = r->chain_len;

    if (n && r->last_sqe)
        r->last_sqe->flags &= (uint8_t)~(IOSQE_IO_LINK | IOSQE_IO_HARDLINK);
    r->chain_flags = 0;
    r->chain_len = 0;
    r->chain_drain = 0;
    return (int)n;
}

int sr_prep_cancel(sr_ring *r, uint64_t ud, uint64_t target, unsigned cancel_flags)
{
    int err = 0;
    struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_INTERNAL);

    if (!sqe)
        return err;
    io_uring_prep_rw(IORING_OP_ASYNC_CANCEL, sqe, -1, NULL, 0, 0);
    sqe->addr = target;
    sqe->cancel_flags = cancel_flags;
    sr_finish_sqe(r, sqe, ud, ud);
    sqe->personality = 0; /* close() depends on these: never on credentials that may be gone */
    return 0;
}

/* Register a batch of n members (n <= SR_BATCH_MAX_MEMBERS; b has room for n results).
   -EBUSY when SR_BATCH_TABLE batches are already in flight: the caller reaps and retries. */
int sr_batch_begin(sr_ring *r, sr_batch *b, uint64_t ud, unsigned n)
{
    unsigned i, probe;

    int usable = sr_usable(r);

    if (usable)
        return usable;
    if (n == 0 || n > SR_BATCH_MAX_MEMBERS)
        return -EINVAL;
    for (probe = 0; probe < SR_BATCH_TABLE; probe++) {
        /* ids stay below the tag bits, so a member's user_data is told apart by bit 63 alone */
        uint64_t id = r->next_batch_id++ & ((1ULL << (61 - SR_BATCH_INDEX_BITS)) - 1);
        if (r->batches[id % SR_BATCH_TABLE])
            continue;
        b->ud = ud;
        b->id = id;
        b->n = n;
        b->remaining = n;
        b->prepared = 0;
        b->first_error = 0;
        b->first_error_index = 0;
        for (i = 0; i < n; i++)
            b->res[i] = SR_RES_PENDING;
        r->batches[id % SR_BATCH_TABLE] = b;
        return 0;
    }
    return -EBUSY;
}

/* The members from b->prepared on will never be prepared (the kernel refused more SQEs, or the
   caller was interrupted): settle them with err, so the batch ends when the prepared members do.
   Returns 1 when nothing of the batch is left in flight; then it has left the table and the
   caller finishes it (no batch CQE will come). */
int sr_batch_abandon(sr_ring *r, sr_batch *b, int err)
{
    unsigned i;

    for (i = b->prepared; i < b->n; i++) {
        if (b->res[i] == SR_RES_PENDING) {
            b->res[i] = err;
            b->remaining--;
            if (!b->first_error) {
                b->first_error = err;
                b->first_error_index = i;
            }
        }
    }
    if (b->remaining == 0) {
        if (r->batches[b->id % SR_BATCH_TABLE] == b)
            r->batches[b->id % SR_BATCH_TABLE] = NULL;
        return 1;
    }
    return 0;
}

static inline uint64_t sr_member_ud(const sr_batch *b, unsigned i)
{
    return SR_UD_BATCH | (b->id << SR_BATCH_INDEX_BITS) | i;
}

uint64_t sr_batch_member_ud(sr_batch *b, unsigned i) { return sr_member_ud(b, i); }

/* Prepare the next (up to) count members of batch b, from b->prepared on.  Each returns how many
   it prepared (fewer when the kernel would not take more: the caller reaps and calls again), or
   -errno if it prepared none. */
int sr_prep_nops(sr_ring *r, sr_batch *b, unsigned count)
{
    unsigned i;
    int err = 0;

    for (i = 0; i < count && b->prepared < b->n; i++) {
        struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);
        if (!sqe)
            break;
        io_uring_prep_rw(IORING_OP_NOP, sqe, -1, NULL, 0, 0);
        sr_finish_sqe(r, sqe, sr_member_ud(b, b->prepared++), b->ud);
    }
    return i ? (int)i : err;
}

/* Reads or writes of block bytes each: member m moves base + m * block at file offset offs[m]. */
int sr_prep_rw_blocks(sr_ring *r, sr_batch *b, unsigned count, int opcode, int fd, char *base,
                      unsigned block, const uint64_t *offs)
{
    unsigned i;
    int err = 0;

    for (i = 0; i < count && b->prepared < b->n; i++) {
        unsigned m = b->prepared;
        struct io_uring_sqe *sqe = sr_get_sqe(r, &err, SR_LIMIT_USER);
        if (!sqe)
            break;
        io_uring_prep_rw(opcode, sqe, fd, base + (size_t)m * block, block, offs[m]);
        sr_finish_sqe(r, sqe, sr_member_ud(b, m), b->ud);
        b->prepared++;
    }
    return i ? (int)i : err;
}

/* ERESTARTSYS (512) to ERESTART_RESTARTBLOCK (516) are the kernel's internal "restart the
   system call" codes; a request interrupted in an io-wq worker (a blocked splice cancelled,
   seen on 6.18) can end with one in its CQE.  Nothing can restart a CQE: it is -EINTR, which
   Python reads as CANCELLED after a cancel request, never as "Unknown error 512". */
static inline int32_t sr_cqe_res(const struct io_uring_cqe *cqe)
{
    return (cqe->res <= -512 && cqe->res >= -516) ? -EINTR : cqe->res;
}

static unsigned sr_copy_cqes(sr_ring *r, unsigned cap, uint64_t *ud, int32_t *res, uint32_t *flags)
{
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0, n = 0;

    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == cap)
            break;
        seen++;
        /* liburing's internal wait timeout (kernels without EXT_ARG) is not ours. */
        if (cqe->user_data == LIBURING_UDATA_TIMEOUT)
            continue;
        r->n_consumed++;
        if (cqe->user_data & SR_UD_BATCH) {
            uint32_t index;
            sr_batch *b = sr_batch_of(r, cqe->user_data, &index);
            if (b) {
                if (b->res[index] != SR_RES_PENDING)
                    continue; /* a member ends once; anything more is not a final CQE of ours */
                b->res[index] = sr_cqe_res(cqe);
                if (b->res[index] < 0 && !b->first_error) {
                    b->first_error = b->res[index];
                    b->first_error_index = index;
                }
                if (--b->remaining)
                    continue;
                /* Last member: the batch itself completes, as one CQE for Python. */
                r->batches[b->id % SR_BATCH_TABLE] = NULL;
                ud[n] = b->ud;
                res[n] = b->first_error ? b->first_error : (int32_t)b->n;
                flags[n] = 0;
                n++;
                continue;
            }
        }
        if (cqe->user_data & SR_UD_FLAGS) {
            r->n_flagged++; /* Python reads this batch with its flags */
        } else if (cqe->flags & IORING_CQE_F_MORE) {
            /* Only tagged ops ask for several CQEs; anything else with F_MORE is not a final
               CQE of ours, and its request keeps its pins. */
            continue;
        }
        ud[n] = cqe->user_data;
        res[n] = sr_cqe_res(cqe);
        flags[n] = cqe->flags;
        n++;
    }
    io_uring_cq_advance(&r->ring, seen);
    return n;
}

static inline int sr_cq_needs_flush(sr_ring *r)
{
    return IO_URING_READ_ONCE(*r->ring.sq.kflags) & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN);
}

static int sr_get_events(sr_ring *r)
{
#if SR_LIBURING_AT_LEAST(2, 3)
    return io_uring_get_events(&r->ring);
#else
    /* liburing exports io_uring_enter() only from 2.3 on: make the syscall directly. */
    int ret = (int)syscall(__NR_io_uring_enter, r->ring.ring_fd, 0, 0, IORING_ENTER_GETEVENTS,
                           NULL, 0);
    return ret < 0 ? -errno : ret;
#endif
}

/* Submit pending SQEs, wait until at least wait_nr CQEs are ready (timeout_ns < 0: no limit), then
   copy up to cap final CQEs out.  Returns the number copied, or -errno when none were copied and the
   wait failed (-ETIME: timed out, -EINTR: a signal arrived; Python runs its handler and retries). */
int sr_reap(sr_ring *r, unsigned wait_nr, int64_t timeout_ns, unsigned cap,
            uint64_t *ud, int32_t *res, uint32_t *flags)
{
    int ret = 0;
    unsigned n;

    if ((ret = sr_usable(r)) != 0)
        return ret;
    /* The CQEs copied out last time are already off the CQ: until Python acknowledges them
       (sets unacked to 0 once it holds them), hand the same ones back rather than overwrite
       them.  A signal handler raising between sr_reap's return and Python's bookkeeping would
       otherwise lose them, and with them their operations' only final CQE. */
    if (r->unacked)
        return (int)r->unacked;
    r->n_flagged = 0;
    if (wait_nr && io_uring_cq_ready(&r->ring) >= wait_nr)
        wait_nr = 0;
    if (r->chain_flags) {
        /* An open chain must not be submitted: only collect what is already there. */
        if (wait_nr)
            return -EINPROGRESS;
    } else if (wait_nr) {
        if (timeout_ns >= 0) {
            struct __kernel_timespec ts;
            struct io_uring_cqe *cqe = NULL;

            ts.tv_sec = timeout_ns / 1000000000;
            ts.tv_nsec = timeout_ns % 1000000000;
            ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, wait_nr, &ts, NULL);
        } else {
            ret = io_uring_submit_and_wait(&r->ring, wait_nr);
        }
    } else if (io_uring_sq_ready(&r->ring)) {
        ret = io_uring_submit(&r->ring);
    }
    sr_account(r);
    n = sr_copy_cqes(r, cap, ud, res, flags);
    if (n == 0 && sr_cq_needs_flush(r)) {
        int ev = sr_get_events(r);
        if (ev < 0 && ret >= 0)
            ret = ev;
        n = sr_copy_cqes(r, cap, ud, res, flags);
    }
    r->unacked = n;
    if (n)
        return (int)n;
    return ret < 0 ? ret : 0;
}

/* The kernel's struct open_how (openat2), by its ABI layout: older headers lack it. */
typedef struct { uint64_t flags; uint64_t mode; uint64_t resolve; } sr_open_how;

/* struct epoll_event is packed on x86-64 only, and siginfo_t's layout is a union maze: both are
   filled and read here, where the compiler knows them. */
static const int SR_EPOLL_EVENT_SIZE = sizeof(struct epoll_event);
static const int SR_SIGINFO_SIZE = sizeof(siginfo_t);

void sr_fill_epoll_event(void *buf, uint32_t events, uint64_t data)
{
    struct epoll_event ev;

    ev.events = events;
    ev.data.u64 = data;
    memcpy(buf, &ev, sizeof(ev));
}

/* out: si_signo, si_code, si_pid, si_uid, si_status */
void sr_read_siginfo(const void *buf, int *out)
{
    siginfo_t si;

    memcpy(&si, buf, sizeof(si));
    out[0] = si.si_signo;
    out[1] = si.si_code;
    out[2] = (int)si.si_pid;
    out[3] = (int)si.si_uid;
    out[4] = si.si_status;
}

/* IORING_REGISTER_SYNC_CANCEL (Linux 6.0): cancel without an SQE.  A cancel SQE queued behind a
   drained chain (IOSQE_IO_DRAIN) waits for every earlier request, including the ones it is meant
   to cancel; this one does not go through the SQ at all.  Written against the ABI (the register
   opcode and struct are stable) so that builds against liburing < 2.3 have it too.  A zero
   timeout: the kernel cancels what it can and does not wait for requests already running. */
struct sr_sync_cancel_reg {
    uint64_t addr;
    int32_t fd;
    uint32_t flags;
    struct __kernel_timespec timeout;
    uint64_t pad[4];
};

/* io_uring_register by opcode number, for registrations liburing 2.3 has no helper for; refused
   on a torn-down or forked ring like every other call. */
static int sr_register_raw(sr_ring *r, unsigned opcode, void *arg, unsigned nr)
{
    int usable = sr_usable(r);
    long ret;

    if (usable)
        return usable;
    ret = syscall(__NR_io_uring_register, r->ring.ring_fd, opcode, arg, nr);
    return ret < 0 ? -errno : (int)ret;
}

int sr_sync_cancel(sr_ring *r, uint64_t ud, int fd, unsigned flags)
{
    struct sr_sync_cancel_reg reg;

    memset(&reg, 0, sizeof(reg));
    reg.addr = ud;
    reg.fd = fd;
    reg.flags = flags;
    return sr_register_raw(r, 24 /* IORING_REGISTER_SYNC_CANCEL */, &reg, 1);
}

/* ---- registration (io_uring_register), each refused on a torn-down or forked ring ---- */

int sr_register_files(sr_ring *r, const int *fds, unsigned n)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_register_files(&r->ring, fds, n);
}

int sr_register_files_sparse(sr_ring *r, unsigned n)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_register_files_sparse(&r->ring, n);
}

int sr_update_files(sr_ring *r, unsigned off, const int *fds, unsigned n)
{
    int usable = sr_usable(r);
    /* liburing takes a non-const array; the kernel only reads it */
    return usable ? usable : io_uring_register_files_update(&r->ring, off, (int *)fds, n);
}

int sr_unregister_files(sr_ring *r)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_unregister_files(&r->ring);
}

int sr_register_eventfd(sr_ring *r, int fd, int async_only)
{
    int usable = sr_usable(r);
    if (usable)
        return usable;
    return async_only ? io_uring_register_eventfd_async(&r->ring, fd)
                      : io_uring_register_eventfd(&r->ring, fd);
}

int sr_unregister_eventfd(sr_ring *r)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_unregister_eventfd(&r->ring);
}

int sr_register_personality(sr_ring *r)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_register_personality(&r->ring);
}

int sr_unregister_personality(sr_ring *r, int id)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_unregister_personality(&r->ring, id);
}

int sr_iowq_max_workers(sr_ring *r, unsigned *values)
{
    int usable = sr_usable(r);
    return usable ? usable : io_uring_register_iowq_max_workers(&r->ring, values);
}

int sr_register_ring_fd(sr_ring *r)
{
    int usable = sr_usable(r);
    if (usable)
        return usable;
#if SR_LIBURING_AT_LEAST(2, 2)
    return io_uring_register_ring_fd(&r->ring);
#else
    return -EOPNOTSUPP;
#endif
}

/* Stop entering the kernel through the registered ring descriptor, without unregistering it.
   A registration lives in the *registering thread's* table, and liburing enters (and unregisters,
   in io_uring_queue_exit) by offset into the *current* thread's table: a ring finalised on
   another thread would drive, or unregister, whatever ring that thread has at the same offset.
   The owner thread's slot is released when that thread exits. */
void sr_forget_registered_ring_fd(sr_ring *r)
{
#if SR_LIBURING_AT_LEAST(2, 2)
    r->ring.int_flags &= (uint8_t)~3u; /* INT_FLAG_REG_RING | INT_FLAG_REG_REG_RING */
    r->ring.enter_ring_fd = r->ring.ring_fd;
#else
    (void)r;
#endif
}

int sr_unregister_ring_fd(sr_ring *r)
{
    int usable = sr_usable(r);
    if (usable)
        return usable;
#if SR_LIBURING_AT_LEAST(2, 2)
    return io_uring_unregister_ring_fd(&r->ring);
#else
    return -EOPNOTSUPP;
#endif
}
