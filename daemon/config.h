/* config.h: the validated, immutable configuration snapshot built from the YAML file. */
#ifndef C2M_CONFIG_H
#define C2M_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "keys.h"
#include "route.h"

#define CONF_DEFAULT_PATH "/etc/coap2mqtt/coap2mqtt.yaml"

enum conf_method { CONF_M_GET = 1, CONF_M_POST = 2, CONF_M_PUT = 4, CONF_M_DELETE = 8 };
enum conf_ack { CONF_ACK_STORED = 0, CONF_ACK_BROKER = 1 };

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
	char **listen;			/* URIs: coaps://host:port or coap://host:port */
	size_t n_listen;		/* default one: coaps://[::]:5684 */
	unsigned idle_timeout;		/* s, default 300, 1..86400 */
	unsigned max_sessions;		/* default 20000, 1..1000000 */
	size_t max_payload;		/* bytes, default 1024, 1..1048576 */
	char **ciphers;			/* IANA names; n_ciphers == 0 → the default list */
	size_t n_ciphers;
	char *psk_hint;			/* NULL = send no identity hint (default) */
	unsigned block_size;		/* 16..1024, power of two, default 512 */
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
	char *persistence_dir;		/* default /var/lib/coap2mqtt */
	int max_buffered;		/* default 100000, 1..10000000 */
	int max_inflight;		/* default 1000, 1..65535 */
	unsigned session_expiry;	/* s, default 86400 */
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
};

/* Loads and validates path. Every problem is printed to errs as "file:line:col: key: what"
 * (all of them, not only the first). Returns NULL when there was any error. */
struct config *conf_load(const char *path, FILE *errs);
void conf_free(struct config *c);

#endif
