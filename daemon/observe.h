/* observe.h: observations the gateway holds on device resources (RFC 7641), tracked by token. */
#ifndef C2M_OBSERVE_H
#define C2M_OBSERVE_H

#include <coap3/coap.h>

struct config;
struct device;

int observe_init(const struct config *c);
/* New configuration: cancels every observation and registers what the new rules name. */
void observe_set_config(const struct config *c);
void observe_device_up(struct device *d);
void observe_device_down(struct device *d, const char *reason);
/* A response or notification; returns 0 when the token is not ours. */
int observe_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd);
/* A request of ours was not answered; returns 0 when the token is not ours. */
int observe_nack(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason);
/* Sends cancellations and frees everything. */
void observe_shutdown(void);
size_t observe_active(void);

/* RFC 7641 §3.4: is notification (v2, t2) newer than (v1, t1)? Sequence numbers are 24-bit,
 * times in seconds. */
int observe_fresh(uint32_t v1, uint64_t t1, uint32_t v2, uint64_t t2);

#endif
