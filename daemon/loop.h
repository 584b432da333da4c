/* loop.h: the libevent loop that owns the process, libcoap's context and endpoints inside it. */
#ifndef C2M_LOOP_H
#define C2M_LOOP_H

#include <coap3/coap.h>

struct event_base;
struct config;
struct keys;

/* Bodies fetched block-wise from devices (notifications, command responses): the largest, and
 * all of one device's being fetched at once. */
#define LOOP_MAX_RESPONSE_BODY (256 * 1024)
#define LOOP_MAX_RESPONSE_BODIES (512 * 1024)

struct key_entry;
struct pki_verifier;

/* What the loop hands to the bridge; main.c fills it in (the loop includes no bridge header). */
struct loop_handlers {
	/* the resource that takes every device request */
	coap_resource_t *(*resource)(const struct config *c);
	/* the PSK, raw public key or certificate callback accepted the device e for s: its
	 * handshake must now complete in time; cert (DER, len bytes) is the device's certificate
	 * when it authenticated with one, else NULL */
	void (*handshake_start)(coap_session_t *s, const struct key_entry *e, const uint8_t *cert,
				size_t len);
	/* libcoap session events of server sessions */
	void (*session_event)(coap_session_t *s, coap_event_t ev);
	/* a response to one of the gateway's own requests: nonzero when it was taken */
	int (*response)(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd);
	/* one of the gateway's own requests got no response */
	void (*nack)(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason);
	/* asked before a Block1 upload is reassembled: 0 refuses it (resp set) */
	int (*block1_start)(coap_session_t *s, const coap_pdu_t *req, unsigned in_progress,
			    coap_pdu_t *resp);
};

int loop_init(const struct config *c, const struct keys *k, const struct loop_handlers *h);
struct event_base *loop_base(void);
coap_context_t *loop_coap(void);
/* Swaps the key store and cipher suites used for new handshakes, and applies the other coap.*
 * settings that can change at run time (reload). */
void loop_set_config(const struct config *c, const struct keys *k);
const struct keys *loop_keys(void);
/* During its DTLS_ERROR event: whether a callback refused s (logged already): 0 = no,
 * LOOP_REFUSED_IDENTITY = an unknown identity or key, LOOP_REFUSED_CERT = a device certificate
 * that does not verify (expired, not yet valid, untrusted, revoked). */
#define LOOP_REFUSED_IDENTITY 1
#define LOOP_REFUSED_CERT 2
int loop_handshake_refused(const coap_session_t *s);
/* The security modes (enum conf_mode) of the listener s came in on. */
unsigned loop_session_modes(const coap_session_t *s);
/* The verifier of the current coap.pki (CAs, CRL), or NULL. */
const struct pki_verifier *loop_pki(void);
int loop_run(void);
void loop_stop(void);
/* Closes the listeners: no new datagrams are read; timers keep running. */
void loop_close_listeners(void);
void loop_shutdown(void);
/* Asks for libcoap's timers to be re-armed soon (after something was sent that needs them). */
void loop_kick(void);
/* coap.block_size: the block size the gateway asks for on what it sends block-wise. */
size_t loop_block_size(void);
/* What became of the datagrams from addresses without a session (deps-patches/libcoap/0010). */
coap_front_door_t loop_front_door(void);

#endif
