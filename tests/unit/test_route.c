/* test_route.c: unit tests for path-pattern matching, topic filling and value checks. */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "route.h"

#define NSEG_MAX (ROUTE_MAX_SEGMENTS + 2)

struct path {
	struct route_seg seg[NSEG_MAX];
	size_t n;
};

/* Splits a test path on '/' (test paths never hold a '/' inside a value). */
static struct path split(const char *p)
{
	struct path out = { .n = 0 };
	const char *slash;

	for (;;) {
		slash = strchr(p, '/');
		out.seg[out.n].s = p;
		out.seg[out.n].len = slash ? (size_t)(slash - p) : strlen(p);
		out.n++;
		if (!slash || out.n == NSEG_MAX)
			return out;
		p = slash + 1;
	}
}

static enum route_result match(const struct route *r, const char *path, char *topic, size_t len)
{
	struct path p = split(path);

	return route_match(r, p.seg, p.n, "dev-1", topic, len);
}

/* Matches one path whose single variable segment (index 1) is the raw bytes v[0..vlen). */
static enum route_result match_raw(const struct route *r, const char *v, size_t vlen)
{
	struct route_seg seg[2] = { { "sensors", 7 }, { v, vlen } };
	char topic[ROUTE_MAX_TOPIC];

	return route_match(r, seg, 2, "dev-1", topic, sizeof(topic));
}

static void test_basic(void)
{
	struct route_error err;
	char topic[ROUTE_MAX_TOPIC];
	struct route *r = route_compile("sensors/{name}", "devices/{identity}/{name}", &err);

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(match(r, "sensors/temp", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "devices/dev-1/temp");
	CHECK(match(r, "sensors", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(match(r, "sensors/temp/x", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(match(r, "sensor/temp", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(match(r, "Sensors/temp", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(match(r, "sensorsX/temp", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(route_uses_var(r, "name"));
	CHECK(route_uses_var(r, "identity"));
	CHECK(!route_uses_var(r, "room"));
	route_free(r);
}

static void test_literal_only(void)
{
	struct route_error err;
	char topic[64];
	struct route *r = route_compile("a/b/c", "x/{identity}", &err);

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(match(r, "a/b/c", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "x/dev-1");
	CHECK(match(r, "a/b", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(match(r, "a/b/d", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(route_match(r, NULL, 0, "dev-1", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(!route_uses_var(r, "a"));
	route_free(r);
}

static void test_rest(void)
{
	struct route_error err;
	char topic[ROUTE_MAX_TOPIC];
	struct route *r = route_compile("data/{kind}/{rest+}", "d/{identity}/{kind}/{rest+}", &err);
	struct route *r2;

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(match(r, "data/t/a", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "d/dev-1/t/a");
	CHECK(match(r, "data/t/a/b/c", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "d/dev-1/t/a/b/c");
	CHECK(match(r, "data/t", topic, sizeof(topic)) == ROUTE_NO_MATCH);	/* rest needs ≥ 1 */
	CHECK(match(r, "data/t/a/+/c", topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(match(r, "data/t/a//c", topic, sizeof(topic)) == ROUTE_BAD_VALUE);	/* empty level */
	CHECK(match(r, "data/t/#", topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(match(r, "other/t/a", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(route_uses_var(r, "rest"));
	route_free(r);

	/* {rest} without '+' in the topic also fills the joined rest */
	r2 = route_compile("{all+}", "up/{all}", &err);
	CHECK(r2 != NULL);
	if (r2) {
		CHECK(match(r2, "x/y", topic, sizeof(topic)) == ROUTE_OK);
		CHECK_STR(topic, "up/x/y");
		route_free(r2);
	}
}

static void test_max_segments(void)
{
	struct route_error err;
	char topic[ROUTE_MAX_TOPIC], path[256] = "";
	struct route *r = route_compile("{rest+}", "t/{rest}", &err);
	int i;

	CHECK(r != NULL);
	if (!r)
		return;
	for (i = 0; i < ROUTE_MAX_SEGMENTS; i++)
		strcat(path, i ? "/s" : "s");
	CHECK(match(r, path, topic, sizeof(topic)) == ROUTE_OK);
	strcat(path, "/s");	/* one more than allowed */
	CHECK(match(r, path, topic, sizeof(topic)) == ROUTE_NO_MATCH);
	route_free(r);
}

static void test_injection(void)
{
	struct route_error err;
	struct route *r = route_compile("sensors/{name}", "devices/{identity}/{name}", &err);

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(match_raw(r, "temp", 4) == ROUTE_OK);
	CHECK(match_raw(r, "a/b", 3) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "+", 1) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "#", 1) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "a+b", 3) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "", 0) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "ab\0cd", 5) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "\xc0\xaf", 2) == ROUTE_BAD_VALUE);	/* overlong '/' */
	CHECK(match_raw(r, "\xed\xa0\x80", 3) == ROUTE_BAD_VALUE);	/* surrogate */
	CHECK(match_raw(r, "ab\xc3", 3) == ROUTE_BAD_VALUE);	/* truncated */
	CHECK(match_raw(r, "\xe2\x82", 2) == ROUTE_BAD_VALUE);	/* truncated */
	CHECK(match_raw(r, "\xf4\x90\x80\x80", 4) == ROUTE_BAD_VALUE);	/* > U+10FFFF */
	CHECK(match_raw(r, "\xf8\x88\x80\x80\x80", 5) == ROUTE_BAD_VALUE);	/* 5-byte form */
	CHECK(match_raw(r, "\x80", 1) == ROUTE_BAD_VALUE);	/* stray continuation */
	CHECK(match_raw(r, "a\nb", 3) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "a\x7f", 2) == ROUTE_BAD_VALUE);
	CHECK(match_raw(r, "\xc2\x85", 2) == ROUTE_BAD_VALUE);	/* C1 control NEL */
	CHECK(match_raw(r, "temp\xc3\xa9rature", 12) == ROUTE_OK);
	CHECK(match_raw(r, "\xf0\x9f\x8c\xa1", 4) == ROUTE_OK);	/* 4-byte emoji */
	CHECK(match_raw(r, "a b", 3) == ROUTE_OK);
	route_free(r);
}

static void test_value_ok(void)
{
	char big[ROUTE_MAX_VALUE + 1];

	memset(big, 'a', sizeof(big));
	CHECK(route_value_ok(big, ROUTE_MAX_VALUE));
	CHECK(!route_value_ok(big, ROUTE_MAX_VALUE + 1));
	CHECK(!route_value_ok(NULL, 1));
	CHECK(route_value_ok("température", strlen("température")));
	CHECK(!route_value_ok("\xe0\x80\xaf", 3));	/* overlong 3-byte */
	CHECK(!route_value_ok("\xf0\x80\x80\xaf", 4));	/* overlong 4-byte */
	CHECK(route_value_ok("\xed\x9f\xbf", 3));	/* U+D7FF, just below surrogates */
	CHECK(route_value_ok("\xf4\x8f\xbf\xbf", 4));	/* U+10FFFF */
}

static void test_identity(void)
{
	struct route_error err;
	char topic[64];
	struct route *r = route_compile("x", "d/{identity}", &err);
	struct route_seg seg = { "x", 1 };

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(route_match(r, &seg, 1, "a/b", topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(route_match(r, &seg, 1, NULL, topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(route_match(r, &seg, 1, "ok", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "d/ok");
	route_free(r);
}

static void test_too_long(void)
{
	struct route_error err;
	char topic[ROUTE_MAX_TOPIC], small[16];
	char v[ROUTE_MAX_VALUE];
	struct route_seg seg[ROUTE_MAX_SEGMENTS];
	struct route *r = route_compile("{rest+}", "t/{rest+}", &err);
	size_t i;

	CHECK(r != NULL);
	if (!r)
		return;
	memset(v, 'v', sizeof(v));
	for (i = 0; i < 4; i++)
		seg[i] = (struct route_seg){ v, sizeof(v) };
	/* "t/" + 4 * 255 + 3 slashes = 1025 bytes > 1023 */
	CHECK(route_match(r, seg, 4, "d", topic, sizeof(topic)) == ROUTE_TOO_LONG);
	CHECK(route_match(r, seg, 3, "d", topic, sizeof(topic)) == ROUTE_OK);
	CHECK(strlen(topic) == 2 + 3 * 255 + 2);
	seg[0] = (struct route_seg){ "abcdefghijklm", 13 };	/* "t/" + 13 = 15 bytes + NUL = 16 */
	CHECK(route_match(r, seg, 1, "d", small, sizeof(small)) == ROUTE_OK);
	CHECK_STR(small, "t/abcdefghijklm");
	seg[0] = (struct route_seg){ "abcdefghijklmn", 14 };
	CHECK(route_match(r, seg, 1, "d", small, sizeof(small)) == ROUTE_TOO_LONG);
	CHECK(route_match(r, seg, 1, "d", small, 0) == ROUTE_TOO_LONG);
	route_free(r);
}

static void expect_error(const char *pattern, const char *tmpl, const char *want)
{
	struct route_error err;
	struct route *r = route_compile(pattern, tmpl, &err);
	char text[300];

	CHECK(r == NULL);
	route_free(r);
	route_error_str(&err, text, sizeof(text));
	if (strstr(text, want) == NULL)
		CHECK_STR(text, want);
	else
		CHECK(1);
}

/* What route_compile's refusal says, as fields: which input, and the variable a topic lacks. */
static void test_error_fields(void)
{
	struct route_error err;
	char text[8];

	CHECK(route_compile("sensors/{name}", "d/{room+}", &err) == NULL);
	CHECK(err.input == ROUTE_IN_TOPIC);
	CHECK_STR(err.var, "room+");
	CHECK_STR(err.reason, "uses {room+} but the path has no {room}");
	CHECK(route_compile("a//b", "d/{identity}", &err) == NULL);
	CHECK(err.input == ROUTE_IN_PATH);
	CHECK_STR(err.var, "");
	CHECK(route_compile(NULL, "d", &err) == NULL);
	CHECK(err.input == ROUTE_IN_NONE);
	CHECK_STR(route_error_str(&err, text, sizeof(text)), "path an");	/* bounded */
	CHECK(route_compile("a//b", "d", NULL) == NULL);	/* no error wanted */
}

static void test_compile_errors(void)
{
	expect_error("sensors/{name}", "d/{room}", "topic uses {room} but the path has no {room}");
	expect_error("sensors/{name}", "", "topic is empty");
	expect_error("sensors/{name}", "/d/{name}", "topic must not start with '/'");
	expect_error("sensors/{name}", "d/+/{name}", "'+' or '#'");
	expect_error("sensors/{name}", "d/#", "'+' or '#'");
	expect_error("sensors/{name}", "d/{name", "'{' without a matching '}'");
	expect_error("sensors/{name}", "d/name}", "'}' without a matching '{'");
	expect_error("sensors/{name}", "d/{}", "not a valid name");
	expect_error("sensors/{name}", "d/{name+}", "single segment");
	expect_error("sensors/{name}", "d/\x01", "control character");
	expect_error("sensors/{name}", "d/\xc0\xaf", "invalid UTF-8");
	expect_error("/sensors", "d", "must not start with '/'");
	expect_error("a//b", "d", "empty segment");
	expect_error("a/", "d", "empty segment");
	expect_error("a/{identity}", "d", "reserved");
	expect_error("a/{1x}", "d", "not a valid name");
	expect_error("a/{x-y}", "d", "not a valid name");
	expect_error("a/{abcdefghijabcdefghijabcdefghijabc}", "d", "not a valid name");	/* 33 */
	expect_error("a/{x}/{x}", "d", "uses {x} twice");
	expect_error("{r+}/a", "d", "must be the last segment");
	expect_error("a{x}", "d", "mixes text and braces");
	expect_error("{x}y", "d", "is not a variable");
	expect_error("{}", "d", "is not a variable");
	expect_error("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z/1/2/3/4/5/6/7", "d",
		     "more than 32 segments");
}

/* route_compile2 with ROUTE_IDENTITY_VAR: command topics carry the identity as a pattern variable. */
static void test_identity_var(void)
{
	struct route_error err;
	char topic[ROUTE_MAX_TOPIC];
	struct route *r = route_compile2("devices/{identity}/set/{path+}",
					 "devices/{identity}/set-response/{path+}", ROUTE_IDENTITY_VAR, &err);
	struct route_seg id, segs[NSEG_MAX];
	const char *t;
	size_t n;

	CHECK(r != NULL);
	if (!r) {
		fprintf(stderr, "%s\n", err.reason);
		return;
	}
	CHECK(route_uses_var(r, "identity"));
	CHECK(route_uses_var(r, "path"));
	t = "devices/dev-9/set/led/1";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(n == 5);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_OK);
	CHECK(id.len == 5 && memcmp(id.s, "dev-9", 5) == 0 && id.s == t + 8);
	CHECK_STR(topic, "devices/dev-9/set-response/led/1");
	/* route_match ignores the identity argument: the value comes from the topic */
	CHECK(route_match(r, segs, n, "other", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "devices/dev-9/set-response/led/1");

	t = "devices/a+b/set/led";	/* the identity is checked like any value */
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(id.s == NULL && id.len == 0);
	t = "devices//set/led";		/* an empty level is kept by route_split, then refused */
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(n == 4);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	t = "devices/d/set/a//b";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	t = "devices/d/set/";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	t = "devices/d/get/led";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_NO_MATCH);
	t = "devices/d/set";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, sizeof(topic)) == ROUTE_NO_MATCH);
	/* too long for the buffer: the identity is still known */
	t = "devices/dev-9/set/led/1";
	n = route_split(t, strlen(t), segs, NSEG_MAX);
	CHECK(route_match_id(r, segs, n, &id, topic, 8) == ROUTE_TOO_LONG);
	CHECK(id.len == 5 && memcmp(id.s, "dev-9", 5) == 0);
	CHECK(route_match_id(r, segs, n, NULL, topic, sizeof(topic)) == ROUTE_NO_MATCH);
	route_free(r);

	/* a route without an {identity} pattern variable never matches through route_match_id */
	r = route_compile("sensors/{name}", "d/{identity}/{name}", &err);
	CHECK(r != NULL);
	if (r) {
		struct path p = split("sensors/t");

		CHECK(route_match_id(r, p.seg, p.n, &id, topic, sizeof(topic)) == ROUTE_NO_MATCH);
		route_free(r);
	}
	r = route_compile2("a/{x}", "b/{x}", ROUTE_IDENTITY_VAR, &err);
	CHECK(r != NULL);
	CHECK(!route_uses_var(r, "identity"));
	route_free(r);
}

static void expect_error2(const char *pattern, const char *tmpl, unsigned flags, const char *want)
{
	struct route_error err;
	struct route *r = route_compile2(pattern, tmpl, flags, &err);
	char text[300];

	CHECK(r == NULL);
	route_free(r);
	CHECK_STR(route_error_str(&err, text, sizeof(text)), want);
}

static void test_identity_var_errors(void)
{
	expect_error2("a/{identity}", "d", 0, "path variable {identity} is reserved (the device identity "
		      "is always available to the topic)");
	expect_error2("a/{identity+}", "d", 0, "path variable {identity} is reserved (the device identity "
		      "is always available to the topic)");
	expect_error2("a/{identity+}", "d", ROUTE_IDENTITY_VAR, "path variable {identity+} is not allowed "
		      "(an identity is one segment: {identity})");
	expect_error2("{identity}/{identity}", "d", ROUTE_IDENTITY_VAR, "path uses {identity} twice");
	expect_error2("a/{x+}", "d/{identity}", ROUTE_IDENTITY_VAR,
		      "topic uses {identity} but the path has no {identity}");
	expect_error2("{identity}/{x+}", "d/{identity+}", ROUTE_IDENTITY_VAR,
		      "topic uses {identity+} but {identity} in the path is a single segment");
	expect_error2("{identity}/{x+}", "d/+/{x+}", ROUTE_IDENTITY_VAR,
		      "topic must not contain '+' or '#' (MQTT wildcards)");
}

/* An empty pattern has no segments: presence topics are filled from the identity alone. */
static void test_empty_pattern(void)
{
	struct route_error err;
	char topic[64];
	struct route *r = route_compile2("", "devices/{identity}/status", 0, &err);
	struct route_seg seg = { "x", 1 };

	CHECK(r != NULL);
	if (!r)
		return;
	CHECK(route_match(r, NULL, 0, "dev-1", topic, sizeof(topic)) == ROUTE_OK);
	CHECK_STR(topic, "devices/dev-1/status");
	CHECK(route_match(r, &seg, 1, "dev-1", topic, sizeof(topic)) == ROUTE_NO_MATCH);
	CHECK(route_match(r, NULL, 0, "a/b", topic, sizeof(topic)) == ROUTE_BAD_VALUE);
	CHECK(route_match(r, NULL, 0, "dev-1", topic, 8) == ROUTE_TOO_LONG);
	CHECK(route_uses_var(r, "identity"));
	route_free(r);
	r = route_compile("", "fixed/topic", &err);	/* route_compile is route_compile2(0) */
	CHECK(r != NULL);
	if (r) {
		CHECK(route_match(r, NULL, 0, NULL, topic, sizeof(topic)) == ROUTE_OK);
		CHECK_STR(topic, "fixed/topic");
		route_free(r);
	}
	expect_error2("", "devices/{identity}/{name}", 0, "topic uses {name} but the path has no {name}");
}

static void test_split(void)
{
	struct route_seg s[4];
	const char *t = "a/b/c";

	CHECK(route_split(t, 5, s, 4) == 3);
	CHECK(s[0].s == t && s[0].len == 1 && s[1].s == t + 2 && s[2].s == t + 4 && s[2].len == 1);
	CHECK(route_split("a//b", 4, s, 4) == 3 && s[1].len == 0 && s[2].len == 1 && s[2].s[0] == 'b');
	CHECK(route_split("/a", 2, s, 4) == 2 && s[0].len == 0 && s[1].len == 1);
	CHECK(route_split("a/", 2, s, 4) == 2 && s[0].len == 1 && s[1].len == 0);
	CHECK(route_split("/", 1, s, 4) == 2 && s[0].len == 0 && s[1].len == 0);
	CHECK(route_split("x", 1, s, 4) == 1 && s[0].len == 1);
	CHECK(route_split("", 0, s, 4) == 0);
	CHECK(route_split("a/b/c", 3, s, 4) == 2 && s[1].len == 1);	/* only len bytes are read */
	CHECK(route_split("a/b/c/d", 7, s, 4) == 4);			/* exactly max */
	CHECK(route_split("a/b/c/d/e", 9, s, 4) == 0);			/* more than max */
	CHECK(route_split("a", 1, s, 0) == 0);
	CHECK(route_split(NULL, 3, s, 4) == 0);
}

static void test_compile_ok(void)
{
	struct route_error err;
	struct route *r = route_compile("{abcdefghijabcdefghijabcdefghijab}", "t/{abcdefghijabcdefghijabcdefghijab}",
					&err);

	CHECK(r != NULL);	/* a 32-character name is allowed */
	route_free(r);
	r = route_compile("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z/1/2/3/4/5/6", "d", &err);
	CHECK(r != NULL);	/* 32 segments */
	route_free(r);
	r = route_compile("s/{_v9}", "m\xc3\xa9t\xc3\xa9o/{_v9}", &err);
	CHECK(r != NULL);	/* UTF-8 text in the topic */
	route_free(r);
	CHECK_STR(route_result_str(ROUTE_BAD_VALUE), "bad path value");
	route_free(NULL);
}

/* MQTT filters and topic templates against concrete topics (the Response Topic checks). */
static void test_filters_and_templates(void)
{
	CHECK(route_filter_matches("replies/#", "replies/a/b"));
	CHECK(route_filter_matches("replies/#", "replies"));		/* '#' takes zero levels */
	CHECK(route_filter_matches("a/+/c", "a/b/c"));
	CHECK(!route_filter_matches("a/+/c", "a/b/c/d"));
	CHECK(!route_filter_matches("a/+", "a"));
	CHECK(route_filter_matches("#", "anything/at/all"));
	CHECK(!route_filter_matches("replies/x", "replies/xy"));

	CHECK(route_template_covers("devices/{identity}/{name}", "devices/s-2/t"));
	CHECK(!route_template_covers("devices/{identity}/{name}", "devices/s-2/t/u"));
	CHECK(!route_template_covers("devices/{identity}/{name}", "devices//t"));
	CHECK(route_template_covers("devices/{identity}/events/{rest+}", "devices/x/events/a/b"));
	CHECK(!route_template_covers("devices/{identity}/events/{rest+}", "devices/x/events"));
	CHECK(route_template_covers("coap2mqtt/gw/status", "coap2mqtt/gw/status"));
	CHECK(!route_template_covers("coap2mqtt/gw/status", "coap2mqtt/gw/statu"));

	CHECK(route_filter_ok("replies/#") && route_filter_ok("+/x/+") && route_filter_ok("#"));
	CHECK(!route_filter_ok("") && !route_filter_ok("a/#/b") && !route_filter_ok("a+/b"));
	CHECK(!route_filter_ok("a/b#") && !route_filter_ok("a/\x01"));
}

int main(void)
{
	test_basic();
	test_literal_only();
	test_rest();
	test_max_segments();
	test_injection();
	test_value_ok();
	test_identity();
	test_too_long();
	test_compile_errors();
	test_error_fields();
	test_compile_ok();
	test_identity_var();
	test_identity_var_errors();
	test_empty_pattern();
	test_split();
	test_filters_and_templates();
	return check_done();
}
