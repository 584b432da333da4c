/* wake.h: a worker thread wakes the event loop, which then takes what the thread finished: an
 * eventfd in the loop's event base (the journal's writer, Paho's threads, the OSCORE bound
 * writer). */
#ifndef C2M_WAKE_H
#define C2M_WAKE_H

#include <event2/event.h>

struct wake {
	int fd;
	struct event *ev;
};

#define WAKE_INIT { .fd = -1 }

/* Loop thread: cb(fd, EV_READ, arg) runs in the loop after wake_signal(); it calls wake_drain()
 * first. -1 (errno set) when the eventfd or the event cannot be made. */
int wake_open(struct wake *w, struct event_base *base, event_callback_fn cb, void *arg);
/* Any thread. -1 (errno set) when the write failed. */
int wake_signal(const struct wake *w);
/* Loop thread, in cb: takes the signals so far. -1 (errno set) when the read failed. */
int wake_drain(int fd);
void wake_close(struct wake *w);

#endif
