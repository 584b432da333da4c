/* route.h: path patterns ("sensors/{name}", "{rest+}") and topic templates, compiled and matched.
 * Pure functions: no I/O, no logging, no knowledge of CoAP or MQTT libraries. */
#ifndef C2M_ROUTE_H
#define C2M_ROUTE_H

#include <stddef.h>

#define ROUTE_MAX_SEGMENTS 32	/* path segments in a pattern or a request */
#define ROUTE_MAX_VALUE 255	/* bytes in one path value */
#define ROUTE_MAX_TOPIC 1024	/* bytes in a filled topic, NUL included */

struct route;			/* opaque: one compiled (pattern, template) pair */

enum route_result {
	ROUTE_OK = 0,
	ROUTE_NO_MATCH,		/* path does not fit the pattern → try next route / 4.04 */
	ROUTE_BAD_VALUE,	/* a value is empty, not UTF-8, holds / + # or NUL → 4.00 */
	ROUTE_TOO_LONG,		/* filled topic longer than the buffer → 4.00 */
};

/* A path segment as received (Uri-Path option bytes: already percent-decoded, not NUL-ended). */
struct route_seg {
	const char *s;
	size_t len;
};

/* Why route_compile refused: which of its two inputs, and a reason about that input that does not
 * name it ("is empty", "uses {room} but the path has no {room}"). */
enum route_input { ROUTE_IN_NONE, ROUTE_IN_PATH, ROUTE_IN_TOPIC };

struct route_error {
	enum route_input input;		/* ROUTE_IN_NONE: neither (out of memory, an input missing) */
	char var[40];			/* the topic names a variable the path lacks: its name ("x",
					 * "x+"); else empty */
	char reason[256];
};

/* The reason with its input named ("topic is empty"), for one line of a log. */
const char *route_error_str(const struct route_error *err, char *buf, size_t len);

/* Compiles pattern + template. Pattern: segments separated by '/', each a literal, "{name}" or, as
 * the last one only, "{name+}" (one or more remaining segments). Template: text with "{name}"
 * placeholders naming pattern variables or "identity"; "{name+}" in a template fills the joined
 * rest. On error returns NULL and fills *err (when not NULL). */
struct route *route_compile(const char *pattern, const char *tmpl, struct route_error *err);
void route_free(struct route *r);

/* Flags for route_compile2. */
#define ROUTE_IDENTITY_VAR 1	/* "{identity}" may be a pattern variable (command topics): its
				 * value is checked like any other and also fills {identity} */

struct route *route_compile2(const char *pattern, const char *tmpl, unsigned flags,
			     struct route_error *err);

/* Like route_match, for routes compiled with ROUTE_IDENTITY_VAR: identity comes from the pattern.
 * On ROUTE_OK, *identity points into segs (not NUL-ended) and the topic is filled. */
enum route_result route_match_id(const struct route *r, const struct route_seg *segs, size_t nseg,
				 struct route_seg *identity, char *topic, size_t topiclen);

/* Splits an MQTT topic or a resource path on '/' into segs (pointing into s); returns the count,
 * or 0 when there are more than max. An empty s gives 0 segments. */
size_t route_split(const char *s, size_t len, struct route_seg *segs, size_t max);

/* Matches segs against r and, on ROUTE_OK, writes the NUL-ended topic into topic[topiclen].
 * identity must already be valid as a topic value (route_value_ok). */
enum route_result route_match(const struct route *r, const struct route_seg *segs, size_t nseg,
			      const char *identity, char *topic, size_t topiclen);

/* 1 when v[0..len) may appear inside one MQTT topic level: non-empty, valid UTF-8 (no overlong
 * forms, no surrogates), no '/', '+', '#', NUL or other control characters. */
int route_value_ok(const char *v, size_t len);

/* 1 when MQTT topic filter f matches topic t ('+' one level, '#' the rest, zero levels
 * included). */
int route_filter_matches(const char *f, const char *t);
/* 1 when topic template tmpl could be filled to give topic t: a level holding a variable takes
 * any one level ({x+}: the rest). On the safe side for a level mixing text and a variable. */
int route_template_covers(const char *tmpl, const char *t);
/* 1 when f is a valid MQTT topic filter: non-empty, '+' and '#' only as whole levels, '#' only
 * last, no NUL or control characters, shorter than ROUTE_MAX_TOPIC. */
int route_filter_ok(const char *f);

/* 1 when the template/pattern uses variable "name". */
int route_uses_var(const struct route *r, const char *name);

const char *route_result_str(enum route_result rr);

#endif
