/* device.h: per-session device state (identity, peer, recent exchanges) driven by libcoap events. */
#ifndef C2M_DEVICE_H
#define C2M_DEVICE_H

#include <stdint.h>

#include <coap3/coap.h>

#define DEV_DEDUP_SLOTS 8	/* recent CON exchanges remembered per session */

struct device;

/* The device bound to a server session, created on first use. NULL when out of memory. */
struct device *dev_get(coap_session_t *s);
const char *dev_identity(const struct device *d);
const char *dev_peer(const struct device *d);

/* Recent exchanges by message ID, so a retransmitted CON is answered, not processed again.
 * dev_dedup_find returns the response code stored for mid, or 0. */
uint8_t dev_dedup_find(const struct device *d, coap_mid_t mid);
void dev_dedup_store(struct device *d, coap_mid_t mid, uint8_t code);

/* The PSK callback accepted identity for s: the handshake must now complete in time. */
void dev_handshake_start(coap_session_t *s, const char *identity);

/* libcoap session events for server sessions. */
void dev_session_event(coap_session_t *s, coap_event_t ev);
size_t dev_count(void);

#endif
