/* discovery.h: devices that find the gateway by multicast (discovery.multicast): the
 * All-CoAP-Nodes groups joined on the configured interfaces, and GET /.well-known/core answered
 * with the gateway's coaps:// URIs and route paths (RFC 6690). A libcoap context of its own,
 * so that nothing else is ever served on the plain-CoAP port. */
#ifndef C2M_DISCOVERY_H
#define C2M_DISCOVERY_H

#include <event2/event.h>

struct config;

/* Nothing to do (0) without discovery.multicast; -1 when its port cannot be bound or no group
 * could be joined on any interface. */
int discovery_init(struct event_base *base, const struct config *c);
/* The links and limits of a reloaded configuration (the groups and port take a restart). */
void discovery_set_config(const struct config *c);
void discovery_shutdown(void);

#endif
