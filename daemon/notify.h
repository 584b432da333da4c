/* notify.h: sd_notify(3) to the service manager, never blocking the loop. */
#ifndef C2M_NOTIFY_H
#define C2M_NOTIFY_H

#include <stdint.h>

struct event_base;

/* Reads NOTIFY_SOCKET (nothing is sent without it); retries run on base. */
int notify_init(struct event_base *base);
/* A state change (READY=1, RELOADING=1, STOPPING=1): sent now, or as soon as there is room,
 * in order. */
void notify_state(const char *msg);
/* A keep-alive (WATCHDOG=1, STATUS=...): sent now if there is room, else dropped and counted. */
void notify_keepalive(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Messages dropped because the service manager did not read its socket. */
uint64_t notify_dropped(void);
void notify_shutdown(void);

#endif
