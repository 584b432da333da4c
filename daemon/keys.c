/* keys.c: the device credentials — keys file parsing with permission checks, and O(1) lookups by
 * identity (PSK) and by raw public key fingerprint (RPK). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero */
#endif
#include "keys.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/sha256.h>

#include "route.h"

#define KEYS_LINE_MAX 1024	/* bytes in one keys file line */
#define KEYS_HEX_PREFIX "hex:"
#define KEYS_RPK_TOKEN "rpk:"
#define KEYS_CERT_TOKEN "certificate"
#define KEYS_OSCORE_TOKEN "oscore:"

/* Open-addressing table of entry indices (+1; 0 = empty slot) over a base array that may move. */
struct ktab {
	uint32_t *slot;
	size_t mask;		/* capacity - 1, capacity a power of two */
	size_t used;
};

struct keys {
	const struct key_entry *v;
	struct ktab tab;
	uint32_t *rslot;	/* fingerprint → entry index + 1, open addressing */
	size_t rmask;
	uint32_t *oslot;	/* OSCORE Recipient ID → entry index + 1, open addressing */
	size_t omask;
	size_t n;
};

static uint64_t fnv1a(const char *s, size_t len)
{
	uint64_t h = 1469598103934665603ULL;
	size_t i;

	for (i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 1099511628211ULL;
	}
	return h;
}

/* Index of the entry with this identity, or SIZE_MAX. */
static size_t ktab_find(const struct ktab *t, const struct key_entry *base, const char *id, size_t len)
{
	size_t i;

	if (t->slot == NULL)
		return SIZE_MAX;
	for (i = fnv1a(id, len) & t->mask; t->slot[i] != 0; i = (i + 1) & t->mask) {
		const struct key_entry *e = &base[t->slot[i] - 1];

		if (strncmp(e->identity, id, len) == 0 && e->identity[len] == '\0')
			return t->slot[i] - 1;
	}
	return SIZE_MAX;
}

static void ktab_place(struct ktab *t, const struct key_entry *base, uint32_t idx)
{
	const char *id = base[idx].identity;
	size_t i;

	for (i = fnv1a(id, strlen(id)) & t->mask; t->slot[i] != 0; i = (i + 1) & t->mask)
		;
	t->slot[i] = idx + 1;
	t->used++;
}

/* Rebuilds with room for at least want entries at a load factor of at most 1/2. */
static int ktab_grow(struct ktab *t, const struct key_entry *base, size_t want)
{
	size_t cap = 16, i, oldcap = t->slot ? t->mask + 1 : 0;
	uint32_t *old = t->slot;

	while (cap < 2 * want)
		cap *= 2;
	t->slot = calloc(cap, sizeof(*t->slot));
	if (t->slot == NULL) {
		t->slot = old;
		return -1;
	}
	t->mask = cap - 1;
	t->used = 0;
	for (i = 0; i < oldcap; i++)
		if (old[i] != 0)
			ktab_place(t, base, old[i] - 1);
	free(old);
	return 0;
}

/* Adds base[idx] (identity must not be in the table yet). */
static int ktab_add(struct ktab *t, const struct key_entry *base, size_t idx)
{
	if (idx >= UINT32_MAX - 1)
		return -1;
	if ((t->slot == NULL || 2 * (t->used + 1) > t->mask + 1) && ktab_grow(t, base, t->used + 1) < 0)
		return -1;
	ktab_place(t, base, (uint32_t)idx);
	return 0;
}

static int rtab_build(struct keys *k, const struct key_entry *v, size_t n);
static int otab_build(struct keys *k, const struct key_entry *v, size_t n);

struct keys *keys_new(const struct key_entry *v, size_t n)
{
	struct keys *k = calloc(1, sizeof(*k));
	size_t i;

	if (k == NULL || n >= UINT32_MAX / 4 || ktab_grow(&k->tab, v, n) < 0) {
		free(k);
		return NULL;
	}
	k->v = v;
	for (i = 0; i < n; i++) {
		if (ktab_find(&k->tab, v, v[i].identity, strlen(v[i].identity)) != SIZE_MAX)
			continue;	/* a duplicate: the first definition wins */
		ktab_place(&k->tab, v, (uint32_t)i);
		k->n++;
	}
	if (rtab_build(k, v, n) < 0 || otab_build(k, v, n) < 0) {
		keys_free(k);
		return NULL;
	}
	return k;
}

/* A fingerprint is a SHA-256 output: its first bytes are as good as any hash of it. */
static size_t rpk_hash(const uint8_t *fp)
{
	uint64_t h;

	memcpy(&h, fp, sizeof(h));
	return (size_t)h;
}

/* An open-addressing table of entry indexes + 1 (0: free) with room for count entries. */
static uint32_t *slots_new(size_t count, size_t *mask)
{
	size_t cap = 16;

	while (cap < 2 * count)
		cap *= 2;
	*mask = cap - 1;
	return calloc(cap, sizeof(uint32_t));
}

static void slots_put(uint32_t *slot, size_t mask, size_t hash, size_t i)
{
	size_t j;

	for (j = hash & mask; slot[j] != 0; j = (j + 1) & mask)
		;
	slot[j] = (uint32_t)i + 1;
}

/* The fingerprint table over the entries with one; the first of a repeated fingerprint wins. */
static int rtab_build(struct keys *k, const struct key_entry *v, size_t n)
{
	size_t i, nrpk = 0;

	for (i = 0; i < n; i++)
		nrpk += v[i].has_rpk != 0;
	if (nrpk == 0)
		return 0;
	if ((k->rslot = slots_new(nrpk, &k->rmask)) == NULL)
		return -1;
	for (i = 0; i < n; i++)
		if (v[i].has_rpk && keys_find_rpk(k, v[i].rpk) == NULL)
			slots_put(k->rslot, k->rmask, rpk_hash(v[i].rpk), i);
	return 0;
}

const struct key_entry *keys_find_rpk(const struct keys *k, const uint8_t fp[KEYS_RPK_LEN])
{
	if (k == NULL || k->rslot == NULL || fp == NULL)
		return NULL;
	for (size_t j = rpk_hash(fp) & k->rmask; k->rslot[j] != 0; j = (j + 1) & k->rmask) {
		const struct key_entry *e = &k->v[k->rslot[j] - 1];

		if (memcmp(e->rpk, fp, KEYS_RPK_LEN) == 0)
			return e;
	}
	return NULL;
}

static size_t rid_hash(const uint8_t *rid, size_t len)
{
	uint8_t key[KEYS_OSCORE_MAX_ID + 1] = { (uint8_t)len };

	memcpy(key + 1, rid, len);
	return (size_t)fnv1a((const char *)key, len + 1);
}

/* The Recipient ID table over the OSCORE entries; the first of a repeated ID wins. */
static int otab_build(struct keys *k, const struct key_entry *v, size_t n)
{
	size_t i, nosc = 0;

	for (i = 0; i < n; i++)
		nosc += v[i].oscore != NULL;
	if (nosc == 0)
		return 0;
	if ((k->oslot = slots_new(nosc, &k->omask)) == NULL)
		return -1;
	for (i = 0; i < n; i++) {
		const struct key_oscore *o = v[i].oscore;

		if (o && keys_find_oscore(k, o->recipient_id, o->recipient_id_len) == NULL)
			slots_put(k->oslot, k->omask, rid_hash(o->recipient_id, o->recipient_id_len),
				  i);
	}
	return 0;
}

const struct key_entry *keys_find_oscore(const struct keys *k, const uint8_t *rid, size_t len)
{
	if (k == NULL || k->oslot == NULL || len > KEYS_OSCORE_MAX_ID || (len && rid == NULL))
		return NULL;
	for (size_t j = rid_hash(rid, len) & k->omask; k->oslot[j] != 0; j = (j + 1) & k->omask) {
		const struct key_entry *e = &k->v[k->oslot[j] - 1];

		if (e->oscore->recipient_id_len == len &&
		    memcmp(e->oscore->recipient_id, rid, len) == 0)
			return e;
	}
	return NULL;
}

int keys_oscore_equal(const struct key_oscore *x, const struct key_oscore *y)
{
	if (!x || !y)
		return !x && !y;
	return x->sender_id_len == y->sender_id_len && x->recipient_id_len == y->recipient_id_len &&
	       x->secret_len == y->secret_len && x->salt_len == y->salt_len && x->alg == y->alg &&
	       memcmp(x->sender_id, y->sender_id, x->sender_id_len) == 0 &&
	       memcmp(x->recipient_id, y->recipient_id, x->recipient_id_len) == 0 &&
	       memcmp(x->secret, y->secret, x->secret_len) == 0 &&
	       memcmp(x->salt, y->salt, x->salt_len) == 0;
}

void keys_free(struct keys *k)
{
	if (k == NULL)
		return;
	free(k->tab.slot);
	free(k->rslot);
	free(k->oslot);
	free(k);
}

const struct key_entry *keys_find(const struct keys *k, const char *identity, size_t len)
{
	size_t i;

	if (k == NULL || identity == NULL || len == 0 || len > KEYS_MAX_IDENTITY ||
	    memchr(identity, '\0', len) != NULL)
		return NULL;
	i = ktab_find(&k->tab, k->v, identity, len);
	return i == SIZE_MAX ? NULL : &k->v[i];
}

size_t keys_count(const struct keys *k)
{
	return k ? k->n : 0;
}

void key_entry_clear(struct key_entry *e)
{
	if (e == NULL)
		return;
	free(e->identity);
	free(e->origin);
	explicit_bzero(e->key, sizeof(e->key));
	if (e->oscore) {
		explicit_bzero(e->oscore, sizeof(*e->oscore));
		free(e->oscore);
		e->oscore = NULL;
	}
	e->identity = NULL;
	e->origin = NULL;
	e->key_len = 0;
	e->has_rpk = 0;
}

static int hex_val(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int keys_decode_hex(const char *hex, uint8_t *out, size_t outlen, const char **why)
{
	size_t len, i;
	const char *dummy;

	if (why == NULL)
		why = &dummy;
	if (hex == NULL || out == NULL) {
		*why = "is missing";
		return -1;
	}
	if (strncmp(hex, KEYS_HEX_PREFIX, strlen(KEYS_HEX_PREFIX)) == 0)
		hex += strlen(KEYS_HEX_PREFIX);
	len = strlen(hex);
	if (len == 0) {
		*why = "is empty";
		return -1;
	}
	if (len % 2 != 0) {
		*why = "has an odd number of hex digits";
		return -1;
	}
	if (len / 2 > outlen || len / 2 > INT32_MAX) {
		*why = "is too long";
		return -1;
	}
	for (i = 0; i < len; i += 2) {
		int hi = hex_val(hex[i]), lo = hex_val(hex[i + 1]);

		if (hi < 0 || lo < 0) {
			*why = "has a character that is not a hex digit";
			explicit_bzero(out, i / 2);
			return -1;
		}
		out[i / 2] = (uint8_t)(hi << 4 | lo);
	}
	return (int)(len / 2);
}

const char *keys_decode_rpk(const char *text, uint8_t fp[KEYS_RPK_LEN])
{
	const char *why = NULL;
	int len;

	if (text == NULL || strncmp(text, KEYS_RPK_PREFIX, strlen(KEYS_RPK_PREFIX)) != 0)
		return "must start with sha256: (the SHA-256 of the device's public key, "
		       "as coap2mqtt --show-rpk or openssl prints it)";
	text += strlen(KEYS_RPK_PREFIX);
	if (strlen(text) != 2 * KEYS_RPK_LEN)
		return "must have 64 hex digits after sha256:";
	/* keys_decode_hex() would take "hex:" and 60 digits: 30 bytes, and no reason */
	len = keys_decode_hex(text, fp, KEYS_RPK_LEN, &why);
	if (len != KEYS_RPK_LEN)
		return len < 0 && why ? why : "must have 64 hex digits after sha256:";
	return NULL;
}

void keys_format_rpk(const uint8_t fp[KEYS_RPK_LEN], char out[KEYS_RPK_TEXT])
{
	static const char hex[] = "0123456789abcdef";
	size_t o = strlen(KEYS_RPK_PREFIX);

	memcpy(out, KEYS_RPK_PREFIX, o);
	for (size_t i = 0; i < KEYS_RPK_LEN; i++) {
		out[o++] = hex[fp[i] >> 4];
		out[o++] = hex[fp[i] & 15];
	}
	out[o] = '\0';
}

/* ---- keys file ---- */

struct kparse {
	const char *path;
	keys_error_fn err;
	void *arg;
	int nerr;
	struct key_entry **v;
	size_t *n;
	size_t cap;
	struct ktab tab;
};

static void kp_error(struct kparse *p, size_t line, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void kp_error(struct kparse *p, size_t line, const char *fmt, ...)
{
	char msg[512];
	int off;
	va_list ap;

	p->nerr++;
	if (p->err == NULL)
		return;
	if (line > 0)
		off = snprintf(msg, sizeof(msg), "%s:%zu: ", p->path, line);
	else
		off = snprintf(msg, sizeof(msg), "%s: ", p->path);
	if (off < 0 || (size_t)off >= sizeof(msg))
		off = 0;
	va_start(ap, fmt);
	vsnprintf(msg + off, sizeof(msg) - (size_t)off, fmt, ap);
	va_end(ap);
	p->err(p->arg, msg);
}

/* Reads one line (without '\n') into buf; *len its length, *over set when it did not fit (the rest
 * is skipped). Returns 0 at end of file with nothing read. */
static int read_line(FILE *f, char *buf, size_t cap, size_t *len, int *over)
{
	int c, any = 0;

	*len = 0;
	*over = 0;
	while ((c = getc(f)) != EOF) {
		any = 1;
		if (c == '\n')
			break;
		if (*len + 1 < cap)
			buf[(*len)++] = (char)c;
		else
			*over = 1;
	}
	buf[*len] = '\0';
	if (*len > 0 && buf[*len - 1] == '\r')
		buf[--*len] = '\0';
	return any;
}

static int is_blank(char c)
{
	return c == ' ' || c == '\t';
}

/* Splits "identity key" into two tokens (NUL-ended in place); returns the token count (0..3). */
static int split_tokens(char *s, char **tok)
{
	int n = 0;

	for (;;) {
		while (is_blank(*s))
			*s++ = '\0';
		if (*s == '\0' || n == 3)
			return n;
		tok[n++] = s;
		while (*s != '\0' && !is_blank(*s))
			s++;
	}
}

/* One "name=HEX" field of an oscore: entry into out (min..max bytes); the length, or -1 after
 * reporting. Never echoes the value. */
static int kp_oscore_hex(struct kparse *p, size_t line, const char *name, const char *hex,
			 uint8_t *out, size_t min, size_t max)
{
	const char *why;
	int len = *hex ? keys_decode_hex(hex, out, max, &why) : 0;

	if (len < 0) {
		kp_error(p, line, "oscore: %s %s (%zu..%zu bytes as hex)", name, why, min, max);
		return -1;
	}
	if ((size_t)len < min) {
		kp_error(p, line, "oscore: %s shorter than %zu bytes (%zu..%zu)", name, min, min, max);
		return -1;
	}
	return len;
}

/* "sender_id=HEX,recipient_id=HEX,secret=HEX[,salt=HEX][,alg=AES-CCM-16-64-128]" (the IDs as
 * the gateway sees them; an ID may be empty) into a new e->oscore; 0 or -1 after reporting. */
static int kp_oscore(struct kparse *p, size_t line, const char *spec, struct key_entry *e)
{
	enum { F_SENDER, F_RECIPIENT, F_SECRET, F_SALT, F_ALG, F_N };
	static const char *const names[F_N] = { "sender_id", "recipient_id", "secret", "salt",
						 "alg" };
	char buf[KEYS_LINE_MAX], *field, *save = NULL;
	struct key_oscore *o = calloc(1, sizeof(*o));
	int seen[F_N] = { 0 }, len, f, rc = -1;

	if (!o) {
		kp_error(p, line, "oscore: out of memory");
		return -1;
	}
	o->alg = KEYS_OSCORE_ALG_CCM_16_64_128;
	snprintf(buf, sizeof(buf), "%s", spec);
	for (field = strtok_r(buf, ",", &save); field; field = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(field, '=');

		for (f = 0; f < F_N && eq; f++)
			if (strlen(names[f]) == (size_t)(eq - field) &&
			    strncmp(field, names[f], (size_t)(eq - field)) == 0)
				break;
		if (!eq || f == F_N) {
			kp_error(p, line, "oscore: unknown field (write sender_id=HEX,recipient_id=HEX,"
				 "secret=HEX[,salt=HEX][,alg=AES-CCM-16-64-128])");
			goto out;
		}
		if (seen[f]++) {
			kp_error(p, line, "oscore: %s given twice", names[f]);
			goto out;
		}
		eq++;
		switch (f) {
		case F_SENDER:
			len = kp_oscore_hex(p, line, names[f], eq, o->sender_id, 0, KEYS_OSCORE_MAX_ID);
			o->sender_id_len = (size_t)len;
			break;
		case F_RECIPIENT:
			len = kp_oscore_hex(p, line, names[f], eq, o->recipient_id, 0,
					    KEYS_OSCORE_MAX_ID);
			o->recipient_id_len = (size_t)len;
			break;
		case F_SECRET:
			len = kp_oscore_hex(p, line, names[f], eq, o->secret, KEYS_OSCORE_MIN_SECRET,
					    KEYS_OSCORE_MAX_SECRET);
			o->secret_len = (size_t)len;
			break;
		case F_SALT:
			len = kp_oscore_hex(p, line, names[f], eq, o->salt, 0, KEYS_OSCORE_MAX_SALT);
			o->salt_len = (size_t)len;
			break;
		default:
			len = strcmp(eq, "AES-CCM-16-64-128") == 0 ? 0 : -1;
			if (len < 0)
				kp_error(p, line, "oscore: alg must be AES-CCM-16-64-128 (RFC 8613's "
					 "mandatory algorithm; the only one whose keys libcoap derives)");
			break;
		}
		if (len < 0)
			goto out;
	}
	for (f = F_SENDER; f <= F_SECRET; f++) {
		if (!seen[f]) {
			kp_error(p, line, "oscore: %s= is required", names[f]);
			goto out;
		}
	}
	if (o->sender_id_len == o->recipient_id_len &&
	    memcmp(o->sender_id, o->recipient_id, o->sender_id_len) == 0) {
		kp_error(p, line, "oscore: sender_id and recipient_id are the same (each side's "
			 "Sender ID must differ, or both would use one key and one nonce space)");
		goto out;
	}
	e->oscore = o;
	o = NULL;
	rc = 0;
out:
	explicit_bzero(buf, sizeof(buf));
	if (o) {
		explicit_bzero(o, sizeof(*o));
		free(o);
	}
	return rc;
}

/* Decodes a text or "hex:" key, an "rpk:sha256:" fingerprint, "certificate" or an "oscore:"
 * context into e; 0 or -1 after reporting.
 * Never echoes the key. */
static int kp_key(struct kparse *p, size_t line, const char *key, struct key_entry *e)
{
	const char *why;
	int len;

	if (strcmp(key, KEYS_CERT_TOKEN) == 0) {
		e->cert = 1;	/* the identity comes from its certificate (coap.pki) */
		return 0;
	}
	if (strncmp(key, KEYS_OSCORE_TOKEN, strlen(KEYS_OSCORE_TOKEN)) == 0)
		return kp_oscore(p, line, key + strlen(KEYS_OSCORE_TOKEN), e);
	if (strncmp(key, KEYS_RPK_TOKEN, strlen(KEYS_RPK_TOKEN)) == 0) {
		if ((why = keys_decode_rpk(key + strlen(KEYS_RPK_TOKEN), e->rpk)) != NULL) {
			kp_error(p, line, "raw public key: %s", why);
			return -1;
		}
		e->has_rpk = 1;
		return 0;
	}
	if (strncmp(key, KEYS_HEX_PREFIX, strlen(KEYS_HEX_PREFIX)) == 0) {
		len = keys_decode_hex(key, e->key, sizeof(e->key), &why);
		if (len < 0) {
			kp_error(p, line, "hex key %s (%d..%d bytes as hex)", why, KEYS_MIN_KEY, KEYS_MAX_KEY);
			return -1;
		}
	} else {
		if (strlen(key) > KEYS_MAX_KEY) {
			kp_error(p, line, "key longer than %d bytes", KEYS_MAX_KEY);
			return -1;
		}
		len = (int)strlen(key);
		memcpy(e->key, key, (size_t)len);
	}
	if (len < KEYS_MIN_KEY) {
		kp_error(p, line, "key shorter than %d bytes (%d..%d)", KEYS_MIN_KEY, KEYS_MIN_KEY,
			 KEYS_MAX_KEY);
		return -1;
	}
	e->key_len = (size_t)len;
	return 0;
}

static int kp_identity(struct kparse *p, size_t line, const char *id)
{
	size_t len = strlen(id), first;

	if (len > KEYS_MAX_IDENTITY) {
		kp_error(p, line, "identity longer than %d bytes", KEYS_MAX_IDENTITY);
		return -1;
	}
	if (!route_value_ok(id, len)) {
		kp_error(p, line, "identity is not valid in an MQTT topic (UTF-8 without '/', '+', '#' "
			 "or control characters)");
		return -1;
	}
	first = ktab_find(&p->tab, *p->v, id, len);
	if (first != SIZE_MAX) {
		kp_error(p, line, "duplicate identity \"%s\" (first defined at %s)", id,
			 (*p->v)[first].origin ? (*p->v)[first].origin : "?");
		return -1;
	}
	return 0;
}

/* Appends e to the caller's array; takes ownership of e's strings. */
static int kp_append(struct kparse *p, struct key_entry *e)
{
	if (*p->n == p->cap) {
		struct key_entry *nv = realloc(*p->v, 2 * p->cap * sizeof(*nv));

		if (nv == NULL)
			return -1;
		*p->v = nv;
		p->cap *= 2;
	}
	(*p->v)[*p->n] = *e;
	if (ktab_add(&p->tab, *p->v, *p->n) < 0)
		return -1;
	(*p->n)++;
	return 0;
}

static int kp_make_origin(struct kparse *p, size_t line, struct key_entry *e)
{
	int len = snprintf(NULL, 0, "%s:%zu", p->path, line);

	if (len < 0 || (e->origin = malloc((size_t)len + 1)) == NULL)
		return -1;
	snprintf(e->origin, (size_t)len + 1, "%s:%zu", p->path, line);
	return 0;
}

/* Handles one line; returns -1 only on out-of-memory. */
static int kp_line(struct kparse *p, size_t line, char *buf)
{
	char *tok[3];
	int n = split_tokens(buf, tok);
	struct key_entry e = { 0 };

	if (n == 0 || tok[0][0] == '#')
		return 0;
	if (n == 1) {
		kp_error(p, line, "identity without a key (write \"identity key\", \"identity hex:...\", "
			 "\"identity rpk:sha256:...\", \"identity certificate\" or \"identity oscore:...\")");
		return 0;
	}
	if (n == 3) {
		kp_error(p, line, "text after the key (a text key may not contain spaces; use hex:)");
		return 0;
	}
	if (kp_identity(p, line, tok[0]) < 0 || kp_key(p, line, tok[1], &e) < 0) {
		explicit_bzero(&e, sizeof(e));
		return 0;
	}
	if (*p->n >= KEYS_MAX_ENTRIES) {
		kp_error(p, line, "more than %d keys", KEYS_MAX_ENTRIES);
		key_entry_clear(&e);
		return 0;
	}
	if ((e.identity = strdup(tok[0])) == NULL || kp_make_origin(p, line, &e) < 0 ||
	    kp_append(p, &e) < 0) {
		key_entry_clear(&e);
		return -1;
	}
	return 0;
}

static void kp_lines(struct kparse *p, FILE *f)
{
	char buf[KEYS_LINE_MAX];
	size_t line = 0, len;
	int over;

	while (read_line(f, buf, sizeof(buf), &len, &over)) {
		line++;
		if (over)
			kp_error(p, line, "line longer than %d bytes", KEYS_LINE_MAX - 1);
		else if (memchr(buf, '\0', len) != NULL)
			kp_error(p, line, "line contains a NUL byte");
		else if (kp_line(p, line, buf) < 0) {
			kp_error(p, line, "out of memory");
			break;
		}
	}
	if (ferror(f))
		kp_error(p, 0, "read error: %s", strerror(errno));
	explicit_bzero(buf, sizeof(buf));
}

/* Opens path and checks it is a regular file (that nobody else may read, when secret); NULL
 * after reporting. */
static FILE *kp_open_as(struct kparse *p, int secret)
{
	FILE *f = fopen(p->path, "re");
	struct stat st;

	if (f == NULL) {
		kp_error(p, 0, "cannot open: %s", strerror(errno));
		return NULL;
	}
	if (fstat(fileno(f), &st) < 0) {
		kp_error(p, 0, "cannot stat: %s", strerror(errno));
	} else if (!S_ISREG(st.st_mode)) {
		kp_error(p, 0, "not a regular file");
	} else if (secret && (st.st_mode & 007) != 0) {
		kp_error(p, 0, "%s by others (mode %04o); chmod 640 it",
			 (st.st_mode & 004) ? "readable" : "accessible", (unsigned)(st.st_mode & 07777));
	} else {
		return f;
	}
	fclose(f);
	return NULL;
}

static FILE *kp_open(struct kparse *p)
{
	return kp_open_as(p, 1);
}

char *keys_read_file(const char *path, size_t max, int secret, size_t *len, keys_error_fn err,
		     void *arg)
{
	struct kparse p = { .path = path, .err = err, .arg = arg };
	char *buf;
	size_t n;
	FILE *f;

	if ((f = kp_open_as(&p, secret)) == NULL)
		return NULL;
	if ((buf = malloc(max + 1)) == NULL) {
		kp_error(&p, 0, "out of memory");
		fclose(f);
		return NULL;
	}
	n = fread(buf, 1, max + 1, f);
	if (ferror(f))
		kp_error(&p, 0, "read error: %s", strerror(errno));
	else if (n > max)
		kp_error(&p, 0, "larger than %zu bytes", max);
	else if (memchr(buf, '\0', n) != NULL)
		kp_error(&p, 0, "contains a NUL byte: not a PEM file");
	fclose(f);
	if (p.nerr) {
		if (secret)
			explicit_bzero(buf, max + 1);
		free(buf);
		return NULL;
	}
	buf[n] = '\0';
	*len = n;
	return buf;
}

/* Sizes *v for doubling growth and indexes the entries already there. */
static int kp_prepare(struct kparse *p)
{
	struct key_entry *nv;
	size_t i;

	p->cap = 16;
	while (p->cap < *p->n)
		p->cap *= 2;
	nv = realloc(*p->v, p->cap * sizeof(*nv));
	if (nv == NULL)
		return -1;
	*p->v = nv;
	if (ktab_grow(&p->tab, nv, *p->n) < 0)
		return -1;
	for (i = 0; i < *p->n; i++)
		if (nv[i].identity != NULL &&
		    ktab_find(&p->tab, nv, nv[i].identity, strlen(nv[i].identity)) == SIZE_MAX &&
		    ktab_add(&p->tab, nv, i) < 0)
			return -1;
	return 0;
}

int keys_parse_file(const char *path, struct key_entry **v, size_t *n, keys_error_fn err, void *arg)
{
	struct kparse p = { .path = path, .err = err, .arg = arg, .v = v, .n = n };
	FILE *f;

	if (path == NULL || v == NULL || n == NULL)
		return 1;
	f = kp_open(&p);
	if (f == NULL)
		return p.nerr;
	if (kp_prepare(&p) < 0)
		kp_error(&p, 0, "out of memory");
	else
		kp_lines(&p, f);
	fclose(f);
	free(p.tab.slot);
	return p.nerr;
}

/* ---- the gateway's own raw public key ---- */

#define RPK_FILE_MAX 16384	/* bytes: a PEM EC key is a few hundred */
#define RPK_DER_MAX 2048

int keys_spki_fingerprint(const uint8_t *spki, size_t len, uint8_t fp[KEYS_RPK_LEN])
{
	if (spki == NULL || len == 0 || len > UINT32_MAX)
		return -1;
	return wc_Sha256Hash(spki, (word32)len, fp) == 0 ? 0 : -1;
}

void keys_rpk_key_clear(struct rpk_key *k)
{
	if (k == NULL)
		return;
	if (k->key_pem != NULL)
		explicit_bzero(k->key_pem, k->key_pem_len);
	free(k->key_pem);
	free(k->pub_pem);
	memset(k, 0, sizeof(*k));
}

/* From the private key in PEM: the public key as DER SubjectPublicKeyInfo (P-256 only). */
static const char *rpk_spki(const char *pem, size_t len, uint8_t *spki, word32 *spki_len)
{
	uint8_t der[RPK_DER_MAX];
	const char *why = NULL;
	ecc_key key;
	word32 idx = 0;
	int n, r;

	n = wc_KeyPemToDer((const unsigned char *)pem, (int)len, der, (int)sizeof(der), NULL);
	if (n <= 0)
		return "holds no PEM private key (expected -----BEGIN EC PRIVATE KEY----- or "
		       "-----BEGIN PRIVATE KEY-----; make one with: openssl ecparam -name prime256v1 "
		       "-genkey -noout -out FILE)";
	if (wc_ecc_init(&key) != 0)
		return "cannot be decoded (out of memory)";
	if (wc_EccPrivateKeyDecode(der, &idx, &key, (word32)n) != 0)
		why = "is not an EC private key (RFC 7252 raw public keys are EC P-256)";
	else if (wc_ecc_get_curve_id(key.idx) != ECC_SECP256R1)
		why = "is an EC key on another curve than P-256 (prime256v1, secp256r1)";
	else if (key.type == ECC_PRIVATEKEY_ONLY && wc_ecc_make_pub(&key, NULL) != 0)
		why = "has no usable public key";
	else if ((r = wc_EccPublicKeyToDer(&key, spki, *spki_len, 1)) <= 0)
		why = "has no usable public key";
	else
		*spki_len = (word32)r;
	wc_ecc_free(&key);
	explicit_bzero(der, sizeof(der));
	return why;
}

int keys_load_rpk_key(const char *path, struct rpk_key *k, keys_error_fn err, void *arg)
{
	struct kparse p = { .path = path, .err = err, .arg = arg };
	uint8_t spki[RPK_DER_MAX];
	word32 spki_len = sizeof(spki);
	char pub[RPK_DER_MAX];
	const char *why;
	size_t n;
	int pn;

	memset(k, 0, sizeof(*k));
	if ((k->key_pem = keys_read_file(path, RPK_FILE_MAX, 1, &n, err, arg)) == NULL)
		return 1;
	k->key_pem_len = n;
	if ((why = rpk_spki(k->key_pem, n, spki, &spki_len)) != NULL) {
		kp_error(&p, 0, "%s", why);
		keys_rpk_key_clear(k);
		return p.nerr;
	}
	pn = wc_DerToPem(spki, spki_len, (byte *)pub, (word32)sizeof(pub) - 1, PUBLICKEY_TYPE);
	if (pn <= 0 || keys_spki_fingerprint(spki, spki_len, k->fp) < 0 ||
	    (k->pub_pem = malloc((size_t)pn + 1)) == NULL) {
		kp_error(&p, 0, "cannot encode its public key");
		keys_rpk_key_clear(k);
		return p.nerr;
	}
	memcpy(k->pub_pem, pub, (size_t)pn);
	k->pub_pem[pn] = '\0';
	k->pub_pem_len = (size_t)pn;
	return 0;
}
