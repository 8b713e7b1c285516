import os, socket, tempfile, time, select, array
import saferring
from saferring import Ring
d = tempfile.mkdtemp()
with Ring() as r:
    p = os.path.join(d, "f")
    fd = r.run(r.openat(p, os.O_RDWR | os.O_CREAT))
    print("write", r.run(r.write(fd, b"hello world", 0)))
    print("fallocate", r.run(r.fallocate(fd, 0, 4096)), os.fstat(fd).st_size)
    print("ftruncate", r.run(r.ftruncate(fd, 5)), os.fstat(fd).st_size)
    print("fadvise", r.run(r.fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)))
    print("sync_file_range", r.run(r.sync_file_range(fd, 0, 0)))
    print("fsetxattr", r.run(r.fsetxattr(fd, "user.x", b"val")))
    print("fgetxattr", r.run(r.fgetxattr(fd, "user.x")))
    print("getxattr", r.run(r.getxattr(p, "user.x")))
    print("setxattr", r.run(r.setxattr(p, "user.y", b"v2")), os.getxattr(p, "user.y"))
    print("mkdirat", r.run(r.mkdirat(os.path.join(d, "sub"))), os.listdir(d))
    print("renameat", r.run(r.renameat(p, os.path.join(d, "g"))), os.listdir(d))
    print("linkat", r.run(r.linkat(os.path.join(d, "g"), os.path.join(d, "h"))), os.listdir(d))
    print("symlinkat", r.run(r.symlinkat("g", os.path.join(d, "s"))), os.readlink(os.path.join(d,"s")))
    print("unlinkat", r.run(r.unlinkat(os.path.join(d, "h"))), sorted(os.listdir(d)))
    print("rmdir", r.run(r.unlinkat(os.path.join(d, "sub"), rmdir=True)), sorted(os.listdir(d)))
    try:
        r.run(r.unlinkat(os.path.join(d, "nope")))
    except FileNotFoundError as e:
        print("err", e)
    fd2 = r.run(r.openat2(os.path.join(d, "g"), resolve=saferring.constants.RESOLVE_BENEATH, dir_fd=None)) if False else None
    dfd = os.open(d, os.O_RDONLY)
    fd2 = r.run(r.openat2("g", dir_fd=dfd, resolve=saferring.constants.RESOLVE_BENEATH))
    print("openat2", fd2, os.read(fd2, 10))
    try:
        r.run(r.openat2("../etc/passwd", dir_fd=dfd, resolve=saferring.constants.RESOLVE_BENEATH))
    except OSError as e:
        print("openat2 beneath", e)
    rp, wp = os.pipe()
    os.lseek(fd2, 0, 0)
    print("splice", r.run(r.splice(fd2, wp, 5, offset_in=0)), os.read(rp, 10))
    rp2, wp2 = os.pipe()
    os.write(wp, b"teedata")
    print("tee", r.run(r.tee(rp, wp2, 7)), os.read(rp2, 10), os.read(rp, 10))
    import mmap
    m = mmap.mmap(-1, 8192)
    print("madvise", r.run(r.madvise(m, 0, 4096, mmap.MADV_WILLNEED)))
    # sockets
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    addr = srv.getsockname()
    s1 = r.run(r.socket())
    acc = r.accept(srv.fileno())
    con = r.connect(s1, addr)
    print("connect", r.run(con))
    cfd, caddr = r.run(acc)
    print("accept", cfd, caddr)
    print("send", r.run(r.send(s1, b"ping")))
    buf = bytearray(10)
    print("recv", r.run(r.recv(cfd, buf)), buf)
    print("sendmsg", r.run(r.sendmsg(s1, [b"a", b"bc"])))
    res = r.run(r.recvmsg(cfd, [bytearray(5)]))
    print("recvmsg", res)
    print("send_zc", r.run(r.send_zc(s1, b"zero")), os.read(cfd, 10))
    print("sendmsg_zc", r.run(r.sendmsg_zc(s1, [b"zmsg"])), os.read(cfd, 10))
    print("shutdown", r.run(r.shutdown(s1, socket.SHUT_WR)), os.read(cfd, 10))
    # poll
    p = r.poll_add(cfd, select.POLLIN)
    os.write(wp, b"")  # nothing
    print("poll (hup)", r.run(p))
    print("getsockopt", r.run(r.getsockopt(cfd, socket.SOL_SOCKET, socket.SO_TYPE)))
    print("setsockopt", r.run(r.setsockopt(cfd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)), cfd)
    print("siocinq", r.run(r.siocinq(cfd)))
    # multishot accept
    ma = r.accept(srv.fileno(), multishot=True)
    clients = [socket.create_connection(addr) for _ in range(3)]
    got = []
    while len(got) < 3:
        for op in r.wait(1, timeout=2):
            got += op.take()
    print("multishot accept", got, ma.state)
    ma.cancel()
    try:
        print(r.run(ma))
    except saferring.OperationCancelledError as e:
        print("ma cancelled", e)
    for g in got: os.close(g)
    for c in clients: c.close()
    # timeouts
    t0 = time.monotonic(); r.run(r.timeout(0.05)); print("timeout", round(time.monotonic()-t0, 3))
    t = r.timeout(10)
    rm = r.timeout_remove(t)
    print("timeout_remove", r.run(rm)); 
    try: r.run(t)
    except saferring.OperationCancelledError as e: print("t cancelled ok")
    mt = r.timeout(0.01, count=3, multishot=True)
    n=0
    while not mt.done():
        r.wait(1); n+=len(mt.take())
    print("multishot timeout", n, mt.state, mt.result())
    # link timeout
    rp3, wp3 = os.pipe()
    rd = r.read(rp3, bytearray(10))
    lt = r.link_timeout(rd, 0.05)
    try: r.run(rd)
    except saferring.OperationCancelledError: print("linked read cancelled")
    print("link fired", r.run(lt))
    # chain
    with r.chain() as ch:
        w = r.write(wp3, b"chained")
        rr = r.read(rp3, bytearray(10))
    r.wait(2)
    print("chain", w.result(), rr.result(), [o.kind for o in ch.ops])
    with r.chain() as ch:
        bad = r.read(-1, bytearray(1))
        nxt = r.nop()
    r.wait(2)
    print("broken chain", bad.state, nxt.state)
    # cancel variants
    rd = r.read(rp3, bytearray(10)); r.submit()
    c = r.cancel_fd(rp3)
    print("cancel_fd", r.run(c), rd.state if rd.done() else r.wait(1) and rd.state)
    # msg ring
    with Ring() as r2:
        m = r.msg_ring(r2, 42, 7); r.run(m)
        msgs = r2.wait(1, timeout=1)
        print("msg", [(x.value, x.result()) for x in msgs])
    # fixed files
    ff = r.register_files([fd2, -1, -1])
    print("fixed", ff)
    b = bytearray(5)
    print("read fixed", r.run(r.read(ff[0], b, 0)), b)
    fd3 = r.run(r.fixed_fd_install(ff[0])); print("install", fd3); os.close(fd3)
    od = r.run(r.openat_direct(os.path.join(d, "g"))); print("openat_direct", od)
    print("close_direct", r.run(r.close_direct(od)), od)
    try: r.read(od, b)
    except saferring.OperationStateError as e: print("stale", e)
    sd = r.run(r.socket_direct()); print("socket_direct", sd)
    r.unregister_files(); print(ff[0])
    ev = os.eventfd(0)
    r.register_eventfd(ev); r.run(r.nop()); print("eventfd", os.eventfd_read(ev)); r.unregister_eventfd(); os.close(ev)
    pid = r.register_personality(); print("personality", pid); r.unregister_personality(pid)
    print("iowq", r.iowq_max_workers(4, 4))
    r.register_ring_fd(); r.run(r.nop()); r.unregister_ring_fd(); print("ring fd ok")
    # waitid
    child = os.fork()
    if child == 0: os._exit(3)
    print("waitid", r.run(r.waitid(os.P_PID, child, os.WEXITED)))
    # futex
    word = array.array("I", [0])
    fw = r.futex_wait(word, 0, 0); r.submit()
    fk = r.futex_wake(word, 0, 1)
    print("futex", r.run(fk), r.run(fw))
    # epoll
    ep = select.epoll()
    print("epoll_ctl", r.run(r.epoll_ctl(ep.fileno(), 1, rp3, select.EPOLLIN, 99)))
    os.write(wp3, b"x"); print(ep.poll(0))
    print(r.stats())
