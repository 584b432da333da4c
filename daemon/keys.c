/* keys.c: the PSK store — keys file parsing with permission checks, and an O(1) identity lookup. */
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

#include "route.h"

#define KEYS_LINE_MAX 1024	/* bytes in one keys file line */
#define KEYS_HEX_PREFIX "hex:"

/* Open-addressing table of entry indices (+1; 0 = empty slot) over a base array that may move. */
struct ktab {
	uint32_t *slot;
	size_t mask;		/* capacity - 1, capacity a power of two */
	size_t used;
};

struct keys {
	const struct key_entry *v;
	struct ktab tab;
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
	return k;
}

void keys_free(struct keys *k)
{
	if (k == NULL)
		return;
	free(k->tab.slot);
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
	e->identity = NULL;
	e->origin = NULL;
	e->key_len = 0;
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

/* Decodes a text or "hex:" key into e; 0 or -1 after reporting. Never echoes the key. */
static int kp_key(struct kparse *p, size_t line, const char *key, struct key_entry *e)
{
	const char *why;
	int len;

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
		kp_error(p, line, "identity without a key (write \"identity key\" or \"identity hex:...\")");
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
		explicit_bzero(&e, sizeof(e));
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

/* Opens path and checks it is a regular file nobody else may read; NULL after reporting. */
static FILE *kp_open(struct kparse *p)
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
	} else if ((st.st_mode & 007) != 0) {
		kp_error(p, 0, "%s by others (mode %04o); chmod 640 it",
			 (st.st_mode & 004) ? "readable" : "accessible", (unsigned)(st.st_mode & 07777));
	} else {
		return f;
	}
	fclose(f);
	return NULL;
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
