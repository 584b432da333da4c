/* metrics.h: the counters and gauges as Prometheus text over HTTP (evhttp on the loop) and as a
 * periodic JSON snapshot on an MQTT topic. */
#ifndef C2M_METRICS_H
#define C2M_METRICS_H

#include <stddef.h>

struct event_base;
struct conf_metrics;

/* Binds metrics.listen (when set) and arms the JSON timer (when metrics.topic is set).
 * -1 when the address cannot be bound (logged, naming it). */
int metrics_init(struct event_base *base, const struct conf_metrics *c);
/* Reload: topic and interval follow; a new listen address needs a restart. */
void metrics_set_config(const struct conf_metrics *c);
void metrics_shutdown(void);

/* Prometheus text format 0.0.4 / the JSON snapshot into buf; the length written, 0 when buf is
 * too small. */
size_t metrics_prometheus(char *buf, size_t len);
size_t metrics_json(char *buf, size_t len);

#endif
