/* metrics.c: counters and gauges as Prometheus text (GET /metrics on an evhttp listener in the
 * loop) and as a JSON snapshot published on an MQTT topic every interval seconds. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

#include "command.h"
#include "config.h"
#include "device.h"
#include "heap.h"
#include "journal.h"
#include "log.h"
#include "loop.h"
#include "metrics.h"
#include "mqtt.h"
#include "notify.h"
#include "observe.h"
#include "oscore.h"
#include "stats.h"
#include "uplink.h"

#define METRICS_PREFIX "coap2mqtt_"
#define METRICS_TEXT_MAX 16384	/* the whole exposition; the table below needs about 9 KiB */
#define METRICS_JSON_MAX 4096	/* about 1.3 KiB, 2.5 KiB with every number at 20 digits */
#define METRICS_HTTP_TIMEOUT_S 10	/* idle or slow scrapers are cut off */
#define METRICS_MAX_HEADERS 8192
#define METRICS_MAX_BODY 1024
#define METRICS_MAX_SERIES 8

enum kind { COUNTER, GAUGE };

/* One metric family: a single value, or one value per label value. */
struct family {
	const char *name;	/* after METRICS_PREFIX */
	const char *json;	/* key in the JSON snapshot */
	enum kind kind;
	const char *help;
	size_t (*gauge)(void);	/* a single series read from the module that owns it */
	const char *label;	/* label name, NULL for a single series */
	size_t n;		/* series */
	struct {
		const char *value;	/* label value */
		enum stat_id id;	/* counted in stats.c, */
		size_t (*read)(void);	/* or read from the module that owns it */
	} s[METRICS_MAX_SERIES];
};

static size_t acks_pending(void)
{
	return uplink_pending_acks();
}

static size_t log_suppressed(void)
{
	return (size_t)log_suppressed_total();
}

static size_t broker_connected(void)
{
	return mqtt_connected() ? 1 : 0;
}

/* the journal's numbers, read once per family (a scrape is rare; this is O(1) but for the
 * latency percentiles, which sort at most 1024 values) */
static struct journal_stats js(void)
{
	struct journal_stats s;

	journal_get_stats(&s);
	return s;
}

/* readings not yet acknowledged by the broker, and other messages waiting in the MQTT client */
static size_t backlog(void)
{
	struct journal_stats s = js();
	size_t out = mqtt_outstanding();

	return s.records + (out > s.in_flight ? out - s.in_flight : 0);
}

static size_t j_bytes(void) { return (size_t)js().bytes; }
static size_t j_segments(void) { return js().segments; }
static size_t j_commits(void) { return (size_t)js().commits; }
static size_t j_records(void) { return (size_t)js().committed_records; }
static size_t j_fsyncs(void) { return (size_t)js().fsyncs; }
static size_t j_p50(void) { return (size_t)(js().fsync_p50_ms * 1000); }
static size_t j_p99(void) { return (size_t)(js().fsync_p99_ms * 1000); }
static size_t j_replays(void) { return (size_t)js().replays; }
static size_t j_errors(void) { return (size_t)js().store_errors; }
static size_t j_cut(void) { return (size_t)js().cut_bytes; }

static size_t qos0_handoff(void) { return (size_t)mqtt_handoff_us(); }
static size_t notify_drops(void) { return (size_t)notify_dropped(); }
static size_t fd_hello_verify(void) { return (size_t)loop_front_door().hello_verify; }
static size_t fd_verified(void) { return (size_t)loop_front_door().verified; }
static size_t fd_cookies_refused(void) { return (size_t)loop_front_door().cookies_refused; }
static size_t oscore_held_n(void) { return (size_t)oscore_held(); }
static size_t fd_dropped(void) { return (size_t)loop_front_door().dropped; }
static size_t fd_reconnects(void) { return (size_t)loop_front_door().reconnects; }
static size_t fd_evicted(void) { return (size_t)loop_front_door().evicted; }
static size_t fd_hs_evicted(void) { return (size_t)loop_front_door().hs_evicted; }
static size_t fd_hs_stalled(void) { return (size_t)loop_front_door().hs_stalled; }
static size_t fd_refused_per_ip(void) { return (size_t)loop_front_door().refused_per_ip; }
static size_t fd_refused_full(void) { return (size_t)loop_front_door().refused_full; }

static const struct family families[] = {
	{ "sessions", "sessions", GAUGE, "DTLS sessions held, handshakes in progress included",
	  dev_sessions, NULL, 0, { { NULL, 0, NULL } } },
	{ "devices_online", "online", GAUGE, "Devices with an established session",
	  dev_online, NULL, 0, { { NULL, 0, NULL } } },
	{ "heap_bytes", "heap_bytes", GAUGE, "Heap in use, bytes: all = what the allocator has "
	  "handed out, dtls = what wolfSSL holds of it (DTLS sessions, handshakes, contexts)",
	  NULL, "part", 2, { { "all", 0, heap_all_bytes }, { "dtls", 0, heap_dtls_bytes } } },
	{ "oscore_devices", "oscore_devices", GAUGE, "OSCORE devices with a security context",
	  oscore_devices, NULL, 0, { { NULL, 0, NULL } } },
	{ "oscore_held_total", "oscore_held", COUNTER, "OSCORE messages of the gateway held back: "
	  "their sequence number was not yet covered by the bound on disk (a burst faster than the "
	  "disk, or the journal directory cannot be written)", oscore_held_n, NULL, 0,
	  { { NULL, 0, NULL } } },
	{ "handshakes_total", "handshakes_ok", COUNTER, "DTLS handshakes completed",
	  NULL, NULL, 1, { { NULL, STAT_HANDSHAKE_OK, NULL } } },
	{ "handshake_failures_total", "handshakes_failed", COUNTER,
	  "DTLS handshakes failed: wrong_key = the device's Finished did not decrypt (seen 10 s "
	  "after the identity was accepted), unknown_identity = an identity or raw public key not in "
	  "the key store, bad_certificate = a device certificate that does not verify (expired, "
	  "not yet valid, untrusted, revoked), dtls_error = any other DTLS failure",
	  NULL, "reason", 4, { { "wrong_key", STAT_HS_WRONG_KEY, NULL },
			       { "unknown_identity", STAT_HS_UNKNOWN_IDENTITY, NULL },
			       { "bad_certificate", STAT_HS_BAD_CERT, NULL },
			       { "dtls_error", STAT_HS_DTLS_ERROR, NULL } } },
	{ "hello_verify_total", "hello_verify", COUNTER,
	  "ClientHellos from addresses without a session and without a valid cookie: answered "
	  "with a HelloVerifyRequest, nothing kept", fd_hello_verify, NULL, 0, { { NULL, 0, NULL } } },
	{ "cookies_verified_total", "cookies_verified", COUNTER,
	  "ClientHellos with a valid cookie (the client receives at its address): a session was "
	  "made, unless handshakes_refused_total counts it", fd_verified, NULL, 0, { { NULL, 0, NULL } } },
	{ "cookies_refused_total", "cookies_refused", COUNTER,
	  "Of the HelloVerifyRequests, those for a ClientHello that carried a cookie that was not "
	  "valid (made for another address, or before the secret changed)", fd_cookies_refused,
	  NULL, 0, { { NULL, 0, NULL } } },
	{ "stranger_datagrams_dropped_total", "stranger_dropped", COUNTER,
	  "Datagrams from addresses without a session that were neither a ClientHello nor a "
	  "record with a known Connection ID: dropped", fd_dropped, NULL, 0, { { NULL, 0, NULL } } },
	{ "reconnects_total", "reconnects", COUNTER,
	  "ClientHellos with a valid cookie from an address that has an established session "
	  "(a device that lost its DTLS state): a new handshake, which replaces the session "
	  "when it completes", fd_reconnects, NULL, 0, { { NULL, 0, NULL } } },
	{ "evictions_total", "evictions", COUNTER,
	  "Sessions closed to make room for a client that echoed its cookie: max_sessions = "
	  "the longest-silent session at coap.max_sessions, max_handshakes = the longest-silent "
	  "handshake at coap.max_handshakes, stalled = a handshake silent for 30 s",
	  NULL, "reason", 3, { { "max_sessions", 0, fd_evicted },
			       { "max_handshakes", 0, fd_hs_evicted },
			       { "stalled", 0, fd_hs_stalled } } },
	{ "handshakes_refused_total", "handshakes_refused", COUNTER,
	  "ClientHellos with a valid cookie that started no handshake: per_ip = their address "
	  "had coap.max_handshakes_per_ip in progress, full = no session could make room",
	  NULL, "reason", 2, { { "per_ip", 0, fd_refused_per_ip },
			       { "full", 0, fd_refused_full } } },
	{ "requests_total", "requests", COUNTER, "Device requests answered, by CoAP response code",
	  NULL, "code", 7, { { "2.04", STAT_RESP_2_04, NULL }, { "4.00", STAT_RESP_4_00, NULL },
			     { "4.01", STAT_RESP_4_01, NULL },
			     { "4.04", STAT_RESP_4_04, NULL }, { "4.05", STAT_RESP_4_05, NULL },
			     { "4.13", STAT_RESP_4_13, NULL }, { "5.03", STAT_RESP_5_03, NULL } } },
	{ "uploads_refused_total", "uploads_refused", COUNTER,
	  "Block-wise uploads refused at their first block, before anything was stored: no_route "
	  "= no route takes the path and method, busy = the device had 2 uploads in progress",
	  NULL, "reason", 2, { { "no_route", STAT_UPLOAD_NO_ROUTE, NULL },
			       { "busy", STAT_UPLOAD_BUSY, NULL } } },
	{ "duplicates_total", "duplicates", COUNTER,
	  "Retransmitted confirmable requests answered again without publishing",
	  NULL, NULL, 1, { { NULL, STAT_DUPLICATES, NULL } } },
	{ "readings_total", "readings", COUNTER, "Device readings handed to the MQTT client",
	  NULL, NULL, 1, { { NULL, STAT_PUBLISHED, NULL } } },
	{ "publishes_total", "publishes", COUNTER,
	  "Messages handed to the MQTT client (readings, notifications, command responses, "
	  "presence, metrics), by QoS",
	  NULL, "qos", 3, { { "0", STAT_PUBLISH_QOS0, NULL }, { "1", STAT_PUBLISH_QOS1, NULL },
			    { "2", STAT_PUBLISH_QOS2, NULL } } },
	{ "publish_failures_total", "publish_failures", COUNTER,
	  "Readings the MQTT client reported as not delivered",
	  NULL, NULL, 1, { { NULL, STAT_PUBLISH_FAILED, NULL } } },
	{ "qos0_handoff_cpu_microseconds_total", "qos0_handoff_cpu_us", COUNTER,
	  "CPU time the event loop spent in the MQTT client's publish calls for QoS 0 readings "
	  "(the client copies and queues each)", qos0_handoff, NULL, 0, { { NULL, 0, NULL } } },
	{ "broker_acks_pending", "acks_pending", GAUGE,
	  "Readings of ack: broker routes waiting for the broker's PUBACK before their 2.04",
	  acks_pending, NULL, 0, { { NULL, 0, NULL } } },
	{ "broker_acks_refused_total", "acks_refused", COUNTER,
	  "Readings of ack: broker routes answered 5.03 because mqtt.max_pending_acks were waiting",
	  NULL, NULL, 1, { { NULL, STAT_ACKS_FULL, NULL } } },
	{ "buffered", "buffered", GAUGE,
	  "Readings in the journal not yet acknowledged by the broker, plus other messages "
	  "waiting in the MQTT client (broker backlog)",
	  backlog, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_bytes", "journal_bytes", GAUGE, "Bytes in the journal's segment files",
	  j_bytes, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_segments", "journal_segments", GAUGE, "Segment files in the journal",
	  j_segments, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_commits_total", "journal_commits", COUNTER,
	  "Batches written to the journal (group commits)", j_commits, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_records_total", "journal_records", COUNTER,
	  "Readings committed to the journal (divided by commits: readings per commit)",
	  j_records, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_fsyncs_total", "journal_fsyncs", COUNTER, "fdatasync calls of the journal",
	  j_fsyncs, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_fsync_p50_microseconds", "journal_fsync_p50_us", GAUGE,
	  "Median fdatasync time over the last 1024", j_p50, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_fsync_p99_microseconds", "journal_fsync_p99_us", GAUGE,
	  "99th percentile fdatasync time over the last 1024", j_p99, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_replays_total", "journal_replays", COUNTER,
	  "Readings published again (after a reconnect, a lost session or a failed publish)",
	  j_replays, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_store_errors_total", "journal_store_errors", COUNTER,
	  "Journal writes or syncs that failed (their readings were answered 5.03)",
	  j_errors, NULL, 0, { { NULL, 0, NULL } } },
	{ "journal_cut_bytes_total", "journal_cut_bytes", COUNTER,
	  "Bytes of torn or corrupt journal tails cut off at start", j_cut, NULL, 0,
	  { { NULL, 0, NULL } } },
	{ "dropped_total", "dropped", COUNTER,
	  "Notifications, command responses and presence messages dropped: MQTT buffer full",
	  NULL, NULL, 1, { { NULL, STAT_DROPPED, NULL } } },
	{ "observations_active", "observations", GAUGE, "Observations held on device resources",
	  observe_active, NULL, 0, { { NULL, 0, NULL } } },
	{ "notifications_total", "notifications", COUNTER, "Observe notifications published",
	  NULL, NULL, 1, { { NULL, STAT_NOTIFICATIONS, NULL } } },
	{ "notifications_stale_total", "notifications_stale", COUNTER,
	  "Observe notifications dropped as older than the last one (RFC 7641 3.4)",
	  NULL, NULL, 1, { { NULL, STAT_STALE_NOTIFICATIONS, NULL } } },
	{ "commands_sent_total", "commands_sent", COUNTER, "Command requests sent to devices",
	  NULL, NULL, 1, { { NULL, STAT_COMMANDS, NULL } } },
	{ "command_errors_total", "command_errors", COUNTER,
	  "Commands answered with an error (queue full, device offline, timeout, no response)",
	  NULL, NULL, 1, { { NULL, STAT_COMMAND_ERRORS, NULL } } },
	{ "commands_queued", "commands_queued", GAUGE, "Commands waiting or in flight",
	  command_queued, NULL, 0, { { NULL, 0, NULL } } },
	{ "notify_dropped_total", "notify_dropped", COUNTER,
	  "Keep-alives (WATCHDOG=1, STATUS=) to the service manager dropped because it was not "
	  "reading its socket: the loop never waits for it", notify_drops, NULL, 0,
	  { { NULL, 0, NULL } } },
	{ "log_lines_suppressed_total", "log_suppressed", COUNTER,
	  "Log lines a device (or a peer without a configured identity) caused beyond 20 a "
	  "minute: not written; a line a minute names the source and the count",
	  log_suppressed, NULL, 0, { { NULL, 0, NULL } } },
	{ "broker_connected", "broker_connected", GAUGE, "1 when the MQTT broker is connected",
	  broker_connected, NULL, 0, { { NULL, 0, NULL } } },
	{ "broker_reconnects_total", "broker_reconnects", COUNTER,
	  "Broker connection re-established after a loss",
	  NULL, NULL, 1, { { NULL, STAT_BROKER_RECONNECTS, NULL } } },
};

#define N_FAMILIES (sizeof(families) / sizeof(families[0]))

static struct {
	const struct conf_metrics *conf;
	struct event_base *base;
	struct evhttp *http;
	struct event *tick;		/* JSON snapshot timer */
	unsigned interval;		/* the timer's period, 0 when not armed */
	char text[METRICS_TEXT_MAX];	/* one exposition at a time: the loop is single-threaded */
} MT;

/* ---- formatting: bounded, O(counters) ---- */

struct out {
	char *buf;
	size_t len, off;
	int full;
};

static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (o->full)
		return;
	va_start(ap, fmt);
	n = vsnprintf(o->buf + o->off, o->len - o->off, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= o->len - o->off)
		o->full = 1;
	else
		o->off += (size_t)n;
}

static size_t done(struct out *o)
{
	if (o->full || o->len == 0) {
		if (o->len)
			o->buf[0] = '\0';
		return 0;
	}
	return o->off;
}

static uint64_t value(const struct family *f, size_t i)
{
	if (f->gauge)
		return f->gauge();
	return f->s[i].read ? f->s[i].read() : stats_get(f->s[i].id);
}

size_t metrics_prometheus(char *buf, size_t len)
{
	struct out o = { buf, len, 0, len == 0 };

	for (size_t i = 0; i < N_FAMILIES; i++) {
		const struct family *f = &families[i];

		put(&o, "# HELP " METRICS_PREFIX "%s %s\n# TYPE " METRICS_PREFIX "%s %s\n", f->name,
		    f->help, f->name, f->kind == GAUGE ? "gauge" : "counter");
		if (!f->label) {
			put(&o, METRICS_PREFIX "%s %" PRIu64 "\n", f->name, value(f, 0));
			continue;
		}
		for (size_t j = 0; j < f->n; j++)
			put(&o, METRICS_PREFIX "%s{%s=\"%s\"} %" PRIu64 "\n", f->name, f->label,
			    f->s[j].value, value(f, j));
	}
	return done(&o);
}

size_t metrics_json(char *buf, size_t len)
{
	struct out o = { buf, len, 0, len == 0 };

	put(&o, "{\"time\":%lld", (long long)time(NULL));
	for (size_t i = 0; i < N_FAMILIES; i++) {
		const struct family *f = &families[i];

		if (!f->label) {
			put(&o, ",\"%s\":%" PRIu64, f->json, value(f, 0));
			continue;
		}
		put(&o, ",\"%s\":{", f->json);
		for (size_t j = 0; j < f->n; j++)
			put(&o, "%s\"%s\":%" PRIu64, j ? "," : "", f->s[j].value, value(f, j));
		put(&o, "}");
	}
	put(&o, "}");
	return done(&o);
}

/* ---- HTTP: GET /metrics ---- */

static void on_http(struct evhttp_request *req, void *arg)
{
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	struct evkeyvalq *hdr = evhttp_request_get_output_headers(req);
	size_t n;

	(void)arg;
	if (!path || strcmp(path, "/metrics") != 0) {
		evhttp_send_error(req, HTTP_NOTFOUND, NULL);
		return;
	}
	if (m != EVHTTP_REQ_GET && m != EVHTTP_REQ_HEAD) {
		evhttp_add_header(hdr, "Allow", "GET, HEAD");
		evhttp_send_error(req, HTTP_BADMETHOD, NULL);
		return;
	}
	n = metrics_prometheus(MT.text, sizeof(MT.text));
	if (n == 0 || evbuffer_add(evhttp_request_get_output_buffer(req), MT.text, n) < 0) {
		log_error("metrics: exposition does not fit in %zu bytes", sizeof(MT.text));
		evhttp_send_error(req, HTTP_INTERNAL, NULL);
		return;
	}
	evhttp_add_header(hdr, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
	evhttp_add_header(hdr, "Cache-Control", "no-store");
	evhttp_send_reply(req, HTTP_OK, "OK", NULL);
}

/* "host:port", "[v6]:port" → host (brackets removed) and port; -1 when malformed. */
static int split_hostport(const char *s, char *host, size_t hlen, ev_uint16_t *port)
{
	const char *colon = strrchr(s, ':'), *h = s;
	size_t n;
	char *end;
	unsigned long p;

	if (!colon)
		return -1;
	n = (size_t)(colon - s);
	if (s[0] == '[') {
		if (n < 2 || s[n - 1] != ']')
			return -1;
		h = s + 1;
		n -= 2;
	}
	p = strtoul(colon + 1, &end, 10);
	if (n == 0 || n >= hlen || *end || colon[1] == '\0' || p == 0 || p > 65535)
		return -1;
	memcpy(host, h, n);
	host[n] = '\0';
	*port = (ev_uint16_t)p;
	return 0;
}

static int http_init(const char *listen)
{
	char host[256];
	ev_uint16_t port;

	if (split_hostport(listen, host, sizeof(host), &port) < 0) {
		log_error("metrics: listen=%s is not HOST:PORT or [IPv6]:PORT", listen);
		return -1;
	}
	MT.http = evhttp_new(MT.base);
	if (!MT.http) {
		log_error("metrics: out of memory creating the HTTP listener");
		return -1;
	}
	evhttp_set_allowed_methods(MT.http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST |
				   EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
				   EVHTTP_REQ_PATCH);	/* others get 405 from on_http, not 501 */
	evhttp_set_timeout(MT.http, METRICS_HTTP_TIMEOUT_S);
	evhttp_set_max_headers_size(MT.http, METRICS_MAX_HEADERS);
	evhttp_set_max_body_size(MT.http, METRICS_MAX_BODY);
	evhttp_set_gencb(MT.http, on_http, NULL);
	if (!evhttp_bind_socket_with_handle(MT.http, host, port)) {
		log_error("metrics: cannot listen on %s: %s", listen,
			  evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
		return -1;
	}
	log_info("metrics: listening listen=%s path=/metrics", listen);
	return 0;
}

/* ---- JSON snapshot on MQTT ---- */

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	char buf[METRICS_JSON_MAX];
	struct mqtt_msg m;
	size_t n;

	(void)fd;
	(void)what;
	(void)arg;
	/* a snapshot is only worth sending now: none is buffered for a broker that is away */
	if (!MT.conf->topic || !mqtt_connected())
		return;
	n = metrics_json(buf, sizeof(buf));
	if (n == 0) {
		log_error("metrics: JSON snapshot does not fit in %zu bytes", sizeof(buf));
		return;
	}
	m = (struct mqtt_msg){ .topic = MT.conf->topic, .payload = buf, .len = n, .qos = 0,
			       .retain = 0, .content_format = 50 };
	if (mqtt_publish(&m, NULL, NULL) != MQTT_SEND_OK)
		log_debug("metrics: snapshot on %s not published: MQTT buffer full", MT.conf->topic);
}

static int tick_arm(void)
{
	struct timeval tv = { (time_t)MT.conf->interval, 0 };
	unsigned want = MT.conf->topic ? MT.conf->interval : 0;

	if (want == MT.interval)
		return 0;
	MT.interval = 0;
	evtimer_del(MT.tick);
	if (want == 0)
		return 0;
	if (evtimer_add(MT.tick, &tv) < 0)
		return -1;
	MT.interval = want;
	return 0;
}

/* ---- life cycle ---- */

int metrics_init(struct event_base *base, const struct conf_metrics *c)
{
	MT.conf = c;
	MT.base = base;
	MT.tick = event_new(base, -1, EV_PERSIST, on_tick, NULL);
	if (!MT.tick || tick_arm() < 0) {
		log_error("metrics: out of memory arming the snapshot timer");
		return -1;
	}
	if (c->topic)
		log_info("metrics: publishing topic=%s interval=%us", c->topic, c->interval);
	return c->listen ? http_init(c->listen) : 0;
}

void metrics_set_config(const struct conf_metrics *c)
{
	const char *was = MT.conf ? MT.conf->listen : NULL;

	if ((was == NULL) != (c->listen == NULL) || (was && strcmp(was, c->listen) != 0))
		log_warn("reload: metrics.listen changed; it takes effect at the next start");
	MT.conf = c;
	if (MT.tick && tick_arm() < 0)
		log_error("metrics: cannot re-arm the snapshot timer");
}

void metrics_shutdown(void)
{
	if (MT.http)
		evhttp_free(MT.http);	/* closes the listener and open connections */
	if (MT.tick)
		event_free(MT.tick);
	MT.http = NULL;
	MT.tick = NULL;
	MT.interval = 0;
}
