/* mqtt.c: the broker connection, the only user of Paho's MQTTAsync client.
 *
 * In this order: state; what runs on Paho's threads (its callbacks, which reach the loop only
 * through a mutex-protected queue and an eventfd); then, on the loop thread: connection state and
 * the events from that queue, connect, publish, subscribe, stop. */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <MQTTAsync.h>
#include <dirent.h>
#include <event2/event.h>
#include <openssl/crypto.h>

#include "config.h"
#include "log.h"
#include "mqtt.h"
#include "stats.h"
#include "wake.h"

enum ev_kind { EV_PUB_DONE, EV_CONNECTED, EV_CONNECT_FAILED, EV_LOST, EV_MESSAGE };

/* One queued event from a Paho thread. A publish's context doubles as its event. */
struct mqtt_ev {
	enum ev_kind kind;
	enum mqtt_status status;
	mqtt_done_fn done;
	void *arg;
	struct mqtt_ev *next;		/* completion queue */
	struct mqtt_ev *lprev, *lnext;	/* live publishes, for shutdown */
	char why[160];
	struct mqtt_in in;		/* EV_MESSAGE: strings and bytes follow the struct */
	char data[];
};

/* A QoS 0 publish that nobody waits for, copied, handed to Paho once the loop has read what its
 * sockets hold (flush_pending): Paho wakes its send thread for every message it is given, and
 * given several at once it finds that thread awake. */
struct mqtt_pend {
	struct mqtt_pend *next;
	struct mqtt_msg m;
	char data[];			/* topic, identity, payload */
};

static struct {
	const struct conf_mqtt *conf;
	MQTTAsync client;
	struct event_base *base;
	struct wake wake;		/* Paho's threads → the loop */
	struct event *retry_ev, *flush_ev;
	struct mqtt_pend *phead, *ptail;	/* QoS 0 publishes to hand over (loop thread) */
	mqtt_state_fn on_state;
	mqtt_in_fn on_message;
	char **subs;			/* subscription filters (copies) */
	int *subs_qos;
	size_t n_subs;
	pthread_mutex_t mu;
	struct mqtt_ev *qhead, *qtail;	/* completion queue (under mu) */
	struct mqtt_ev *live;		/* accepted publishes not yet completed (under mu) */
	atomic_int connected;
	int stopping;			/* mqtt_shutdown running (loop thread) */
	size_t unfinished;		/* publishes not completed at stop */
	atomic_size_t outstanding;
	uint64_t handoff_ns;		/* loop thread: CPU in flush_pending's publish calls */
	atomic_size_t in_bytes;		/* messages from the broker handed to the loop, not yet taken */
	atomic_uint receive_max;	/* the broker's Receive Maximum, 0 = none announced */
	unsigned retry_s;
	uint64_t msg_seq;
	char boot_id[24];
	char uri[300];
	char tls_why[200];		/* why the last TLS connect failed, from Paho's trace (under mu) */
} M = { .mu = PTHREAD_MUTEX_INITIALIZER, .wake = WAKE_INIT };

static const struct {
	int cf;
	const char *type;
} content_types[] = {
	{ 0, "text/plain;charset=utf-8" },
	{ 40, "application/link-format" },
	{ 41, "application/xml" },
	{ 42, "application/octet-stream" },
	{ 47, "application/exi" },
	{ 50, "application/json" },
	{ 60, "application/cbor" },
	{ 110, "application/senml+json" },
	{ 112, "application/senml+cbor" },
};

const char *mqtt_content_type(int cf)
{
	for (size_t i = 0; i < sizeof(content_types) / sizeof(content_types[0]); i++)
		if (content_types[i].cf == cf)
			return content_types[i].type;
	return NULL;
}

int mqtt_content_format(const char *type)
{
	for (size_t i = 0; type && i < sizeof(content_types) / sizeof(content_types[0]); i++)
		if (strcmp(content_types[i].type, type) == 0)
			return content_types[i].cf;
	return -1;
}

int mqtt_connected(void)
{
	return atomic_load(&M.connected);
}

size_t mqtt_outstanding(void)
{
	return atomic_load(&M.outstanding);
}

uint64_t mqtt_handoff_us(void)
{
	return M.handoff_ns / 1000;
}

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) < 0)
		return 0;
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

size_t mqtt_window(void)
{
	size_t w = (size_t)M.conf->max_inflight, rm = atomic_load(&M.receive_max);

	return rm && 2 * rm < w ? 2 * rm : w;
}

/* Either thread, under M.mu. */
static void live_unlink(struct mqtt_ev *ev)
{
	if (ev->lprev)
		ev->lprev->lnext = ev->lnext;
	else
		M.live = ev->lnext;
	if (ev->lnext)
		ev->lnext->lprev = ev->lprev;
	ev->lprev = ev->lnext = NULL;
}

/* Any thread → loop. */
static void queue_push(struct mqtt_ev *ev)
{
	pthread_mutex_lock(&M.mu);
	ev->next = NULL;
	if (M.qtail)
		M.qtail->next = ev;
	else
		M.qhead = ev;
	M.qtail = ev;
	pthread_mutex_unlock(&M.mu);
	if (wake_signal(&M.wake) < 0)
		log_error("mqtt: eventfd write failed: %s", strerror(errno));
}

static void queue_event(enum ev_kind kind, const char *why)
{
	struct mqtt_ev *ev = calloc(1, sizeof(*ev));

	if (!ev) {
		log_error("mqtt: out of memory queueing event %d", kind);
		return;
	}
	ev->kind = kind;
	if (why)
		snprintf(ev->why, sizeof(ev->why), "%s", why);
	queue_push(ev);
}

/* ---- Paho's threads ------------------------------------------------------------------------
 * Everything from here to the next such line runs on Paho's send or receive thread. It touches M
 * only under M.mu or through its atomics, and hands everything else to the loop (queue_push). */

static void pub_complete(struct mqtt_ev *ev, enum mqtt_status st, const char *why)
{
	pthread_mutex_lock(&M.mu);
	live_unlink(ev);
	pthread_mutex_unlock(&M.mu);
	if (st == MQTT_DELIVERED && !ev->done) {
		/* nobody waits for it (a QoS 0 reading, a status): done here, without waking the
		 * loop once per message */
		atomic_fetch_sub(&M.outstanding, 1);
		free(ev);
		return;
	}
	ev->kind = EV_PUB_DONE;
	ev->status = st;
	if (why)
		snprintf(ev->why, sizeof(ev->why), "%s", why);
	queue_push(ev);
}

/* Paho calls MQTT 5 and 3.1.1 callbacks with different types: each pair shares one body. */
static void on_pub_ok(void *ctx, MQTTAsync_successData *r)
{
	(void)r;
	pub_complete(ctx, MQTT_DELIVERED, NULL);
}

static void on_pub_ok5(void *ctx, MQTTAsync_successData5 *r)
{
	(void)r;
	pub_complete(ctx, MQTT_DELIVERED, NULL);
}

/* reason: the broker's MQTT 5 reason code, -1 for MQTT 3.1.1 (which has none) */
static void pub_failed(void *ctx, int code, int reason, const char *message)
{
	char why[128];

	if (reason >= 0)
		snprintf(why, sizeof(why), "code=%d reason=%d %s", code, reason, message ? message : "");
	else
		snprintf(why, sizeof(why), "code=%d %s", code, message ? message : "");
	pub_complete(ctx, reason >= 0x80 ? MQTT_REFUSED : MQTT_FAILED, why);
}

static void on_pub_fail(void *ctx, MQTTAsync_failureData *r)
{
	pub_failed(ctx, r ? r->code : 0, -1, r ? r->message : NULL);
}

static void on_pub_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
	pub_failed(ctx, r ? r->code : 0, r ? (int)r->reasonCode : 0, r ? r->message : NULL);
}

static void on_connect_ok(void *ctx, MQTTAsync_successData *r)
{
	(void)ctx;
	(void)r;
	queue_event(EV_CONNECTED, NULL);
}

static void on_connect_ok5(void *ctx, MQTTAsync_successData5 *r)
{
	int rm = 0;

	(void)ctx;
	/* Receive Maximum absent means 65,535 (MQTT 5.0 3.2.2.3.3) */
	if (r && MQTTProperties_hasProperty(&r->properties, MQTTPROPERTY_CODE_RECEIVE_MAXIMUM))
		rm = MQTTProperties_getNumericValue(&r->properties, MQTTPROPERTY_CODE_RECEIVE_MAXIMUM);
	atomic_store(&M.receive_max, rm > 0 ? (unsigned)rm : 65535u);
	queue_event(EV_CONNECTED, NULL);
}

/* reason: the broker's CONNACK reason code; 0 when the failure came before (TCP, TLS) or the
 * protocol is 3.1.1 */
static void connect_failed(int code, int reason, const char *message)
{
	char why[160];

	if (reason != MQTTREASONCODE_SUCCESS)
		snprintf(why, sizeof(why), "code=%d broker refused: %s %s", code,
			 MQTTReasonCode_toString(reason), message ? message : "");
	else
		snprintf(why, sizeof(why), "code=%d %s", code,
			 message ? message : "no connection (TCP or TLS)");
	queue_event(EV_CONNECT_FAILED, why);
}

static void on_connect_fail(void *ctx, MQTTAsync_failureData *r)
{
	(void)ctx;
	connect_failed(r ? r->code : 0, MQTTREASONCODE_SUCCESS, r ? r->message : NULL);
}

static void on_connect_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
	(void)ctx;
	connect_failed(r ? r->code : 0, r ? r->reasonCode : MQTTREASONCODE_SUCCESS,
		       r ? r->message : NULL);
}

/* automatic reconnects report here */
static void on_connected(void *ctx, char *cause)
{
	(void)ctx;
	(void)cause;
	queue_event(EV_CONNECTED, NULL);
}

static void on_lost(void *ctx, char *cause)
{
	(void)ctx;
	queue_event(EV_LOST, cause ? cause : "connection lost");
}

static const MQTTLenString *prop_data(MQTTProperties *props, enum MQTTPropertyCodes id)
{
	MQTTProperty *p = MQTTProperties_getProperty(props, id);

	return p ? &p->value.data : NULL;
}

/* Copies one arrived message into a single allocation: struct, topic, payload, properties. */
static struct mqtt_ev *message_copy(const char *topic, size_t tlen, const MQTTAsync_message *m)
{
	MQTTProperties *props = (MQTTProperties *)&m->properties;
	const MQTTLenString *rt = prop_data(props, MQTTPROPERTY_CODE_RESPONSE_TOPIC);
	const MQTTLenString *cd = prop_data(props, MQTTPROPERTY_CODE_CORRELATION_DATA);
	const MQTTLenString *ct = prop_data(props, MQTTPROPERTY_CODE_CONTENT_TYPE);
	size_t plen = (size_t)m->payloadlen, rlen = rt ? (size_t)rt->len : 0;
	size_t clen = cd ? (size_t)cd->len : 0, tylen = ct ? (size_t)ct->len : 0;
	struct mqtt_ev *ev = calloc(1, sizeof(*ev) + tlen + 1 + plen + 1 + rlen + 1 + clen + tylen + 1);
	char *p;

	if (!ev)
		return NULL;
	ev->kind = EV_MESSAGE;
	p = ev->data;
	memcpy(p, topic, tlen);
	ev->in.topic = p;
	p += tlen + 1;
	memcpy(p, m->payload, plen);
	ev->in.payload = p;
	ev->in.len = plen;
	p += plen + 1;
	if (rt) {
		memcpy(p, rt->data, rlen);
		ev->in.response_topic = p;
		p += rlen + 1;
	}
	if (cd) {
		memcpy(p, cd->data, clen);
		ev->in.correlation = p;
		ev->in.correlation_len = clen;
		p += clen;
	}
	if (ct) {
		memcpy(p, ct->data, tylen);
		ev->in.content_type = p;
	}
	return ev;
}

static int on_arrived(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
	size_t tlen = topic_len > 0 ? (size_t)topic_len : strlen(topic);
	struct mqtt_ev *ev = NULL;

	(void)ctx;
	/* the loop is behind: Paho keeps the message and offers it again later (returning 0), so
	 * what waits for the loop stays bounded, whatever publishers send */
	size_t waiting = atomic_load(&M.in_bytes);

	if (m->payloadlen > 0 && waiting > 0 && waiting + (size_t)m->payloadlen > MQTT_MAX_IN_QUEUED)
		return 0;
	if (m->payloadlen < 0 || m->payloadlen > MQTT_MAX_IN_PAYLOAD || tlen > 65535)
		log_warn("mqtt: message on %.*s dropped: payload of %d bytes over %d", (int)tlen, topic,
			 m->payloadlen, MQTT_MAX_IN_PAYLOAD);
	else if ((ev = message_copy(topic, tlen, m)) == NULL)
		log_error("mqtt: message on %.*s dropped: out of memory", (int)tlen, topic);
	MQTTAsync_freeMessage(&m);
	MQTTAsync_free(topic);
	if (ev) {
		atomic_fetch_add(&M.in_bytes, ev->in.len);
		queue_push(ev);
	}
	return 1;
}

static int on_ssl_error(const char *str, size_t len, void *u)
{
	(void)u;
	log_warn("mqtt: broker=%s tls error: %.*s", M.uri, (int)len, str);
	return 0;
}

/* Paho's trace is the only place that says why a TLS connection was refused (certificate not
 * trusted, host name not in it). While not connected its verbose level is on and the verdicts are
 * kept for the connect-failure message; once connected only errors are traced. Paho traces on
 * whichever thread calls it, the loop's included: M.mu covers what this keeps. */
static void on_paho_trace(enum MQTTASYNC_TRACE_LEVELS level, char *message)
{
	const char *m = message, *why = NULL;

	if (!m)
		return;
	/* "20261123 195251.764 text": drop Paho's time stamp */
	for (int sp = 0; sp < 2 && strchr(m, ' '); sp++)
		m = strchr(m, ' ') + 1;
	if (strstr(m, "X509_check_host") && strstr(m, "failed"))
		why = "the broker's certificate does not name this host (host name mismatch)";
	else if (strstr(m, "X509_check_ip_asc is 1"))
		why = "";	/* an IP address host: the IP check decides, and it passed */
	else if (strstr(m, "certificate verification:") && !strstr(m, "X509_V_OK"))
		why = m;
	else if (level >= MQTTASYNC_TRACE_ERROR)
		log_warn("mqtt: broker=%s client library: %s", M.uri, m);
	if (why) {
		pthread_mutex_lock(&M.mu);
		snprintf(M.tls_why, sizeof(M.tls_why), "%s", why);
		pthread_mutex_unlock(&M.mu);
	}
}

/* ---- The loop thread: connection state, events from Paho's threads ------------------------ */

static void trace_verbose(int on)
{
	MQTTAsync_setTraceLevel(on ? MQTTASYNC_TRACE_MINIMUM : MQTTASYNC_TRACE_ERROR);
}

static void subscribe_all(void);
static void flush_pending(evutil_socket_t fd, short what, void *arg);

/* The gateway's own state on mqtt.status_topic: retained, QoS 1 ("online" after each connect,
 * "offline" at a clean stop, which sends no Will). */
static void status_publish(const char *state)
{
	MQTTAsync_message msg = MQTTAsync_message_initializer;

	if (!M.conf->status_topic)
		return;
	msg.payload = (void *)state;
	msg.payloadlen = (int)strlen(state);
	msg.qos = 1;
	msg.retained = 1;
	if (MQTTAsync_sendMessage(M.client, M.conf->status_topic, &msg, NULL) != MQTTASYNC_SUCCESS)
		log_warn("mqtt: status %s on %s not published", state, M.conf->status_topic);
}

/* Paho sets no TCP_NODELAY on the broker connection, so Nagle's algorithm holds each small
 * publish until the broker has acknowledged the previous segment, and a broker that delays its
 * ACKs (Linux: up to 40 ms) delays QoS 0 readings that long: 26 ms p50 from device to subscriber
 * at half load in tests/bench/bench.py (QoS 1 traffic hides it: PUBACKs carry the ACKs). Paho
 * does not hand out its socket; the connection is the process's TCP socket whose peer is the
 * broker's port (the loop's own sockets are UDP, and the metrics listener accepts). Read from
 * /proc/self/fd: a few dozen descriptors, once per connect. */
static void broker_nodelay(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int one = 1, n = 0;

	if (!d)
		return;
	while ((e = readdir(d)) != NULL) {
		struct sockaddr_storage peer;
		socklen_t len = sizeof(peer);
		int fd, type = 0, proto = 0;
		socklen_t tl = sizeof(type), pl = sizeof(proto);
		unsigned port;

		if (e->d_name[0] < '0' || e->d_name[0] > '9' || (fd = atoi(e->d_name)) == dirfd(d))
			continue;
		if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_STREAM ||
		    getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &pl) < 0 ||
		    proto != IPPROTO_TCP || getpeername(fd, (struct sockaddr *)&peer, &len) < 0)
			continue;
		port = peer.ss_family == AF_INET6 ?
			       ntohs(((struct sockaddr_in6 *)&peer)->sin6_port) :
			       ntohs(((struct sockaddr_in *)&peer)->sin_port);
		if (port == (unsigned)M.conf->port &&
		    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0)
			n++;
	}
	closedir(d);
	if (n == 0)
		log_debug("mqtt: broker=%s connection not found to set TCP_NODELAY", M.uri);
}

static void set_state(int up, const char *why)
{
	int was = atomic_exchange(&M.connected, up);

	if (up) {
		M.retry_s = 1;
		if (!was) {
			trace_verbose(0);
			if (stats_get(STAT_BROKER_LOST))
				stats_inc(STAT_BROKER_RECONNECTS);
			broker_nodelay();
			log_info("mqtt: broker=%s connected buffered=%zu window=%zu", M.uri,
				 mqtt_outstanding(), mqtt_window());
			status_publish("online");
			subscribe_all();
		}
	} else if (was) {
		trace_verbose(1);
		stats_inc(STAT_BROKER_LOST);
		log_warn("mqtt: broker=%s connection lost: %s; buffering (reconnect automatic)", M.uri,
			 why);
	}
	if (up != was && M.on_state)
		M.on_state(up);
}

static void handle_event(struct mqtt_ev *ev)
{
	switch (ev->kind) {
	case EV_PUB_DONE:
		atomic_fetch_sub(&M.outstanding, 1);
		if (M.stopping && ev->status == MQTT_FAILED) {
			/* cut off by the stop: not a failure (readings stay in the journal) */
			ev->status = MQTT_ABORTED;
			M.unfinished++;
		} else if (ev->status == MQTT_FAILED || ev->status == MQTT_REFUSED) {
			log_warn("mqtt: publish failed: %s", ev->why);
		}
		if (ev->done)
			ev->done(ev->arg, ev->status);
		break;
	case EV_CONNECTED:
		set_state(1, NULL);
		break;
	case EV_LOST:
		set_state(0, ev->why);
		break;
	case EV_MESSAGE:
		if (M.on_message)
			M.on_message(&ev->in);
		break;
	case EV_CONNECT_FAILED: {
		struct timeval tv = { .tv_sec = M.retry_s };

		char tls[sizeof(M.tls_why)];

		pthread_mutex_lock(&M.mu);
		snprintf(tls, sizeof(tls), "%s", M.tls_why);
		M.tls_why[0] = '\0';
		pthread_mutex_unlock(&M.mu);
		if (tls[0])
			log_warn("mqtt: broker=%s connect failed: TLS: %s; check mqtt.url and ca_file; "
				 "retry in %us", M.uri, tls, M.retry_s);
		else
			log_warn("mqtt: broker=%s connect failed: %s; check url, ca_file and that the "
				 "broker's certificate names this host; retry in %us", M.uri, ev->why,
				 M.retry_s);
		set_state(0, ev->why);
		evtimer_add(M.retry_ev, &tv);
		M.retry_s = M.retry_s >= 30 ? 60 : M.retry_s * 2;
		break;
	}
	}
	free(ev);
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
	struct mqtt_ev *list;

	(void)what;
	(void)arg;
	if (wake_drain(fd) < 0)
		log_error("mqtt: eventfd read failed: %s", strerror(errno));
	pthread_mutex_lock(&M.mu);
	list = M.qhead;
	M.qhead = M.qtail = NULL;
	pthread_mutex_unlock(&M.mu);
	while (list) {
		struct mqtt_ev *next = list->next;

		if (list->kind == EV_MESSAGE)
			atomic_fetch_sub(&M.in_bytes, list->in.len);
		handle_event(list);
		list = next;
	}
}

/* ---- Connect ------------------------------------------------------------------------------ */

static void connect_now(void)
{
	const struct conf_mqtt *c = M.conf;
	MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer;
	MQTTAsync_connectOptions co5 = MQTTAsync_connectOptions_initializer5;
	MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
	MQTTProperties props = MQTTProperties_initializer;
	MQTTProperty p = { .identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL };
	MQTTProperty maxp = { .identifier = MQTTPROPERTY_CODE_MAXIMUM_PACKET_SIZE };
	MQTTAsync_connectOptions *o = c->version == 5 ? &co5 : &co;
	MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
	int rc;

	o->keepAliveInterval = c->keepalive;
	o->maxInflight = c->max_inflight;
	o->automaticReconnect = 1;
	o->minRetryInterval = 1;
	o->maxRetryInterval = 30;
	o->connectTimeout = 10;
	o->username = c->username;
	o->password = c->password;
	if (c->status_topic) {
		/* the broker announces "offline" for the gateway when the connection dies */
		will.topicName = c->status_topic;
		will.message = "offline";
		will.retained = 1;
		will.qos = 1;
		o->will = &will;
	}
	if (c->version == 5) {
		/* keep the session so messages in flight survive a restart (design.md) */
		o->cleanstart = 0;
		p.value.integer4 = c->session_expiry;
		MQTTProperties_add(&props, &p);
		/* the broker sends nothing larger (MQTT 5 §3.1.2.11.4): Paho would allocate it
		 * whole before the gateway could refuse it */
		maxp.value.integer4 = MQTT_MAX_IN_PACKET;
		MQTTProperties_add(&props, &maxp);
		o->connectProperties = &props;
		o->onSuccess5 = on_connect_ok5;
		o->onFailure5 = on_connect_fail5;
	} else {
		o->cleansession = 0;
		o->MQTTVersion = MQTTVERSION_3_1_1;
		o->onSuccess = on_connect_ok;
		o->onFailure = on_connect_fail;
	}
	if (c->tls) {
		ssl.trustStore = c->ca_file;
		ssl.keyStore = c->cert_file;
		ssl.privateKey = c->key_file;
		ssl.enableServerCertAuth = 1;
		ssl.verify = 1;		/* host name check: Paho skips it otherwise */
		ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
		ssl.ssl_error_cb = on_ssl_error;
		o->ssl = &ssl;
	}
	rc = MQTTAsync_connect(M.client, o);
	MQTTProperties_free(&props);
	if (rc != MQTTASYNC_SUCCESS) {
		char why[64];

		snprintf(why, sizeof(why), "MQTTAsync_connect returned %d", rc);
		queue_event(EV_CONNECT_FAILED, why);
	}
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	connect_now();
}

int mqtt_init(struct event_base *base, const struct conf_mqtt *c, mqtt_state_fn on_state,
	      mqtt_in_fn on_message)
{
	MQTTAsync_createOptions cro = MQTTAsync_createOptions_initializer;
	struct timespec ts;
	int rc;

	M.conf = c;
	M.base = base;
	M.on_state = on_state;
	M.on_message = on_message;
	M.retry_s = 1;
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(M.boot_id, sizeof(M.boot_id), "%" PRIx64,
		 (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u);
	snprintf(M.uri, sizeof(M.uri), "%s://%s%s%s:%d", c->tls ? "ssl" : "tcp",
		 strchr(c->host, ':') ? "[" : "", c->host, strchr(c->host, ':') ? "]" : "", c->port);
	if (wake_open(&M.wake, base, on_wake, NULL) < 0) {
		log_error("mqtt: eventfd: %s", strerror(errno));
		return -1;
	}
	M.retry_ev = evtimer_new(base, on_retry, NULL);
	M.flush_ev = event_new(base, -1, 0, flush_pending, NULL);
	if (!M.retry_ev || !M.flush_ev) {
		log_error("mqtt: cannot create loop events");
		return -1;
	}
	/* Paho's threads use OpenSSL until they end, which may be after exit() begins: keep OpenSSL's
	 * exit-time cleanup from freeing their per-thread state under them */
	OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL);
	cro.sendWhileDisconnected = 1;
	cro.allowDisconnectedSendAtAnyTime = 1;
	cro.maxBufferedMessages = c->max_buffered;
	cro.deleteOldestMessages = 0;	/* never drop silently: refuse (5.03) instead */
	cro.restoreMessages = 0;
	cro.MQTTVersion = c->version == 5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
	/* no Paho store: readings are kept by the journal (journal.c), which Paho's file store could
	 * not do safely (no fsync, write errors ignored, messages dropped on a lost session) */
	rc = MQTTAsync_createWithOptions(&M.client, M.uri, c->client_id, MQTTCLIENT_PERSISTENCE_NONE,
					 NULL, &cro);
	if (rc != MQTTASYNC_SUCCESS) {
		log_error("mqtt: cannot create client for %s: code %d", M.uri, rc);
		return -1;
	}
	MQTTAsync_setTraceCallback(on_paho_trace);
	trace_verbose(1);
	MQTTAsync_setCallbacks(M.client, NULL, on_lost, on_arrived, NULL);
	MQTTAsync_setConnected(M.client, NULL, on_connected);
	log_info("mqtt: connecting broker=%s client_id=%s version=%d", M.uri, c->client_id,
		 c->version);
	connect_now();
	return 0;
}

/* ---- Publish ------------------------------------------------------------------------------ */

/* A publish's properties live on the stack: MQTTAsync_sendMessage copies them (MQTTProperties_copy
 * reads count and array), so building them with MQTTProperties_add would allocate and free every
 * string twice per reading. length is kept as MQTTProperties_add keeps it. */
enum { PUB_PROPS = 6 };	/* content type, identity, msg-id, reason, coap-code, correlation data */

struct pub_props {
	MQTTProperties p;
	MQTTProperty a[PUB_PROPS];
};

static void prop_add(struct pub_props *pp, int id, const char *key, const char *val, size_t vlen)
{
	MQTTProperty *p = &pp->a[pp->p.count++];

	*p = (MQTTProperty){ .identifier = id };
	if (key) {
		p->value.data.data = (char *)key;
		p->value.data.len = (int)strlen(key);
		p->value.value.data = (char *)val;
		p->value.value.len = (int)vlen;
		pp->p.length += 1 + 2 + p->value.data.len + 2 + p->value.value.len;
	} else {
		p->value.data.data = (char *)val;
		p->value.data.len = (int)vlen;
		pp->p.length += 1 + 2 + p->value.data.len;
	}
}

static void prop_str(struct pub_props *pp, int id, const char *key, const char *val)
{
	prop_add(pp, id, key, val, strlen(val));
}

static enum mqtt_send send_now(const struct mqtt_msg *m, mqtt_done_fn done, void *arg)
{
	MQTTAsync_message msg = MQTTAsync_message_initializer;
	MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
	struct pub_props pp = { .p = MQTTProperties_initializer };
	struct mqtt_ev *ev;
	char msgid[48];
	const char *ct;
	int rc;

	ev = calloc(1, sizeof(*ev));
	if (!ev)
		return MQTT_SEND_FAILED;
	ev->done = done;
	ev->arg = arg;
	msg.payload = (void *)m->payload;
	msg.payloadlen = (int)m->len;
	msg.qos = m->qos;
	msg.retained = m->retain;
	if (M.conf->version == 5) {
		if (m->msg_id)
			snprintf(msgid, sizeof(msgid), "%s", m->msg_id);
		else
			snprintf(msgid, sizeof(msgid), "%s-%" PRIu64, M.boot_id, ++M.msg_seq);
		pp.p.array = pp.a;
		pp.p.max_count = PUB_PROPS;
		if ((ct = mqtt_content_type(m->content_format)) != NULL)
			prop_str(&pp, MQTTPROPERTY_CODE_CONTENT_TYPE, NULL, ct);
		if (m->identity)
			prop_str(&pp, MQTTPROPERTY_CODE_USER_PROPERTY, "identity", m->identity);
		prop_str(&pp, MQTTPROPERTY_CODE_USER_PROPERTY, "msg-id", msgid);
		if (m->reason)
			prop_str(&pp, MQTTPROPERTY_CODE_USER_PROPERTY, "reason", m->reason);
		if (m->coap_code)
			prop_str(&pp, MQTTPROPERTY_CODE_USER_PROPERTY, "coap-code", m->coap_code);
		if (m->correlation)
			prop_add(&pp, MQTTPROPERTY_CODE_CORRELATION_DATA, NULL, (const char *)m->correlation,
				 m->correlation_len);
		msg.properties = pp.p;
		ro.onSuccess5 = on_pub_ok5;
		ro.onFailure5 = on_pub_fail5;
	} else {
		ro.onSuccess = on_pub_ok;
		ro.onFailure = on_pub_fail;
	}
	ro.context = ev;
	/* link before sending: the completion may run on a Paho thread before send returns */
	pthread_mutex_lock(&M.mu);
	ev->lnext = M.live;
	if (M.live)
		M.live->lprev = ev;
	M.live = ev;
	pthread_mutex_unlock(&M.mu);
	atomic_fetch_add(&M.outstanding, 1);
	rc = MQTTAsync_sendMessage(M.client, m->topic, &msg, &ro);
	if (rc == MQTTASYNC_SUCCESS) {
		stats_inc(m->qos == 2 ? STAT_PUBLISH_QOS2 : m->qos == 1 ? STAT_PUBLISH_QOS1 :
			  STAT_PUBLISH_QOS0);
		return MQTT_SEND_OK;
	}
	atomic_fetch_sub(&M.outstanding, 1);
	pthread_mutex_lock(&M.mu);
	live_unlink(ev);
	pthread_mutex_unlock(&M.mu);
	free(ev);
	if (rc == MQTTASYNC_MAX_BUFFERED_MESSAGES || rc == MQTTASYNC_MAX_BUFFERED)
		return MQTT_SEND_FULL;
	log_error("mqtt: publish topic=%s refused by client: code %d", m->topic, rc);
	return MQTT_SEND_FAILED;
}

static void flush_pending(evutil_socket_t fd, short what, void *arg)
{
	struct mqtt_pend *p = M.phead, *next;
	size_t failed = 0;
	uint64_t t0 = thread_cpu_ns(), t1;	/* once a batch: a system call each */

	(void)fd;
	(void)what;
	(void)arg;
	M.phead = M.ptail = NULL;
	for (; p; p = next) {
		next = p->next;
		atomic_fetch_sub(&M.outstanding, 1);	/* send_now counts it again */
		if (send_now(&p->m, NULL, NULL) != MQTT_SEND_OK)
			failed++;
		free(p);
	}
	t1 = thread_cpu_ns();
	if (t0 && t1 > t0)
		M.handoff_ns += t1 - t0;
	if (failed) {
		for (size_t i = 0; i < failed; i++)
			stats_inc(STAT_PUBLISH_FAILED);
		log_error("mqtt: %zu QoS 0 publishes refused by the client after they were taken",
			  failed);
	}
}

/* The loop thread: a copy of m joins the publishes handed over at the end of this turn. */
static enum mqtt_send defer(const struct mqtt_msg *m)
{
	size_t tl = strlen(m->topic) + 1, il = m->identity ? strlen(m->identity) + 1 : 0;
	struct mqtt_pend *p = malloc(sizeof(*p) + tl + il + m->len);

	if (!p)
		return MQTT_SEND_FAILED;
	p->next = NULL;
	p->m = *m;
	p->m.topic = memcpy(p->data, m->topic, tl);
	if (m->identity)
		p->m.identity = memcpy(p->data + tl, m->identity, il);
	p->m.payload = p->data + tl + il;
	if (m->len)		/* an empty reading may come with no buffer at all */
		memcpy(p->data + tl + il, m->payload, m->len);
	if (M.ptail)
		M.ptail->next = p;
	else
		M.phead = p;
	M.ptail = p;
	if (p == M.phead)
		event_active(M.flush_ev, EV_TIMEOUT, 0);
	atomic_fetch_add(&M.outstanding, 1);
	return MQTT_SEND_OK;
}

enum mqtt_send mqtt_publish(const struct mqtt_msg *m, mqtt_done_fn done, void *arg)
{
	if (mqtt_outstanding() >= (size_t)M.conf->max_buffered)
		return MQTT_SEND_FULL;
	if (m->qos == 0 && !done && !m->msg_id && !m->reason && !m->coap_code && !m->correlation &&
	    M.flush_ev && !M.stopping)
		return defer(m);
	if (M.phead)
		flush_pending(-1, 0, NULL);	/* in the order they were taken */
	return send_now(m, done, arg);
}

/* ---- Subscribe ---------------------------------------------------------------------------- */

static void subscribe_all(void)
{
	MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
	int rc;

	if (M.n_subs == 0 || !mqtt_connected())
		return;
	rc = MQTTAsync_subscribeMany(M.client, (int)M.n_subs, M.subs, M.subs_qos, &ro);
	if (rc != MQTTASYNC_SUCCESS)
		log_error("mqtt: subscribe to %zu command filters failed: code %d", M.n_subs, rc);
	else
		for (size_t i = 0; i < M.n_subs; i++)
			log_info("mqtt: subscribed filter=%s qos=%d", M.subs[i], M.subs_qos[i]);
}

void mqtt_set_subscriptions(char *const *filters, const int *qos, size_t n)
{
	MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
	char **old = M.subs;
	int *old_qos = M.subs_qos;
	size_t n_old = M.n_subs;
	size_t i, j;

	/* filters no longer wanted are unsubscribed */
	for (i = 0; i < n_old && M.client && mqtt_connected(); i++) {
		for (j = 0; j < n && strcmp(old[i], filters[j]) != 0; j++)
			;
		if (j == n)
			MQTTAsync_unsubscribe(M.client, old[i], &ro);
	}
	M.subs = NULL;
	M.subs_qos = NULL;
	M.n_subs = 0;
	if (n) {
		M.subs = calloc(n, sizeof(*M.subs));
		M.subs_qos = calloc(n, sizeof(*M.subs_qos));
		for (i = 0; M.subs && M.subs_qos && i < n; i++) {
			if ((M.subs[i] = strdup(filters[i])) == NULL)
				break;
			M.subs_qos[i] = qos[i];
			M.n_subs++;
		}
		if (M.n_subs < n)
			log_error("mqtt: out of memory storing subscriptions");
	}
	for (i = 0; i < n_old; i++)
		free(old[i]);
	free(old);
	free(old_qos);
	subscribe_all();
}

/* ---- Stop --------------------------------------------------------------------------------- */

/* Threads of this process (Paho's end some time after MQTTAsync_destroy). */
static int thread_count(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	int n = 0;

	if (!d)
		return 1;
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

void mqtt_shutdown(int timeout_ms)
{
	MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
	struct mqtt_ev *ev;

	flush_pending(-1, 0, NULL);	/* what the loop took before the stop goes out */
	M.stopping = 1;
	if (M.client) {
		d.timeout = timeout_ms;
		/* a clean stop sends no Will (that is only for a broken connection); the disconnect
		 * waits for this like for other in-flight ones */
		if (MQTTAsync_isConnected(M.client))
			status_publish("offline");
		if (MQTTAsync_isConnected(M.client))
			MQTTAsync_disconnect(M.client, &d);
		for (int waited = 0; waited < timeout_ms && MQTTAsync_isConnected(M.client); waited += 20)
			usleep(20000);
		MQTTAsync_destroy(&M.client);
		/* let Paho's threads finish before the process tears libraries down (bounded) */
		for (int waited = 0; waited < 1000 && thread_count() > 1; waited += 10)
			usleep(10000);
	}
	/* no Paho thread runs now: deliver what was queued, abort what was not completed */
	if (M.wake.fd >= 0)
		on_wake(M.wake.fd, EV_READ, NULL);
	while ((ev = M.live) != NULL) {
		live_unlink(ev);
		atomic_fetch_sub(&M.outstanding, 1);
		if (ev->done)
			ev->done(ev->arg, MQTT_ABORTED);
		free(ev);
		M.unfinished++;
	}
	if (M.unfinished)
		log_info("mqtt: %zu publishes not completed at stop (readings among them stay in the "
			 "journal)", M.unfinished);
	wake_close(&M.wake);
	if (M.retry_ev)
		event_free(M.retry_ev);
	if (M.flush_ev)
		event_free(M.flush_ev);
	M.retry_ev = M.flush_ev = NULL;
	mqtt_set_subscriptions(NULL, NULL, 0);
	atomic_store(&M.connected, 0);
}
