/* config.h: the validated, immutable configuration snapshot built from the YAML file. */
#ifndef C2M_CONFIG_H
#define C2M_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "keys.h"
#include "pki.h"
#include "route.h"

#define CONF_DEFAULT_PATH "/etc/coap2mqtt/coap2mqtt.yaml"

enum conf_method { CONF_M_GET = 1, CONF_M_POST = 2, CONF_M_PUT = 4, CONF_M_DELETE = 8 };
enum conf_ack { CONF_ACK_STORED = 0, CONF_ACK_BROKER = 1 };
/* The security modes a coaps:// listener takes (?modes=psk,rpk,x509), and a coap:// one
 * (?modes=oscore,nosec); all of its scheme's by default. */
enum conf_mode { CONF_MODE_PSK = 1, CONF_MODE_RPK = 2, CONF_MODE_X509 = 4, CONF_MODES_ALL = 7,
		 CONF_MODE_OSCORE = 8, CONF_MODE_NOSEC = 16, CONF_MODES_PLAIN = 24 };

struct conf_route {
	char *path;			/* pattern as written */
	char *topic;			/* template as written */
	struct route *route;		/* compiled */
	unsigned methods;		/* enum conf_method bits; default POST|PUT */
	int qos;			/* 0..2, default 1 */
	bool retain;			/* default false */
	enum conf_ack ack;		/* default stored */
	int line;			/* in the config file */
};

struct conf_coap {
	char **listen;			/* URIs: coaps://host:port or coap://host:port, as written
					 * (?modes=psk,rpk,x509 or ?modes=oscore,nosec after) */
	unsigned *listen_modes;		/* per URI: enum conf_mode bits */
	size_t n_listen;		/* default one: coaps://[::]:5684 */
	unsigned idle_timeout;		/* s, default 300, 1..86400 */
	unsigned max_sessions;		/* default 20000, 1..1000000 */
	size_t max_payload;		/* bytes, default 1024, 1..1048576 */
	char **ciphers;			/* IANA names; n_ciphers == 0 → the default list */
	size_t n_ciphers;
	char *psk_hint;			/* NULL = send no identity hint (default) */
	unsigned block_size;		/* 16..1024, power of two, default 512 */
	unsigned receive_buffer;	/* bytes, each listening socket's SO_RCVBUF, default 4 MiB,
					 * 64 KiB..1 GiB */
	unsigned max_handshakes;	/* DTLS handshakes in progress at once, 1..100000,
					 * default 1000 */
	unsigned max_handshakes_per_ip;	/* of those, from one IP address (any port),
					 * 1..100000, default 16 */
	bool cid;			/* offer DTLS Connection IDs (RFC 9146), default true */
	unsigned cid_length;		/* their length in bytes, 4..16, default 8 */
	char *rpk_key_file;		/* coap.rpk.key_file: NULL = no raw public keys */
	struct rpk_key rpk;		/* read from it */
	struct conf_pki {		/* coap.pki: X.509 certificates; cert_file NULL = none */
		char *cert_file, *key_file, *ca_file, *crl_file;	/* crl_file optional */
		struct pki_buf cert, key, ca, crl;	/* read from them */
		enum pki_identity identity;	/* where a device certificate names its identity:
						 * cn (default), san_dns, san_uri */
		bool allow_unlisted;	/* any identity a trusted certificate carries, listed
					 * or not (default false: only auth: certificate ones) */
		struct pki_verifier *verifier;	/* over ca and crl */
	} pki;
};

struct conf_mqtt {
	char *url;			/* mqtts://host:port (mqtt:// only with insecure) */
	char *host;			/* parsed from url */
	int port;			/* parsed from url, default 8883 / 1883 */
	bool tls;			/* url scheme is mqtts */
	bool insecure;			/* allow mqtt:// (default false) */
	char *client_id;		/* default "coap2mqtt" */
	char *ca_file;			/* default /etc/ssl/certs/ca-certificates.crt */
	char *cert_file, *key_file;	/* optional, both or neither */
	char *username;			/* optional */
	char *password;			/* read from password_file (first line), optional */
	int keepalive;			/* s, default 30, 5..3600 */
	int version;			/* 5 (default) or 3 (= 3.1.1) */
	char *persistence_dir;		/* the journal, default /var/lib/coap2mqtt */
	int max_buffered;		/* readings in the journal, default 100000, 1..10000000 */
	unsigned long long max_buffered_bytes;	/* journal bytes, default 1 GiB, 1 MiB..1 TiB */
	int max_inflight;		/* default 1000, 1..65535 */
	int max_pending_acks;		/* ack: broker readings awaiting their PUBACK before their
					 * 2.04, default 1000, 1..1000000; beyond: 5.03 */
	unsigned session_expiry;	/* s, default 86400 */
	char *status_topic;		/* gateway status (Last Will "offline", "online" after connect);
					 * default "coap2mqtt/<client_id>/status" */
};

/* observe: resources the gateway observes on devices (RFC 7641). */
struct conf_observe {
	char *devices;			/* fnmatch(3) glob on the PSK identity, default "*" */
	char *path;			/* resource path ("temperature", "a/b"); NULL when discover */
	bool discover;			/* GET /.well-known/core and observe every obs resource */
	char *match;			/* with discover: fnmatch glob on the resource path, NULL = all */
	char *topic;			/* topic template: {identity}, {path+} (the resource path) */
	struct route *route;		/* compiled: pattern "{path+}" + topic */
	int qos;			/* default 0 */
	bool retain;			/* default false */
	int line;
};

/* commands: MQTT messages that become CoAP requests to devices. */
struct conf_command {
	char *topic;			/* template: literal levels, {identity} (required), {path+} (required, last) */
	char *filter;			/* MQTT subscription filter derived from topic: {x} → +, {x+} → # */
	struct route *route;		/* compiled with ROUTE_IDENTITY_VAR: matches incoming topics and
					 * fills response_topic */
	unsigned method;		/* one enum conf_method bit, default CONF_M_PUT */
	char *response_topic;		/* template over the same variables; NULL → only MQTT 5 Response Topic */
	char **response_topics;		/* filters an MQTT 5 Response Topic must fit to be used; none =
					 * never (only response_topic) */
	size_t n_response_topics;
	unsigned ttl;			/* s to wait for an offline device, 0..86400, default 30 */
	unsigned timeout;		/* s from sending to the answer (block-wise included), 1..3600,
					 * default 60 */
	size_t max_payload;		/* bytes, 0..1048576, default 4096; larger → 4.13 */
	int qos;			/* subscription and response QoS, default 1 */
	int line;
};

struct conf_metrics {
	char *listen;			/* "HOST:PORT" for Prometheus text over HTTP; NULL = off */
	char *topic;			/* MQTT topic for periodic JSON; NULL = off */
	unsigned interval;		/* s between JSON publishes, 1..86400, default 60 */
};

/* discovery: devices that find the gateway by multicast (RFC 7252 8, RFC 6690). */
struct conf_discovery {
	bool multicast;			/* join the All-CoAP-Nodes groups, answer GET
					 * /.well-known/core (default false) */
	char **interfaces;		/* where to join (required with multicast) */
	size_t n_interfaces;
	unsigned port;			/* UDP port of the groups, default 5683 */
	unsigned leisure;		/* s: answers to a group are delayed by a random time below
					 * it (RFC 7252 8.2 Leisure), 1..60, default 5 */
	unsigned max_answers;		/* answers per second, 1..1000, default 10; beyond: none */
	char **advertise;		/* coaps:// URIs to name instead of the listeners' */
	size_t n_advertise;
};

struct config {
	char *file;			/* path as given */
	int log_level;			/* enum log_level, default info */
	struct conf_coap coap;
	struct key_entry *devices;	/* devices: + devices_file, in that order */
	size_t n_devices;
	char *devices_file;		/* resolved path or NULL */
	struct conf_mqtt mqtt;
	struct conf_route *routes;
	size_t n_routes;
	struct conf_observe *observe;
	size_t n_observe;
	struct conf_command *commands;
	size_t n_commands;
	char *presence_topic;		/* template with {identity}; NULL = no presence messages */
	struct route *presence_route;	/* compiled: pattern "" (no segments) + presence_topic */
	struct conf_metrics metrics;
	struct conf_discovery discovery;
};

/* Loads and validates path. Every problem is printed to errs as "file:line:col: key: what"
 * (all of them, not only the first). Returns NULL when there was any error. */
struct config *conf_load(const char *path, FILE *errs);
void conf_free(struct config *c);
/* A reload from old to c: the settings that changed but only a restart applies (coap.listen,
 * coap.psk_hint, mqtt.*), their names ("mqtt.url") into names[0..max); returns how many. */
#define CONF_RESTART_KEYS 20
size_t conf_restart_needed(const struct config *old, const struct config *c, const char **names,
			   size_t max);

#endif
