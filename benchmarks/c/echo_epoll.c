/*
 * echo_epoll: the echo benchmark's "limit of the machine" server, in C with epoll.
 *
 *   echo_epoll        listens on 127.0.0.1, a free port; prints the port; serves until stdin
 *                     closes.
 *
 * Level-triggered epoll, non-blocking sockets, one read and one write per readiness event (a
 * short write keeps the rest and waits for EPOLLOUT): what a plain event-loop server does,
 * with no interpreter in the way.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAXFD 65536

static char *pending[MAXFD];
static size_t pending_len[MAXFD];

int main(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t len = sizeof(sa);
    static char buf[BUF];

    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1024) < 0) {
        perror("echo_epoll");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&sa, &len);
    printf("%d\n", ntohs(sa.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == 0)
                return 0; /* stdin closed (or readable): stop */
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT && pending_len[fd]) {
                ssize_t w = write(fd, pending[fd], pending_len[fd]);
                if (w > 0) {
                    memmove(pending[fd], pending[fd] + w, pending_len[fd] - (size_t)w);
                    pending_len[fd] -= (size_t)w;
                }
                if (!pending_len[fd]) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, BUF);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                free(pending[fd]);
                pending[fd] = NULL;
                pending_len[fd] = 0;
                continue;
            }
            ssize_t w = pending_len[fd] ? 0 : write(fd, buf, (size_t)r);
            if (w < 0)
                w = 0;
            if (w < r) {
                pending[fd] = realloc(pending[fd], pending_len[fd] + (size_t)(r - w));
                memcpy(pending[fd] + pending_len[fd], buf + w, (size_t)(r - w));
                pending_len[fd] += (size_t)(r - w);
                struct epoll_event cev = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &cev);
            }
        }
    }
}
