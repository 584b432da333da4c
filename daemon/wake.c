/* wake.c: see wake.h. */
#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "wake.h"

int wake_open(struct wake *w, struct event_base *base, event_callback_fn cb, void *arg)
{
	w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->fd < 0)
		return -1;
	w->ev = event_new(base, w->fd, EV_READ | EV_PERSIST, cb, arg);
	if (!w->ev || event_add(w->ev, NULL) < 0) {
		wake_close(w);
		errno = ENOMEM;
		return -1;
	}
	return 0;
}

int wake_signal(const struct wake *w)
{
	uint64_t one = 1;

	/* EAGAIN: the counter is full, the loop will wake anyway */
	return write(w->fd, &one, sizeof(one)) < 0 && errno != EAGAIN ? -1 : 0;
}

int wake_drain(int fd)
{
	uint64_t n;

	return read(fd, &n, sizeof(n)) < 0 && errno != EAGAIN ? -1 : 0;
}

void wake_close(struct wake *w)
{
	if (w->ev)
		event_free(w->ev);
	if (w->fd >= 0)
		close(w->fd);
	w->ev = NULL;
	w->fd = -1;
}
