/* device.h: devices by identity (current session, presence) and per-session state (peer,
 * handshake deadline), driven by libcoap session events. */
#ifndef C2M_DEVICE_H
#define C2M_DEVICE_H

#include <stdint.h>

#include <coap3/coap.h>

struct config;
struct keys;
struct log_budget;
struct dev_sess;		/* one DTLS (or NoSec) session */
struct key_entry;
struct device;			/* one identity; outlives its sessions */

/* What observe.c and command.c do when a device comes online or goes offline (wired by main). */
struct dev_hooks {
	void (*up)(struct device *d);
	void (*down)(struct device *d, const char *reason);
};

int dev_init(const struct config *c, const struct dev_hooks *hooks);
void dev_set_config(const struct config *c);
/* Publishes "offline" for every device online and frees all state. */
void dev_shutdown(void);

/* The state bound to a server session, created on first use. NULL when out of memory. */
struct dev_sess *dev_sess_get(coap_session_t *s);
const char *dev_sess_identity(const struct dev_sess *d);
const char *dev_sess_peer(const struct dev_sess *d);
/* NULL while the session may speak for its identity; else why not (removed, key changed): the
 * request is to be refused, and the session is closed once the answer is out. */
const char *dev_sess_refused(struct dev_sess *d);

/* The PSK or raw public key callback accepted device e for s: the handshake must now complete
 * in time. */
void dev_handshake_start(coap_session_t *s, const struct key_entry *e, const uint8_t *cert,
			 size_t len);
/* A request on s verified under the OSCORE context of device e: s now speaks for e (on plain
 * UDP; inside DTLS, e must be the DTLS identity's), the device is online and goes offline after
 * coap.idle_timeout without another. NULL, or why the request is to be refused. */
const char *dev_oscore_request(struct dev_sess *s, const struct key_entry *e);
/* Whether requests on s have verified under an OSCORE context. */
int dev_sess_oscore(const struct dev_sess *s);

/* libcoap session events for server sessions. */
void dev_session_event(coap_session_t *s, coap_event_t ev);

/* The device of a configured identity (created on first use); NULL if not configured. */
struct device *dev_find(const char *identity, size_t len);
const char *dev_identity(const struct device *d);
/* The device's live, established session, or NULL when offline. */
coap_session_t *dev_session(const struct device *d);
const char *dev_peer(const struct device *d);
/* The log budget of the lines a device causes (log.h); for a session, its device's or, without
 * a configured identity, the one budget those sessions share. */
struct log_budget *dev_log(struct device *d);
struct log_budget *dev_sess_log(struct dev_sess *s);
/* The same for a libcoap session, also while the gateway shuts down. */
struct log_budget *dev_session_log(coap_session_t *s);
/* Opaque per-device slots for the observe and command modules. */
void **dev_observe_slot(struct device *d);
void **dev_command_slot(struct device *d);

/* After a reload: closes every session and handshake of an identity that was removed or whose
 * key changed; the others keep their sessions. */
void dev_apply_keys(const struct keys *k);

/* Calls fn for every known device / every device online (reload, shutdown: O(devices)). */
void dev_each(void (*fn)(struct device *d));
void dev_each_online(void (*fn)(struct device *d));

size_t dev_sessions(void);
size_t dev_online(void);

#endif
