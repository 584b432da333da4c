/* oscore.h: OSCORE devices (RFC 8613) — a security context of its own for each in libcoap, the
 * device whose context verified a request, and the gateway's Sender Sequence Numbers kept safe
 * across restarts and crashes (Appendix B.1.1: a bound ahead of use, fsync'd in the journal
 * directory, renewed from a thread long before it is reached). */
#ifndef C2M_OSCORE_H
#define C2M_OSCORE_H

#include <stddef.h>
#include <stdint.h>

#include <coap3/coap.h>

struct event_base;
struct key_entry;
struct keys;

/* How far ahead of use a bound is written, and how close use may come before a new one is
 * asked for. A restart or crash skips at most OSCORE_SEQ_STEP numbers of each device. */
#define OSCORE_SEQ_STEP 4096
#define OSCORE_SEQ_RENEW 2048

/* The file of bounds in the journal directory. */
#define OSCORE_SEQ_FILE "oscore-seq"

/* Reads the bounds in dir, writes a new one for every OSCORE device among v (synchronously:
 * nothing is protected before they are on disk), and gives each device its context in ctx.
 * 0, or -1 after logging why. */
int oscore_init(struct event_base *base, coap_context_t *ctx, const char *dir,
		const struct key_entry *v, size_t n);
/* A reload: the contexts of devices removed or changed go (their sessions forget them), the
 * new ones come, each new one with a bound on disk first. 0, or -1 (logged; the devices
 * that could not be set up are refused until a later reload). */
int oscore_apply(const struct key_entry *v, size_t n);
/* The device (in k) whose context verified the request now being handled on s; NULL when the
 * request was not OSCORE-protected. */
const struct key_entry *oscore_request(const coap_session_t *s, const struct keys *k);
/* OSCORE devices with a context. */
size_t oscore_devices(void);
/* Messages held back because their Sender Sequence Number was not yet covered on disk. */
uint64_t oscore_held(void);
/* Writes the last bounds asked for and frees everything (after the CoAP context is gone). */
void oscore_shutdown(void);

#endif
