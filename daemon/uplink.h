/* uplink.h: device requests → route → mqtt, answered when the reading is safe (design.md). */
#ifndef C2M_UPLINK_H
#define C2M_UPLINK_H

#include <coap3/coap.h>

#include "route.h"

struct config;
struct conf_route;

/* Outcome of looking a request up in the routes. */
struct uplink_decision {
	uint8_t code;				/* 2.04 when route is set, else the error to answer */
	const char *diag;			/* short diagnostic payload, NULL on 2.04 */
	const struct conf_route *route;		/* the route to publish on, or NULL */
	char topic[ROUTE_MAX_TOPIC];		/* filled when route is set */
};

/* Uri-Path options → segments pointing into req; 0 when there are more than max. */
size_t uplink_path(const coap_pdu_t *req, struct route_seg *segs, size_t max);

/* Pure routing decision for a request from identity (no I/O; fuzzed by tests/fuzz). The payload
 * size check (4.13) and the publish come after it. */
void uplink_decide(const struct config *c, const coap_pdu_t *req, const char *identity,
		   struct uplink_decision *d);

/* Asked before libcoap starts to reassemble a Block1 upload (deps-patches/libcoap/0013):
 * refuses it at once (resp's code set, returns 0) when no route takes it or the device has
 * UPLINK_MAX_UPLOADS uploads in progress, so that nothing is stored for it. */
int uplink_block1_start(coap_session_t *s, const coap_pdu_t *req, unsigned in_progress,
			coap_pdu_t *resp);

/* The catch-all resource that receives every device request; keeps c for routing. */
coap_resource_t *uplink_resource(const struct config *c);
/* Routes follow a new configuration (reload). */
void uplink_set_config(const struct config *c);
/* Broker connection state changed: when down, readings waiting for a PUBACK are answered from
 * the store instead. */
void uplink_mqtt_state(int connected);
/* Answers or forgets what is still waiting; call before the CoAP context is freed. */
void uplink_shutdown(void);
size_t uplink_pending(void);
/* Of them, ack: broker readings waiting for their PUBACK (at most mqtt.max_pending_acks). */
size_t uplink_pending_acks(void);

#endif
