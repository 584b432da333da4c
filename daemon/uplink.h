/* uplink.h: device requests → route → mqtt, answered when the reading is safe (design.md). */
#ifndef C2M_UPLINK_H
#define C2M_UPLINK_H

#include <coap3/coap.h>

struct config;

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

#endif
