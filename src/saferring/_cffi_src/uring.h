/*
 * The cdef of saferring._uring: what Python may call.
 *
 * build_ffi.py hands this file to ffi.cdef() as it is, so it holds only declarations cffi can
 * parse (no #include, no #if).  "...;" asks the compiler for the real layout, so these partial
 * struct declarations stay right on every liburing and kernel header version.
 *
 * Two groups:
 *   - sr_*: saferring's own hot path (uring.c).  The safe layer uses only these.
 *   - io_uring_*: plain liburing, one function each.  Only the raw/unsafe layer and the benchmarks'
 *     "raw cffi" baseline use them; nothing here pins memory for you.
 */

/* ---- kernel ABI structs, partial ---- */
struct iovec { void *iov_base; size_t iov_len; };
struct __kernel_timespec { int64_t tv_sec; long long tv_nsec; };

struct statx_timestamp { int64_t tv_sec; uint32_t tv_nsec; ...; };
struct statx {
    uint32_t stx_mask;
    uint32_t stx_blksize;
    uint64_t stx_attributes;
    uint32_t stx_nlink;
    uint32_t stx_uid;
    uint32_t stx_gid;
    uint16_t stx_mode;
    uint64_t stx_ino;
    uint64_t stx_size;
    uint64_t stx_blocks;
    uint64_t stx_attributes_mask;
    struct statx_timestamp stx_atime;
    struct statx_timestamp stx_btime;
    struct statx_timestamp stx_ctime;
    struct statx_timestamp stx_mtime;
    uint32_t stx_rdev_major;
    uint32_t stx_rdev_minor;
    uint32_t stx_dev_major;
    uint32_t stx_dev_minor;
    ...;
};

struct io_uring_sqe { uint8_t opcode; uint8_t flags; uint16_t ioprio; int32_t fd;
                      uint64_t off; uint64_t addr; uint32_t len; uint32_t rw_flags;
                      uint64_t user_data; ...; };
struct io_uring_cqe { uint64_t user_data; int32_t res; uint32_t flags; ...; };
struct io_uring_params { uint32_t sq_entries; uint32_t cq_entries; uint32_t flags;
                         uint32_t sq_thread_cpu; uint32_t sq_thread_idle; uint32_t features;
                         uint32_t wq_fd; ...; };
struct io_uring { unsigned flags; int ring_fd; unsigned features; ...; };
struct io_uring_probe;
struct msghdr { void *msg_name; unsigned msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
                void *msg_control; size_t msg_controllen; int msg_flags; ...; };
typedef struct { uint64_t flags; uint64_t mode; uint64_t resolve; } sr_open_how;

/* ---- constants (values come from the headers at build time) ---- */
#define IORING_SETUP_IOPOLL ...
#define IORING_SETUP_SQPOLL ...
#define IORING_SETUP_SQ_AFF ...
#define IORING_SETUP_CQSIZE ...
#define IORING_SETUP_CLAMP ...
#define IORING_SETUP_ATTACH_WQ ...
#define IORING_SETUP_R_DISABLED ...

#define IORING_CQE_F_BUFFER ...
#define IORING_CQE_F_MORE ...
#define IORING_CQE_F_NOTIF ...

#define IOSQE_FIXED_FILE ...
#define IOSQE_IO_DRAIN ...
#define IOSQE_IO_LINK ...
#define IOSQE_IO_HARDLINK ...
#define IOSQE_ASYNC ...

#define IORING_TIMEOUT_ABS ...
#define IORING_FSYNC_DATASYNC ...
#define AT_FDCWD ...
#define AT_SYMLINK_NOFOLLOW ...
#define AT_EMPTY_PATH ...
#define STATX_BASIC_STATS ...
#define STATX_BTIME ...
#define IOV_MAX ...

/* ---- saferring's hot path (uring.c) ---- */
typedef struct {
    uint64_t ud;
    uint64_t id;
    uint32_t n;
    uint32_t remaining;
    uint32_t prepared;
    int32_t first_error;
    uint32_t first_error_index;
    int32_t res[];
} sr_batch;
#define SR_BATCH_MAX_MEMBERS ...
#define SR_RES_PENDING ...

typedef struct {
    struct io_uring ring;
    uint64_t prepared_ud;   /* user_data of the newest SQE placed in the SQ */
    uint64_t submitted_ud;  /* user_data of the newest SQE the kernel has been handed */
    uint64_t n_submitted;   /* SQEs handed to the kernel, all time */
    unsigned sq_entries;
    unsigned cq_entries;
    unsigned setup_flags;
    unsigned features;
    int initialized;
    uint64_t n_consumed;    /* CQEs taken off the CQ, batch members included */
    unsigned unacked;       /* CQEs copied out by sr_reap, not yet acknowledged by Python */
    int cq_guard;           /* 1 on kernels that drop CQEs on overflow: in-flight <= CQ size */
    uint64_t n_prepared;    /* SQEs prepared, all time */
    unsigned n_flagged;     /* CQEs of the last sr_reap that must be read with their flags */
    unsigned chain_flags;   /* the link flag while a chain is open, else 0 */
    unsigned personality;   /* registered credentials new SQEs run with (0: the caller's) */
    ...;
} sr_ring;

/* Setup flags the kernel added after 5.1; 0 when the build headers predate them (then the kernel
   can't be asked for them through this build either). */
static const unsigned SR_SETUP_SUBMIT_ALL;
static const unsigned SR_SETUP_COOP_TASKRUN;
static const unsigned SR_SETUP_TASKRUN_FLAG;
static const unsigned SR_SETUP_SINGLE_ISSUER;
static const unsigned SR_SETUP_DEFER_TASKRUN;
static const int SR_HAS_GET_EVENTS;
static const int SR_HAS_REGISTER_RING_FD;
static const int SR_LIBURING_MAJOR;
static const int SR_LIBURING_MINOR;

const char *sr_build_stamp(void);
int sr_ring_init(sr_ring *r, unsigned entries, unsigned flags, unsigned sq_thread_idle,
                 unsigned cq_entries);
void sr_ring_exit(sr_ring *r);
int sr_probe(sr_ring *r, uint8_t *supported, unsigned n);

int sr_prep_nop(sr_ring *r, uint64_t ud);
int sr_prep(sr_ring *r, uint64_t ud, int opcode, int fd, const void *addr, unsigned len,
            int64_t off, unsigned op_flags, unsigned sqe_flags);
int sr_prep_cancel(sr_ring *r, uint64_t ud, uint64_t target, unsigned cancel_flags);
int sr_prep_ext(sr_ring *r, uint64_t ud, int opcode, int fd, uint64_t addr, unsigned len,
                uint64_t off, unsigned op_flags, unsigned sqe_flags, unsigned ioprio,
                unsigned buf_index, unsigned file_index, uint64_t addr3, unsigned personality);
int sr_prep_cmd_sock(sr_ring *r, uint64_t ud, unsigned cmd_op, int fd, unsigned level,
                     unsigned optname, uint64_t optval, unsigned optlen, unsigned sqe_flags);
unsigned sr_addr_len_word(unsigned addr_len);
unsigned sr_poll_mask(unsigned mask);
int sr_prep_link_timeout(sr_ring *r, uint64_t ud, uint64_t target_ud, const void *ts,
                         unsigned timeout_flags);
int sr_chain_begin(sr_ring *r, unsigned link_flag, unsigned drain);
int sr_chain_end(sr_ring *r);

/* C structs whose layout varies by architecture, filled and read in C */
static const int SR_EPOLL_EVENT_SIZE;
static const int SR_SIGINFO_SIZE;
void sr_fill_epoll_event(void *buf, uint32_t events, uint64_t data);
void sr_read_siginfo(const void *buf, int *out);

/* buffers.c: registered buffers and provided buffer rings (addresses of Python-owned memory) */
int sr_register_buffers(sr_ring *r, const uint64_t *addrs, unsigned size, unsigned n);
int sr_unregister_buffers(sr_ring *r);
int sr_register_buf_ring(sr_ring *r, uint64_t ring_addr, unsigned entries, unsigned bgid,
                         unsigned flags);
int sr_unregister_buf_ring(sr_ring *r, unsigned bgid);
void sr_buf_ring_provide(uint64_t ring_addr, unsigned mask, const uint64_t *addrs, unsigned size,
                         const uint16_t *bids, unsigned n);
void sr_buf_ring_provide_one(uint64_t ring_addr, unsigned mask, uint64_t addr, unsigned size,
                             unsigned bid);
int sr_prep_fixed_blocks(sr_ring *r, sr_batch *b, unsigned count, int opcode, int fd,
                         const uint64_t *addrs, const uint16_t *index, unsigned len,
                         const uint64_t *offs);

/* kernel_probes.c: behaviour the opcode probe cannot show (1 yes, 0 no, -errno probe failed) */
#define SR_CAP_TIMEOUT_MULTISHOT ...
#define SR_CAP_SOCKET_COMMANDS ...
#define SR_CAP_SYNC_CANCEL ...
#define SR_CAP_BUF_RING ...
#define SR_CAP_RECV_MULTISHOT ...
#define SR_CAP_BUF_RING_INC ...
int sr_probe_capability(int which);

int sr_sync_cancel(sr_ring *r, uint64_t ud, int fd, unsigned flags);
int sr_register_files(sr_ring *r, const int *fds, unsigned n);
int sr_register_files_sparse(sr_ring *r, unsigned n);
int sr_update_files(sr_ring *r, unsigned off, const int *fds, unsigned n);
int sr_unregister_files(sr_ring *r);
int sr_register_eventfd(sr_ring *r, int fd, int async_only);
int sr_unregister_eventfd(sr_ring *r);
int sr_register_personality(sr_ring *r);
int sr_unregister_personality(sr_ring *r, int id);
int sr_iowq_max_workers(sr_ring *r, unsigned *values);
int sr_register_ring_fd(sr_ring *r);
int sr_unregister_ring_fd(sr_ring *r);
void sr_forget_registered_ring_fd(sr_ring *r);
int sr_batch_begin(sr_ring *r, sr_batch *b, uint64_t ud, unsigned n);
int sr_batch_abandon(sr_ring *r, sr_batch *b, int err);
uint64_t sr_batch_member_ud(sr_batch *b, unsigned i);
int sr_prep_nops(sr_ring *r, sr_batch *b, unsigned count);
int sr_prep_rw_blocks(sr_ring *r, sr_batch *b, unsigned count, int opcode, int fd, char *base,
                      unsigned block, const uint64_t *offs);

/* nowait.c: preadv2(RWF_NOWAIT), the asyncio file layer's page-cache fast path */
long sr_pread_nowait(int fd, void *buf, size_t len, int64_t off);

int sr_submit(sr_ring *r);
unsigned sr_sq_pending(sr_ring *r);
int sr_reap(sr_ring *r, unsigned wait_nr, int64_t timeout_ns, unsigned cap,
            uint64_t *ud, int32_t *res, uint32_t *flags);

/* ---- plain liburing (raw layer) ---- */
int io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
int io_uring_queue_init_params(unsigned entries, struct io_uring *ring, struct io_uring_params *p);
void io_uring_queue_exit(struct io_uring *ring);
struct io_uring_sqe *io_uring_get_sqe(struct io_uring *ring);
void io_uring_sqe_set_data64(struct io_uring_sqe *sqe, uint64_t data);
void io_uring_sqe_set_flags(struct io_uring_sqe *sqe, unsigned flags);
void io_uring_prep_rw(int op, struct io_uring_sqe *sqe, int fd, const void *addr, unsigned len,
                      uint64_t offset);
void io_uring_prep_nop(struct io_uring_sqe *sqe);
void io_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                        uint64_t offset);
void io_uring_prep_write(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                         uint64_t offset);
void io_uring_prep_readv(struct io_uring_sqe *sqe, int fd, const struct iovec *iovecs,
                         unsigned nr_vecs, uint64_t offset);
void io_uring_prep_writev(struct io_uring_sqe *sqe, int fd, const struct iovec *iovecs,
                          unsigned nr_vecs, uint64_t offset);
void io_uring_prep_fsync(struct io_uring_sqe *sqe, int fd, unsigned fsync_flags);
void io_uring_prep_read_fixed(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                              uint64_t offset, int buf_index);
void io_uring_prep_recv(struct io_uring_sqe *sqe, int sockfd, void *buf, size_t len, int flags);
void io_uring_prep_send(struct io_uring_sqe *sqe, int sockfd, const void *buf, size_t len,
                        int flags);
int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs,
                              unsigned nr_iovecs);
int io_uring_unregister_buffers(struct io_uring *ring);
void io_uring_prep_timeout(struct io_uring_sqe *sqe, struct __kernel_timespec *ts,
                           unsigned count, unsigned flags);
int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int io_uring_wait_cqe(struct io_uring *ring, struct io_uring_cqe **cqe_ptr);
int io_uring_peek_cqe(struct io_uring *ring, struct io_uring_cqe **cqe_ptr);
unsigned io_uring_peek_batch_cqe(struct io_uring *ring, struct io_uring_cqe **cqes, unsigned count);
void io_uring_cq_advance(struct io_uring *ring, unsigned nr);
void io_uring_cqe_seen(struct io_uring *ring, struct io_uring_cqe *cqe);
unsigned io_uring_cq_ready(const struct io_uring *ring);
unsigned io_uring_sq_ready(const struct io_uring *ring);
struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring);
void io_uring_free_probe(struct io_uring_probe *probe);
int io_uring_opcode_supported(const struct io_uring_probe *p, int op);
