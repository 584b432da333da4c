/* observe.c: the gateway as an RFC 7641 client on each device's own session: registers
 * observations (random token each), publishes every fresh notification, re-registers on errors,
 * silence and new sessions, cancels on reload and shutdown. */
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "config.h"
#include "device.h"
#include "hmap.h"
#include "log.h"
#include "loop.h"
#include "mqtt.h"
#include "observe.h"
#include "pdu.h"
#include "route.h"
#include "stats.h"

#define OBS_TOKEN_LEN 8
#define OBS_MAX_PATH 255
#define OBS_MAX_PER_DEVICE 64		/* discovered resources observed per device */
#define OBS_DEFAULT_MAX_AGE 60		/* s, RFC 7252 default Max-Age */
#define OBS_SILENCE_MARGIN 30		/* s beyond Max-Age before re-registering */
#define OBS_RETRY_MIN 5			/* s, first retry after an error or timeout */
#define OBS_RETRY_MAX 300		/* s */

/* An observation's life: new -> registering -> observing (notifications arrive) or polling
 * (answered without Observe: GET again when the value expires) or waiting (refused, reset, timed
 * out or silent: register again after a backoff). Its token is in the map only while registering
 * or observing; its one timer means what its state says. */
enum obs_state { OBS_NEW, OBS_REGISTERING, OBS_OBSERVING, OBS_POLLING, OBS_WAITING };

static const char *const obs_state_name[] = { "new", "registering", "observing", "polling",
					      "waiting" };

struct obs {
	enum obs_state state;
	struct device *dev;
	coap_session_t *session;	/* the session it was registered on */
	const struct conf_observe *rule;
	char path[OBS_MAX_PATH + 1];	/* "" for discovery (GET /.well-known/core) */
	int discover;
	uint8_t token[OBS_TOKEN_LEN];
	int have_seq;
	uint32_t seq;
	uint64_t t_last;		/* s, monotonic */
	unsigned backoff;		/* s before the next retry */
	struct event *timer;		/* registering: no answer; observing: silence; polling: next
					 * GET; waiting: retry */
	struct obs *next;		/* the device's list */
};

static struct {
	const struct config *conf;
	struct hmap *by_token;
	size_t active;
} O;

static uint64_t now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec;
}

int observe_fresh(uint32_t v1, uint64_t t1, uint32_t v2, uint64_t t2)
{
	const uint32_t half = 1u << 23;

	return (v1 < v2 && v2 - v1 < half) || (v1 > v2 && v1 - v2 > half) || t2 > t1 + 128;
}

size_t observe_active(void)
{
	return O.active;
}

int observe_init(const struct config *c)
{
	O.conf = c;
	O.by_token = hmap_new();
	return O.by_token ? 0 : -1;
}

static struct obs **dev_list(struct device *d)
{
	return (struct obs **)dev_observe_slot(d);
}

/* GET with Observe 0 (register) or 1 (cancel), or a plain GET of /.well-known/core. */
static int send_get(struct obs *o, int observe, coap_pdu_type_t type)
{
	coap_session_t *s = o->session;
	coap_pdu_t *pdu = s ? coap_new_pdu(type, COAP_REQUEST_CODE_GET, s) : NULL;

	if (!pdu)
		return -1;
	coap_add_token(pdu, sizeof(o->token), o->token);
	if (o->discover) {
		coap_add_option(pdu, COAP_OPTION_URI_PATH, 11, (const uint8_t *)".well-known");
		coap_add_option(pdu, COAP_OPTION_URI_PATH, 4, (const uint8_t *)"core");
	} else {
		pdu_add_uint(pdu, COAP_OPTION_OBSERVE, (unsigned)observe);
		pdu_add_path(pdu, o->path);
	}
	if (coap_send(s, pdu) == COAP_INVALID_MID)
		return -1;
	loop_kick();
	return 0;
}

static void on_timer(evutil_socket_t fd, short what, void *arg);

static void arm(struct obs *o, unsigned secs)
{
	struct timeval tv = { (time_t)secs, 0 };

	if (o->timer)
		evtimer_add(o->timer, &tv);
}

static const char *obs_path(const struct obs *o)
{
	return o->discover ? ".well-known/core" : o->path;
}

/* The one place an observation changes state: the token map, the timer and the log follow.
 * why: the cause, logged with the transition (NULL: none worth a line when the state stays). */
static void obs_enter(struct obs *o, enum obs_state to, unsigned timer_s, const char *why)
{
	enum obs_state from = o->state;
	enum log_level lvl = to == OBS_WAITING ? LOG_LVL_WARNING :
			     to == OBS_REGISTERING && from != OBS_OBSERVING ? LOG_LVL_DEBUG :
			     LOG_LVL_INFO;

	if (to == OBS_POLLING || to == OBS_WAITING)
		hmap_del(O.by_token, o->token, sizeof(o->token));
	o->state = to;
	arm(o, timer_s);
	if (from != to || why)
		log_msg(lvl, "peer=%s identity=%s path=/%s observation=%s->%s timer_s=%u%s%s%s",
			dev_peer(o->dev), dev_identity(o->dev), obs_path(o), obs_state_name[from],
			obs_state_name[to], timer_s, why ? " reason=\"" : "", why ? why : "",
			why ? "\"" : "");
	if (to == OBS_WAITING)
		o->backoff = o->backoff * 2 > OBS_RETRY_MAX ? OBS_RETRY_MAX : o->backoff * 2;
	else if (to == OBS_OBSERVING)
		o->backoff = OBS_RETRY_MIN;
}

/* (Re-)registers o with a fresh token: a late notification for the old one gets RST. */
static void obs_register(struct obs *o, const char *why)
{
	hmap_del(O.by_token, o->token, sizeof(o->token));
	pdu_token(o->token, sizeof(o->token));
	o->have_seq = 0;
	if (hmap_put(O.by_token, o->token, sizeof(o->token), o) < 0 || send_get(o, 0,
	    COAP_MESSAGE_CON) < 0) {
		obs_enter(o, OBS_WAITING, o->backoff, "registration not sent");
		return;
	}
	/* no answer at all (not even a NACK) within the retry time: try again */
	obs_enter(o, OBS_REGISTERING, OBS_RETRY_MAX, why);
}

static struct obs *obs_new(struct device *d, const struct conf_observe *rule, const char *path,
			   int discover)
{
	struct obs *o = calloc(1, sizeof(*o));

	if (!o)
		return NULL;
	o->dev = d;
	o->session = dev_session(d);
	o->rule = rule;
	o->discover = discover;
	o->backoff = OBS_RETRY_MIN;
	snprintf(o->path, sizeof(o->path), "%s", path);
	o->timer = evtimer_new(loop_base(), on_timer, o);
	if (!o->timer) {
		free(o);
		return NULL;
	}
	o->next = *dev_list(d);
	*dev_list(d) = o;
	if (!discover)
		O.active++;
	obs_register(o, NULL);
	return o;
}

static void obs_free(struct obs *o)
{
	hmap_del(O.by_token, o->token, sizeof(o->token));
	if (o->timer)
		event_free(o->timer);
	if (!o->discover)
		O.active--;
	free(o);
}

static void obs_unlink_free(struct obs *o)
{
	struct obs **pp = dev_list(o->dev);

	for (; *pp; pp = &(*pp)->next)
		if (*pp == o) {
			*pp = o->next;
			break;
		}
	obs_free(o);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct obs *o = arg;

	char why[64];

	(void)fd;
	(void)what;
	snprintf(why, sizeof(why), "no notification for Max-Age + %d s", OBS_SILENCE_MARGIN);
	obs_register(o, o->state == OBS_OBSERVING ? why :
		     o->state == OBS_REGISTERING ? "no answer" : NULL);
}

static int has_path(struct device *d, const char *path)
{
	for (struct obs *o = *dev_list(d); o; o = o->next)
		if (!o->discover && strcmp(o->path, path) == 0)
			return 1;
	return 0;
}

/* Link format (RFC 6690): observes every "<path>;...;obs" the rule's match allows. */
static void discovered(struct obs *disc, const char *buf, size_t len)
{
	const char *p = buf, *end = buf + len;
	size_t started = 0;

	while (p < end) {
		const char *lt = memchr(p, '<', (size_t)(end - p)), *gt, *next;
		char path[OBS_MAX_PATH + 1];
		int obs = 0;

		if (!lt || (gt = memchr(lt, '>', (size_t)(end - lt))) == NULL)
			break;
		next = memchr(gt, ',', (size_t)(end - gt));
		if (!next)
			next = end;
		/* attributes between '>' and ',': look for ";obs" as a whole parameter name */
		for (const char *a = gt + 1; a + 4 <= next; a++)
			if (memcmp(a, ";obs", 4) == 0 && (a + 4 == next || a[4] == ';' || a[4] == '='))
				obs = 1;
		if (obs && gt - lt - 2 > 0 && gt - lt - 2 <= OBS_MAX_PATH && lt[1] == '/') {
			memcpy(path, lt + 2, (size_t)(gt - lt - 2));
			path[gt - lt - 2] = '\0';
			if ((!disc->rule->match || fnmatch(disc->rule->match, path, 0) == 0) &&
			    !has_path(disc->dev, path) && started < OBS_MAX_PER_DEVICE) {
				if (obs_new(disc->dev, disc->rule, path, 0))
					started++;
			}
		}
		p = next + 1;
	}
	log_info("peer=%s identity=%s discovery=ok observing=%zu", dev_peer(disc->dev),
		 dev_identity(disc->dev), started);
}

static void publish(struct obs *o, const coap_pdu_t *rcvd)
{
	struct route_seg segs[ROUTE_MAX_SEGMENTS];
	size_t nseg = route_split(o->path, strlen(o->path), segs, ROUTE_MAX_SEGMENTS);
	char topic[ROUTE_MAX_TOPIC];
	const uint8_t *data = NULL;
	size_t len = 0, off = 0, total = 0;
	coap_opt_iterator_t oi;
	coap_opt_t *cf = coap_check_option(rcvd, COAP_OPTION_CONTENT_FORMAT, &oi);
	struct mqtt_msg m;

	if (route_match(o->rule->route, segs, nseg, dev_identity(o->dev), topic, sizeof(topic)) !=
	    ROUTE_OK) {
		log_src(dev_log(o->dev), LOG_LVL_WARNING, "peer=%s identity=%s path=/%s "
			"notification=dropped reason=\"the path does not fill topic %s\"",
			dev_peer(o->dev), dev_identity(o->dev), o->path, o->rule->topic);
		return;
	}
	coap_get_data_large(rcvd, &len, &data, &off, &total);
	m = (struct mqtt_msg){ .topic = topic, .payload = data, .len = len, .qos = o->rule->qos,
			       .retain = o->rule->retain, .identity = dev_identity(o->dev),
			       .content_format = cf ? (int)coap_decode_var_bytes(coap_opt_value(cf),
						      coap_opt_length(cf)) : -1 };
	if (mqtt_publish(&m, NULL, NULL) == MQTT_SEND_OK) {
		stats_inc(STAT_NOTIFICATIONS);
	} else {
		stats_inc(STAT_DROPPED);
		log_src(dev_log(o->dev), LOG_LVL_WARNING, "peer=%s identity=%s path=/%s "
			"notification=dropped reason=\"MQTT buffer full\"", dev_peer(o->dev),
			dev_identity(o->dev), o->path);
	}
}

static unsigned max_age(const coap_pdu_t *rcvd)
{
	coap_opt_iterator_t oi;
	coap_opt_t *opt = coap_check_option(rcvd, COAP_OPTION_MAXAGE, &oi);

	return opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) :
		     OBS_DEFAULT_MAX_AGE;
}

static void notification(struct obs *o, const coap_pdu_t *rcvd)
{
	coap_opt_iterator_t oi;
	coap_opt_t *ob = coap_check_option(rcvd, COAP_OPTION_OBSERVE, &oi);
	uint64_t t = now_s();
	unsigned age = max_age(rcvd);

	if (pdu_partial_body(rcvd)) {
		/* one block of a body that was not fetched whole: nothing to publish, and the
		 * state stays (a registration is tried again when its timer runs out) */
		stats_inc(STAT_DROPPED);
		log_src(dev_log(o->dev), LOG_LVL_WARNING, "peer=%s identity=%s path=/%s "
			"notification=dropped reason=\"body over the limit (%u KiB each, %u KiB per "
			"device at once)\"", dev_peer(o->dev), dev_identity(o->dev), o->path,
			LOOP_MAX_RESPONSE_BODY / 1024, LOOP_MAX_RESPONSE_BODIES / 1024);
		return;
	}

	if (ob) {
		uint32_t v = coap_decode_var_bytes(coap_opt_value(ob), coap_opt_length(ob)) & 0xffffff;

		if (o->have_seq && !observe_fresh(o->seq, o->t_last, v, t)) {
			stats_inc(STAT_STALE_NOTIFICATIONS);
			log_debug("peer=%s identity=%s path=/%s notification=dropped reason=stale "
				  "seq=%u have=%u", dev_peer(o->dev), dev_identity(o->dev), o->path, v,
				  o->seq);
			return;
		}
		o->have_seq = 1;
		o->seq = v;
		o->t_last = t;
		obs_enter(o, OBS_OBSERVING, age + OBS_SILENCE_MARGIN, NULL);
	} else {
		/* answered, but not observable: poll again when the value expires */
		obs_enter(o, OBS_POLLING, age ? age : OBS_DEFAULT_MAX_AGE,
			  "answered without Observe");
	}
	publish(o, rcvd);
}

int observe_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd)
{
	coap_bin_const_t tok = coap_pdu_get_token(rcvd);
	struct obs *o = hmap_get(O.by_token, tok.s, tok.length);
	coap_pdu_code_t code = coap_pdu_get_code(rcvd);
	char why[48];

	(void)sent;
	if (!o || o->session != s)
		return 0;
	if (COAP_RESPONSE_CLASS(code) != 2) {
		snprintf(why, sizeof(why), "refused with %u.%02u", code >> 5, code & 31);
		obs_enter(o, OBS_WAITING, o->backoff, why);
		return 1;
	}
	if (o->discover) {
		const uint8_t *data = NULL;
		size_t len = 0, off = 0, total = 0;

		coap_get_data_large(rcvd, &len, &data, &off, &total);
		hmap_del(O.by_token, o->token, sizeof(o->token));
		discovered(o, (const char *)data, data ? len : 0);
		obs_unlink_free(o);
		return 1;
	}
	notification(o, rcvd);
	return 1;
}

int observe_nack(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason)
{
	coap_bin_const_t tok = coap_pdu_get_token(sent);
	struct obs *o = hmap_get(O.by_token, tok.s, tok.length);

	if (!o || o->session != s)
		return 0;
	obs_enter(o, OBS_WAITING, o->backoff, reason == COAP_NACK_RST ?
		  "registration reset by the device" : "registration timed out");
	return 1;
}

static void start_rules(struct device *d)
{
	for (size_t i = 0; i < O.conf->n_observe; i++) {
		const struct conf_observe *r = &O.conf->observe[i];

		if (fnmatch(r->devices, dev_identity(d), 0) != 0)
			continue;
		if (r->discover)
			obs_new(d, r, "", 1);
		else if (!has_path(d, r->path))
			obs_new(d, r, r->path, 0);
	}
}

void observe_device_up(struct device *d)
{
	observe_device_down(d, "new session");
	start_rules(d);
}

void observe_device_down(struct device *d, const char *reason)
{
	struct obs *o, *next;

	(void)reason;
	for (o = *dev_list(d); o; o = next) {
		next = o->next;
		obs_free(o);
	}
	*dev_list(d) = NULL;
}

static void cancel_all(struct device *d)
{
	for (struct obs *o = *dev_list(d); o; o = o->next)
		if (o->state == OBS_OBSERVING && o->session == dev_session(d))
			send_get(o, 1, COAP_MESSAGE_NON);	/* RFC 7641 §3.6 */
	observe_device_down(d, "cancelled");
}

void observe_set_config(const struct config *c)
{
	O.conf = c;
	dev_each_online(cancel_all);
	dev_each_online(start_rules);
}

void observe_shutdown(void)
{
	dev_each_online(cancel_all);
	hmap_free(O.by_token);
	O.by_token = NULL;
}
