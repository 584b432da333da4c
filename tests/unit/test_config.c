/* test_config.c: unit tests for the YAML configuration loader (run with tests/unit as the cwd). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "config.h"
#include "log.h"

static char tmpdir[64];

#define MQTT_OK "mqtt:\n  url: mqtt://b\n  insecure: true\n"

struct loaded {
	struct config *c;
	char *errs;		/* everything written to errs, NUL-ended */
	size_t len;
};

static struct loaded load(const char *path)
{
	struct loaded l = { NULL, NULL, 0 };
	FILE *f = open_memstream(&l.errs, &l.len);

	if (f == NULL)
		return l;
	l.c = conf_load(path, f);
	fclose(f);
	return l;
}

static void unload(struct loaded *l)
{
	conf_free(l->c);
	free(l->errs);
}

static int count_lines(const char *s)
{
	int n = 0;

	for (; s && *s; s++)
		n += *s == '\n';
	return n;
}

/* 1 when errs holds want as one whole line; prints what it got otherwise. */
static int has_line(const char *errs, const char *want)
{
	size_t wl = strlen(want);
	const char *p = errs;

	while (p && (p = strstr(p, want)) != NULL) {
		if ((p == errs || p[-1] == '\n') && p[wl] == '\n')
			return 1;
		p++;
	}
	fprintf(stderr, "missing line: %s\n--- got:\n%s---\n", want, errs ? errs : "(null)");
	return 0;
}

static void write_file(const char *name, const char *content, mode_t mode)
{
	char path[256];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	f = fopen(path, "w");
	CHECK(f != NULL);
	if (f == NULL)
		return;
	CHECK(fputs(content, f) >= 0);
	fclose(f);
	CHECK(chmod(path, mode) == 0);
}

static void copy_file(const char *from, const char *name, mode_t mode)
{
	char buf[65536];
	FILE *f = fopen(from, "r");
	size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;

	CHECK(f != NULL);
	if (f)
		fclose(f);
	buf[n] = '\0';
	write_file(name, buf, mode);
}

static struct loaded load_tmp(const char *name)
{
	char path[256];

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	return load(path);
}

/* Writes content as a config file in the temporary folder and loads it. */
static struct loaded load_text(const char *name, const char *content)
{
	write_file(name, content, 0640);
	return load_tmp(name);
}

/* full.yaml's observe, commands, presence_topic and metrics, through their compiled routes too. */
static void test_full_new(const struct config *c)
{
	char topic[ROUTE_MAX_TOPIC];
	struct route_seg seg[ROUTE_MAX_SEGMENTS], id;
	const char *t = "devices/dev-a/set/led/1";
	size_t n;

	CHECK(c->n_observe == 3);
	if (c->n_observe == 3) {
		CHECK_STR(c->observe[0].devices, "sensor-*");
		CHECK_STR(c->observe[0].path, "temperature");
		CHECK(!c->observe[0].discover && c->observe[0].match == NULL);
		CHECK(c->observe[0].qos == 1 && c->observe[0].retain);
		CHECK(c->observe[0].line == 49);
		n = route_split(c->observe[0].path, strlen(c->observe[0].path), seg, ROUTE_MAX_SEGMENTS);
		CHECK(route_match(c->observe[0].route, seg, n, "sensor-1", topic, sizeof(topic)) == ROUTE_OK);
		CHECK_STR(topic, "devices/sensor-1/temperature");
		CHECK_STR(c->observe[1].devices, "*");
		CHECK(c->observe[1].discover && c->observe[1].path == NULL);
		CHECK_STR(c->observe[1].match, "sensors/*");
		CHECK(c->observe[1].qos == 2 && !c->observe[1].retain);
		n = route_split("sensors/hum/1", 13, seg, ROUTE_MAX_SEGMENTS);
		CHECK(route_match(c->observe[1].route, seg, n, "d", topic, sizeof(topic)) == ROUTE_OK);
		CHECK_STR(topic, "devices/d/sensors/hum/1");
		CHECK_STR(c->observe[2].path, "a/b");
		CHECK(!c->observe[2].discover && c->observe[2].qos == 0);
		n = route_split("a/b", 3, seg, ROUTE_MAX_SEGMENTS);
		CHECK(route_match(c->observe[2].route, seg, n, "d", topic, sizeof(topic)) == ROUTE_OK);
		CHECK_STR(topic, "obs/d/a/b");
	}
	CHECK(c->n_commands == 2);
	if (c->n_commands == 2) {
		CHECK_STR(c->commands[0].topic, "devices/{identity}/set/{path+}");
		CHECK_STR(c->commands[0].filter, "devices/+/set/#");
		CHECK_STR(c->commands[0].response_topic, "devices/{identity}/set-response/{path+}");
		CHECK(c->commands[0].method == CONF_M_POST);
		CHECK(c->commands[0].ttl == 0 && c->commands[0].qos == 2);
		CHECK(c->commands[0].line == 62);
		n = route_split(t, strlen(t), seg, ROUTE_MAX_SEGMENTS);
		CHECK(route_match_id(c->commands[0].route, seg, n, &id, topic, sizeof(topic)) == ROUTE_OK);
		CHECK(id.len == 5 && memcmp(id.s, "dev-a", 5) == 0);
		CHECK_STR(topic, "devices/dev-a/set-response/led/1");
		CHECK_STR(c->commands[1].filter, "cmd/+/+/#");
		CHECK(c->commands[1].response_topic == NULL);
		CHECK(c->commands[1].method == CONF_M_PUT);
		CHECK(c->commands[1].ttl == 30 && c->commands[1].qos == 1);
		CHECK(route_match_id(c->commands[1].route, seg, n, &id, topic, sizeof(topic)) ==
		      ROUTE_NO_MATCH);
	}
	CHECK_STR(c->presence_topic, "devices/{identity}/status");
	CHECK(route_match(c->presence_route, NULL, 0, "dev-a", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "devices/dev-a/status");
	CHECK_STR(c->metrics.listen, "[::1]:9464");
	CHECK_STR(c->metrics.topic, "gw/test/metrics");
	CHECK(c->metrics.interval == 15);
}

static void test_full(void)
{
	char want[256];
	struct loaded l;
	struct config *c;

	copy_file("full.yaml", "full.yaml", 0640);
	copy_file("full.keys", "full.keys", 0640);
	write_file("ca.pem", "not parsed here\n", 0644);
	write_file("client.crt", "not parsed here\n", 0644);
	write_file("client.key", "not parsed here\n", 0600);
	snprintf(want, sizeof(want), "%s/secret", tmpdir);
	CHECK(mkdir(want, 0700) == 0 || errno == EEXIST);
	write_file("secret/mqtt.password", "pa ss\r\nsecond line\n", 0600);
	l = load_tmp("full.yaml");
	c = l.c;
	CHECK(c != NULL);
	CHECK(l.len == 0);
	if (c == NULL) {
		fprintf(stderr, "%s", l.errs);
		unload(&l);
		return;
	}
	CHECK(c->log_level == LOG_LVL_DEBUG);
	CHECK(c->coap.n_listen == 2);
	CHECK_STR(c->coap.listen[0], "coaps://[::1]:15684");
	CHECK_STR(c->coap.listen[1], "coap://127.0.0.1:15683");
	CHECK(c->coap.idle_timeout == 60);
	CHECK(c->coap.max_sessions == 500);
	CHECK(c->coap.max_payload == 2048);
	CHECK(c->coap.n_ciphers == 2);
	CHECK_STR(c->coap.ciphers[1], "TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256");
	CHECK_STR(c->coap.psk_hint, "gw-hint");
	CHECK(c->coap.block_size == 256);

	CHECK(c->n_devices == 4);
	if (c->n_devices == 4) {
		CHECK_STR(c->devices[0].identity, "dev-a");
		CHECK(c->devices[0].key_len == 10 && memcmp(c->devices[0].key, "0123456789", 10) == 0);
		CHECK_STR(c->devices[1].identity, "dev-\xc3\xbc");
		CHECK(c->devices[1].key_len == 16 && c->devices[1].key[15] == 0xff);
		CHECK_STR(c->devices[2].identity, "dev-b");
		CHECK_STR(c->devices[3].identity, "dev-c");
		CHECK(c->devices[3].key_len == 8 && c->devices[3].key[0] == 1);
		snprintf(want, sizeof(want), "%s/full.yaml:14", tmpdir);
		CHECK_STR(c->devices[0].origin, want);
	}
	snprintf(want, sizeof(want), "%s/full.keys", tmpdir);
	CHECK_STR(c->devices_file, want);

	CHECK_STR(c->mqtt.url, "mqtts://[::1]:18883");
	CHECK_STR(c->mqtt.host, "::1");
	CHECK(c->mqtt.port == 18883);
	CHECK(c->mqtt.tls);
	CHECK(c->mqtt.insecure);
	CHECK_STR(c->mqtt.client_id, "gw-test_1");
	snprintf(want, sizeof(want), "%s/ca.pem", tmpdir);
	CHECK_STR(c->mqtt.ca_file, want);
	snprintf(want, sizeof(want), "%s/client.key", tmpdir);
	CHECK_STR(c->mqtt.key_file, want);
	CHECK(c->mqtt.cert_file != NULL);
	CHECK_STR(c->mqtt.username, "gateway");
	CHECK_STR(c->mqtt.password, "pa ss");
	CHECK(c->mqtt.keepalive == 45);
	CHECK(c->mqtt.version == 3);
	snprintf(want, sizeof(want), "%s/spool", tmpdir);
	CHECK_STR(c->mqtt.persistence_dir, want);
	CHECK(c->mqtt.max_buffered == 500);
	CHECK(c->mqtt.max_inflight == 20);
	CHECK(c->mqtt.session_expiry == 0);

	CHECK(c->n_routes == 2);
	if (c->n_routes == 2) {
		CHECK_STR(c->routes[0].path, "sensors/{name}");
		CHECK_STR(c->routes[0].topic, "devices/{identity}/{name}");
		CHECK(c->routes[0].route != NULL);
		CHECK(c->routes[0].methods == (CONF_M_GET | CONF_M_POST | CONF_M_PUT | CONF_M_DELETE));
		CHECK(c->routes[0].qos == 2);
		CHECK(c->routes[0].retain);
		CHECK(c->routes[0].ack == CONF_ACK_BROKER);
		CHECK(c->routes[0].line == 36);
		CHECK(c->routes[1].methods == CONF_M_POST);
		CHECK(c->routes[1].qos == 0);
		CHECK(!c->routes[1].retain);
		CHECK(c->routes[1].ack == CONF_ACK_STORED);
	}
	CHECK_STR(c->mqtt.status_topic, "gw/test/status");
	test_full_new(c);
	unload(&l);
}

static void test_defaults(void)
{
	struct loaded l = load("defaults.yaml");
	struct config *c = l.c;

	CHECK(c != NULL);
	if (c == NULL) {
		fprintf(stderr, "%s", l.errs);
		unload(&l);
		return;
	}
	CHECK(c->log_level == LOG_LVL_INFO);
	CHECK(c->coap.n_listen == 1);
	CHECK_STR(c->coap.listen[0], "coaps://[::]:5684");
	CHECK(c->coap.idle_timeout == 300);
	CHECK(c->coap.max_sessions == 20000);
	CHECK(c->coap.max_payload == 1024);
	CHECK(c->coap.n_ciphers == 0);
	CHECK(c->coap.psk_hint == NULL);
	CHECK(c->coap.block_size == 512);
	CHECK(c->n_devices == 0);
	CHECK(c->devices_file == NULL);
	CHECK_STR(c->mqtt.host, "localhost");
	CHECK(c->mqtt.port == 1883);
	CHECK(!c->mqtt.tls);
	CHECK_STR(c->mqtt.client_id, "coap2mqtt");
	CHECK_STR(c->mqtt.ca_file, "/etc/ssl/certs/ca-certificates.crt");
	CHECK(c->mqtt.cert_file == NULL && c->mqtt.key_file == NULL);
	CHECK(c->mqtt.username == NULL && c->mqtt.password == NULL);
	CHECK(c->mqtt.keepalive == 30);
	CHECK(c->mqtt.version == 5);
	CHECK_STR(c->mqtt.persistence_dir, "/var/lib/coap2mqtt");
	CHECK(c->mqtt.max_buffered == 100000);
	CHECK(c->mqtt.max_inflight == 1000);
	CHECK(c->mqtt.session_expiry == 86400);
	CHECK(c->n_routes == 0);
	CHECK_STR(c->mqtt.status_topic, "coap2mqtt/coap2mqtt/status");
	CHECK(c->n_observe == 0 && c->observe == NULL);
	CHECK(c->n_commands == 0 && c->commands == NULL);
	CHECK(c->presence_topic == NULL && c->presence_route == NULL);
	CHECK(c->metrics.listen == NULL && c->metrics.topic == NULL && c->metrics.interval == 60);
	unload(&l);

	/* observe and commands take their defaults; status_topic follows client_id */
	l = load_text("d3.yaml", MQTT_OK "  client_id: gw-7\nobserve:\n  - {path: t, topic: \"o/{identity}\"}\n"
		      "commands:\n  - topic: \"{identity}/{p+}\"\nmetrics: {}\npresence_topic: ~\n");
	CHECK(l.c != NULL);
	if (l.c) {
		CHECK_STR(l.c->mqtt.status_topic, "coap2mqtt/gw-7/status");
		CHECK(l.c->n_observe == 1 && l.c->n_commands == 1);
		CHECK_STR(l.c->observe[0].devices, "*");
		CHECK(l.c->observe[0].qos == 0 && !l.c->observe[0].retain && !l.c->observe[0].discover);
		CHECK_STR(l.c->commands[0].filter, "+/#");
		CHECK(l.c->commands[0].method == CONF_M_PUT && l.c->commands[0].response_topic == NULL);
		CHECK(l.c->commands[0].ttl == 30 && l.c->commands[0].qos == 1);
		CHECK(l.c->commands[0].n_response_topics == 0);	/* no Response Topic is used */
		CHECK(l.c->commands[0].timeout == 60 && l.c->commands[0].max_payload == 4096);
		CHECK(l.c->metrics.listen == NULL && l.c->metrics.interval == 60);
		CHECK(l.c->presence_topic == NULL);
		CHECK(l.c->coap.receive_buffer == 4u << 20);
		CHECK(l.c->coap.max_handshakes == 1000);
		CHECK(l.c->coap.max_handshakes_per_ip == 16);
	} else {
		fprintf(stderr, "%s", l.errs);
	}
	unload(&l);

	/* mqtts:// without a port → 8883; a route's options default too */
	write_file("ca.pem", "x\n", 0644);
	l = load_text("d2.yaml", "mqtt:\n  url: mqtts://b.example\n  ca_file: ca.pem\n"
			 "routes:\n  - path: p\n    topic: t\n");
	CHECK(l.c != NULL);
	if (l.c) {
		CHECK(l.c->mqtt.port == 8883 && l.c->mqtt.tls);
		CHECK(l.c->n_routes == 1);
		CHECK(l.c->routes[0].methods == (CONF_M_POST | CONF_M_PUT));
		CHECK(l.c->routes[0].qos == 1 && !l.c->routes[0].retain);
		CHECK(l.c->routes[0].ack == CONF_ACK_STORED);
	}
	unload(&l);

	/* coap.receive_buffer: bytes, 64 KiB..1 GiB */
	l = load_text("rb.yaml", MQTT_OK "coap:\n  receive_buffer: 1000\n");
	CHECK(l.c == NULL);
	CHECK(strstr(l.errs, "receive_buffer: 1000 is out of range 65536..1073741824") != NULL);
	unload(&l);
	/* coap.max_handshakes: 1..100000, default 1000 */
	l = load_text("mh.yaml", MQTT_OK "coap:\n  max_handshakes: 0\n");
	CHECK(l.c == NULL && l.errs != NULL);
	CHECK(strstr(l.errs, "max_handshakes: 0 is out of range 1..100000") != NULL);
	unload(&l);
	l = load_text("mh2.yaml", MQTT_OK "coap:\n  max_handshakes: 50\n");
	CHECK(l.c != NULL && l.c->coap.max_handshakes == 50);
	unload(&l);
	/* coap.max_handshakes_per_ip: 1..100000, default 16 */
	l = load_text("mhi.yaml", MQTT_OK "coap:\n  max_handshakes_per_ip: 0\n");
	CHECK(l.c == NULL && l.errs != NULL);
	CHECK(strstr(l.errs, "max_handshakes_per_ip: 0 is out of range 1..100000") != NULL);
	unload(&l);
	l = load_text("rts.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n"
		      "    response_topics: [\"replies/#\", \"a/+/b\", \"#\"]\n");
	CHECK(l.c != NULL && l.c->commands[0].n_response_topics == 3);
	if (l.c)
		CHECK_STR(l.c->commands[0].response_topics[1], "a/+/b");
	unload(&l);
	/* a reload names what only a restart applies */
	{
		struct loaded a = load_text("rs1.yaml", MQTT_OK "coap:\n  idle_timeout: 5\n");
		struct loaded b = load_text("rs2.yaml", MQTT_OK "coap:\n  idle_timeout: 9\n"
					    "  psk_hint: gw\n");
		const char *names[CONF_RESTART_KEYS];

		CHECK(a.c != NULL && b.c != NULL);
		if (a.c && b.c) {
			CHECK(conf_restart_needed(a.c, a.c, names, CONF_RESTART_KEYS) == 0);
			CHECK(conf_restart_needed(a.c, b.c, names, CONF_RESTART_KEYS) == 1);
			CHECK_STR(names[0], "coap.psk_hint");
		}
		unload(&a);
		unload(&b);
	}
	l = load_text("mhi2.yaml", MQTT_OK "coap:\n  max_handshakes_per_ip: 4\n");
	CHECK(l.c != NULL && l.c->coap.max_handshakes_per_ip == 4);
	unload(&l);
	l = load_text("rb2.yaml", MQTT_OK "coap:\n  receive_buffer: 65536\n");
	CHECK(l.c != NULL && l.c->coap.receive_buffer == 65536);
	unload(&l);
}

/* errors.yaml holds one of each kind of error: all must be reported, in file order. */
static void test_errors_file(void)
{
	static const char *const want[] = {
		"errors.yaml:2:12: log_level: \"loud\" is not error, warning, info or debug",
		"errors.yaml:4:11: listen: expected a list, found a single value",
		"errors.yaml:5:17: idle_timeout: 0 is out of range 1..86400",
		"errors.yaml:6:17: max_sessions: \"10s\" is not an integer (1..1000000)",
		"errors.yaml:7:12: ciphers: must include TLS_PSK_WITH_AES_128_CCM_8 (mandatory in RFC 7252)",
		"errors.yaml:8:15: block_size: 100 is not 16, 32, 64, 128, 256, 512 or 1024",
		"errors.yaml:9:3: coap: unknown key \"colour\" (allowed: listen, idle_timeout, max_sessions, "
		"max_payload, ciphers, psk_hint, block_size, receive_buffer, max_handshakes, "
		"max_handshakes_per_ip, rpk, pki, cid, cid_length)",
		"errors.yaml:12:10: key: key shorter than 8 bytes (8..64)",
		"errors.yaml:15:15: identity: duplicate identity \"dev2\" (first defined at line 13)",
		"errors.yaml:17:15: identity: \"a/b\" is not valid in an MQTT topic (non-empty UTF-8 without "
		"'/', '+', '#' or control characters)",
		"errors.yaml:21:14: key_hex: give one of key, key_hex, rpk or auth: certificate",
		"errors.yaml:23:14: key_hex: key has a character that is not a hex digit (8..64 bytes: "
		"16..128 hex digits)",
		"errors.yaml:25:8: url: mqtt:// sends without TLS (use mqtts://, or set insecure: true for a "
		"lab broker)",
		"errors.yaml:26:13: insecure: \"maybe\" is not a boolean (true, false, yes or no)",
		"errors.yaml:27:14: keepalive: 4 is out of range 5..3600",
		"errors.yaml:28:12: version: 4 is not 3 or 5",
		"errors.yaml:29:14: cert_file: needs key_file too (both or neither)",
		"errors.yaml:30:17: max_inflight: expected an integer, found a list",
		"errors.yaml:34:12: topic: uses {room} but the path has no {room}",
		"errors.yaml:37:10: qos: 3 is not 0, 1 or 2",
		"errors.yaml:39:12: topic: must not contain '+' or '#' (MQTT wildcards)",
		"errors.yaml:43:10: ack: broker needs qos 1 or 2 (a qos 0 publish is never acknowledged)",
		"errors.yaml:44:20: methods: \"PATCH\" is not GET, POST, PUT or DELETE",
		"errors.yaml:47:11: path: \"ok/{x}\" is already routed at line 45",
		"errors.yaml:49:5: routes: path is required",
		"errors.yaml:50:1: unknown key \"unknown_top\" (allowed: log_level, coap, devices, "
		"devices_file, mqtt, routes, observe, commands, presence_topic, metrics, discovery)",
	};
	struct loaded l = load("errors.yaml");
	size_t i;
	const char *last = l.errs;

	CHECK(l.c == NULL);
	for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		CHECK(has_line(l.errs, want[i]));
		if (l.errs && strstr(l.errs, want[i])) {
			CHECK(strstr(l.errs, want[i]) >= last);	/* sorted by position */
			last = strstr(l.errs, want[i]);
		}
	}
	CHECK(count_lines(l.errs) == 28);	/* the list above + "a client certificate needs mqtts://" */
	CHECK(strstr(l.errs, "longenough") == NULL);	/* keys never shown */
	unload(&l);
}

/* errors_ext.yaml: the same for observe, commands, presence_topic, status_topic and metrics. */
static void test_errors_ext(void)
{
	static const char *const want[] = {
		"errors_ext.yaml:6:17: status_topic: must not contain '+' or '#' (MQTT wildcards)",
		"errors_ext.yaml:9:15: discover: give path or discover: true, not both",
		"errors_ext.yaml:12:12: match: only with discover: true (it filters the discovered resources)",
		"errors_ext.yaml:14:5: observe: path or discover: true is required",
		"errors_ext.yaml:15:11: path: must not start with '/' (write \"temperature\" or \"a/b\")",
		"errors_ext.yaml:16:12: topic: uses {room} but the path has no {room}",
		"errors_ext.yaml:17:10: qos: 3 is not 0, 1 or 2",
		"errors_ext.yaml:20:5: observe: unknown key \"colour\" (allowed: devices, path, discover, "
		"match, topic, qos, retain)",
		"errors_ext.yaml:22:12: topic: must contain a {identity} level (the device the command goes to)",
		"errors_ext.yaml:23:12: topic: must not contain '+' or '#' (MQTT wildcards; write {name} for "
		"one level, {name+} for the rest)",
		"errors_ext.yaml:24:12: topic: must end with a {name+} level (the resource path, e.g. {path+})",
		"errors_ext.yaml:26:13: method: \"PATCH\" is not GET, POST, PUT or DELETE",
		"errors_ext.yaml:27:10: ttl: 86401 is out of range 0..86400",
		"errors_ext.yaml:28:12: topic: subscribes to \"devices/+/set/#\" like the command at line 25",
		"errors_ext.yaml:29:21: response_topic: would come back in as a command (it fits "
		"\"devices/+/set/#\", the topic of line 25)",
		"errors_ext.yaml:31:21: response_topic: uses {room} but the path has no {room}",
		"errors_ext.yaml:32:17: presence_topic: must contain {identity} (else every device would "
		"share one retained topic)",
		"errors_ext.yaml:34:11: listen: \"127.0.0.1:70000\" is not HOST:PORT or [IPv6]:PORT (the port "
		"is out of range 1..65535)",
		"errors_ext.yaml:35:10: topic: must not contain '+' or '#' (MQTT wildcards)",
		"errors_ext.yaml:36:13: interval: 0 is out of range 1..86400",
	};
	struct loaded l = load("errors_ext.yaml");
	size_t i;
	const char *last = l.errs;

	CHECK(l.c == NULL);
	for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		CHECK(has_line(l.errs, want[i]));
		if (l.errs && strstr(l.errs, want[i])) {
			CHECK(strstr(l.errs, want[i]) >= last);	/* sorted by position */
			last = strstr(l.errs, want[i]);
		}
	}
	CHECK(count_lines(l.errs) == (int)(sizeof(want) / sizeof(want[0])));
	unload(&l);
}

static void expect(const char *name, const char *yaml, const char *line_suffix)
{
	char want[512];
	struct loaded l = load_text(name, yaml);

	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/%s:%s", tmpdir, name, line_suffix);
	CHECK(has_line(l.errs, want));
	unload(&l);
}

/* The new keys, one error each; the exact line includes position and key. */
static void test_errors_inline_new(void)
{
	expect("obs-both.yaml", MQTT_OK "observe:\n  - path: t\n    discover: true\n    topic: x/{identity}\n",
	       "6:15: discover: give path or discover: true, not both");
	expect("obs-match.yaml", MQTT_OK "observe:\n  - path: t\n    match: \"s/*\"\n    topic: x/{identity}\n",
	       "6:12: match: only with discover: true (it filters the discovered resources)");
	expect("obs-key.yaml", MQTT_OK "observe:\n  - path: t\n    topic: x\n    colour: red\n",
	       "7:5: observe: unknown key \"colour\" (allowed: devices, path, discover, match, topic, qos, "
	       "retain)");
	expect("obs-topic.yaml", MQTT_OK "observe:\n  - path: t\n", "5:5: observe: topic is required");
	/* the reasons route_compile gives, placed at the key they are about */
	expect("pres-var.yaml", MQTT_OK "presence_topic: \"d/{identity}/{room}\"\n",
	       "4:17: presence_topic: uses {room} (only {identity} is available here)");
	expect("pres-rest.yaml", MQTT_OK "presence_topic: \"d/{identity}/{all+}\"\n",
	       "4:17: presence_topic: uses {all+} (only {identity} is available here)");
	expect("route-topic.yaml", MQTT_OK "routes:\n  - {path: \"s/{n}\", topic: \"d/{m}\"}\n",
	       "5:28: topic: uses {m} but the path has no {m}");
	expect("route-path.yaml", MQTT_OK "routes:\n  - {path: \"s/{n}/{n}\", topic: \"d/{n}\"}\n",
	       "5:12: path: uses {n} twice");
	expect("cmd-path.yaml", MQTT_OK "commands:\n  - topic: \"{identity}/{p+}/{q}\"\n",
	       "5:12: topic: must end with a {name+} level (the resource path, e.g. {path+})");
	expect("ack.yaml", MQTT_OK "routes:\n  - {path: s, topic: d, ack: sometimes}\n",
	       "5:30: ack: \"sometimes\" is not stored or broker");
	expect("ack-type.yaml", MQTT_OK "routes:\n  - {path: s, topic: d, ack: [stored]}\n",
	       "5:30: ack: expected stored or broker, found a list");
	expect("level-case.yaml", MQTT_OK "log_level: Info\n",
	       "4:12: log_level: \"Info\" is not error, warning, info or debug");
	expect("method-twice.yaml", MQTT_OK "routes:\n  - {path: s, topic: d, methods: [put, PUT]}\n",
	       "5:40: methods: PUT is listed twice");
	expect("obs-empty.yaml", MQTT_OK "observe:\n  - {path: a//b, topic: x}\n",
	       "5:12: path: has an empty segment (between two '/' or at the end)");
	expect("obs-long.yaml", MQTT_OK "observe:\n  - {path: " "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	       "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	       "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	       "aaaa, topic: x}\n", "5:12: path: is longer than 255 bytes");
	expect("obs-seg.yaml", MQTT_OK "observe:\n  - {path: \"a/b+c\", topic: x}\n",
	       "5:12: path: segment \"b+c\" is not valid in an MQTT topic (UTF-8 without '+', '#' or control "
	       "characters)");
	expect("cmd-id.yaml", MQTT_OK "commands:\n  - topic: \"devices/{id}/set/{path+}\"\n",
	       "5:12: topic: must contain a {identity} level (the device the command goes to)");
	expect("cmd-plus.yaml", MQTT_OK "commands:\n  - topic: \"devices/+/{identity}/{path+}\"\n",
	       "5:12: topic: must not contain '+' or '#' (MQTT wildcards; write {name} for one level, "
	       "{name+} for the rest)");
	expect("cmd-hash.yaml", MQTT_OK "commands:\n  - topic: \"devices/{identity}/#\"\n",
	       "5:12: topic: must not contain '+' or '#' (MQTT wildcards; write {name} for one level, "
	       "{name+} for the rest)");
	expect("cmd-mixed.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/x{y}/{p+}\"\n",
	       "5:12: topic: segment \"x{y}\" mixes text and braces (a variable is a whole segment: {name})");
	expect("cmd-empty.yaml", MQTT_OK "commands:\n  - topic: \"d//{identity}/{p+}\"\n",
	       "5:12: topic: has an empty segment (between two '/' or at the end)");
	expect("cmd-idplus.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{identity+}\"\n",
	       "5:12: topic: variable {identity+} is not allowed (an identity is one segment: {identity})");
	expect("cmd-list.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n    method: [PUT, POST]\n",
	       "6:13: method: expected one method, found a list");
	expect("cmd-rts.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n"
	       "    response_topics: [\"replies/#\", \"a/#/b\"]\n",
	       "6:36: response_topics: \"a/#/b\" is not an MQTT topic filter ('+' and '#' only as whole "
	       "levels, '#' last)");
	expect("cmd-timeout.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n"
	       "    timeout: 0\n", "6:14: timeout: 0 is out of range 1..3600");
	expect("cmd-rts2.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n"
	       "    response_topics: [\"x+/y\"]\n",
	       "6:23: response_topics: \"x+/y\" is not an MQTT topic filter ('+' and '#' only as whole "
	       "levels, '#' last)");
	expect("cmd-same.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n"
	       "    response_topic: \"d/{identity}/{p+}\"\n",
	       "6:21: response_topic: would come back in as a command (it fits \"d/+/#\", the topic of line 5)");
	expect("cmd-dup.yaml", MQTT_OK "commands:\n  - topic: \"d/{identity}/{p+}\"\n  - topic: \"d/{identity}/{p+}\"\n",
	       "6:12: topic: subscribes to \"d/+/#\" like the command at line 5");
	expect("pres.yaml", MQTT_OK "presence_topic: devices/status\n",
	       "4:17: presence_topic: must contain {identity} (else every device would share one retained topic)");
	expect("pres-var.yaml", MQTT_OK "presence_topic: \"devices/{identity}/{room}\"\n",
	       "4:17: presence_topic: uses {room} (only {identity} is available here)");
	expect("status.yaml", MQTT_OK "  status_topic: \"gw/{identity}\"\n",
	       "4:17: status_topic: must not contain '{' or '}' (this topic has no placeholders)");
	expect("status-cid.yaml", MQTT_OK "  client_id: gw+1\n",
	       "4:14: client_id: \"gw+1\" makes the default status_topic coap2mqtt/gw+1/status invalid (it "
	       "may not hold '+', '#', '{' or '}'; set status_topic)");
	expect("met-port.yaml", MQTT_OK "metrics:\n  listen: \"127.0.0.1:70000\"\n",
	       "5:11: listen: \"127.0.0.1:70000\" is not HOST:PORT or [IPv6]:PORT (the port is out of range "
	       "1..65535)");
	expect("met-noport.yaml", MQTT_OK "metrics:\n  listen: localhost\n",
	       "5:11: listen: \"localhost\" is not HOST:PORT or [IPv6]:PORT (no :PORT)");
	expect("met-key.yaml", MQTT_OK "metrics:\n  port: 9464\n",
	       "5:3: metrics: unknown key \"port\" (allowed: listen, topic, interval)");
}

static void test_errors_inline(void)
{
	expect("syn.yaml", "coap:\n  listen: [a, b\nmqtt: 1\n",
	       "3:5: syntax: did not find expected ',' or ']' (while parsing a flow sequence at line 2 "
	       "column 11)");
	expect("tab.yaml", "coap:\n\tlisten: 1\n", "2:1: syntax: found character that cannot start any "
	       "token (while scanning for the next token at line 2 column 1)");
	expect("nomqtt.yaml", "log_level: info\n", "1:1: mqtt: is required (at least url: mqtts://HOST[:PORT])");
	expect("empty.yaml", "", "1:1: mqtt: is required (at least url: mqtts://HOST[:PORT])");
	expect("nourl.yaml", "mqtt:\n  insecure: true\n", "2:3: mqtt: url is required (mqtts://HOST[:PORT])");
	expect("top.yaml", "- a\n- b\n", "1:1: the top level must be a mapping (log_level:, coap:, mqtt:, "
	       "...), found a list");
	expect("type.yaml", MQTT_OK "coap: [1]\n", "4:7: coap: expected a mapping, found a list");
	expect("alias.yaml", MQTT_OK "coap: &c {}\nlog_level: *c\n",
	       "5:12: syntax: aliases (*c) are not supported (write the value out)");
	expect("docs.yaml", MQTT_OK "---\nlog_level: info\n",
	       "4:1: syntax: more than one YAML document (one configuration per file)");
	expect("twice.yaml", MQTT_OK "log_level: info\nlog_level: debug\n",
	       "5:1: log_level given twice (first at line 4)");
	expect("scheme.yaml", "mqtt:\n  url: tcp://b:1883\n", "2:8: url: \"tcp://b:1883\" is not "
	       "mqtts://HOST[:PORT] or mqtt://HOST[:PORT] (the scheme is not mqtts:// or mqtt://)");
	expect("v6.yaml", "mqtt:\n  url: mqtt://::1:1883\n  insecure: true\n", "2:8: url: \"mqtt://::1:1883\" "
	       "is not mqtts://HOST[:PORT] or mqtt://HOST[:PORT] (an IPv6 address needs [brackets])");
	expect("port.yaml", MQTT_OK "coap:\n  listen: [\"coaps://h:0\"]\n", "5:12: listen: \"coaps://h:0\" is "
	       "not coaps://HOST:PORT[?modes=psk,rpk,x509] or coap://HOST:PORT[?modes=oscore,nosec] (the port is out of "
	       "range 1..65535)");
	expect("modes.yaml", MQTT_OK "coap:\n  listen: [\"coaps://h:5684?modes=psk,dtls\"]\n",
	       "5:12: listen: \"coaps://h:5684?modes=psk,dtls\" is not "
	       "coaps://HOST:PORT[?modes=psk,rpk,x509] or coap://HOST:PORT[?modes=oscore,nosec] "
	       "(modes of coaps:// are psk, rpk and x509, separated by commas)");
	expect("modes2.yaml", MQTT_OK "coap:\n  listen: [\"coap://h:5683?modes=psk\"]\n",
	       "5:12: listen: \"coap://h:5683?modes=psk\" is not "
	       "coaps://HOST:PORT[?modes=psk,rpk,x509] or coap://HOST:PORT[?modes=oscore,nosec] "
	       "(modes of coap:// are oscore and nosec, separated by commas)");
	expect("modes3.yaml", MQTT_OK "coap:\n  listen: [\"coaps://h:5684?modes=rpk\"]\n",
	       "5:12: listen: modes has rpk but coap.rpk is not set");
	expect("big.yaml", MQTT_OK "coap:\n  max_payload: 99999999999999999999999\n",
	       "5:16: max_payload: 99999999999999999999999 is out of range 1..1048576");
	expect("neg.yaml", MQTT_OK "coap:\n  max_sessions: -1\n", "5:17: max_sessions: -1 is out of range 1..1000000");
	expect("qosbig.yaml", MQTT_OK "routes:\n  - {path: p, topic: t, qos: 99999999999999999999}\n",
	       "5:30: qos: 99999999999999999999 is not 0, 1 or 2");
	expect("cid.yaml", "mqtt:\n  url: mqtt://b\n  insecure: true\n  client_id: a b\n",
	       "4:14: client_id: \"a \" has a space or non-ASCII character (1..64 printable ASCII characters; "
	       "[A-Za-z0-9_-], at most 23, is safest)");
	expect("nokey.yaml", MQTT_OK "devices:\n  - identity: x\n", "5:5: devices: key, key_hex, rpk or auth: certificate is required");
	expect("noid.yaml", MQTT_OK "devices:\n  - key: 12345678\n", "5:5: devices: identity is required");
	expect("hexshort.yaml", MQTT_OK "devices:\n  - {identity: x, key_hex: \"00112233\"}\n",
	       "5:28: key_hex: key shorter than 8 bytes (8..64 bytes: 16..128 hex digits)");
	expect("noca.yaml", "mqtt:\n  url: mqtts://b\n  ca_file: /nonexistent/ca.pem\n",
	       "3:12: ca_file: cannot read /nonexistent/ca.pem: No such file or directory");
	expect("reserved.yaml", MQTT_OK "routes:\n  - path: a/{identity}\n    topic: t\n",
	       "5:11: path: variable {identity} is reserved (the device identity is always available to "
	       "the topic)");
	expect("meth.yaml", MQTT_OK "routes:\n  - path: a\n    topic: t\n    methods: []\n",
	       "7:14: methods: needs at least one of GET, POST, PUT or DELETE");
	expect("nul.yaml", "mqtt:\n  url: \"mqtt://b\\0x\"\n  insecure: true\n", "2:8: url: contains a NUL character");
	test_errors_inline_new();
}

static void test_files(void)
{
	char want[512];
	struct loaded l;

	/* a password file others may read is refused, and the password never printed */
	write_file("pw", "hunter2hunter2\n", 0644);
	l = load_text("pw.yaml", MQTT_OK "  password_file: pw\n");
	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/pw.yaml:4:18: password_file: %s/pw is readable by others "
		 "(mode 0644); chmod 640 it", tmpdir, tmpdir);
	CHECK(has_line(l.errs, want));
	CHECK(l.errs && strstr(l.errs, "hunter2") == NULL);
	unload(&l);

	/* devices_file: errors flow through; duplicates across devices: and the file are found */
	write_file("dup.keys", "# dup\nsame 12345678\nother short\n", 0640);
	l = load_text("dup.yaml", MQTT_OK "devices:\n  - {identity: same, key: abcdefgh}\ndevices_file: dup.keys\n");
	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/dup.keys:2: duplicate identity \"same\" (first defined at %s/dup.yaml:5)",
		 tmpdir, tmpdir);
	CHECK(has_line(l.errs, want));
	snprintf(want, sizeof(want), "%s/dup.keys:3: key shorter than 8 bytes (8..64)", tmpdir);
	CHECK(has_line(l.errs, want));
	CHECK(count_lines(l.errs) == 2);
	unload(&l);

	write_file("open.keys", "a 12345678\n", 0644);
	l = load_text("open.yaml", MQTT_OK "devices_file: open.keys\n");
	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/open.keys: readable by others (mode 0644); chmod 640 it", tmpdir);
	CHECK(has_line(l.errs, want));
	unload(&l);

	l = load("/nonexistent/c2m.yaml");
	CHECK(l.c == NULL);
	CHECK(has_line(l.errs, "/nonexistent/c2m.yaml: cannot open: No such file or directory"));
	unload(&l);
}

/* "$CREDENTIALS_DIRECTORY/NAME" (systemd LoadCredential=) for devices_file, password_file, key_file. */
static void test_credentials(void)
{
	static const char *const yaml = "mqtt:\n  url: mqtts://b\n  ca_file: ca.pem\n"
		"  cert_file: client.crt\n  key_file: $CREDENTIALS_DIRECTORY/client.key\n"
		"  username: u\n  password_file: \"$CREDENTIALS_DIRECTORY/pw\"\n"
		"devices_file: $CREDENTIALS_DIRECTORY/devices.keys\n";
	char dir[128], want[512];
	struct loaded l;

	snprintf(dir, sizeof(dir), "%s/creds", tmpdir);
	CHECK(mkdir(dir, 0700) == 0 || errno == EEXIST);
	write_file("ca.pem", "x\n", 0644);
	write_file("client.crt", "x\n", 0644);
	write_file("creds/client.key", "x\n", 0400);
	write_file("creds/pw", "from-credential\n", 0400);
	write_file("creds/devices.keys", "cred-dev 12345678\n", 0400);

	snprintf(want, sizeof(want), "%s/", dir);	/* a trailing '/' is not doubled */
	CHECK(setenv("CREDENTIALS_DIRECTORY", want, 1) == 0);
	l = load_text("cred.yaml", yaml);
	CHECK(l.c != NULL);
	if (l.c) {
		snprintf(want, sizeof(want), "%s/devices.keys", dir);
		CHECK_STR(l.c->devices_file, want);
		CHECK(l.c->n_devices == 1 && strcmp(l.c->devices[0].identity, "cred-dev") == 0);
		CHECK_STR(l.c->mqtt.password, "from-credential");
		snprintf(want, sizeof(want), "%s/client.key", dir);
		CHECK_STR(l.c->mqtt.key_file, want);
	} else {
		fprintf(stderr, "%s", l.errs);
	}
	unload(&l);

	CHECK(unsetenv("CREDENTIALS_DIRECTORY") == 0);
	l = load_text("cred.yaml", yaml);
	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/cred.yaml:5:13: key_file: CREDENTIALS_DIRECTORY is not set (use "
		 "LoadCredential= in the unit)", tmpdir);
	CHECK(has_line(l.errs, want));
	snprintf(want, sizeof(want), "%s/cred.yaml:7:18: password_file: CREDENTIALS_DIRECTORY is not set "
		 "(use LoadCredential= in the unit)", tmpdir);
	CHECK(has_line(l.errs, want));
	snprintf(want, sizeof(want), "%s/cred.yaml:8:15: devices_file: CREDENTIALS_DIRECTORY is not set "
		 "(use LoadCredential= in the unit)", tmpdir);
	CHECK(has_line(l.errs, want));
	CHECK(count_lines(l.errs) == 3);
	unload(&l);
}

/* Limits: file size, nesting, list length. */
static void test_limits(void)
{
	size_t big = 4 * 1024 * 1024 + 16, i;
	char *s = malloc(big + 1), want[256], *p;
	struct loaded l;

	if (s == NULL)
		return;
	memset(s, '#', big);
	s[big] = '\0';
	l = load_text("huge.yaml", s);
	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/huge.yaml: larger than 4 MiB (at most 4194304 bytes)", tmpdir);
	CHECK(has_line(l.errs, want));
	unload(&l);

	strcpy(s, MQTT_OK "coap: ");
	for (i = 0; i < 20; i++)
		strcat(s, "[");
	for (i = 0; i < 20; i++)
		strcat(s, "]");
	strcat(s, "\n");
	expect("deep.yaml", s, "4:22: syntax: nesting deeper than 16 levels");

	p = s + sprintf(s, MQTT_OK "routes: [");
	for (i = 0; i <= 100000; i++, p += 2)
		memcpy(p, "1,", 2);
	strcpy(p, "1]\n");
	expect("many.yaml", s, "4:9: routes: more than 100000 entries");

	p = s + sprintf(s, MQTT_OK "commands: [");
	for (i = 0; i <= 1024; i++, p += 2)
		memcpy(p, "1,", 2);
	strcpy(p, "1]\n");
	expect("manycmd.yaml", s, "4:11: commands: more than 1024 entries (each one is a subscription)");
	free(s);
}

/* The shipped example must load (its keys file copied with the mode it needs). */
static void test_example(void)
{
	struct loaded l;

	copy_file("../../conf/coap2mqtt.yaml", "coap2mqtt.yaml", 0640);
	copy_file("../../conf/devices.keys", "devices.keys", 0640);
	l = load_tmp("coap2mqtt.yaml");
	CHECK(l.c != NULL);
	if (l.c == NULL) {
		fprintf(stderr, "%s", l.errs);
		unload(&l);
		return;
	}
	CHECK(l.c->n_devices == 4);
	CHECK(l.c->n_routes == 3);
	CHECK(l.c->n_routes == 3 && l.c->routes[1].ack == CONF_ACK_BROKER);
	CHECK(l.c->mqtt.tls && l.c->mqtt.port == 8883);
	CHECK_STR(l.c->mqtt.status_topic, "coap2mqtt/coap2mqtt/status");
	CHECK(l.c->n_observe == 2);
	CHECK(l.c->n_observe == 2 && l.c->observe[0].retain && l.c->observe[0].qos == 0 &&
	      l.c->observe[1].discover && strcmp(l.c->observe[1].match, "sensors/*") == 0);
	CHECK(l.c->n_commands == 1);
	CHECK(l.c->n_commands == 1 && strcmp(l.c->commands[0].filter, "devices/+/set/#") == 0 &&
	      l.c->commands[0].method == CONF_M_PUT && l.c->commands[0].ttl == 30);
	CHECK(l.c->presence_route != NULL);
	CHECK(l.c->metrics.listen == NULL && l.c->metrics.topic == NULL && l.c->metrics.interval == 60);
	unload(&l);
}

static void cleanup(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
}

int main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/c2m-conf-XXXXXX");
	if (mkdtemp(tmpdir) == NULL) {
		perror("mkdtemp");
		return 1;
	}
	test_full();
	test_defaults();
	test_errors_file();
	test_errors_ext();
	test_errors_inline();
	test_files();
	test_credentials();
	test_limits();
	test_example();
	cleanup();
	return check_done();
}
