/* fuzz_route.c: libFuzzer target for path patterns and topic templates. The input is
 * "pattern\0template\0path\0identity" (missing pieces are empty); the pattern and template are
 * compiled with and without ROUTE_IDENTITY_VAR and the path is matched against both. */
#include <locale.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#include "route.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NPIECES 4

struct segs {
	struct route_seg v[ROUTE_MAX_SEGMENTS];
	size_t n;
};

/* The C library's UTF-8 decoder as a second opinion on route_value_ok: a topic value is 1..255
 * bytes of code points up to U+10FFFF without C0/C1 controls, DEL, '/', '+' or '#'. */
static int value_ok_ref(const char *v, size_t len)
{
	mbstate_t st;
	size_t i = 0;

	if (len == 0 || len > ROUTE_MAX_VALUE)
		return 0;
	memset(&st, 0, sizeof(st));
	while (i < len) {
		wchar_t w;
		size_t k = mbrtowc(&w, v + i, len - i, &st);

		if (k == (size_t)-1 || k == (size_t)-2 || k == 0)
			return 0;
		if (w > 0x10ffff || w < 0x20 || (w >= 0x7f && w <= 0x9f) || w == '/' || w == '+' ||
		    w == '#')
			return 0;
		i += k;
	}
	return 1;
}

static void check_value(const char *v, size_t len)
{
	if (!!route_value_ok(v, len) != value_ok_ref(v, len))
		abort();
}

/* A filled topic: NUL-ended inside the buffer, no wildcards, no control characters. */
static void check_topic(const char *topic, size_t cap)
{
	size_t len = strnlen(topic, cap), i;

	if (len == cap)
		abort();
	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)topic[i];

		if (c == '+' || c == '#' || c < 0x20 || c == 0x7f)
			abort();
	}
}

/* Splits p[0..len) on sep without route_split, so that values may hold '/'. */
static void split_on(const char *p, size_t len, char sep, struct segs *s)
{
	size_t start = 0, i;

	s->n = 0;
	for (i = 0; i <= len && s->n < ROUTE_MAX_SEGMENTS; i++) {
		if (i < len && p[i] != sep)
			continue;
		s->v[s->n++] = (struct route_seg){ p + start, i - start };
		start = i + 1;
	}
}

/* route_split: the pieces are consecutive, hold no '/', and cover the whole string. */
static void check_split(const char *p, size_t len, const struct segs *s)
{
	size_t i, total = 0;

	if (len == 0 || s->n == 0)
		return;		/* empty, or more than ROUTE_MAX_SEGMENTS */
	for (i = 0; i < s->n; i++) {
		if (memchr(s->v[i].s, '/', s->v[i].len) != NULL)
			abort();
		if (i > 0 && s->v[i].s != s->v[i - 1].s + s->v[i - 1].len + 1)
			abort();
		total += s->v[i].len;
	}
	if (s->v[0].s != p || total + s->n - 1 != len)
		abort();
}

/* Called on ROUTE_OK: a segment holding '/' fits neither a literal (patterns are split on '/')
 * nor a variable (not a valid value), so it never matches. */
static void check_no_slash(const struct segs *s)
{
	size_t i;

	for (i = 0; i < s->n; i++)
		if (memchr(s->v[i].s, '/', s->v[i].len) != NULL)
			abort();
}

/* Matches s against r with a full and with a short topic buffer; they must agree. */
static void match(const struct route *r, const struct segs *s, const char *identity, size_t small)
{
	char topic[ROUTE_MAX_TOPIC], *tiny = malloc(small);
	struct route_seg id;
	enum route_result rr, rs;

	if (tiny == NULL)
		return;
	rr = route_match(r, s->v, s->n, identity, topic, sizeof(topic));
	rs = route_match(r, s->v, s->n, identity, tiny, small);
	if (rr == ROUTE_OK) {
		check_topic(topic, sizeof(topic));
		check_no_slash(s);
		if (strlen(topic) < small ? rs != ROUTE_OK || strcmp(topic, tiny) != 0 :
		    rs != ROUTE_TOO_LONG)
			abort();
	} else if (rs != rr) {
		abort();
	}
	rr = route_match_id(r, s->v, s->n, &id, topic, sizeof(topic));
	if (rr == ROUTE_OK || rr == ROUTE_TOO_LONG) {
		if (id.s == NULL || !route_value_ok(id.s, id.len))
			abort();
		if (rr == ROUTE_OK) {
			check_topic(topic, sizeof(topic));
			check_no_slash(s);
		}
	} else if (id.s != NULL) {
		abort();
	}
	(void)route_result_str(rr);
	free(tiny);
}

static struct route *compile(const char *pattern, const char *tmpl, unsigned flags, size_t textlen)
{
	struct route_error err = { .input = ROUTE_IN_NONE };
	char *text = malloc(textlen);
	struct route *r;

	if (text == NULL)
		return NULL;
	r = route_compile2(pattern, tmpl, flags, &err);
	if (r == NULL && (err.reason[0] == '\0' || strnlen(err.reason, sizeof(err.reason)) ==
			  sizeof(err.reason) || strnlen(err.var, sizeof(err.var)) == sizeof(err.var)))
		abort();	/* a refusal always says why, in bounded strings */
	if (r == NULL)
		(void)route_error_str(&err, text, textlen);	/* any size, even 1, is safe */
	if (r != NULL) {
		(void)route_uses_var(r, "identity");
		(void)route_uses_var(r, "name");
	}
	free(text);
	return r;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	if (setlocale(LC_CTYPE, "C.UTF-8") == NULL)
		abort();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size + NPIECES), *piece[NPIECES];
	size_t plen[NPIECES], off = 0, i, small;
	struct route *r[2];
	struct segs by_slash, by_newline;

	if (buf == NULL)
		return 0;
	memcpy(buf, data, size);
	memset(buf + size, 0, NPIECES);
	for (i = 0; i < NPIECES; i++) {
		piece[i] = buf + off;
		plen[i] = strlen(piece[i]);
		check_value(piece[i], plen[i]);
		off += off < size ? plen[i] + 1 : 0;
	}
	small = size > 0 ? (size_t)data[0] % 64 + 1 : 1;
	r[0] = compile(piece[0], piece[1], 0, small + 1);	/* a truncated reason too */
	r[1] = compile(piece[0], piece[1], ROUTE_IDENTITY_VAR, 256);
	by_slash.n = route_split(piece[2], plen[2], by_slash.v, ROUTE_MAX_SEGMENTS);
	check_split(piece[2], plen[2], &by_slash);
	split_on(piece[2], plen[2], '\n', &by_newline);
	for (i = 0; i < by_slash.n; i++)
		check_value(by_slash.v[i].s, by_slash.v[i].len);
	for (i = 0; i < 2; i++) {
		if (r[i] == NULL)
			continue;
		match(r[i], &by_slash, piece[3], small);
		match(r[i], &by_newline, piece[3], small);
		match(r[i], &by_slash, NULL, small);
		route_free(r[i]);
	}
	free(buf);
	return 0;
}
