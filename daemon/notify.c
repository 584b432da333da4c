/* notify.c: the service manager's notification protocol (sd_notify(3)) without ever blocking the
 * loop. libsystemd's sd_notify() sends on a blocking socket: when the service manager does not
 * read its socket (PID 1 busy, a daemon-reload of many units) and the kernel's queue is full (10
 * datagrams), the sender waits, and with it every device. Here the socket is non-blocking: a
 * state change (READY, RELOADING, STOPPING) that does not fit waits in a short queue and is sent
 * again from a timer, in order; a keep-alive (WATCHDOG, STATUS) that does not fit is dropped and
 * counted (the next one follows at half the watchdog interval). */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "notify.h"

#define NOTIFY_QUEUE 4		/* state changes waiting for room in the socket */
#define NOTIFY_MAX 512		/* one message */
#define NOTIFY_RETRY_MS 50

static struct {
	int fd;				/* -1: no service manager */
	struct sockaddr_un addr;
	socklen_t addr_len;
	struct event *retry;
	char queue[NOTIFY_QUEUE][NOTIFY_MAX];
	size_t n_queued;
	uint64_t dropped;
} N = { .fd = -1 };

static void notify_flush_cb(evutil_socket_t fd, short what, void *arg);

int notify_init(struct event_base *base)
{
	const char *path = getenv("NOTIFY_SOCKET");
	size_t len;

	if (!path || !*path)
		return 0;
	len = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || len >= sizeof(N.addr.sun_path)) {
		log_warn("notify: NOTIFY_SOCKET=\"%.64s\" is not a socket path; not notifying", path);
		return 0;
	}
	memset(&N.addr, 0, sizeof(N.addr));
	N.addr.sun_family = AF_UNIX;
	memcpy(N.addr.sun_path, path, len);
	if (path[0] == '@')
		N.addr.sun_path[0] = '\0';	/* abstract namespace */
	N.addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
	N.fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (N.fd < 0) {
		log_warn("notify: socket: %s; not notifying", strerror(errno));
		return 0;
	}
	N.retry = evtimer_new(base, notify_flush_cb, NULL);
	if (!N.retry) {
		close(N.fd);
		N.fd = -1;
		return -1;
	}
	return 0;
}

/* 1 sent, 0 no room now, -1 failed for good */
static int send_one(const char *msg)
{
	ssize_t n = sendto(N.fd, msg, strlen(msg), MSG_DONTWAIT | MSG_NOSIGNAL,
			   (const struct sockaddr *)&N.addr, N.addr_len);

	if (n >= 0)
		return 1;
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == EINTR)
		return 0;
	return -1;
}

static void arm_retry(void)
{
	struct timeval tv = { 0, NOTIFY_RETRY_MS * 1000 };

	if (N.retry && !evtimer_pending(N.retry, NULL))
		evtimer_add(N.retry, &tv);
}

static void notify_flush_cb(evutil_socket_t fd, short what, void *arg)
{
	size_t sent = 0;

	(void)fd;
	(void)what;
	(void)arg;
	while (sent < N.n_queued) {
		int r = send_one(N.queue[sent]);

		if (r == 0)
			break;
		if (r < 0)
			log_warn("notify: cannot send \"%s\": %s", N.queue[sent], strerror(errno));
		sent++;
	}
	memmove(N.queue, N.queue[sent], (N.n_queued - sent) * sizeof(N.queue[0]));
	N.n_queued -= sent;
	if (N.n_queued)
		arm_retry();
}

void notify_state(const char *msg)
{
	if (N.fd < 0)
		return;
	if (N.n_queued == 0 && send_one(msg) != 0)
		return;
	if (N.n_queued == NOTIFY_QUEUE) {
		/* the oldest waiting change is overtaken by the newer ones: drop it */
		memmove(N.queue, N.queue[1], (NOTIFY_QUEUE - 1) * sizeof(N.queue[0]));
		N.n_queued--;
		N.dropped++;
	}
	snprintf(N.queue[N.n_queued++], NOTIFY_MAX, "%s", msg);
	arm_retry();
}

void notify_keepalive(const char *fmt, ...)
{
	char msg[NOTIFY_MAX];
	va_list ap;

	if (N.fd < 0)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* behind a waiting state change, or no room: this one is dropped, the next one follows */
	if (N.n_queued || send_one(msg) != 1) {
		if (N.dropped++ == 0)
			log_warn("notify: the service manager is not reading its socket; keep-alives "
				 "are dropped (not waited for) until it does");
	}
}

uint64_t notify_dropped(void)
{
	return N.dropped;
}

void notify_shutdown(void)
{
	if (N.fd >= 0 && N.n_queued)
		notify_flush_cb(-1, 0, NULL);	/* a last try, without waiting */
	if (N.retry)
		event_free(N.retry);
	if (N.fd >= 0)
		close(N.fd);
	N.retry = NULL;
	N.fd = -1;
	N.n_queued = 0;
}
