/*
 * nowait.c: reads that never sleep, for the asyncio file layer (saferring.aio).
 *
 * A page-cache hit is served fastest by the read system call itself: io_uring's own first step
 * for a buffered read is the same non-blocking attempt, made inside io_uring_enter, which costs
 * more per call than preadv2.  So the async file objects try preadv2(RWF_NOWAIT) on the loop
 * thread first; the kernel returns what the page cache holds and -EAGAIN instead of waiting for
 * the device, and only then is the read queued on the ring.  The buffer belongs to the caller
 * for the duration of this one synchronous call: nothing keeps it after the return.
 */
#include <sys/uio.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008 /* include/uapi/linux/fs.h, Linux 4.14 */
#endif

/* Bytes read (0 at end of file), or -errno: -EAGAIN when the data is not cached, -EOPNOTSUPP
   (or -EINVAL on old kernels) when the file system cannot tell without blocking. */
long sr_pread_nowait(int fd, void *buf, size_t len, int64_t off)
{
    struct iovec v;
    ssize_t n;

    v.iov_base = buf;
    v.iov_len = len;
    n = preadv2(fd, &v, 1, (off_t)off, RWF_NOWAIT);
    return n < 0 ? -(long)errno : (long)n;
}
