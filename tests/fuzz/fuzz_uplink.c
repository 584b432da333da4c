/* fuzz_uplink.c: libFuzzer target for the uplink path: a raw CoAP datagram goes through libcoap's
 * parser (as coap_handle_dgram() does), uplink.c's uplink_path() and uplink_decide() (the response
 * code and topic the gateway would use), and its segments are routed against the routes of
 * conf/coap2mqtt.yaml and more. Each route result is
 * compared with one derived independently from the pattern text: the same code (no match, bad
 * value, too long) and, on a match, the same topic byte for byte. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <coap3/coap.h>

#include "config.h"
#include "route.h"
#include "uplink.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define IDENTITY "thermostat-kitchen"

/* A route and the topic it must give: "devices/" + identity + mid + the values from segment `from`
 * on, joined with '/'. With id_seg >= 0 the identity is that segment (ROUTE_IDENTITY_VAR). */
struct fixed {
	const char *pattern, *tmpl, *mid;
	size_t from;
	int id_seg;
	struct route *r;
	struct route_seg pat[ROUTE_MAX_SEGMENTS];
	size_t npat;
};

static struct fixed routes[] = {
	/* routes: of conf/coap2mqtt.yaml */
	{ .pattern = "sensors/{name}", .tmpl = "devices/{identity}/sensors/{name}",
	  .mid = "/sensors/", .from = 1, .id_seg = -1 },
	{ .pattern = "events/{rest+}", .tmpl = "devices/{identity}/events/{rest+}",
	  .mid = "/events/", .from = 1, .id_seg = -1 },
	{ .pattern = "state", .tmpl = "devices/{identity}/state", .mid = "/state", .from = 1,
	  .id_seg = -1 },
	/* a catch-all, as observe: rules compile theirs */
	{ .pattern = "{path+}", .tmpl = "devices/{identity}/{path+}", .mid = "/", .from = 0,
	  .id_seg = -1 },
	/* the commands: rule, matched as if the path were a topic */
	{ .pattern = "devices/{identity}/set/{path+}",
	  .tmpl = "devices/{identity}/set-response/{path+}", .mid = "/set-response/", .from = 3,
	  .id_seg = 1 },
};
#define NROUTES (sizeof(routes) / sizeof(routes[0]))

struct topic {
	char s[ROUTE_MAX_TOPIC];
	size_t len;
	int too_long;
};

static void put(struct topic *t, const char *s, size_t len)
{
	if (t->too_long || len >= sizeof(t->s) - t->len) {
		t->too_long = 1;
		return;
	}
	memcpy(t->s + t->len, s, len);
	t->len += len;
	t->s[t->len] = '\0';
}

static int is_var(const struct route_seg *p)
{
	return p->len > 0 && p->s[0] == '{';
}

static int is_rest(const struct route_seg *p)
{
	return p->len > 1 && p->s[p->len - 2] == '+';
}

/* What route_match must answer for f and segs, derived from the pattern text; fills want. */
static enum route_result expect(const struct fixed *f, const struct route_seg *segs, size_t n,
				struct topic *want)
{
	int rest = is_rest(&f->pat[f->npat - 1]);
	const char *id = IDENTITY;
	size_t i, idlen = strlen(IDENTITY);

	if (rest ? n < f->npat : n != f->npat)
		return ROUTE_NO_MATCH;
	for (i = 0; i < f->npat; i++)
		if (!is_var(&f->pat[i]) && (segs[i].len != f->pat[i].len ||
					    memcmp(segs[i].s, f->pat[i].s, segs[i].len) != 0))
			return ROUTE_NO_MATCH;
	for (i = 0; i < n; i++)
		if (is_var(&f->pat[i < f->npat ? i : f->npat - 1]) &&
		    !route_value_ok(segs[i].s, segs[i].len))
			return ROUTE_BAD_VALUE;
	if (f->id_seg >= 0) {
		id = segs[f->id_seg].s;
		idlen = segs[f->id_seg].len;
	}
	memset(want, 0, sizeof(*want));
	put(want, "devices/", 8);
	put(want, id, idlen);
	put(want, f->mid, strlen(f->mid));
	for (i = f->from; i < n; i++) {
		if (i > f->from)
			put(want, "/", 1);
		put(want, segs[i].s, segs[i].len);
	}
	return want->too_long ? ROUTE_TOO_LONG : ROUTE_OK;
}

/* A topic a device's reading may go to: no wildcard, no NUL, every level non-empty. */
static void check_topic(const char *topic)
{
	size_t len = strnlen(topic, ROUTE_MAX_TOPIC), i;

	if (len == 0 || len == ROUTE_MAX_TOPIC || topic[0] == '/' || topic[len - 1] == '/')
		abort();
	for (i = 0; i < len; i++)
		if (topic[i] == '+' || topic[i] == '#' || (topic[i] == '/' && topic[i + 1] == '/'))
			abort();
}

static void route_one(const struct fixed *f, const struct route_seg *segs, size_t n)
{
	struct topic want;
	struct route_seg id;
	char topic[ROUTE_MAX_TOPIC];
	enum route_result rr, wr = expect(f, segs, n, &want);
	size_t i;

	if (f->id_seg >= 0)
		rr = route_match_id(f->r, segs, n, &id, topic, sizeof(topic));
	else
		rr = route_match(f->r, segs, n, IDENTITY, topic, sizeof(topic));
	if (rr != wr)
		abort();
	if (rr != ROUTE_OK)
		return;
	if (strlen(topic) != want.len || memcmp(topic, want.s, want.len) != 0)
		abort();
	check_topic(topic);
	for (i = 0; i < n; i++)
		if (memchr(segs[i].s, '/', segs[i].len) != NULL)
			abort();	/* a value with '/' never matches */
	if (f->id_seg >= 0 && (id.s != segs[f->id_seg].s || id.len != segs[f->id_seg].len))
		abort();
}

/* The gateway's own decision over the first three routes (those of conf/coap2mqtt.yaml): the
 * code is one a device may get, and a publish goes only to a topic without wildcards. */
static struct conf_route conf_routes[3];
static struct config conf = { .routes = conf_routes, .n_routes = 3 };

static void check_decision(const coap_pdu_t *pdu)
{
	struct uplink_decision d;

	uplink_decide(&conf, pdu, IDENTITY, &d);
	if (d.route) {
		if (d.code != COAP_RESPONSE_CODE(204) || strpbrk(d.topic, "+#") ||
		    strncmp(d.topic, "devices/" IDENTITY "/", strlen("devices/" IDENTITY "/")) != 0)
			abort();
	} else if (d.code != COAP_RESPONSE_CODE(400) && d.code != COAP_RESPONSE_CODE(404) &&
		   d.code != COAP_RESPONSE_CODE(405)) {
		abort();
	}
}

/* The same path joined with '/' and split again, as an MQTT topic would be: when no segment holds
 * '/', route_split gives the segments back. */
static void check_resplit(const struct route_seg *segs, size_t n)
{
	struct route_seg again[ROUTE_MAX_SEGMENTS];
	struct topic joined;
	size_t i, m;

	memset(&joined, 0, sizeof(joined));
	for (i = 0; i < n; i++) {
		if (memchr(segs[i].s, '/', segs[i].len) != NULL)
			return;
		if (i > 0)
			put(&joined, "/", 1);
		put(&joined, segs[i].s, segs[i].len);
	}
	if (joined.too_long || (n == 1 && segs[0].len == 0))
		return;
	m = route_split(joined.s, joined.len, again, ROUTE_MAX_SEGMENTS);
	if (m != n)
		abort();
	for (i = 0; i < n; i++)
		if (again[i].len != segs[i].len || memcmp(again[i].s, segs[i].s, segs[i].len) != 0)
			abort();
	for (i = 0; i < NROUTES; i++)
		route_one(&routes[i], again, m);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	struct route_error err;
	size_t i;

	(void)argc;
	(void)argv;
	coap_startup();
	coap_set_log_level(COAP_LOG_EMERG);
	for (i = 0; i < NROUTES; i++) {
		struct fixed *f = &routes[i];

		f->r = route_compile2(f->pattern, f->tmpl, f->id_seg >= 0 ? ROUTE_IDENTITY_VAR : 0, &err);
		f->npat = route_split(f->pattern, strlen(f->pattern), f->pat, ROUTE_MAX_SEGMENTS);
		if (f->r == NULL || f->npat == 0)
			abort();
	}
	for (i = 0; i < conf.n_routes; i++) {
		conf_routes[i].route = routes[i].r;
		conf_routes[i].methods = CONF_M_POST | CONF_M_PUT;
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct route_seg segs[ROUTE_MAX_SEGMENTS];
	const uint8_t *body = NULL;
	size_t n, i, len = 0, offset = 0, total = 0;
	coap_pdu_t *pdu;

	/* coap_handle_dgram(): runts and other versions are dropped before the parser */
	if (size < 4 || (data[0] >> 6) != 1)
		return 0;
	pdu = coap_pdu_init(0, 0, 0, COAP_DEFAULT_MTU);
	if (pdu == NULL)
		return 0;
	if (coap_pdu_parse(COAP_PROTO_DTLS, data, size, pdu)) {
		n = uplink_path(pdu, segs, ROUTE_MAX_SEGMENTS);
		check_decision(pdu);
		for (i = 0; i < NROUTES; i++)
			route_one(&routes[i], segs, n);
		check_resplit(segs, n);
		coap_get_data_large(pdu, &len, &body, &offset, &total);
		if (len > size || (len > 0 && body == NULL))
			abort();
	}
	coap_delete_pdu(pdu);
	return 0;
}
