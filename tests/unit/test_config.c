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
		CHECK(c->routes[0].line == 35);
		CHECK(c->routes[1].methods == CONF_M_POST);
		CHECK(c->routes[1].qos == 0);
		CHECK(!c->routes[1].retain);
		CHECK(c->routes[1].ack == CONF_ACK_STORED);
	}
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
		"max_payload, ciphers, psk_hint, block_size)",
		"errors.yaml:12:10: key: key shorter than 8 bytes (8..64)",
		"errors.yaml:15:15: identity: duplicate identity \"dev2\" (first defined at line 13)",
		"errors.yaml:17:15: identity: \"a/b\" is not valid in an MQTT topic (non-empty UTF-8 without "
		"'/', '+', '#' or control characters)",
		"errors.yaml:21:14: key_hex: give key or key_hex, not both",
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
		"devices_file, mqtt, routes)",
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

static void expect(const char *name, const char *yaml, const char *line_suffix)
{
	char want[512];
	struct loaded l = load_text(name, yaml);

	CHECK(l.c == NULL);
	snprintf(want, sizeof(want), "%s/%s:%s", tmpdir, name, line_suffix);
	CHECK(has_line(l.errs, want));
	unload(&l);
}

#define MQTT_OK "mqtt:\n  url: mqtt://b\n  insecure: true\n"

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
	       "not coaps://HOST:PORT or coap://HOST:PORT (the port is out of range 1..65535)");
	expect("big.yaml", MQTT_OK "coap:\n  max_payload: 99999999999999999999999\n",
	       "5:16: max_payload: 99999999999999999999999 is out of range 1..1048576");
	expect("neg.yaml", MQTT_OK "coap:\n  max_sessions: -1\n", "5:17: max_sessions: -1 is out of range 1..1000000");
	expect("qosbig.yaml", MQTT_OK "routes:\n  - {path: p, topic: t, qos: 99999999999999999999}\n",
	       "5:30: qos: 99999999999999999999 is not 0, 1 or 2");
	expect("cid.yaml", "mqtt:\n  url: mqtt://b\n  insecure: true\n  client_id: a b\n",
	       "4:14: client_id: \"a \" has a space or non-ASCII character (1..64 printable ASCII characters; "
	       "[A-Za-z0-9_-], at most 23, is safest)");
	expect("nokey.yaml", MQTT_OK "devices:\n  - identity: x\n", "5:5: devices: key or key_hex is required");
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
	test_errors_inline();
	test_files();
	test_limits();
	test_example();
	cleanup();
	return check_done();
}
