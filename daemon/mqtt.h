/* mqtt.h: the broker connection (the only Paho user): connect, publish, hand-off to the loop. */
#ifndef C2M_MQTT_H
#define C2M_MQTT_H

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct conf_mqtt;

enum mqtt_status {
	MQTT_DELIVERED,		/* QoS 0 written / QoS 1 PUBACK / QoS 2 PUBCOMP */
	MQTT_FAILED,		/* Paho reported failure (not proof of non-delivery) */
	MQTT_REFUSED,		/* the broker answered with a reason code >= 0x80 (MQTT 5) */
	MQTT_ABORTED,		/* shutdown: not completed (the journal keeps readings) */
};

/* Called on the loop thread, exactly once per accepted publish. */
typedef void (*mqtt_done_fn)(void *arg, enum mqtt_status st);
/* Called on the loop thread when the broker connection comes up (1) or goes down (0). */
typedef void (*mqtt_state_fn)(int connected);

struct mqtt_msg {
	const char *topic;
	const void *payload;
	size_t len;
	int qos;
	int retain;
	int content_format;	/* CoAP Content-Format, -1 when absent */
	const char *identity;	/* PSK identity, sent as user property "identity" */
	const char *msg_id;	/* user property "msg-id"; NULL: a new one is made */
	const char *reason;	/* user property "reason", or NULL */
	const char *coap_code;	/* user property "coap-code" ("2.04"), or NULL */
	const void *correlation;	/* MQTT 5 Correlation Data, or NULL */
	size_t correlation_len;
};

/* A message from the broker on a subscribed filter (valid during the callback only). */
struct mqtt_in {
	const char *topic;
	const void *payload;
	size_t len;
	const char *response_topic;	/* MQTT 5 Response Topic, or NULL */
	const void *correlation;	/* MQTT 5 Correlation Data, or NULL */
	size_t correlation_len;
	const char *content_type;	/* MQTT 5 Content Type, or NULL */
};

/* Called on the loop thread for each message that arrives. */
typedef void (*mqtt_in_fn)(const struct mqtt_in *m);

enum mqtt_send {
	MQTT_SEND_OK,		/* taken by the client (in memory only) */
	MQTT_SEND_FULL,		/* buffer / window full: try later (5.03) */
	MQTT_SEND_FAILED,	/* store or client failure (5.03) */
};

int mqtt_init(struct event_base *base, const struct conf_mqtt *c, mqtt_state_fn on_state,
	      mqtt_in_fn on_message);
/* Replaces the subscription filters (subscribed now when connected, and after every connect). */
void mqtt_set_subscriptions(char *const *filters, const int *qos, size_t n);
/* The CoAP Content-Format for an MQTT 5 Content Type, -1 when unknown. */
int mqtt_content_format(const char *content_type);
/* Incoming messages larger than this are dropped with a warning; with MQTT 5 the broker is told
 * not to send a packet larger than MQTT_MAX_IN_PACKET at all. */
#define MQTT_MAX_IN_PAYLOAD (1024 * 1024)
#define MQTT_MAX_IN_PACKET (MQTT_MAX_IN_PAYLOAD + 64 * 1024)
/* Bytes of incoming messages waiting for the loop; beyond, Paho holds them back. */
#define MQTT_MAX_IN_QUEUED (16 * 1024 * 1024)
/* Disconnects (waiting up to timeout_ms for in-flight work), aborts what is left. */
void mqtt_shutdown(int timeout_ms);

/* Loop thread. MQTT_SEND_OK: the client has it, or (QoS 0 with no done, msg_id, reason, coap-code
 * or correlation: a reading) a copy goes to it at the end of this loop turn with the others
 * taken in the turn; a refusal then is counted (publish_failed) and logged. In the order taken. */
enum mqtt_send mqtt_publish(const struct mqtt_msg *m, mqtt_done_fn done, void *arg);
int mqtt_connected(void);
/* Publishes accepted and not yet completed. */
size_t mqtt_outstanding(void);
/* CPU time the loop thread has spent in the MQTT client's publish calls for QoS 0 readings
 * handed over at the end of a turn (the client copies and queues each), microseconds. */
uint64_t mqtt_handoff_us(void);
/* How many QoS 1/2 publishes are worth handing to the client at once: mqtt.max_inflight, but at
 * most twice the broker's Receive Maximum (MQTT 5 CONNACK), which is all the client may have
 * unacknowledged; what waits beyond that waits better in the journal than in the client's
 * command queue, which it walks on every send. */
size_t mqtt_window(void);
/* MQTT 5 Content Type for a CoAP Content-Format, NULL when unknown. */
const char *mqtt_content_type(int content_format);

#endif
