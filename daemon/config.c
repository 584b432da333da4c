/* config.c: the schema of the configuration file: reads it (through conftree.c, the YAML tree and
 * its error messages) into a validated, immutable struct config. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero, strdup */
#endif
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conftree.h"
#include "log.h"	/* log level names only; this module never logs */

#define CONF_MAX_ITEMS KEYS_MAX_ENTRIES	/* entries in one list (devices, routes) */
#define CONF_MAX_LISTEN 64			/* coap.listen URIs */
#define CONF_MAX_COMMANDS 1024			/* commands: each is a subscription; checked pairwise */
#define CONF_MAX_RESPONSE_TOPICS 64		/* commands[].response_topics filters */
#define CONF_MAX_PASSWORD 1024			/* bytes in password_file's first line */

#define DEFAULT_LISTEN "coaps://[::]:5684"
#define DEFAULT_CLIENT_ID "coap2mqtt"
#define DEFAULT_CA_FILE "/etc/ssl/certs/ca-certificates.crt"
#define DEFAULT_PERSISTENCE_DIR "/var/lib/coap2mqtt"
#define MANDATORY_CIPHER "TLS_PSK_WITH_AES_128_CCM_8"
#define STATUS_FMT "coap2mqtt/%s/status"		/* default mqtt.status_topic */

struct cctx {
	struct ctree t;		/* the file as a tree, and its messages */
	const struct cnode *here;	/* position for messages from the keys file parser */
	struct config *c;
	const struct cnode **dev_node;	/* identity node per config device */
	size_t dev_cap, n_dev_nodes;
	const struct cnode **route_node;	/* path node per route */
	size_t route_cap;
};

static const char *const cipher_names[] = {
	"TLS_PSK_WITH_AES_128_CCM_8", "TLS_PSK_WITH_AES_128_CCM", "TLS_PSK_WITH_AES_256_CCM_8",
	"TLS_PSK_WITH_AES_256_CCM", "TLS_PSK_WITH_AES_128_GCM_SHA256", "TLS_PSK_WITH_AES_256_GCM_SHA384",
	"TLS_PSK_WITH_AES_128_CBC_SHA256", "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256",
	"TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
};
#define N_CIPHERS (sizeof(cipher_names) / sizeof(cipher_names[0]))

/* A fixed MQTT topic the gateway publishes on (status, metrics): no wildcards, no placeholders. */
static bool get_topic(struct cctx *x, const struct cnode *n, char **out)
{
	struct route_error err;
	struct route *r = NULL;

	if (!ct_str(&x->t, n, CONF_MAX_STR, out))
		return false;
	if (strpbrk(*out, "{}") != NULL)
		conf_err(&x->t, n, "must not contain '{' or '}' (this topic has no placeholders)");
	else if ((r = route_compile2("", *out, 0, &err)) == NULL)
		conf_err(&x->t, n, "%s", err.reason);
	route_free(r);
	if (r != NULL)
		return true;
	free(*out);
	*out = NULL;
	return false;
}

/* ---- coap ---- */

/* Checks "HOST:PORT" or "[V6]:PORT" (port optional unless need_port); NULL or the reason. */
static const char *parse_hostport(const char *s, bool need_port, char **host, int *port)
{
	const char *end, *h = s;
	char v6[INET6_ADDRSTRLEN + 1];
	size_t hl, i;
	long long p = 0;

	if (*s == '[') {
		end = strchr(s, ']');
		if (end == NULL || (size_t)(end - s - 1) >= sizeof(v6))
			return "unclosed '[' around an IPv6 address";
		h = s + 1;
		hl = (size_t)(end - h);
		memcpy(v6, h, hl);
		v6[hl] = '\0';
		if (inet_pton(AF_INET6, v6, &(struct in6_addr){ 0 }) != 1)
			return "not a valid IPv6 address between [ and ]";
		end++;
	} else {
		end = s + strcspn(s, ":/");
		hl = (size_t)(end - h);
		for (i = 0; i < hl; i++)
			if (!((h[i] >= 'a' && h[i] <= 'z') || (h[i] >= 'A' && h[i] <= 'Z') ||
			      (h[i] >= '0' && h[i] <= '9') || h[i] == '.' || h[i] == '-' || h[i] == '_'))
				return "the host has a character other than letters, digits, '.', '-' and '_'";
		if (strchr(end, ':') != strrchr(end, ':'))
			return "an IPv6 address needs [brackets]";
	}
	if (hl == 0)
		return "no host";
	if (*end == '\0' && need_port)
		return "no :PORT";
	if (*end != '\0' && (*end != ':' || ct_parse_ll(end + 1, &p) != 0 || end[1] < '0' || end[1] > '9'))
		return "the port is not a number (or there is text after it)";
	if (*end != '\0' && (p < 1 || p > 65535))
		return "the port is out of range 1..65535";
	if (port && *end != '\0')
		*port = (int)p;
	if (host && (*host = strndup(h, hl)) == NULL)
		return "out of memory";
	return NULL;
}

/* "modes=" and a comma-separated list of psk, rpk and x509 (coaps://), or of oscore and nosec
 * (coap://), into *out; NULL, or why not. */
static const char *listen_modes(const char *q, int plain, unsigned *out)
{
	static const char *const names[] = { "psk", "rpk", "x509", "oscore", "nosec" };
	size_t first = plain ? 3 : 0, last = plain ? 5 : 3;
	const char *p;

	if (strncmp(q, "modes=", 6) != 0)
		return plain ? "the only query is ?modes=oscore,nosec" :
		       "the only query is ?modes=psk,rpk,x509";
	*out = 0;
	for (p = q + 6;; p++) {
		size_t len = strcspn(p, ","), i;

		for (i = first; i < last && !(strlen(names[i]) == len && strncmp(p, names[i], len) == 0);
		     i++)
			;
		if (i == last)
			return plain ? "modes of coap:// are oscore and nosec, separated by commas" :
			       "modes of coaps:// are psk, rpk and x509, separated by commas";
		if (*out & (1u << i))
			return "a mode is named twice";
		*out |= 1u << i;
		p += len;
		if (*p == '\0')
			return NULL;
	}
}

static void coap_listen(struct cctx *x, const struct cnode *n)
{
	struct conf_coap *cc = &x->c->coap;
	const struct cnode *it;
	const char *s, *why, *rest;

	if (!ct_want(&x->t, n, CN_SEQ))
		return;
	if (n->nkids == 0 || n->nkids > CONF_MAX_LISTEN) {
		conf_err(&x->t, n, "needs 1..%d URIs (coaps://HOST:PORT)", CONF_MAX_LISTEN);
		return;
	}
	cc->listen = ct_calloc(&x->t, n->nkids, sizeof(*cc->listen));
	cc->listen_modes = ct_calloc(&x->t, n->nkids, sizeof(*cc->listen_modes));
	if (cc->listen == NULL || cc->listen_modes == NULL)
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		char hostport[300];
		const char *q;
		unsigned modes;

		if ((s = ct_scalar(&x->t, it, "a URI")) == NULL)
			continue;
		rest = strncmp(s, "coaps://", 8) == 0 ? s + 8 : strncmp(s, "coap://", 7) == 0 ? s + 7 : NULL;
		why = rest ? NULL : "the scheme is not coaps:// or coap://";
		modes = rest == s + 7 ? CONF_MODES_PLAIN : CONF_MODES_ALL;
		if (rest && (q = strchr(rest, '?')) != NULL) {
			why = listen_modes(q + 1, rest == s + 7, &modes);
			if ((size_t)(q - rest) >= sizeof(hostport))
				why = "the host is too long";
			else if (why == NULL) {
				memcpy(hostport, rest, (size_t)(q - rest));
				hostport[q - rest] = '\0';
				rest = hostport;
			}
		}
		if (why == NULL)
			why = parse_hostport(rest, true, NULL, NULL);
		if (why != NULL) {
			conf_err(&x->t, it, "%s is not coaps://HOST:PORT[?modes=psk,rpk,x509] or "
				 "coap://HOST:PORT[?modes=oscore,nosec] (%s)", ct_show(s, it->len).s, why);
			continue;
		}
		cc->listen_modes[cc->n_listen] = modes;
		if ((cc->listen[cc->n_listen] = ct_strdup(&x->t, s)) != NULL)
			cc->n_listen++;
	}
}

/* Each mode a listener names must be set up: rpk needs coap.rpk, x509 coap.pki. */
static void listen_modes_set_up(struct cctx *x, const struct cnode *n)
{
	const struct conf_coap *cc = &x->c->coap;
	const struct cnode *it = n ? ct_kid(&x->t, n) : NULL;

	for (size_t i = 0; i < cc->n_listen && it; i++, it = ct_sib(&x->t, it)) {
		if (strchr(cc->listen[i], '?') == NULL)
			continue;	/* every mode set up */
		if ((cc->listen_modes[i] & CONF_MODE_RPK) && cc->rpk_key_file == NULL)
			conf_err(&x->t, it, "modes has rpk but coap.rpk is not set");
		if ((cc->listen_modes[i] & CONF_MODE_X509) && cc->pki.cert_file == NULL)
			conf_err(&x->t, it, "modes has x509 but coap.pki is not set");
	}
}

static void coap_ciphers(struct cctx *x, const struct cnode *n)
{
	struct conf_coap *cc = &x->c->coap;
	const struct cnode *it;
	const char *s;
	unsigned seen = 0;
	size_t i;

	if (!ct_want(&x->t, n, CN_SEQ))
		return;
	cc->ciphers = ct_calloc(&x->t, N_CIPHERS, sizeof(*cc->ciphers));
	if (cc->ciphers == NULL)
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		if ((s = ct_scalar(&x->t, it, "a cipher suite name")) == NULL)
			continue;
		for (i = 0; i < N_CIPHERS && strcmp(s, cipher_names[i]) != 0; i++)
			;
		if (i == N_CIPHERS) {
			conf_err(&x->t, it, "%s is not a supported cipher suite (TLS_PSK_WITH_AES_128_CCM_8, "
				 "TLS_PSK_WITH_AES_128_CCM, TLS_PSK_WITH_AES_256_CCM_8, TLS_PSK_WITH_AES_256_CCM, "
				 "TLS_PSK_WITH_AES_128_GCM_SHA256, TLS_PSK_WITH_AES_256_GCM_SHA384, "
				 "TLS_PSK_WITH_AES_128_CBC_SHA256, TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256, "
				 "TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8)",
				 ct_show(s, it->len).s);
		} else if (seen & (1u << i)) {
			conf_err(&x->t, it, "%s is listed twice", cipher_names[i]);
		} else {
			seen |= 1u << i;
			if ((cc->ciphers[cc->n_ciphers] = ct_strdup(&x->t, s)) != NULL)
				cc->n_ciphers++;
		}
	}
	if (!(seen & 1u))
		conf_err(&x->t, n, "must include %s (mandatory in RFC 7252)", MANDATORY_CIPHER);
}

/* The keys of coap:, in the order of v[]. */
enum {
	C_LISTEN, C_IDLE_TIMEOUT, C_MAX_SESSIONS, C_MAX_PAYLOAD, C_CIPHERS, C_PSK_HINT,
	C_BLOCK_SIZE, C_RECEIVE_BUFFER, C_MAX_HANDSHAKES, C_MAX_HANDSHAKES_PER_IP, C_RPK, C_PKI,
	C_CID, C_CID_LENGTH,
	C_KEYS
};

static const char *const coap_keys[C_KEYS + 1] = {
	[C_LISTEN] = "listen",
	[C_IDLE_TIMEOUT] = "idle_timeout",
	[C_MAX_SESSIONS] = "max_sessions",
	[C_MAX_PAYLOAD] = "max_payload",
	[C_CIPHERS] = "ciphers",
	[C_PSK_HINT] = "psk_hint",
	[C_BLOCK_SIZE] = "block_size",
	[C_RECEIVE_BUFFER] = "receive_buffer",
	[C_MAX_HANDSHAKES] = "max_handshakes",
	[C_MAX_HANDSHAKES_PER_IP] = "max_handshakes_per_ip",
	[C_RPK] = "rpk",
	[C_PKI] = "pki",
	[C_CID] = "cid",
	[C_CID_LENGTH] = "cid_length",
};

/* The keys of coap.rpk:, in the order of v[]. */
enum {
	RPK_KEY_FILE,
	RPK_KEYS
};

static const char *const rpk_keys[RPK_KEYS + 1] = {
	[RPK_KEY_FILE] = "key_file",
};

/* Messages from the keys file parser and the key loader, kept at the position of the value
 * that named the file (devices_file, coap.rpk.key_file). */
static void keys_sink(void *arg, const char *msg)
{
	struct cctx *x = arg;

	if (x->t.errs != NULL)
		ct_keep(&x->t, x->here->line, x->here->col, strdup(msg));
}

/* The keys of coap.pki:, in the order of v[]. */
enum {
	PKI_CERT_FILE, PKI_KEY_FILE, PKI_CA_FILE, PKI_CRL_FILE, PKI_IDENTITY, PKI_ALLOW_UNLISTED,
	PKI_KEYS
};

static const char *const pki_keys[PKI_KEYS + 1] = {
	[PKI_CERT_FILE] = "cert_file",
	[PKI_KEY_FILE] = "key_file",
	[PKI_CA_FILE] = "ca_file",
	[PKI_CRL_FILE] = "crl_file",
	[PKI_IDENTITY] = "identity",
	[PKI_ALLOW_UNLISTED] = "allow_unlisted",
};

/* One file of coap.pki: its path resolved and its content read and checked. */
static bool pki_file(struct cctx *x, const struct cnode *n, enum pki_part part, char **path,
		     struct pki_buf *b)
{
	if (!ct_file(&x->t, n, path))
		return false;
	x->here = n;
	if (pki_read(*path, part, b, keys_sink, x) != 0) {
		x->t.nerr++;
		return false;
	}
	return true;
}

/* coap.pki: the gateway's certificate for X.509 handshakes, and what device certificates are
 * checked against. */
static void coap_pki(struct cctx *x, const struct cnode *n)
{
	static const char *const ids[] = { "cn", "san_dns", "san_uri" };
	const struct cnode *v[PKI_KEYS];
	struct conf_pki *p = &x->c->coap.pki;
	bool ok = true;
	int i;

	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, pki_keys, v))
		return;
	for (i = PKI_CERT_FILE; i <= PKI_CA_FILE; i++)
		if (v[i] == NULL) {
			conf_err(&x->t, n, "%s is required", pki_keys[i]);
			ok = false;
		}
	if (!ok)
		return;
	ok = pki_file(x, v[PKI_CERT_FILE], PKI_CERT, &p->cert_file, &p->cert);
	ok = pki_file(x, v[PKI_KEY_FILE], PKI_KEY, &p->key_file, &p->key) && ok;
	ok = pki_file(x, v[PKI_CA_FILE], PKI_CA, &p->ca_file, &p->ca) && ok;
	if (v[PKI_CRL_FILE] && !ct_is_null(v[PKI_CRL_FILE]))
		ok = pki_file(x, v[PKI_CRL_FILE], PKI_CRL, &p->crl_file, &p->crl) && ok;
	if (v[PKI_IDENTITY] && ct_enum(&x->t, v[PKI_IDENTITY], "cn, san_dns or san_uri", ids, 3,
				       false, &i))
		p->identity = (enum pki_identity)i;
	if (v[PKI_ALLOW_UNLISTED])
		ct_bool(&x->t, v[PKI_ALLOW_UNLISTED], &p->allow_unlisted);
	if (!ok)
		return;
	x->here = v[PKI_KEY_FILE];
	x->t.nerr += pki_check_pair(&p->cert, &p->key, keys_sink, x);
	x->here = v[PKI_CRL_FILE] ? v[PKI_CRL_FILE] : v[PKI_CA_FILE];
	if ((p->verifier = pki_verifier_new(&p->ca, &p->crl, keys_sink, x)) == NULL)
		x->t.nerr++;
}

/* coap.rpk: the gateway's own key pair for raw public key (RFC 7250) handshakes. */
static void coap_rpk(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[RPK_KEYS];
	struct conf_coap *cc = &x->c->coap;

	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, rpk_keys, v))
		return;
	if (v[RPK_KEY_FILE] == NULL) {
		conf_err(&x->t, n, "key_file is required (a PEM EC P-256 private key)");
		return;
	}
	if (!ct_file(&x->t, v[RPK_KEY_FILE], &cc->rpk_key_file))
		return;
	x->here = v[RPK_KEY_FILE];
	x->t.nerr += keys_load_rpk_key(cc->rpk_key_file, &cc->rpk, keys_sink, x);
}

static void coap_numbers(struct cctx *x, const struct cnode **v)
{
	static const int blocks[] = { 16, 32, 64, 128, 256, 512, 1024 };
	struct conf_coap *cc = &x->c->coap;
	long long ll;
	int b;

	if (v[C_IDLE_TIMEOUT] && ct_int(&x->t, v[C_IDLE_TIMEOUT], 1, 86400, &ll))
		cc->idle_timeout = (unsigned)ll;
	if (v[C_MAX_SESSIONS] && ct_int(&x->t, v[C_MAX_SESSIONS], 1, 1000000, &ll))
		cc->max_sessions = (unsigned)ll;
	if (v[C_MAX_PAYLOAD] && ct_int(&x->t, v[C_MAX_PAYLOAD], 1, 1048576, &ll))
		cc->max_payload = (size_t)ll;
	if (v[C_BLOCK_SIZE] && ct_choice(&x->t, v[C_BLOCK_SIZE], blocks,
					 sizeof(blocks) / sizeof(blocks[0]),
					 "16, 32, 64, 128, 256, 512 or 1024", &b))
		cc->block_size = (unsigned)b;
	if (v[C_RECEIVE_BUFFER] && ct_int(&x->t, v[C_RECEIVE_BUFFER], 65536, 1ll << 30, &ll))
		cc->receive_buffer = (unsigned)ll;
	if (v[C_MAX_HANDSHAKES] && ct_int(&x->t, v[C_MAX_HANDSHAKES], 1, 100000, &ll))
		cc->max_handshakes = (unsigned)ll;
	if (v[C_MAX_HANDSHAKES_PER_IP] &&
	    ct_int(&x->t, v[C_MAX_HANDSHAKES_PER_IP], 1, 100000, &ll))
		cc->max_handshakes_per_ip = (unsigned)ll;
	if (v[C_CID])
		ct_bool(&x->t, v[C_CID], &cc->cid);
	if (v[C_CID_LENGTH] && ct_int(&x->t, v[C_CID_LENGTH], 4, 16, &ll))
		cc->cid_length = (unsigned)ll;
}

static void conf_coap(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[C_KEYS];
	struct conf_coap *cc = &x->c->coap;

	cc->idle_timeout = 300;
	cc->max_sessions = 20000;
	cc->max_payload = 1024;
	cc->block_size = 512;
	cc->receive_buffer = 4u << 20;
	cc->max_handshakes = 1000;
	cc->max_handshakes_per_ip = 16;
	cc->cid = true;
	cc->cid_length = 8;
	if (!ct_fields(&x->t, n, coap_keys, v))
		return;
	if (v[C_LISTEN])
		coap_listen(x, v[C_LISTEN]);
	coap_numbers(x, v);
	if (v[C_CIPHERS])
		coap_ciphers(x, v[C_CIPHERS]);
	if (v[C_PSK_HINT] && !ct_is_null(v[C_PSK_HINT]))
		ct_str(&x->t, v[C_PSK_HINT], 128, &cc->psk_hint);
	if (v[C_RPK] && !ct_is_null(v[C_RPK]))
		coap_rpk(x, v[C_RPK]);
	if (v[C_PKI] && !ct_is_null(v[C_PKI]))
		coap_pki(x, v[C_PKI]);
	if (v[C_LISTEN])
		listen_modes_set_up(x, v[C_LISTEN]);
	if (cc->n_listen == 0 && v[C_LISTEN] == NULL) {
		free(cc->listen);
		free(cc->listen_modes);
		cc->listen = ct_calloc(&x->t, 1, sizeof(*cc->listen));
		cc->listen_modes = ct_calloc(&x->t, 1, sizeof(*cc->listen_modes));
		if (cc->listen && cc->listen_modes &&
		    (cc->listen[0] = ct_strdup(&x->t, DEFAULT_LISTEN)) != NULL) {
			cc->listen_modes[0] = CONF_MODES_ALL;
			cc->n_listen = 1;
		}
	}
}

/* ---- devices ---- */

static int dev_append(struct cctx *x, struct key_entry *e, const struct cnode *idnode)
{
	struct config *c = x->c;

	if (c->n_devices == x->dev_cap) {
		size_t cap = x->dev_cap ? 2 * x->dev_cap : 16;
		struct key_entry *nv = realloc(c->devices, cap * sizeof(*nv));
		const struct cnode **nn;

		if (nv == NULL)
			return -1;
		c->devices = nv;
		nn = realloc(x->dev_node, cap * sizeof(*nn));
		if (nn == NULL)
			return -1;
		x->dev_node = nn;
		x->dev_cap = cap;
	}
	x->dev_node[c->n_devices] = idnode;
	c->devices[c->n_devices++] = *e;
	x->n_dev_nodes = c->n_devices;
	return 0;
}

static bool dev_identity(struct cctx *x, const struct cnode *n, struct key_entry *e)
{
	const char *s = ct_scalar(&x->t, n, "a string");

	if (s == NULL)
		return false;
	if (n->len > KEYS_MAX_IDENTITY) {
		conf_err(&x->t, n, "is longer than %d bytes", KEYS_MAX_IDENTITY);
		return false;
	}
	if (!route_value_ok(s, n->len)) {
		conf_err(&x->t, n, "%s is not valid in an MQTT topic (non-empty UTF-8 without '/', '+', '#' or "
			 "control characters)", ct_show(s, n->len).s);
		return false;
	}
	e->identity = ct_strdup(&x->t, s);
	return e->identity != NULL;
}

/* Fills e->key from key (text) or key_hex; never echoes the key. */
static bool dev_key(struct cctx *x, const struct cnode *key, const struct cnode *hex, struct key_entry *e)
{
	const char *s, *why;
	int len;

	if (key) {
		if (key->type != CN_SCALAR || ct_is_null(key)) {
			conf_err(&x->t, key, "expected a string of %d..%d bytes", KEYS_MIN_KEY, KEYS_MAX_KEY);
			return false;
		}
		if (key->len < KEYS_MIN_KEY || key->len > KEYS_MAX_KEY) {
			conf_err(&x->t, key, "key %s than %d bytes (%d..%d)", key->len < KEYS_MIN_KEY ?
				 "shorter" : "longer", key->len < KEYS_MIN_KEY ? KEYS_MIN_KEY : KEYS_MAX_KEY,
				 KEYS_MIN_KEY, KEYS_MAX_KEY);
			return false;
		}
		memcpy(e->key, key->val, key->len);
		e->key_len = key->len;
		return true;
	}
	if ((s = ct_scalar(&x->t, hex, "hex digits")) == NULL)
		return false;
	len = keys_decode_hex(s, e->key, sizeof(e->key), &why);
	if (len < 0 || len < KEYS_MIN_KEY) {
		conf_err(&x->t, hex, "key %s (%d..%d bytes: %d..%d hex digits)", len < 0 ? why :
			 "shorter than 8 bytes", KEYS_MIN_KEY, KEYS_MAX_KEY, 2 * KEYS_MIN_KEY, 2 * KEYS_MAX_KEY);
		return false;
	}
	e->key_len = (size_t)len;
	return true;
}

static char *origin_of(const struct cctx *x, int line)
{
	int len = snprintf(NULL, 0, "%s:%d", x->t.file, line);
	char *s = len < 0 ? NULL : malloc((size_t)len + 1);

	if (s != NULL)
		snprintf(s, (size_t)len + 1, "%s:%d", x->t.file, line);
	return s;
}

/* The keys of a device mapping, in the order of v[]. */
enum {
	D_IDENTITY, D_KEY, D_KEY_HEX, D_RPK, D_AUTH,
	D_KEYS
};

static const char *const device_keys[D_KEYS + 1] = {
	[D_IDENTITY] = "identity",
	[D_KEY] = "key",
	[D_KEY_HEX] = "key_hex",
	[D_RPK] = "rpk",
	[D_AUTH] = "auth",
};

/* auth: certificate — the device authenticates with an X.509 certificate naming it. */
static bool dev_auth(struct cctx *x, const struct cnode *n, struct key_entry *e)
{
	static const char *const kinds[] = { "certificate" };
	int i;

	if (!ct_enum(&x->t, n, "certificate (PSK and raw public key devices give key, key_hex "
		     "or rpk instead)", kinds, 1, false, &i))
		return false;
	e->cert = 1;
	return true;
}

/* Fills e->rpk from "sha256:HEX". */
static bool dev_rpk(struct cctx *x, const struct cnode *n, struct key_entry *e)
{
	const char *s = ct_scalar(&x->t, n, "sha256: and 64 hex digits"), *why;

	if (s == NULL)
		return false;
	if ((why = keys_decode_rpk(s, e->rpk)) != NULL) {
		conf_err(&x->t, n, "raw public key %s", why);
		return false;
	}
	e->has_rpk = 1;
	return true;
}

static void conf_device(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[D_KEYS];
	struct key_entry e = { 0 };
	bool ok;

	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, device_keys, v))
		return;
	int creds = (v[D_KEY] != NULL) + (v[D_KEY_HEX] != NULL) + (v[D_RPK] != NULL) +
		    (v[D_AUTH] != NULL);

	if (v[D_IDENTITY] == NULL)
		conf_err(&x->t, n, "identity is required");
	if (creds > 1)
		conf_err(&x->t, v[D_AUTH] ? v[D_AUTH] : v[D_RPK] ? v[D_RPK] : v[D_KEY_HEX],
			 "give one of key, key_hex, rpk or auth: certificate");
	else if (creds == 0)
		conf_err(&x->t, n, "key, key_hex, rpk or auth: certificate is required");
	ok = v[D_IDENTITY] && dev_identity(x, v[D_IDENTITY], &e);
	ok = creds == 1 && (v[D_AUTH] ? dev_auth(x, v[D_AUTH], &e) :
			    v[D_RPK] ? dev_rpk(x, v[D_RPK], &e) :
			    dev_key(x, v[D_KEY], v[D_KEY_HEX], &e)) && ok;
	if (ok && (e.origin = origin_of(x, v[D_IDENTITY]->line)) != NULL &&
	    dev_append(x, &e, v[D_IDENTITY]) == 0)
		return;
	if (ok)
		conf_oom(&x->t);
	key_entry_clear(&e);
}

static void device_dups(struct cctx *x)
{
	struct config *c = x->c;
	struct keys *k = keys_new(c->devices, c->n_devices);
	size_t i;

	if (k == NULL) {
		conf_oom(&x->t);
		return;
	}
	for (i = 0; i < c->n_devices; i++) {
		const struct key_entry *f = keys_find(k, c->devices[i].identity, strlen(c->devices[i].identity));

		if (f != NULL && f != &c->devices[i])
			conf_err(&x->t, x->dev_node[i], "duplicate identity %s (first defined at line %d)",
				 ct_show(f->identity, strlen(f->identity)).s, x->dev_node[f - c->devices]->line);
	}
	keys_free(k);
}

/* A fingerprint names one device: listed twice, which identity would it be? Also says when
 * devices use raw public keys but the gateway has no key pair of its own for them. */
static void rpk_dups(struct cctx *x, const struct cnode *file_node)
{
	struct config *c = x->c;
	struct keys *k;
	size_t i, nrpk = 0;

	for (i = 0; i < c->n_devices; i++)
		nrpk += c->devices[i].has_rpk != 0;
	if (nrpk == 0)
		return;
	if ((k = keys_new(c->devices, c->n_devices)) == NULL) {
		conf_oom(&x->t);
		return;
	}
	for (i = 0; i < c->n_devices; i++) {
		const struct key_entry *e = &c->devices[i], *f;
		char fp[KEYS_RPK_TEXT];

		if (!e->has_rpk || (f = keys_find_rpk(k, e->rpk)) == NULL || f == e)
			continue;
		keys_format_rpk(e->rpk, fp);
		if (i < x->n_dev_nodes)
			conf_err(&x->t, x->dev_node[i], "raw public key %s is also device %s's (%s)",
				 fp, f->identity, f->origin ? f->origin : "?");
		else
			conf_err(&x->t, file_node, "%s: raw public key %s is also device %s's (%s)",
				 e->origin ? e->origin : "?", fp, f->identity,
				 f->origin ? f->origin : "?");
	}
	keys_free(k);
	if (c->coap.rpk_key_file == NULL)
		conf_err(&x->t, file_node ? file_node : &x->t.node[0], "%zu device(s) use a raw "
			 "public key but coap.rpk.key_file is not set (the gateway's own key pair)",
			 nrpk);
}

/* An OSCORE Recipient ID names one device (it is how a request finds its context), and OSCORE
 * devices need a coap:// listener that takes them. */
static void oscore_devices(struct cctx *x, const struct cnode *file_node)
{
	const struct config *c = x->c;
	const struct cnode *where;
	struct keys *k;
	size_t i, n = 0, listeners = 0;

	for (i = 0; i < c->n_devices; i++)
		n += c->devices[i].oscore != NULL;
	if (n == 0)
		return;
	where = file_node ? file_node : &x->t.node[0];
	if ((k = keys_new(c->devices, c->n_devices)) == NULL) {
		conf_oom(&x->t);
		return;
	}
	for (i = 0; i < c->n_devices; i++) {
		const struct key_entry *e = &c->devices[i], *f;

		if (!e->oscore || (f = keys_find_oscore(k, e->oscore->recipient_id,
						       e->oscore->recipient_id_len)) == e)
			continue;
		conf_err(&x->t, where, "%s: oscore recipient_id is also device %s's (%s); each "
			 "device needs its own", e->origin ? e->origin : "?", f->identity,
			 f->origin ? f->origin : "?");
	}
	keys_free(k);
	for (i = 0; i < c->coap.n_listen; i++)
		listeners += strncmp(c->coap.listen[i], "coap://", 7) == 0 &&
			     (c->coap.listen_modes[i] & CONF_MODE_OSCORE);
	if (listeners == 0)
		conf_err(&x->t, where, "%zu device(s) use OSCORE but no coap.listen entry is a "
			 "coap:// listener taking them (coap://HOST:PORT?modes=oscore)", n);
}

/* Certificate devices need the gateway's certificate setup. */
static void cert_devices(struct cctx *x, const struct cnode *file_node)
{
	size_t i, n = 0;

	for (i = 0; i < x->c->n_devices; i++)
		n += x->c->devices[i].cert != 0;
	if (n && x->c->coap.pki.cert_file == NULL)
		conf_err(&x->t, file_node ? file_node : &x->t.node[0], "%zu device(s) use a "
			 "certificate (auth: certificate) but coap.pki is not set", n);
}

static void conf_devices(struct cctx *x, const struct cnode *n)
{
	const struct cnode *it;

	if (n == NULL || !ct_want(&x->t, n, CN_SEQ))
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it))
		conf_device(x, it);
	device_dups(x);
}

static void conf_devices_file(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;

	if (n == NULL || !ct_file(&x->t, n, &c->devices_file))
		return;
	x->here = n;
	x->t.nerr += keys_parse_file(c->devices_file, &c->devices, &c->n_devices, keys_sink, x);
	x->dev_cap = c->n_devices;	/* the keys parser sized the array its own way */
}

/* ---- mqtt ---- */

static void mqtt_url(struct cctx *x, const struct cnode *n)
{
	struct conf_mqtt *m = &x->c->mqtt;
	const char *s, *rest, *why;

	if (!ct_str(&x->t, n, CONF_MAX_STR, &m->url))
		return;
	s = m->url;
	m->tls = strncmp(s, "mqtts://", 8) == 0;
	rest = m->tls ? s + 8 : strncmp(s, "mqtt://", 7) == 0 ? s + 7 : NULL;
	m->port = m->tls ? 8883 : 1883;
	why = rest ? parse_hostport(rest, false, &m->host, &m->port) : "the scheme is not mqtts:// or mqtt://";
	if (why != NULL)
		conf_err(&x->t, n, "%s is not mqtts://HOST[:PORT] or mqtt://HOST[:PORT] (%s)",
			 ct_show(s, n->len).s, why);
	else if (!m->tls && !m->insecure)
		conf_err(&x->t, n, "mqtt:// sends without TLS (use mqtts://, or set insecure: true for a lab "
			 "broker)");
}

/* Opens path for reading; with private set, also refuses a file others may read. */
static bool file_check(struct cctx *x, const struct cnode *n, const char *key, const char *path,
		       bool private)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	bool ok = false;

	if (fd < 0) {
		conf_errk(&x->t, n, key, "cannot read %s: %s", path, strerror(errno));
		return false;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		conf_errk(&x->t, n, key, "%s is not a regular file", path);
	else if (private && (st.st_mode & 007) != 0)
		conf_errk(&x->t, n, key, "%s is readable by others (mode %04o); chmod 640 it", path,
			  (unsigned)(st.st_mode & 07777));
	else
		ok = true;
	close(fd);
	return ok;
}

/* Reads the first line of the password file into m->password; never prints it. */
static void mqtt_password(struct cctx *x, const struct cnode *n)
{
	char *path = NULL, *nl, buf[CONF_MAX_PASSWORD + 2];
	ssize_t got;
	size_t len;
	int fd;

	if (!ct_file(&x->t, n, &path) || !file_check(x, n, "password_file", path, true) ||
	    (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		free(path);
		return;
	}
	got = read(fd, buf, sizeof(buf));
	close(fd);
	len = got > 0 ? (size_t)got : 0;
	if ((nl = memchr(buf, '\n', len)) != NULL)
		len = (size_t)(nl - buf);
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	if (len > CONF_MAX_PASSWORD)
		conf_err(&x->t, n, "%s: first line is longer than %d bytes", path, CONF_MAX_PASSWORD);
	else if (len == 0)
		conf_err(&x->t, n, "%s: first line is empty (it holds the password)", path);
	else if (memchr(buf, '\0', len) != NULL)
		conf_err(&x->t, n, "%s: first line contains a NUL byte", path);
	else if ((x->c->mqtt.password = strndup(buf, len)) == NULL)
		conf_err(&x->t, n, "out of memory");
	explicit_bzero(buf, sizeof(buf));
	free(path);
}

/* The keys of mqtt:, in the order of v[]. */
enum {
	M_URL, M_INSECURE, M_CLIENT_ID, M_CA_FILE, M_CERT_FILE, M_KEY_FILE, M_USERNAME,
	M_PASSWORD_FILE, M_KEEPALIVE, M_VERSION, M_PERSISTENCE_DIR, M_MAX_BUFFERED,
	M_MAX_INFLIGHT, M_SESSION_EXPIRY, M_STATUS_TOPIC, M_MAX_BUFFERED_BYTES, M_MAX_PENDING_ACKS,
	M_KEYS
};

static const char *const mqtt_keys[M_KEYS + 1] = {
	[M_URL] = "url",
	[M_INSECURE] = "insecure",
	[M_CLIENT_ID] = "client_id",
	[M_CA_FILE] = "ca_file",
	[M_CERT_FILE] = "cert_file",
	[M_KEY_FILE] = "key_file",
	[M_USERNAME] = "username",
	[M_PASSWORD_FILE] = "password_file",
	[M_KEEPALIVE] = "keepalive",
	[M_VERSION] = "version",
	[M_PERSISTENCE_DIR] = "persistence_dir",
	[M_MAX_BUFFERED] = "max_buffered",
	[M_MAX_INFLIGHT] = "max_inflight",
	[M_SESSION_EXPIRY] = "session_expiry",
	[M_STATUS_TOPIC] = "status_topic",
	[M_MAX_BUFFERED_BYTES] = "max_buffered_bytes",
	[M_MAX_PENDING_ACKS] = "max_pending_acks",
};

static void mqtt_files(struct cctx *x, const struct cnode **v)
{
	struct conf_mqtt *m = &x->c->mqtt;

	if (v[M_CA_FILE])
		ct_file(&x->t, v[M_CA_FILE], &m->ca_file);
	else
		m->ca_file = ct_strdup(&x->t, DEFAULT_CA_FILE);
	if (m->tls && m->ca_file)
		file_check(x, v[M_CA_FILE] ? v[M_CA_FILE] : v[M_URL], "ca_file", m->ca_file, false);
	if (v[M_CERT_FILE] && !v[M_KEY_FILE])
		conf_err(&x->t, v[M_CERT_FILE], "needs key_file too (both or neither)");
	if (v[M_KEY_FILE] && !v[M_CERT_FILE])
		conf_err(&x->t, v[M_KEY_FILE], "needs cert_file too (both or neither)");
	if (v[M_CERT_FILE] && ct_file(&x->t, v[M_CERT_FILE], &m->cert_file) && m->tls)
		file_check(x, v[M_CERT_FILE], "cert_file", m->cert_file, false);
	if (v[M_KEY_FILE] && ct_file(&x->t, v[M_KEY_FILE], &m->key_file) && m->tls)
		file_check(x, v[M_KEY_FILE], "key_file", m->key_file, true);
	if ((v[M_CERT_FILE] || v[M_KEY_FILE]) && v[M_URL] && m->url && !m->tls)
		conf_err(&x->t, v[M_CERT_FILE] ? v[M_CERT_FILE] : v[M_KEY_FILE],
			 "a client certificate needs mqtts://");
	if (v[M_PASSWORD_FILE])
		mqtt_password(x, v[M_PASSWORD_FILE]);
}

static void mqtt_client_id(struct cctx *x, const struct cnode *n)
{
	struct conf_mqtt *m = &x->c->mqtt;
	size_t i;

	if (!ct_str(&x->t, n, 64, &m->client_id))
		return;
	for (i = 0; m->client_id[i]; i++) {
		if ((unsigned char)m->client_id[i] <= 0x20 || (unsigned char)m->client_id[i] >= 0x7f) {
			conf_err(&x->t, n, "%s has a space or non-ASCII character (1..64 printable ASCII "
				 "characters; [A-Za-z0-9_-], at most 23, is safest)", ct_show(m->client_id, i + 1).s);
			return;
		}
	}
}

static void mqtt_numbers(struct cctx *x, const struct cnode **v)
{
	static const int versions[] = { 3, 5 };
	struct conf_mqtt *m = &x->c->mqtt;
	long long ll;

	if (v[M_KEEPALIVE] && ct_int(&x->t, v[M_KEEPALIVE], 5, 3600, &ll))
		m->keepalive = (int)ll;
	if (v[M_VERSION])
		ct_choice(&x->t, v[M_VERSION], versions, 2, "3 or 5", &m->version);
	if (v[M_MAX_BUFFERED] && ct_int(&x->t, v[M_MAX_BUFFERED], 1, 10000000, &ll))
		m->max_buffered = (int)ll;
	if (v[M_MAX_INFLIGHT] && ct_int(&x->t, v[M_MAX_INFLIGHT], 1, 65535, &ll))
		m->max_inflight = (int)ll;
	if (v[M_SESSION_EXPIRY] && ct_int(&x->t, v[M_SESSION_EXPIRY], 0, UINT32_MAX, &ll))
		m->session_expiry = (unsigned)ll;
	if (v[M_MAX_BUFFERED_BYTES] && ct_int(&x->t, v[M_MAX_BUFFERED_BYTES], 1ll << 20, 1ll << 40, &ll))
		m->max_buffered_bytes = (unsigned long long)ll;
	if (v[M_MAX_PENDING_ACKS] && ct_int(&x->t, v[M_MAX_PENDING_ACKS], 1, 1000000, &ll))
		m->max_pending_acks = (int)ll;
}

/* status_topic as given, else coap2mqtt/<client_id>/status (idnode: client_id, for messages). */
static void mqtt_status_topic(struct cctx *x, const struct cnode *n, const struct cnode *idnode)
{
	struct conf_mqtt *m = &x->c->mqtt;

	if (n != NULL) {
		get_topic(x, n, &m->status_topic);
		return;
	}
	if (m->client_id == NULL)
		return;
	if (strpbrk(m->client_id, "+#{}") != NULL) {
		conf_err(&x->t, idnode, "%s makes the default status_topic " STATUS_FMT " invalid (it may not "
			 "hold '+', '#', '{' or '}'; set status_topic)", ct_show(m->client_id,
			 strlen(m->client_id)).s, m->client_id);
		return;
	}
	if (asprintf(&m->status_topic, STATUS_FMT, m->client_id) < 0) {
		m->status_topic = NULL;
		conf_oom(&x->t);
	}
}

static void conf_mqtt(struct cctx *x, const struct cnode *n, const struct cnode *root)
{
	const struct cnode *v[M_KEYS];
	struct conf_mqtt *m = &x->c->mqtt;

	*m = (struct conf_mqtt){ .keepalive = 30, .version = 5, .max_buffered = 100000,
				 .max_buffered_bytes = 1ull << 30, .max_inflight = 1000,
				 .max_pending_acks = 1000,
				 .session_expiry = 86400 };
	if (n == NULL)
		conf_errk(&x->t, root, "mqtt", "is required (at least url: mqtts://HOST[:PORT])");
	if (n == NULL || !ct_fields(&x->t, n, mqtt_keys, v))
		return;
	if (v[M_INSECURE])
		ct_bool(&x->t, v[M_INSECURE], &m->insecure);
	if (v[M_URL])
		mqtt_url(x, v[M_URL]);
	else
		conf_errk(&x->t, n, "mqtt", "url is required (mqtts://HOST[:PORT])");
	if (v[M_CLIENT_ID])
		mqtt_client_id(x, v[M_CLIENT_ID]);
	if (v[M_USERNAME])
		ct_str(&x->t, v[M_USERNAME], 65535, &m->username);
	mqtt_files(x, v);
	mqtt_numbers(x, v);
	if (m->password && !m->username && m->version == 3)
		conf_err(&x->t, v[M_PASSWORD_FILE], "needs username with MQTT 3.1.1 (version: 3)");
	if (v[M_PERSISTENCE_DIR])
		ct_path(&x->t, v[M_PERSISTENCE_DIR], &m->persistence_dir);
	if (m->client_id == NULL)
		m->client_id = ct_strdup(&x->t, DEFAULT_CLIENT_ID);
	if (m->persistence_dir == NULL)
		m->persistence_dir = ct_strdup(&x->t, DEFAULT_PERSISTENCE_DIR);
	mqtt_status_topic(x, v[M_STATUS_TOPIC], v[M_CLIENT_ID]);
}

/* ---- routes ---- */

/* MQTT QoS: 0, 1 or 2. */
static void get_qos(struct cctx *x, const struct cnode *n, int *out)
{
	static const int qos[] = { 0, 1, 2 };

	ct_choice(&x->t, n, qos, 3, "0, 1 or 2", out);
}

/* Method names in the order of enum conf_method's bits (method_names[i] is bit 1 << i). */
static const char *const method_names[] = { "GET", "POST", "PUT", "DELETE" };

/* A CoAP method name (any case); *i is its index in method_names. */
static bool get_method(struct cctx *x, const struct cnode *n, const char *what, int *i)
{
	return ct_enum(&x->t, n, what, method_names, 4, true, i);
}

static void route_methods(struct cctx *x, const struct cnode *n, unsigned *out)
{
	const struct cnode *it;
	unsigned bits = 0;
	int i;

	if (!ct_want(&x->t, n, CN_SEQ))
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		if (!get_method(x, it, "a method", &i))
			continue;
		if (bits & (1u << i))
			conf_err(&x->t, it, "%s is listed twice", method_names[i]);
		bits |= 1u << i;
	}
	if (bits == 0 && n->nkids == 0)
		conf_err(&x->t, n, "needs at least one of GET, POST, PUT or DELETE");
	*out = bits;
}

/* The keys of a route mapping, in the order of v[]. */
enum {
	R_PATH, R_TOPIC, R_METHODS, R_QOS, R_RETAIN, R_ACK,
	R_KEYS
};

static const char *const route_keys[R_KEYS + 1] = {
	[R_PATH] = "path",
	[R_TOPIC] = "topic",
	[R_METHODS] = "methods",
	[R_QOS] = "qos",
	[R_RETAIN] = "retain",
	[R_ACK] = "ack",
};

static void route_option(struct cctx *x, const struct cnode **v, struct conf_route *r)
{
	static const char *const acks[] = { "stored", "broker" };	/* enum conf_ack order */
	int ack;

	if (v[R_METHODS])
		route_methods(x, v[R_METHODS], &r->methods);
	if (v[R_QOS])
		get_qos(x, v[R_QOS], &r->qos);
	if (v[R_RETAIN])
		ct_bool(&x->t, v[R_RETAIN], &r->retain);
	if (v[R_ACK] && ct_enum(&x->t, v[R_ACK], "stored or broker", acks, 2, false, &ack))
		r->ack = (enum conf_ack)ack;
	if (r->ack == CONF_ACK_BROKER && r->qos == 0)
		conf_err(&x->t, v[R_ACK], "broker needs qos 1 or 2 (a qos 0 publish is never acknowledged)");
}

/* Compiles path + topic; reports route_compile's reason at the node it is about. */
static bool route_build(struct cctx *x, const struct cnode **v, struct conf_route *r)
{
	struct route_error err;

	r->route = route_compile(r->path, r->topic, &err);
	if (r->route != NULL)
		return true;
	conf_err(&x->t, err.input == ROUTE_IN_TOPIC ? v[R_TOPIC] : v[R_PATH], "%s", err.reason);
	return false;
}

static int route_append(struct cctx *x, struct conf_route *r, const struct cnode *pathnode)
{
	struct config *c = x->c;

	if (c->n_routes == x->route_cap) {
		size_t cap = x->route_cap ? 2 * x->route_cap : 16;
		struct conf_route *nv = realloc(c->routes, cap * sizeof(*nv));
		const struct cnode **nn;

		if (nv == NULL)
			return -1;
		c->routes = nv;
		nn = realloc(x->route_node, cap * sizeof(*nn));
		if (nn == NULL)
			return -1;
		x->route_node = nn;
		x->route_cap = cap;
	}
	x->route_node[c->n_routes] = pathnode;
	c->routes[c->n_routes++] = *r;
	return 0;
}

static void conf_route(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[R_KEYS];
	struct conf_route r = { .methods = CONF_M_POST | CONF_M_PUT, .qos = 1, .ack = CONF_ACK_STORED,
				.line = n->line };
	int before = x->t.nerr;

	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, route_keys, v))
		return;
	if (v[R_PATH] == NULL)
		conf_err(&x->t, n, "path is required");
	if (v[R_TOPIC] == NULL)
		conf_err(&x->t, n, "topic is required");
	if (v[R_PATH])
		ct_str(&x->t, v[R_PATH], CONF_MAX_STR, &r.path);
	if (v[R_TOPIC])
		ct_str(&x->t, v[R_TOPIC], CONF_MAX_STR, &r.topic);
	route_option(x, v, &r);
	if (r.path && r.topic && route_build(x, v, &r) && x->t.nerr == before) {
		if (route_append(x, &r, v[R_PATH]) == 0)
			return;
		conf_oom(&x->t);
	}
	route_free(r.route);
	free(r.path);
	free(r.topic);
}

static int route_cmp(const void *a, const void *b)
{
	const struct conf_route *ra = *(const struct conf_route *const *)a;
	const struct conf_route *rb = *(const struct conf_route *const *)b;
	int c = strcmp(ra->path, rb->path);

	return c ? c : (ra->line > rb->line) - (ra->line < rb->line);
}

/* Reports every route whose path repeats an earlier route's path (sorted: O(n log n)). */
static void route_dups(struct cctx *x)
{
	struct config *c = x->c;
	struct conf_route **s = ct_calloc(&x->t, c->n_routes, sizeof(*s));
	size_t i, first = 0;

	if (s == NULL)
		return;
	for (i = 0; i < c->n_routes; i++)
		s[i] = &c->routes[i];
	qsort(s, c->n_routes, sizeof(*s), route_cmp);
	for (i = 1; i < c->n_routes; i++) {
		if (strcmp(s[i]->path, s[first]->path) != 0) {
			first = i;
			continue;
		}
		conf_err(&x->t, x->route_node[s[i] - c->routes], "%s is already routed at line %d",
			 ct_show(s[i]->path, strlen(s[i]->path)).s, s[first]->line);
	}
	free(s);
}

static void conf_routes(struct cctx *x, const struct cnode *n)
{
	const struct cnode *it;

	if (n == NULL || !ct_want(&x->t, n, CN_SEQ))
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it))
		conf_route(x, it);
	route_dups(x);
}

/* ---- observe ---- */

/* A resource path on a device: no leading '/', no empty segment, each segment fit for a topic. */
static bool observe_path(struct cctx *x, const struct cnode *n, struct conf_observe *o)
{
	struct route_seg seg[ROUTE_MAX_SEGMENTS];
	size_t nseg, i;

	if (!ct_str(&x->t, n, ROUTE_MAX_VALUE, &o->path))
		return false;
	if (o->path[0] == '/') {
		conf_err(&x->t, n, "must not start with '/' (write \"temperature\" or \"a/b\")");
		return false;
	}
	nseg = route_split(o->path, n->len, seg, ROUTE_MAX_SEGMENTS);
	if (nseg == 0) {
		conf_err(&x->t, n, "has more than %d segments", ROUTE_MAX_SEGMENTS);
		return false;
	}
	for (i = 0; i < nseg; i++) {
		if (seg[i].len == 0) {
			conf_err(&x->t, n, "has an empty segment (between two '/' or at the end)");
			return false;
		}
		if (!route_value_ok(seg[i].s, seg[i].len)) {
			conf_err(&x->t, n, "segment %s is not valid in an MQTT topic (UTF-8 without '+', '#' or "
				 "control characters)", ct_show(seg[i].s, seg[i].len).s);
			return false;
		}
	}
	return true;
}

/* The keys of a observe mapping, in the order of v[]. */
enum {
	OB_DEVICES, OB_PATH, OB_DISCOVER, OB_MATCH, OB_TOPIC, OB_QOS, OB_RETAIN,
	OB_KEYS
};

static const char *const observe_keys[OB_KEYS + 1] = {
	[OB_DEVICES] = "devices",
	[OB_PATH] = "path",
	[OB_DISCOVER] = "discover",
	[OB_MATCH] = "match",
	[OB_TOPIC] = "topic",
	[OB_QOS] = "qos",
	[OB_RETAIN] = "retain",
};

/* discover: true or path, exactly one; match only with discover. */
static void observe_what(struct cctx *x, const struct cnode *n, const struct cnode **v,
			 struct conf_observe *o)
{
	bool disc_ok = v[OB_DISCOVER] == NULL || ct_bool(&x->t, v[OB_DISCOVER], &o->discover);

	if (v[OB_PATH] && o->discover)
		conf_err(&x->t, v[OB_DISCOVER], "give path or discover: true, not both");
	else if (!v[OB_PATH] && !o->discover && disc_ok)
		conf_err(&x->t, n, "path or discover: true is required");
	if (v[OB_PATH] && !o->discover)
		observe_path(x, v[OB_PATH], o);
	if (v[OB_MATCH] && !o->discover && disc_ok)
		conf_err(&x->t, v[OB_MATCH], "only with discover: true (it filters the discovered resources)");
	else if (v[OB_MATCH] && o->discover)
		ct_str(&x->t, v[OB_MATCH], CONF_MAX_STR, &o->match);
}

static void observe_rule(struct cctx *x, const struct cnode *n, struct conf_observe *o)
{
	const struct cnode *v[OB_KEYS];
	struct route_error err;

	*o = (struct conf_observe){ .line = n->line };
	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, observe_keys, v))
		return;
	if (v[OB_DEVICES])
		ct_str(&x->t, v[OB_DEVICES], CONF_MAX_STR, &o->devices);
	else
		o->devices = ct_strdup(&x->t, "*");
	observe_what(x, n, v, o);
	if (v[OB_TOPIC] == NULL)
		conf_err(&x->t, n, "topic is required");
	else if (ct_str(&x->t, v[OB_TOPIC], CONF_MAX_STR, &o->topic) &&
		 (o->route = route_compile2("{path+}", o->topic, 0, &err)) == NULL)
		conf_err(&x->t, v[OB_TOPIC], "%s", err.reason);
	if (v[OB_QOS])
		get_qos(x, v[OB_QOS], &o->qos);
	if (v[OB_RETAIN])
		ct_bool(&x->t, v[OB_RETAIN], &o->retain);
}

static void conf_observes(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	const struct cnode *it;

	if (n == NULL || !ct_want(&x->t, n, CN_SEQ) || n->nkids == 0)
		return;
	c->observe = ct_calloc(&x->t, n->nkids, sizeof(*c->observe));
	if (c->observe == NULL)
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it))
		observe_rule(x, it, &c->observe[c->n_observe++]);
}

/* ---- commands ---- */

static bool is_var_level(const struct route_seg *l)
{
	return l->len >= 2 && l->s[0] == '{' && l->s[l->len - 1] == '}';
}

static bool is_rest_level(const struct route_seg *l)
{
	return is_var_level(l) && l->len >= 3 && l->s[l->len - 2] == '+';
}

/* Checks the levels of a command topic (literals without wildcards, a {identity} level, a {name+}
 * level last) and builds its subscription filter: {x} → +, {x+} → #. The braces themselves are
 * checked by route_compile2 afterwards. */
static bool command_levels(struct cctx *x, const struct cnode *n, struct conf_command *cmd)
{
	struct route_seg lv[ROUTE_MAX_SEGMENTS];
	size_t nl = route_split(cmd->topic, strlen(cmd->topic), lv, ROUTE_MAX_SEGMENTS), i, pos = 0;
	bool identity = false;

	if (nl == 0) {
		conf_err(&x->t, n, "has more than %d levels", ROUTE_MAX_SEGMENTS);
		return false;
	}
	for (i = 0; i < nl; i++) {
		const struct route_seg *l = &lv[i];

		if (!is_var_level(l) && (memchr(l->s, '+', l->len) || memchr(l->s, '#', l->len))) {
			conf_err(&x->t, n, "must not contain '+' or '#' (MQTT wildcards; write {name} for one "
				 "level, {name+} for the rest)");
			return false;
		}
		if (!is_var_level(l) && l->len > 0 && !route_value_ok(l->s, l->len)) {
			conf_err(&x->t, n, "level %s is not valid UTF-8", ct_show(l->s, l->len).s);
			return false;
		}
		identity |= lv[i].len == 10 && memcmp(lv[i].s, "{identity}", 10) == 0;
	}
	if (!identity) {
		conf_err(&x->t, n, "must contain a {identity} level (the device the command goes to)");
		return false;
	}
	if (!is_rest_level(&lv[nl - 1])) {
		conf_err(&x->t, n, "must end with a {name+} level (the resource path, e.g. {path+})");
		return false;
	}
	if ((cmd->filter = ct_calloc(&x->t, strlen(cmd->topic) + 1, 1)) == NULL)
		return false;
	for (i = 0; i < nl; i++) {
		if (i > 0)
			cmd->filter[pos++] = '/';
		if (is_var_level(&lv[i])) {
			cmd->filter[pos++] = is_rest_level(&lv[i]) ? '#' : '+';
		} else {
			memcpy(cmd->filter + pos, lv[i].s, lv[i].len);
			pos += lv[i].len;
		}
	}
	return true;
}

/* The keys of a command mapping, in the order of v[]. */
enum {
	CMD_TOPIC, CMD_METHOD, CMD_RESPONSE_TOPIC, CMD_RESPONSE_TOPICS, CMD_TTL, CMD_TIMEOUT,
	CMD_QOS, CMD_MAX_PAYLOAD,
	CMD_KEYS
};

static const char *const command_keys[CMD_KEYS + 1] = {
	[CMD_TOPIC] = "topic",
	[CMD_METHOD] = "method",
	[CMD_RESPONSE_TOPIC] = "response_topic",
	[CMD_RESPONSE_TOPICS] = "response_topics",
	[CMD_TTL] = "ttl",
	[CMD_TIMEOUT] = "timeout",
	[CMD_QOS] = "qos",
	[CMD_MAX_PAYLOAD] = "max_payload",
};

/* Compiles topic (as the pattern) + response_topic or topic. */
static void command_route(struct cctx *x, const struct cnode **v, struct conf_command *cmd)
{
	struct route_error err;

	cmd->route = route_compile2(cmd->topic, cmd->response_topic ? cmd->response_topic : cmd->topic,
				    ROUTE_IDENTITY_VAR, &err);
	if (cmd->route != NULL)
		return;
	if (err.input == ROUTE_IN_TOPIC && cmd->response_topic)
		conf_err(&x->t, v[CMD_RESPONSE_TOPIC], "%s", err.reason);
	else
		conf_err(&x->t, v[CMD_TOPIC], "%s", err.reason);
}

/* response_topics: the MQTT topic filters a command's own Response Topic must fit. */
static void command_response_topics(struct cctx *x, const struct cnode *n,
				     struct conf_command *cmd)
{
	const struct cnode *it;
	const char *s;

	if (!ct_want(&x->t, n, CN_SEQ))
		return;
	if (n->nkids > CONF_MAX_RESPONSE_TOPICS) {
		conf_err(&x->t, n, "more than %d topic filters", CONF_MAX_RESPONSE_TOPICS);
		return;
	}
	cmd->response_topics = ct_calloc(&x->t, n->nkids ? n->nkids : 1,
					 sizeof(*cmd->response_topics));
	if (cmd->response_topics == NULL)
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		if ((s = ct_scalar(&x->t, it, "an MQTT topic filter")) == NULL)
			continue;
		if (strlen(s) != it->len || !route_filter_ok(s)) {
			conf_err(&x->t, it, "%s is not an MQTT topic filter ('+' and '#' only as whole "
				 "levels, '#' last)", ct_show(s, it->len).s);
			continue;
		}
		if ((cmd->response_topics[cmd->n_response_topics] = ct_strdup(&x->t, s)) != NULL)
			cmd->n_response_topics++;
	}
}

/* nodes[0..1]: the topic and response_topic nodes, for the checks across commands. */
static void command_rule(struct cctx *x, const struct cnode *n, struct conf_command *cmd,
			 const struct cnode **nodes)
{
	const struct cnode *v[CMD_KEYS];
	long long ll;
	bool ok = false;
	int m;

	*cmd = (struct conf_command){ .method = CONF_M_PUT, .ttl = 30, .timeout = 60, .qos = 1,
				      .max_payload = 4096, .line = n->line };
	if (!ct_want(&x->t, n, CN_MAP) || !ct_fields(&x->t, n, command_keys, v))
		return;
	nodes[0] = v[CMD_TOPIC];
	nodes[1] = v[CMD_RESPONSE_TOPIC];
	if (v[CMD_TOPIC] == NULL)
		conf_err(&x->t, n, "topic is required");
	else if (ct_str(&x->t, v[CMD_TOPIC], CONF_MAX_STR, &cmd->topic))
		ok = command_levels(x, v[CMD_TOPIC], cmd);
	if (v[CMD_METHOD] && get_method(x, v[CMD_METHOD], "one method", &m))
		cmd->method = 1u << m;
	if (v[CMD_RESPONSE_TOPIC] &&
	    !ct_str(&x->t, v[CMD_RESPONSE_TOPIC], CONF_MAX_STR, &cmd->response_topic))
		ok = false;
	if (ok)
		command_route(x, v, cmd);
	if (v[CMD_RESPONSE_TOPICS])
		command_response_topics(x, v[CMD_RESPONSE_TOPICS], cmd);
	if (v[CMD_TTL] && ct_int(&x->t, v[CMD_TTL], 0, 86400, &ll))
		cmd->ttl = (unsigned)ll;
	if (v[CMD_TIMEOUT] && ct_int(&x->t, v[CMD_TIMEOUT], 1, 3600, &ll))
		cmd->timeout = (unsigned)ll;
	if (v[CMD_MAX_PAYLOAD] && ct_int(&x->t, v[CMD_MAX_PAYLOAD], 0, 1048576, &ll))
		cmd->max_payload = (size_t)ll;
	if (v[CMD_QOS])
		get_qos(x, v[CMD_QOS], &cmd->qos);
}

static int command_cmp(const void *a, const void *b)
{
	const struct conf_command *ca = *(const struct conf_command *const *)a;
	const struct conf_command *cb = *(const struct conf_command *const *)b;
	int c = strcmp(ca->filter, cb->filter);

	return c ? c : (ca->line > cb->line) - (ca->line < cb->line);
}

/* Two commands on one subscription filter would both take every message: reported (sorted). */
static void command_dups(struct cctx *x, const struct cnode **nodes)
{
	struct config *c = x->c;
	struct conf_command **s = ct_calloc(&x->t, c->n_commands, sizeof(*s));
	size_t i, n = 0, first = 0;

	if (s == NULL)
		return;
	for (i = 0; i < c->n_commands; i++)
		if (c->commands[i].route != NULL)
			s[n++] = &c->commands[i];
	qsort(s, n, sizeof(*s), command_cmp);
	for (i = 1; i < n; i++) {
		if (strcmp(s[i]->filter, s[first]->filter) != 0) {
			first = i;
			continue;
		}
		conf_err(&x->t, nodes[2 * (size_t)(s[i] - c->commands)], "subscribes to %s like the command at "
			 "line %d", ct_show(s[i]->filter, strlen(s[i]->filter)).s, s[first]->line);
	}
	free(s);
}

/* A response_topic that some command filter takes in again would feed the gateway's answers back
 * to devices. Checked on a sample with "{}" for every value: no literal level may hold braces,
 * so a value never equals a literal level by accident. */
static void command_loops(struct cctx *x, const struct cnode **nodes)
{
	struct config *c = x->c;
	struct route_seg lv[ROUTE_MAX_SEGMENTS], id;
	char sample[ROUTE_MAX_TOPIC];
	size_t i, j, k, nl;

	for (i = 0; i < c->n_commands; i++) {
		const struct conf_command *cmd = &c->commands[i];

		if (cmd->route == NULL || cmd->response_topic == NULL)
			continue;
		nl = route_split(cmd->topic, strlen(cmd->topic), lv, ROUTE_MAX_SEGMENTS);
		for (k = 0; k < nl; k++)
			if (is_var_level(&lv[k]))
				lv[k] = (struct route_seg){ "{}", 2 };
		if (route_match_id(cmd->route, lv, nl, &id, sample, sizeof(sample)) != ROUTE_OK)
			continue;
		for (j = 0; j < c->n_commands; j++) {
			if (c->commands[j].route == NULL || !route_filter_matches(c->commands[j].filter, sample))
				continue;
			conf_err(&x->t, nodes[2 * i + 1], "would come back in as a command (it fits %s, the "
				 "topic of line %d)", ct_show(c->commands[j].filter,
				 strlen(c->commands[j].filter)).s, c->commands[j].line);
			break;
		}
	}
}

static void conf_commands(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	const struct cnode *it, **nodes;

	if (n == NULL || !ct_want(&x->t, n, CN_SEQ) || n->nkids == 0)
		return;
	if (n->nkids > CONF_MAX_COMMANDS) {
		conf_err(&x->t, n, "more than %d entries (each one is a subscription)", CONF_MAX_COMMANDS);
		return;
	}
	c->commands = ct_calloc(&x->t, n->nkids, sizeof(*c->commands));
	nodes = ct_calloc(&x->t, 2 * n->nkids, sizeof(*nodes));	/* topic, response_topic per command */
	if (c->commands == NULL || nodes == NULL) {
		free(nodes);
		return;
	}
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		command_rule(x, it, &c->commands[c->n_commands], &nodes[2 * c->n_commands]);
		c->n_commands++;
	}
	command_dups(x, nodes);
	command_loops(x, nodes);
	free(nodes);
}

/* ---- presence, metrics ---- */

static void conf_presence(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	struct route_error err;

	if (n == NULL || ct_is_null(n) || !ct_str(&x->t, n, CONF_MAX_STR, &c->presence_topic))
		return;
	c->presence_route = route_compile2("", c->presence_topic, 0, &err);
	if (c->presence_route == NULL && err.var[0])
		conf_err(&x->t, n, "uses {%s} (only {identity} is available here)", err.var);
	else if (c->presence_route == NULL)
		conf_err(&x->t, n, "%s", err.reason);
	else if (!route_uses_var(c->presence_route, "identity"))
		conf_err(&x->t, n, "must contain {identity} (else every device would share one retained topic)");
}

/* The keys of metrics:, in the order of v[]. */
enum {
	MET_LISTEN, MET_TOPIC, MET_INTERVAL,
	MET_KEYS
};

static const char *const metrics_keys[MET_KEYS + 1] = {
	[MET_LISTEN] = "listen",
	[MET_TOPIC] = "topic",
	[MET_INTERVAL] = "interval",
};

static void conf_metrics(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[MET_KEYS];
	struct conf_metrics *mt = &x->c->metrics;
	const char *why;
	long long ll;

	mt->interval = 60;
	if (!ct_fields(&x->t, n, metrics_keys, v))
		return;
	if (v[MET_LISTEN] && !ct_is_null(v[MET_LISTEN]) &&
	    ct_str(&x->t, v[MET_LISTEN], CONF_MAX_STR, &mt->listen) &&
	    (why = parse_hostport(mt->listen, true, NULL, NULL)) != NULL)
		conf_err(&x->t, v[MET_LISTEN], "%s is not HOST:PORT or [IPv6]:PORT (%s)",
			 ct_show(mt->listen, v[MET_LISTEN]->len).s, why);
	if (v[MET_TOPIC] && !ct_is_null(v[MET_TOPIC]))
		get_topic(x, v[MET_TOPIC], &mt->topic);
	if (v[MET_INTERVAL] && ct_int(&x->t, v[MET_INTERVAL], 1, 86400, &ll))
		mt->interval = (unsigned)ll;
}

/* ---- discovery ---- */

enum {
	DI_MULTICAST, DI_INTERFACES, DI_PORT, DI_LEISURE, DI_MAX_ANSWERS, DI_ADVERTISE,
	DI_KEYS
};

static const char *const discovery_keys[DI_KEYS + 1] = {
	[DI_MULTICAST] = "multicast",
	[DI_INTERFACES] = "interfaces",
	[DI_PORT] = "port",
	[DI_LEISURE] = "leisure",
	[DI_MAX_ANSWERS] = "max_answers",
	[DI_ADVERTISE] = "advertise",
};

/* A list of strings, each checked by ok (NULL or why not). */
static void str_list(struct cctx *x, const struct cnode *n, size_t max, char ***out, size_t *nout,
		     const char *what, const char *(*ok)(const char *))
{
	const struct cnode *it;
	const char *s, *why;

	if (!ct_want(&x->t, n, CN_SEQ))
		return;
	if (n->nkids == 0 || n->nkids > max) {
		conf_err(&x->t, n, "needs 1..%zu %s", max, what);
		return;
	}
	if ((*out = ct_calloc(&x->t, n->nkids, sizeof(**out))) == NULL)
		return;
	for (it = ct_kid(&x->t, n); it; it = ct_sib(&x->t, it)) {
		if ((s = ct_scalar(&x->t, it, what)) == NULL)
			continue;
		if ((why = ok(s)) != NULL) {
			conf_err(&x->t, it, "%s %s", ct_show(s, it->len).s, why);
			continue;
		}
		if (((*out)[*nout] = ct_strdup(&x->t, s)) != NULL)
			(*nout)++;
	}
}

static const char *interface_ok(const char *s)
{
	size_t len = strlen(s);

	if (len == 0 || len >= 16)
		return "is not an interface name (1..15 characters)";
	for (size_t i = 0; i < len; i++)
		if (s[i] <= ' ' || s[i] == '/' || s[i] == ':' || s[i] == 0x7f)
			return "is not an interface name (no spaces, '/' or ':')";
	return NULL;
}

static const char *advertise_ok(const char *s)
{
	static char why[160];
	const char *e;

	if (strncmp(s, "coaps://", 8) != 0)
		return "is not a coaps:// URI";
	if (strpbrk(s, " \t\"<>\\^`{|}") != NULL || strlen(s) > 255)
		return "is not a URI (spaces, quotes or <> in it, or longer than 255)";
	e = parse_hostport(s + 8, false, NULL, NULL);
	if (e != NULL) {
		snprintf(why, sizeof(why), "is not coaps://HOST[:PORT] (%s)", e);
		return why;
	}
	return NULL;
}

static void conf_discovery(struct cctx *x, const struct cnode *n)
{
	const struct cnode *v[DI_KEYS];
	struct conf_discovery *d = &x->c->discovery;
	long long ll;

	d->port = 5683;
	d->leisure = 5;
	d->max_answers = 10;
	if (!ct_fields(&x->t, n, discovery_keys, v))
		return;
	if (v[DI_MULTICAST])
		ct_bool(&x->t, v[DI_MULTICAST], &d->multicast);
	if (v[DI_INTERFACES])
		str_list(x, v[DI_INTERFACES], 64, &d->interfaces, &d->n_interfaces,
			 "interface names", interface_ok);
	else if (d->multicast)
		conf_err(&x->t, n, "interfaces is required with multicast: true (the interfaces "
			 "devices look for the gateway on, e.g. [eth0])");
	if (v[DI_PORT] && ct_int(&x->t, v[DI_PORT], 1, 65535, &ll))
		d->port = (unsigned)ll;
	if (v[DI_LEISURE] && ct_int(&x->t, v[DI_LEISURE], 1, 60, &ll))
		d->leisure = (unsigned)ll;
	if (v[DI_MAX_ANSWERS] && ct_int(&x->t, v[DI_MAX_ANSWERS], 1, 1000, &ll))
		d->max_answers = (unsigned)ll;
	if (v[DI_ADVERTISE])
		str_list(x, v[DI_ADVERTISE], 16, &d->advertise, &d->n_advertise, "coaps:// URIs",
			 advertise_ok);
	if (d->multicast && d->n_advertise == 0) {
		size_t i;

		for (i = 0; i < x->c->coap.n_listen && strncmp(x->c->coap.listen[i], "coaps://", 8);
		     i++)
			;
		if (i == x->c->coap.n_listen)
			conf_err(&x->t, n, "multicast: true but no coaps:// listener to name (and no "
				 "advertise:)");
	}
}

/* ---- top level ---- */

static void conf_log_level(struct cctx *x, const struct cnode *n)
{
	const char *s = ct_scalar(&x->t, n, "a log level");
	int lvl = s ? log_level_parse(s) : -1;

	if (lvl >= 0)
		x->c->log_level = lvl;
	else if (s)
		conf_err(&x->t, n, "%s is not error, warning, info or debug", ct_show(s, n->len).s);
}

/* The keys of the top level, in the order of v[]. */
enum {
	TOP_LOG_LEVEL, TOP_COAP, TOP_DEVICES, TOP_DEVICES_FILE, TOP_MQTT, TOP_ROUTES,
	TOP_OBSERVE, TOP_COMMANDS, TOP_PRESENCE_TOPIC, TOP_METRICS, TOP_DISCOVERY,
	TOP_KEYS
};

static const char *const top_keys[TOP_KEYS + 1] = {
	[TOP_LOG_LEVEL] = "log_level",
	[TOP_COAP] = "coap",
	[TOP_DEVICES] = "devices",
	[TOP_DEVICES_FILE] = "devices_file",
	[TOP_MQTT] = "mqtt",
	[TOP_ROUTES] = "routes",
	[TOP_OBSERVE] = "observe",
	[TOP_COMMANDS] = "commands",
	[TOP_PRESENCE_TOPIC] = "presence_topic",
	[TOP_METRICS] = "metrics",
	[TOP_DISCOVERY] = "discovery",
};

static void conf_top(struct cctx *x)
{
	const struct cnode *v[TOP_KEYS], *root = x->t.nnode ? &x->t.node[0] : NULL;

	x->c->log_level = LOG_LVL_INFO;
	if (root && !ct_is_null(root) && root->type != CN_MAP && root->type != CN_BAD) {
		conf_err(&x->t, root, "the top level must be a mapping (log_level:, coap:, mqtt:, ...), found %s",
			 ct_type_name(root->type));
		return;
	}
	ct_fields(&x->t, root, top_keys, v);
	if (v[TOP_LOG_LEVEL])
		conf_log_level(x, v[TOP_LOG_LEVEL]);
	conf_coap(x, v[TOP_COAP]);
	conf_devices(x, v[TOP_DEVICES]);
	conf_devices_file(x, v[TOP_DEVICES_FILE]);
	rpk_dups(x, v[TOP_DEVICES_FILE]);
	cert_devices(x, v[TOP_DEVICES_FILE]);
	oscore_devices(x, v[TOP_DEVICES_FILE]);
	conf_mqtt(x, v[TOP_MQTT], root);
	conf_routes(x, v[TOP_ROUTES]);
	conf_observes(x, v[TOP_OBSERVE]);
	conf_commands(x, v[TOP_COMMANDS]);
	conf_presence(x, v[TOP_PRESENCE_TOPIC]);
	conf_metrics(x, v[TOP_METRICS]);
	conf_discovery(x, v[TOP_DISCOVERY]);
}

static char *dir_of(const char *path)
{
	const char *slash = strrchr(path, '/');

	if (slash == NULL)
		return NULL;
	return strndup(path, slash == path ? 1 : (size_t)(slash - path));
}

struct config *conf_load(const char *path, FILE *errs)
{
	struct cctx x = { .t = { .file = path, .errs = errs, .max_items = CONF_MAX_ITEMS } };
	unsigned char *buf = NULL;
	size_t len = 0;

	if (path == NULL)
		return NULL;
	x.c = calloc(1, sizeof(*x.c));
	if (x.c == NULL || (x.c->file = strdup(path)) == NULL) {
		if (errs)
			fprintf(errs, "%s: out of memory\n", path);
		free(x.c);
		return NULL;
	}
	x.t.dir = dir_of(path);
	if (ct_read(&x.t, &buf, &len) == 0 && ct_parse(&x.t, buf, len) == 0)
		conf_top(&x);
	conf_flush(&x.t);
	if (buf)
		explicit_bzero(buf, len);
	free(buf);
	ct_free(&x.t);
	free(x.dev_node);
	free(x.route_node);
	free(x.t.dir);
	if (x.t.nerr > 0) {
		conf_free(x.c);
		return NULL;
	}
	return x.c;
}

static void free_strv(char **v, size_t n)
{
	size_t i;

	for (i = 0; v && i < n; i++)
		free(v[i]);
	free(v);
}

/* ---- reload ---- */

static int same_str(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

/* Everything of discovery: but what is read per answer (advertise, max_answers, leisure). */
static int same_discovery(const struct conf_discovery *a, const struct conf_discovery *b)
{
	if (a->multicast != b->multicast || a->port != b->port ||
	    a->n_interfaces != b->n_interfaces)
		return 0;
	for (size_t i = 0; i < a->n_interfaces; i++)
		if (strcmp(a->interfaces[i], b->interfaces[i]) != 0)
			return 0;
	return 1;
}

size_t conf_restart_needed(const struct config *old, const struct config *c, const char **names,
			   size_t max)
{
	const struct conf_mqtt *o = &old->mqtt, *m = &c->mqtt;
	const struct conf_pki *op = &old->coap.pki, *np = &c->coap.pki;
	int listen = old->coap.n_listen != c->coap.n_listen;
	size_t n = 0;

	for (size_t i = 0; !listen && i < c->coap.n_listen; i++)
		listen = strcmp(old->coap.listen[i], c->coap.listen[i]) != 0;
	const struct { const char *key; int changed; } keys[] = {
		{ "coap.listen", listen },
		{ "coap.psk_hint", !same_str(old->coap.psk_hint, c->coap.psk_hint) },
		{ "mqtt.url", !same_str(o->url, m->url) || o->insecure != m->insecure },
		{ "mqtt.client_id", !same_str(o->client_id, m->client_id) },
		{ "mqtt.ca_file", !same_str(o->ca_file, m->ca_file) },
		{ "mqtt.cert_file", !same_str(o->cert_file, m->cert_file) ||
				    !same_str(o->key_file, m->key_file) },
		{ "mqtt.username", !same_str(o->username, m->username) ||
				   !same_str(o->password, m->password) },
		{ "mqtt.keepalive", o->keepalive != m->keepalive },
		{ "mqtt.version", o->version != m->version },
		{ "mqtt.persistence_dir", !same_str(o->persistence_dir, m->persistence_dir) },
		{ "mqtt.max_buffered", o->max_buffered != m->max_buffered ||
				       o->max_buffered_bytes != m->max_buffered_bytes },
		{ "mqtt.max_inflight", o->max_inflight != m->max_inflight },
		{ "mqtt.session_expiry", o->session_expiry != m->session_expiry },
		{ "mqtt.status_topic", !same_str(o->status_topic, m->status_topic) },
		{ "coap.rpk.key_file", !same_str(old->coap.rpk_key_file, c->coap.rpk_key_file) ||
				       memcmp(old->coap.rpk.fp, c->coap.rpk.fp, KEYS_RPK_LEN) != 0 },
		{ "coap.pki.cert_file", !same_str(op->cert_file, np->cert_file) ||
					!same_str(op->cert.pem, np->cert.pem) },
		{ "coap.pki.key_file", !same_str(op->key_file, np->key_file) ||
				       !same_str(op->key.pem, np->key.pem) },
		{ "coap.pki.ca_file", !same_str(op->ca_file, np->ca_file) ||
				      !same_str(op->ca.pem, np->ca.pem) },
		{ "discovery", !same_discovery(&old->discovery, &c->discovery) },
		{ "coap.cid", old->coap.cid != c->coap.cid ||
			      old->coap.cid_length != c->coap.cid_length },
	};

	_Static_assert(sizeof(keys) / sizeof(keys[0]) == CONF_RESTART_KEYS, "CONF_RESTART_KEYS");
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (keys[i].changed && n < max)
			names[n++] = keys[i].key;
	return n;
}

void conf_free(struct config *c)
{
	size_t i;

	if (c == NULL)
		return;
	free_strv(c->coap.listen, c->coap.n_listen);
	free(c->coap.listen_modes);
	free_strv(c->discovery.interfaces, c->discovery.n_interfaces);
	free_strv(c->discovery.advertise, c->discovery.n_advertise);
	free_strv(c->coap.ciphers, c->coap.n_ciphers);
	free(c->coap.psk_hint);
	free(c->coap.rpk_key_file);
	keys_rpk_key_clear(&c->coap.rpk);
	free(c->coap.pki.cert_file);
	free(c->coap.pki.key_file);
	free(c->coap.pki.ca_file);
	free(c->coap.pki.crl_file);
	pki_buf_clear(&c->coap.pki.cert, 0);
	pki_buf_clear(&c->coap.pki.key, 1);
	pki_buf_clear(&c->coap.pki.ca, 0);
	pki_buf_clear(&c->coap.pki.crl, 0);
	pki_verifier_free(c->coap.pki.verifier);
	for (i = 0; i < c->n_devices; i++)
		key_entry_clear(&c->devices[i]);
	free(c->devices);
	free(c->devices_file);
	for (i = 0; i < c->n_routes; i++) {
		route_free(c->routes[i].route);
		free(c->routes[i].path);
		free(c->routes[i].topic);
	}
	free(c->routes);
	for (i = 0; i < c->n_observe; i++) {
		route_free(c->observe[i].route);
		free(c->observe[i].devices);
		free(c->observe[i].path);
		free(c->observe[i].match);
		free(c->observe[i].topic);
	}
	free(c->observe);
	for (i = 0; i < c->n_commands; i++) {
		route_free(c->commands[i].route);
		free(c->commands[i].topic);
		free(c->commands[i].filter);
		free(c->commands[i].response_topic);
		for (size_t j = 0; j < c->commands[i].n_response_topics; j++)
			free(c->commands[i].response_topics[j]);
		free(c->commands[i].response_topics);
	}
	free(c->commands);
	route_free(c->presence_route);
	free(c->presence_topic);
	free(c->metrics.listen);
	free(c->metrics.topic);
	free(c->mqtt.url);
	free(c->mqtt.host);
	free(c->mqtt.client_id);
	free(c->mqtt.ca_file);
	free(c->mqtt.cert_file);
	free(c->mqtt.key_file);
	free(c->mqtt.username);
	if (c->mqtt.password)
		explicit_bzero(c->mqtt.password, strlen(c->mqtt.password));
	free(c->mqtt.password);
	free(c->mqtt.persistence_dir);
	free(c->mqtt.status_topic);
	free(c->file);
	free(c);
}
