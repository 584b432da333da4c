/* route.c: compiles path patterns and topic templates; matches request paths and fills topics. */
#include "route.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROUTE_MAX_NAME 32	/* bytes in a variable name */
#define ROUTE_IDENTITY "identity"

enum seg_kind { SEG_LIT, SEG_VAR, SEG_REST };

struct pat_seg {
	enum seg_kind kind;
	const char *text;	/* literal bytes or variable name, inside route.pat */
	size_t len;
};

enum part_kind { PART_TEXT, PART_VAR, PART_IDENTITY };

struct tmpl_part {
	enum part_kind kind;
	const char *text;	/* PART_TEXT: bytes inside route.tmpl */
	size_t len;
	size_t seg;		/* PART_VAR: index into route.seg */
};

struct route {
	char *pat;
	char *tmpl;
	struct pat_seg seg[ROUTE_MAX_SEGMENTS];
	size_t nseg;
	struct tmpl_part *part;
	size_t npart;
	int uses_identity;	/* the template has a PART_IDENTITY (identity given to route_match) */
	int id_seg;		/* ROUTE_IDENTITY_VAR: index of the {identity} pattern variable, or -1 */
	unsigned flags;
};

static void route_err(struct route_error *err, enum route_input in, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void route_err(struct route_error *err, enum route_input in, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL)
		return;
	err->input = in;
	err->var[0] = '\0';
	va_start(ap, fmt);
	vsnprintf(err->reason, sizeof(err->reason), fmt, ap);
	va_end(ap);
}

/* Length of the valid UTF-8 sequence at p[0..n), 0 when invalid (overlong, surrogate, > U+10FFFF,
 * truncated). */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
	unsigned c = p[0];
	size_t need, i;

	if (c < 0x80)
		return 1;
	if (c < 0xc2)
		return 0;	/* stray continuation byte or overlong 2-byte form */
	need = c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf5 ? 4 : 0;
	if (need == 0 || n < need)
		return 0;
	for (i = 1; i < need; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xf0 && p[1] < 0x90))
		return 0;	/* overlong */
	if (c == 0xed && p[1] >= 0xa0)
		return 0;	/* UTF-16 surrogate */
	if (c == 0xf4 && p[1] >= 0x90)
		return 0;	/* above U+10FFFF */
	return need;
}

/* 1 when v[0..len) is valid UTF-8 without controls (C0, DEL, C1) and without any byte in forbid. */
static int text_ok(const char *v, size_t len, const char *forbid)
{
	const unsigned char *p = (const unsigned char *)v;
	size_t i = 0, k;

	while (i < len) {
		k = utf8_seq(p + i, len - i);
		if (k == 0)
			return 0;
		if (k == 1 && (p[i] < 0x20 || p[i] == 0x7f || strchr(forbid, p[i]) != NULL))
			return 0;
		if (k == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)
			return 0;	/* C1 control U+0080..U+009F */
		i += k;
	}
	return 1;
}

int route_filter_matches(const char *f, const char *t)
{
	for (;;) {
		size_t fl = strcspn(f, "/"), tl = strcspn(t, "/");

		if (fl == 1 && f[0] == '#')
			return 1;
		if (!(fl == 1 && f[0] == '+') && (fl != tl || memcmp(f, t, fl) != 0))
			return 0;
		if (f[fl] == '\0' || t[tl] == '\0')
			return f[fl] == t[tl] || strcmp(f + fl, "/#") == 0;
		f += fl + 1;
		t += tl + 1;
	}
}

int route_template_covers(const char *tmpl, const char *t)
{
	for (;;) {
		size_t ml = strcspn(tmpl, "/"), tl = strcspn(t, "/");
		const char *var = memchr(tmpl, '{', ml);

		if (var && ml >= 3 && tmpl[ml - 2] == '+' && tmpl[ml - 1] == '}')
			return tl > 0;		/* {x+}: one level or more, the rest */
		if (var ? tl == 0 : (ml != tl || memcmp(tmpl, t, ml) != 0))
			return 0;
		if (tmpl[ml] == '\0' || t[tl] == '\0')
			return tmpl[ml] == t[tl];
		tmpl += ml + 1;
		t += tl + 1;
	}
}

int route_filter_ok(const char *f)
{
	size_t len = strlen(f);

	if (len == 0 || len >= ROUTE_MAX_TOPIC)
		return 0;
	for (const char *l = f;; ) {
		size_t n = strcspn(l, "/");

		for (size_t i = 0; i < n; i++) {
			unsigned char ch = (unsigned char)l[i];

			if (ch < 0x20 || ch == 0x7f || ((ch == '+' || ch == '#') && n != 1))
				return 0;
		}
		if (n == 1 && l[0] == '#' && l[1] != '\0')
			return 0;
		if (l[n] == '\0')
			return 1;
		l += n + 1;
	}
}

int route_value_ok(const char *v, size_t len)
{
	if (v == NULL || len == 0 || len > ROUTE_MAX_VALUE)
		return 0;
	return text_ok(v, len, "/+#");
}

static int name_ok(const char *s, size_t len)
{
	size_t i;

	if (len == 0 || len > ROUTE_MAX_NAME)
		return 0;
	for (i = 0; i < len; i++) {
		char c = s[i];
		int alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';

		if (!alpha && !(i > 0 && c >= '0' && c <= '9'))
			return 0;
	}
	return 1;
}

static int is_identity(const char *s, size_t len)
{
	return len == strlen(ROUTE_IDENTITY) && memcmp(s, ROUTE_IDENTITY, len) == 0;
}

static int find_var(const struct route *r, const char *name, size_t len)
{
	size_t i;

	for (i = 0; i < r->nseg; i++)
		if (r->seg[i].kind != SEG_LIT && r->seg[i].len == len &&
		    memcmp(r->seg[i].text, name, len) == 0)
			return (int)i;
	return -1;
}

/* Classifies one pattern segment s[0..len) into seg; 0 or -1 with err written. */
static int compile_seg(struct route *r, const char *s, size_t len, int last, struct route_error *err)
{
	struct pat_seg *seg = &r->seg[r->nseg];
	int plus;

	if (len == 0) {
		route_err(err, ROUTE_IN_PATH, "has an empty segment (between two '/' or at the end)");
		return -1;
	}
	if (s[0] != '{') {
		if (memchr(s, '{', len) || memchr(s, '}', len)) {
			route_err(err, ROUTE_IN_PATH, "segment \"%.*s\" mixes text and braces "
				  "(a variable is a whole segment: {name})", (int)(len > 64 ? 64 : len), s);
			return -1;
		}
		*seg = (struct pat_seg){ SEG_LIT, s, len };
		return 0;
	}
	if (len < 3 || s[len - 1] != '}' || memchr(s + 1, '{', len - 2) || memchr(s + 1, '}', len - 2)) {
		route_err(err, ROUTE_IN_PATH, "segment \"%.*s\" is not a variable of the form {name} or "
			  "{name+}", (int)(len > 64 ? 64 : len), s);
		return -1;
	}
	plus = s[len - 2] == '+';
	*seg = (struct pat_seg){ plus ? SEG_REST : SEG_VAR, s + 1, len - 2 - (size_t)plus };
	if (!name_ok(seg->text, seg->len)) {
		route_err(err, ROUTE_IN_PATH, "variable \"%.*s\" is not a valid name ([A-Za-z_][A-Za-z0-9_]*, "
			  "at most %d characters)", (int)(len > 64 ? 64 : len), s, ROUTE_MAX_NAME);
		return -1;
	}
	if (is_identity(seg->text, seg->len) && !(r->flags & ROUTE_IDENTITY_VAR)) {
		route_err(err, ROUTE_IN_PATH, "variable {identity} is reserved (the device identity is always "
			  "available to the topic)");
		return -1;
	}
	if (is_identity(seg->text, seg->len) && plus) {
		route_err(err, ROUTE_IN_PATH, "variable {identity+} is not allowed (an identity is one segment: "
			  "{identity})");
		return -1;
	}
	if (find_var(r, seg->text, seg->len) >= 0) {
		route_err(err, ROUTE_IN_PATH, "uses {%.*s} twice", (int)seg->len, seg->text);
		return -1;
	}
	if (plus && !last) {
		route_err(err, ROUTE_IN_PATH, "variable {%.*s+} must be the last segment", (int)seg->len,
			  seg->text);
		return -1;
	}
	if (is_identity(seg->text, seg->len))
		r->id_seg = (int)r->nseg;
	return 0;
}

static int compile_pattern(struct route *r, struct route_error *err)
{
	const char *s = r->pat, *slash;
	size_t len;

	if (*s == '\0')
		return 0;	/* no segments: matches only an empty path (presence topics) */
	if (*s == '/') {
		route_err(err, ROUTE_IN_PATH, "must not start with '/' (write \"sensors/{name}\")");
		return -1;
	}
	for (;;) {
		if (r->nseg == ROUTE_MAX_SEGMENTS) {
			route_err(err, ROUTE_IN_PATH, "has more than %d segments", ROUTE_MAX_SEGMENTS);
			return -1;
		}
		slash = strchr(s, '/');
		len = slash ? (size_t)(slash - s) : strlen(s);
		if (compile_seg(r, s, len, slash == NULL, err) < 0)
			return -1;
		r->nseg++;
		if (slash == NULL)
			return 0;
		s = slash + 1;
	}
}

/* Resolves one "{name}" / "{name+}" placeholder (name[0..len), plus) into part. */
static int compile_placeholder(struct route *r, struct tmpl_part *part, const char *name, size_t len,
			       int plus, struct route_error *err)
{
	int i;

	/* with ROUTE_IDENTITY_VAR, {identity} is a pattern variable like any other */
	if (is_identity(name, len) && !plus && !(r->flags & ROUTE_IDENTITY_VAR)) {
		part->kind = PART_IDENTITY;
		r->uses_identity = 1;
		return 0;
	}
	if (!name_ok(name, len)) {
		route_err(err, ROUTE_IN_TOPIC, "placeholder {%.*s%s} is not a valid name ([A-Za-z_][A-Za-z0-9_]*, "
			  "at most %d characters)", (int)(len > 64 ? 64 : len), name, plus ? "+" : "",
			  ROUTE_MAX_NAME);
		return -1;
	}
	i = find_var(r, name, len);
	if (i < 0) {
		route_err(err, ROUTE_IN_TOPIC, "uses {%.*s%s} but the path has no {%.*s}",
			  (int)(len > 64 ? 64 : len), name, plus ? "+" : "", (int)(len > 64 ? 64 : len), name);
		if (err)	/* a valid name (name_ok): at most ROUTE_MAX_NAME bytes */
			snprintf(err->var, sizeof(err->var), "%.*s%s", (int)len, name, plus ? "+" : "");
		return -1;
	}
	if (plus && r->seg[i].kind != SEG_REST) {
		route_err(err, ROUTE_IN_TOPIC, "uses {%.*s+} but {%.*s} in the path is a single segment",
			  (int)len, name, (int)len, name);
		return -1;
	}
	part->kind = PART_VAR;
	part->seg = (size_t)i;
	return 0;
}

/* Checks literal template text: no wildcards, no stray '}', UTF-8 without controls. */
static int compile_text(const char *s, size_t len, struct route_error *err)
{
	if (memchr(s, '+', len) || memchr(s, '#', len)) {
		route_err(err, ROUTE_IN_TOPIC, "must not contain '+' or '#' (MQTT wildcards)");
		return -1;
	}
	if (memchr(s, '}', len)) {
		route_err(err, ROUTE_IN_TOPIC, "has a '}' without a matching '{'");
		return -1;
	}
	if (!text_ok(s, len, "")) {
		route_err(err, ROUTE_IN_TOPIC, "has a control character or invalid UTF-8");
		return -1;
	}
	return 0;
}

/* Compiles one placeholder; *p points at its '{' and is moved past its '}'. */
static int compile_brace(struct route *r, const char **p, struct route_error *err)
{
	const char *open = *p, *close = strchr(open, '}');
	size_t len;
	int plus;

	if (close == NULL || memchr(open + 1, '{', (size_t)(close - open - 1))) {
		route_err(err, ROUTE_IN_TOPIC, "has a '{' without a matching '}'");
		return -1;
	}
	len = (size_t)(close - open - 1);
	plus = len > 0 && open[len] == '+';
	if (compile_placeholder(r, &r->part[r->npart], open + 1, len - (size_t)plus, plus, err) < 0)
		return -1;
	r->npart++;
	*p = close + 1;
	return 0;
}

static int compile_template(struct route *r, struct route_error *err)
{
	const char *p = r->tmpl, *start;
	size_t tlen = strlen(r->tmpl), nbrace = 0, i;

	if (tlen == 0) {
		route_err(err, ROUTE_IN_TOPIC, "is empty");
		return -1;
	}
	if (r->tmpl[0] == '/') {
		route_err(err, ROUTE_IN_TOPIC, "must not start with '/'");
		return -1;
	}
	if (tlen >= ROUTE_MAX_TOPIC) {
		route_err(err, ROUTE_IN_TOPIC, "is longer than %d bytes", ROUTE_MAX_TOPIC - 1);
		return -1;
	}
	for (i = 0; i < tlen; i++)
		nbrace += r->tmpl[i] == '{';
	r->part = calloc(2 * nbrace + 1, sizeof(*r->part));
	if (r->part == NULL) {
		route_err(err, ROUTE_IN_NONE, "out of memory");
		return -1;
	}
	while (*p) {
		if (*p == '{') {
			if (compile_brace(r, &p, err) < 0)
				return -1;
			continue;
		}
		start = p;
		while (*p && *p != '{')
			p++;
		if (compile_text(start, (size_t)(p - start), err) < 0)
			return -1;
		r->part[r->npart++] = (struct tmpl_part){ PART_TEXT, start, (size_t)(p - start), 0 };
	}
	return 0;
}

struct route *route_compile(const char *pattern, const char *tmpl, struct route_error *err)
{
	return route_compile2(pattern, tmpl, 0, err);
}

const char *route_error_str(const struct route_error *err, char *buf, size_t len)
{
	static const char *const word[] = { [ROUTE_IN_NONE] = "", [ROUTE_IN_PATH] = "path ",
					    [ROUTE_IN_TOPIC] = "topic " };

	snprintf(buf, len, "%s%s", word[err->input], err->reason);
	return buf;
}

struct route *route_compile2(const char *pattern, const char *tmpl, unsigned flags,
			     struct route_error *err)
{
	struct route *r;

	if (pattern == NULL || tmpl == NULL) {
		route_err(err, ROUTE_IN_NONE, "path and topic are required");
		return NULL;
	}
	r = calloc(1, sizeof(*r));
	if (r == NULL || (r->pat = strdup(pattern)) == NULL || (r->tmpl = strdup(tmpl)) == NULL) {
		route_err(err, ROUTE_IN_NONE, "out of memory");
		route_free(r);
		return NULL;
	}
	r->flags = flags;
	r->id_seg = -1;
	if (compile_pattern(r, err) < 0 || compile_template(r, err) < 0) {
		route_free(r);
		return NULL;
	}
	return r;
}

void route_free(struct route *r)
{
	if (r == NULL)
		return;
	free(r->part);
	free(r->pat);
	free(r->tmpl);
	free(r);
}

/* ROUTE_OK when segs has the pattern's shape and its literals, else ROUTE_NO_MATCH. */
static enum route_result match_shape(const struct route *r, const struct route_seg *segs, size_t nseg)
{
	size_t i;
	int rest = r->nseg > 0 && r->seg[r->nseg - 1].kind == SEG_REST;

	if (rest ? nseg < r->nseg : nseg != r->nseg)
		return ROUTE_NO_MATCH;
	for (i = 0; i < r->nseg; i++) {
		const struct pat_seg *p = &r->seg[i];

		if (p->kind == SEG_LIT && (segs[i].len != p->len || memcmp(segs[i].s, p->text, p->len)))
			return ROUTE_NO_MATCH;
	}
	return ROUTE_OK;
}

/* Every value bound to a variable must be a valid topic level. */
static enum route_result check_values(const struct route *r, const struct route_seg *segs, size_t nseg)
{
	size_t i;

	for (i = 0; i < nseg; i++) {
		const struct pat_seg *p = &r->seg[i < r->nseg ? i : r->nseg - 1];

		if (p->kind != SEG_LIT && !route_value_ok(segs[i].s, segs[i].len))
			return ROUTE_BAD_VALUE;
	}
	return ROUTE_OK;
}

/* Appends s[0..len) at *pos; 0 or -1 when it (plus the final NUL) does not fit in cap. */
static int put(char *topic, size_t cap, size_t *pos, const char *s, size_t len)
{
	if (len >= cap - *pos)
		return -1;
	memcpy(topic + *pos, s, len);
	*pos += len;
	return 0;
}

static int put_var(const struct route *r, const struct tmpl_part *part, const struct route_seg *segs,
		   size_t nseg, char *topic, size_t cap, size_t *pos)
{
	size_t i, last = r->seg[part->seg].kind == SEG_REST ? nseg - 1 : part->seg;

	for (i = part->seg; i <= last; i++) {
		if (i > part->seg && put(topic, cap, pos, "/", 1) < 0)
			return -1;
		if (put(topic, cap, pos, segs[i].s, segs[i].len) < 0)
			return -1;
	}
	return 0;
}

static enum route_result fill(const struct route *r, const struct route_seg *segs, size_t nseg,
			      const char *identity, size_t idlen, char *topic, size_t cap)
{
	size_t i, pos = 0;
	int rc = 0;

	for (i = 0; i < r->npart && rc == 0; i++) {
		const struct tmpl_part *part = &r->part[i];

		if (part->kind == PART_TEXT)
			rc = put(topic, cap, &pos, part->text, part->len);
		else if (part->kind == PART_IDENTITY)
			rc = put(topic, cap, &pos, identity, idlen);
		else
			rc = put_var(r, part, segs, nseg, topic, cap, &pos);
	}
	if (rc < 0) {
		topic[0] = '\0';
		return ROUTE_TOO_LONG;
	}
	topic[pos] = '\0';
	return ROUTE_OK;
}

enum route_result route_match(const struct route *r, const struct route_seg *segs, size_t nseg,
			      const char *identity, char *topic, size_t topiclen)
{
	enum route_result rr;
	size_t idlen = 0, cap = topiclen < ROUTE_MAX_TOPIC ? topiclen : ROUTE_MAX_TOPIC;

	if (r == NULL || nseg > ROUTE_MAX_SEGMENTS || (nseg > 0 && segs == NULL))
		return ROUTE_NO_MATCH;
	rr = match_shape(r, segs, nseg);
	if (rr == ROUTE_OK)
		rr = check_values(r, segs, nseg);
	if (rr != ROUTE_OK)
		return rr;
	if (r->uses_identity) {
		idlen = identity ? strnlen(identity, ROUTE_MAX_VALUE + 1) : 0;
		if (!route_value_ok(identity, idlen))
			return ROUTE_BAD_VALUE;
	}
	if (topic == NULL || cap == 0)
		return ROUTE_TOO_LONG;
	return fill(r, segs, nseg, identity, idlen, topic, cap);
}

/* The identity is set whenever the values are valid (ROUTE_OK, and ROUTE_TOO_LONG too, so that a
 * caller can still answer the device's owner); a route without an {identity} pattern variable
 * never matches here. */
enum route_result route_match_id(const struct route *r, const struct route_seg *segs, size_t nseg,
				 struct route_seg *identity, char *topic, size_t topiclen)
{
	enum route_result rr;

	if (identity == NULL)
		return ROUTE_NO_MATCH;
	*identity = (struct route_seg){ NULL, 0 };
	if (r == NULL || r->id_seg < 0)
		return ROUTE_NO_MATCH;
	rr = route_match(r, segs, nseg, NULL, topic, topiclen);
	if (rr == ROUTE_OK || rr == ROUTE_TOO_LONG)
		*identity = segs[r->id_seg];
	return rr;
}

/* Empty segments are kept ("a//b" is three), so that matching refuses them as bad values. */
size_t route_split(const char *s, size_t len, struct route_seg *segs, size_t max)
{
	size_t n = 0, start = 0, i;

	if (s == NULL || segs == NULL || len == 0)
		return 0;
	for (i = 0; i <= len; i++) {
		if (i < len && s[i] != '/')
			continue;
		if (n == max)
			return 0;
		segs[n++] = (struct route_seg){ s + start, i - start };
		start = i + 1;
	}
	return n;
}

int route_uses_var(const struct route *r, const char *name)
{
	size_t len;

	if (r == NULL || name == NULL)
		return 0;
	len = strlen(name);
	if (is_identity(name, len))
		return r->uses_identity || r->id_seg >= 0;
	return find_var(r, name, len) >= 0;
}

const char *route_result_str(enum route_result rr)
{
	switch (rr) {
	case ROUTE_OK:		return "ok";
	case ROUTE_NO_MATCH:	return "no matching route";
	case ROUTE_BAD_VALUE:	return "bad path value";
	case ROUTE_TOO_LONG:	return "topic too long";
	}
	return "unknown";
}
