/* uplink.c: one handler for every device request: route it, hand it to mqtt, answer the device
 * once the reading is safe — piggybacked once the journal has it on disk for `ack: stored`,
 * separately after the PUBACK for `ack: broker`. Every CoAP error code the gateway sends is chosen here. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "device.h"
#include "exchange.h"
#include "journal.h"
#include "log.h"
#include "loop.h"
#include "mqtt.h"
#include "oscore.h"
#include "pdu.h"
#include "route.h"
#include "stats.h"
#include "uplink.h"

#define UPLINK_RETRY_S 30	/* Max-Age on 5.03: when the device should try again */
#define UPLINK_MAX_UPLOADS 2	/* Block1 uploads one device may have in progress at once */

/* A reading (QoS >= 1) waiting for the journal (ack: stored) or for the broker (ack: broker). */
struct pending {
	coap_session_t *session;	/* referenced while pending; the latest the device used */
	struct exch *ex;		/* its exchange (CON), NULL for NON */
	coap_pdu_t *answer;		/* ack: stored: the deferred response, sent once stored */
	uint8_t token[8];		/* ack: broker: for the separate response */
	size_t token_len;
	uint64_t seq;			/* in the journal */
	unsigned no_response;		/* No-Response option bits (RFC 7967) of a NON */
	int broker, stored;
	char who[160];			/* "peer=… identity=…" for log lines */
	struct pending *prev, *next;
};

static struct {
	const struct config *conf;
	struct pending *pending;
	size_t n_pending;
	size_t n_acks;			/* of them, ack: broker readings waiting for a PUBACK */
	time_t last_refusal_log;
	unsigned refusals_unlogged;
} U;

static void set_error(coap_pdu_t *resp, uint8_t code, const char *diag)
{
	coap_pdu_set_code(resp, code);
	if (code == COAP_RESPONSE_CODE(503))
		pdu_add_uint(resp, COAP_OPTION_MAXAGE, UPLINK_RETRY_S);
	if (diag)
		coap_add_data(resp, strlen(diag), (const uint8_t *)diag);
}

static void count_code(uint8_t code)
{
	switch (code) {
	case COAP_RESPONSE_CODE(204): stats_inc(STAT_RESP_2_04); break;
	case COAP_RESPONSE_CODE(400): stats_inc(STAT_RESP_4_00); break;
	case COAP_RESPONSE_CODE(401): stats_inc(STAT_RESP_4_01); break;
	case COAP_RESPONSE_CODE(404): stats_inc(STAT_RESP_4_04); break;
	case COAP_RESPONSE_CODE(405): stats_inc(STAT_RESP_4_05); break;
	case COAP_RESPONSE_CODE(413): stats_inc(STAT_RESP_4_13); break;
	case COAP_RESPONSE_CODE(503): stats_inc(STAT_RESP_5_03); break;
	default: break;
	}
}

static unsigned method_bit(coap_pdu_code_t code)
{
	switch (code) {
	case COAP_REQUEST_CODE_GET: return CONF_M_GET;
	case COAP_REQUEST_CODE_POST: return CONF_M_POST;
	case COAP_REQUEST_CODE_PUT: return CONF_M_PUT;
	case COAP_REQUEST_CODE_DELETE: return CONF_M_DELETE;
	default: return 0;
	}
}

size_t uplink_path(const coap_pdu_t *req, struct route_seg *segs, size_t max)
{
	coap_opt_iterator_t oi;
	coap_opt_filter_t f;
	coap_opt_t *opt;
	size_t n = 0;

	coap_option_filter_clear(&f);
	coap_option_filter_set(&f, COAP_OPTION_URI_PATH);
	coap_option_iterator_init(req, &oi, &f);
	while ((opt = coap_option_next(&oi)) != NULL) {
		if (n == max)
			return 0;
		segs[n].s = (const char *)coap_opt_value(opt);
		segs[n].len = coap_opt_length(opt);
		n++;
	}
	return n;
}

void uplink_decide(const struct config *c, const coap_pdu_t *req, const char *identity,
		   struct uplink_decision *d)
{
	struct route_seg segs[ROUTE_MAX_SEGMENTS];
	size_t nseg = uplink_path(req, segs, ROUTE_MAX_SEGMENTS);
	unsigned m = method_bit(coap_pdu_get_code(req));
	int shape_matched = 0, bad_value = 0;

	d->route = NULL;
	d->code = COAP_RESPONSE_CODE(404);
	d->diag = "no route for this path";
	for (size_t i = 0; i < c->n_routes; i++) {
		const struct conf_route *r = &c->routes[i];
		enum route_result rr = route_match(r->route, segs, nseg, identity, d->topic,
						   sizeof(d->topic));

		if (rr == ROUTE_BAD_VALUE || rr == ROUTE_TOO_LONG) {
			bad_value = 1;
		} else if (rr == ROUTE_OK) {
			shape_matched = 1;
			if (r->methods & m) {
				d->route = r;
				d->code = COAP_RESPONSE_CODE(204);
				d->diag = NULL;
				return;
			}
		}
	}
	if (bad_value) {
		d->code = COAP_RESPONSE_CODE(400);
		d->diag = "bad path value: empty, not UTF-8, or holds / + # or NUL";
	} else if (shape_matched) {
		d->code = COAP_RESPONSE_CODE(405);
		d->diag = "method not allowed on this path";
	}
}

static int content_format(const coap_pdu_t *req)
{
	coap_opt_iterator_t oi;
	coap_opt_t *opt = coap_check_option(req, COAP_OPTION_CONTENT_FORMAT, &oi);

	if (!opt)
		return -1;
	return (int)coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));
}

static void pending_unlink(struct pending *p)
{
	if (p->prev)
		p->prev->next = p->next;
	else
		U.pending = p->next;
	if (p->next)
		p->next->prev = p->prev;
	U.n_pending--;
	U.n_acks -= p->broker ? 1 : 0;
}

/* The one way out of a pending reading: detached from the journal, session released. */
static void pending_free(struct pending *p)
{
	pending_unlink(p);
	journal_detach(p->seq);
	if (p->ex && exch_ctx(p->ex) == p)
		exch_set_ctx(p->ex, NULL);
	if (p->answer)
		coap_delete_pdu(p->answer);
	coap_session_release(p->session);
	free(p);
}

static int suppressed(unsigned no_response, uint8_t code)
{
	unsigned cls = code >> 5;

	return (cls == 2 && (no_response & 2)) || (cls == 4 && (no_response & 8)) ||
	       (cls == 5 && (no_response & 16));
}

/* Sends the answer a pending reading waited for: the deferred piggybacked ACK (ack: stored) or a
 * separate CON response (ack: broker, the empty ACK went out already), then frees it. */
static void pending_answer(struct pending *p, uint8_t code)
{
	coap_pdu_t *pdu = p->answer;

	count_code(code);
	if (p->ex)
		exch_set_code(p->ex, code);
	p->answer = NULL;
	if (coap_session_get_state(p->session) != COAP_SESSION_STATE_ESTABLISHED ||
	    suppressed(p->no_response, code)) {
		if (pdu)
			coap_delete_pdu(pdu);
		pending_free(p);
		return;
	}
	if (!pdu) {
		pdu = coap_pdu_init(COAP_MESSAGE_CON, code, coap_new_message_id(p->session),
				    coap_session_max_pdu_size(p->session));
		if (pdu)
			coap_add_token(pdu, p->token_len, p->token);
	}
	if (pdu) {
		if (code == COAP_RESPONSE_CODE(503))
			set_error(pdu, code, "cannot store now, retry after Max-Age");
		else
			coap_pdu_set_code(pdu, code);
		if (coap_send(p->session, pdu) == COAP_INVALID_MID)
			log_src(dev_session_log(p->session), LOG_LVL_WARNING, "%s code=%u.%02u "
				"outcome=not-sent", p->who, code >> 5, code & 31);
		else if (p->broker)
			loop_kick();	/* a CON: libcoap's retransmission timer must run */
	}
	pending_free(p);
}

/* A 5.03 (limits, store errors, memory): logged at most once a minute, the rest counted (the line
 * says how many were not logged since the one before), since a device that retries makes one per
 * request. */
static void log_refusal(const char *who, const char *why)
{
	time_t now = time(NULL);

	if (now - U.last_refusal_log < 60) {
		U.refusals_unlogged++;
		return;
	}
	log_warn("%s code=5.03 reason=\"%s\" unlogged=%u", who, why, U.refusals_unlogged);
	U.last_refusal_log = now;
	U.refusals_unlogged = 0;
}

static void on_journal(void *arg, enum journal_event ev)
{
	struct pending *p = arg;

	switch (ev) {
	case JOURNAL_STORED:
		p->stored = 1;
		if (!p->broker || !mqtt_connected())
			pending_answer(p, COAP_RESPONSE_CODE(204));
		break;
	case JOURNAL_NOT_STORED:
		stats_inc(STAT_PUBLISH_FAILED);
		log_refusal(p->who, journal_refusal());
		pending_answer(p, COAP_RESPONSE_CODE(503));
		break;
	case JOURNAL_DELIVERED:
		pending_answer(p, COAP_RESPONSE_CODE(204));
		break;
	}
}

/* The one way an immediate answer leaves: the code (errors with a diagnostic, 5.03 with
 * Max-Age), counted, remembered for retransmissions, and logged (why: the reason logged, NULL =
 * diag; for a 2.04 the topic it went to, logged at debug level only). */
static void reply(coap_pdu_t *resp, coap_session_t *s, struct dev_sess *dev, coap_mid_t mid,
		  struct exch *ex, uint8_t code, const char *diag, const char *why)
{
	char peer[64], who[160];
	const char *p = dev ? dev_sess_peer(dev) : pdu_peer(s, peer, sizeof(peer));
	const char *id = dev ? dev_sess_identity(dev) : "?";

	if (code == COAP_RESPONSE_CODE(204))
		coap_pdu_set_code(resp, code);
	else
		set_error(resp, code, diag);
	count_code(code);
	if (ex)
		exch_set_code(ex, code);
	snprintf(who, sizeof(who), "peer=%s identity=%s mid=%u", p, id, (unsigned)mid);
	if (code == COAP_RESPONSE_CODE(503))
		log_refusal(who, why ? why : diag);
	else if (code != COAP_RESPONSE_CODE(204) && dev)
		log_src(dev_sess_log(dev), LOG_LVL_INFO, "%s code=%u.%02u reason=\"%s\"", who,
			code >> 5, code & 31, why ? why : diag);
	else if (code != COAP_RESPONSE_CODE(204))
		log_info("%s code=%u.%02u reason=\"%s\"", who, code >> 5, code & 31, why ? why : diag);
	else
		log_debug("%s code=2.04 topic=%s", who, why ? why : "-");
}

static unsigned no_response_bits(const coap_pdu_t *req)
{
	coap_opt_iterator_t oi;
	coap_opt_t *opt = coap_check_option(req, COAP_OPTION_NORESPONSE, &oi);

	return opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : 0;
}

/* A reading for the journal; returns 0 when it is pending (the answer follows), else the code. */
static uint8_t take_durable(coap_session_t *s, struct dev_sess *dev, const coap_pdu_t *req,
			    coap_pdu_t *resp, const struct mqtt_msg *m, struct exch *ex, int broker,
			    const char **why)
{
	struct pending *p = calloc(1, sizeof(*p));
	coap_bin_const_t tok = coap_pdu_get_token(resp);

	*why = "gateway out of memory";
	if (!p)
		return COAP_RESPONSE_CODE(503);
	p->broker = broker && coap_pdu_get_type(req) == COAP_MESSAGE_CON;
	if (p->broker && U.n_acks >= (size_t)U.conf->mqtt.max_pending_acks) {
		free(p);
		*why = "mqtt.max_pending_acks readings wait for the broker's PUBACK";
		stats_inc(STAT_ACKS_FULL);
		return COAP_RESPONSE_CODE(503);
	}
	if (!p->broker) {
		/* answered once stored: libcoap's response, held back until then */
		p->answer = coap_pdu_duplicate(resp, s, tok.length, tok.s, NULL);
		if (!p->answer) {
			free(p);
			return COAP_RESPONSE_CODE(503);
		}
		if (coap_pdu_get_type(resp) == COAP_MESSAGE_ACK)
			coap_pdu_set_mid(p->answer, coap_pdu_get_mid(resp));
	}
	if (journal_append(m, on_journal, p, &p->seq) != JOURNAL_TAKEN) {
		*why = journal_refusal();
		if (p->answer)
			coap_delete_pdu(p->answer);
		free(p);
		return COAP_RESPONSE_CODE(503);
	}
	p->session = coap_session_reference(s);
	p->ex = ex;
	p->token_len = tok.length <= sizeof(p->token) ? tok.length : sizeof(p->token);
	memcpy(p->token, tok.s, p->token_len);
	p->no_response = coap_pdu_get_type(req) == COAP_MESSAGE_NON ? no_response_bits(req) : 0;
	snprintf(p->who, sizeof(p->who), "peer=%s identity=%s mid=%u", dev_sess_peer(dev),
		 dev_sess_identity(dev), (unsigned)coap_pdu_get_mid(req));
	if (ex)
		exch_set_ctx(ex, p);
	p->next = U.pending;
	if (U.pending)
		U.pending->prev = p;
	U.pending = p;
	U.n_pending++;
	U.n_acks += p->broker ? 1 : 0;
	coap_pdu_defer_response(resp);
	if (p->broker)
		coap_send_ack(s, req);	/* empty ACK now, 2.04 once the broker has it */
	return 0;
}

/* A retransmitted CON: the first answer again, or nothing yet while the first is pending. */
static void answer_again(coap_session_t *s, struct dev_sess *dev, const coap_pdu_t *req,
			 coap_pdu_t *resp, struct exch *ex)
{
	uint8_t code = exch_code(ex);
	struct pending *p = exch_ctx(ex);

	stats_inc(STAT_DUPLICATES);
	log_debug("peer=%s identity=%s mid=%u code=%u.%02u duplicate=yes", dev_sess_peer(dev),
		  dev_sess_identity(dev), (unsigned)coap_pdu_get_mid(req), code >> 5, code & 31);
	if (code) {
		if (code == COAP_RESPONSE_CODE(503))
			set_error(resp, code, "cannot accept now, retry after Max-Age");
		else
			coap_pdu_set_code(resp, code);
		return;
	}
	coap_pdu_defer_response(resp);
	if (p && p->session != s) {
		/* the device came back on a new session (rebinding, re-handshake): answer there */
		coap_session_release(p->session);
		p->session = coap_session_reference(s);
	}
	if (p && p->broker)
		coap_send_ack(s, req);
}

/* The key exchanges are remembered by: the device identity, or the address for NoSec. */
static const char *exch_key(coap_session_t *s, struct dev_sess *dev, char *buf, size_t len)
{
	if (coap_session_get_proto(s) == COAP_PROTO_DTLS || dev_sess_oscore(dev))
		return dev_sess_identity(dev);
	snprintf(buf, len, "@%s", dev_sess_peer(dev));
	return buf;
}

/* Who the request speaks for, by its protection: the DTLS identity; the device whose OSCORE
 * context verified it; or nobody (NoSec, where the listener takes it). NULL, or why it is
 * refused (4.01). */
static const char *protection(coap_session_t *s, struct dev_sess *dev)
{
	const struct key_entry *e = oscore_request(s, loop_keys());
	unsigned modes;

	if (e)
		return (coap_session_get_proto(s) == COAP_PROTO_DTLS ||
			(loop_session_modes(s) & CONF_MODE_OSCORE)) ?
		       dev_oscore_request(dev, e) : "this listener does not take OSCORE";
	if (coap_session_get_proto(s) == COAP_PROTO_DTLS)
		return NULL;
	if (coap_session_get_oscore_recipient_id(s))
		return "its OSCORE context is no longer listed";
	modes = loop_session_modes(s);
	if (!(modes & CONF_MODE_NOSEC))
		return "this listener takes OSCORE-protected requests only";
	if (dev_sess_oscore(dev))
		return "an unprotected request from an address whose device speaks OSCORE";
	return NULL;
}

static void on_request(coap_resource_t *res, coap_session_t *s, const coap_pdu_t *req,
		       const coap_string_t *query, coap_pdu_t *resp)
{
	struct dev_sess *dev = dev_sess_get(s);
	struct uplink_decision d;
	struct mqtt_msg m;
	struct exch *ex = NULL;
	const uint8_t *data = NULL;
	size_t len = 0, offset = 0, total = 0;
	int con = coap_pdu_get_type(req) == COAP_MESSAGE_CON;
	coap_mid_t mid = coap_pdu_get_mid(req);
	char keybuf[80];
	const char *key;
	coap_bin_const_t tok;
	const char *why;
	uint8_t code;

	(void)res;
	(void)query;
	stats_inc(STAT_REQUESTS);
	if (!dev) {
		reply(resp, s, NULL, mid, NULL, COAP_RESPONSE_CODE(503), "gateway out of memory", NULL);
		return;
	}
	if ((why = protection(s, dev)) != NULL) {
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(401), "unauthorized", why);
		return;
	}
	if ((why = dev_sess_refused(dev)) != NULL) {
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(401), "identity revoked", why);
		return;
	}
	key = exch_key(s, dev, keybuf, sizeof(keybuf));
	tok = coap_pdu_get_token(req);
	if (con && (ex = exch_find(key, (uint16_t)mid, tok.s, tok.length)) != NULL) {
		answer_again(s, dev, req, resp, ex);
		return;
	}
	if (con && (ex = exch_add(key, (uint16_t)mid, tok.s, tok.length)) == NULL) {
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(503),
		      "too many requests, retry after Max-Age",
		      "too many exchanges of this device in the last 247 s");
		return;
	}
	uplink_decide(U.conf, req, dev_sess_identity(dev), &d);
	coap_get_data_large(req, &len, &data, &offset, &total);
	if (d.route && total > U.conf->coap.max_payload) {
		pdu_add_uint(resp, COAP_OPTION_SIZE1, (unsigned)U.conf->coap.max_payload);
		reply(resp, s, dev, mid, ex, COAP_RESPONSE_CODE(413), "payload too large", NULL);
		return;
	}
	if (!d.route) {
		reply(resp, s, dev, mid, ex, d.code, d.diag, NULL);
		return;
	}
	m = (struct mqtt_msg){ .topic = d.topic, .payload = data, .len = len, .qos = d.route->qos,
			       .retain = d.route->retain, .content_format = content_format(req),
			       .identity = dev_sess_identity(dev) };
	if (d.route->qos > 0) {
		code = take_durable(s, dev, req, resp, &m, ex, d.route->ack == CONF_ACK_BROKER, &why);
		if (code == 0) {
			stats_inc(STAT_PUBLISHED);
			return;		/* answered once stored (or delivered) */
		}
		reply(resp, s, dev, mid, ex, code, "cannot accept now, retry after Max-Age", why);
		return;
	}
	switch (mqtt_publish(&m, NULL, NULL)) {
	case MQTT_SEND_OK:
		stats_inc(STAT_PUBLISHED);
		reply(resp, s, dev, mid, ex, COAP_RESPONSE_CODE(204), NULL, d.topic);
		break;
	case MQTT_SEND_FULL:
		reply(resp, s, dev, mid, ex, COAP_RESPONSE_CODE(503),
		      "cannot accept now, retry after Max-Age",
		      "MQTT client buffer full (broker away or slow)");
		break;
	default:
		reply(resp, s, dev, mid, ex, COAP_RESPONSE_CODE(503),
		      "cannot accept now, retry after Max-Age", "the MQTT client refused the message");
		break;
	}
}

int uplink_block1_start(coap_session_t *s, const coap_pdu_t *req, unsigned in_progress,
			coap_pdu_t *resp)
{
	struct dev_sess *dev = dev_sess_get(s);
	coap_mid_t mid = coap_pdu_get_mid(req);
	struct uplink_decision d;
	const char *revoked;
	char why[80];

	if (!dev) {
		reply(resp, s, NULL, mid, NULL, COAP_RESPONSE_CODE(503), "gateway out of memory",
		      NULL);
		return 0;
	}
	if ((revoked = protection(s, dev)) != NULL) {
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(401), "unauthorized", revoked);
		return 0;
	}
	if ((revoked = dev_sess_refused(dev)) != NULL) {
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(401), "identity revoked", revoked);
		return 0;
	}
	uplink_decide(U.conf, req, dev_sess_identity(dev), &d);
	if (!d.route) {
		stats_inc(STAT_UPLOAD_NO_ROUTE);
		reply(resp, s, dev, mid, NULL, d.code, d.diag, NULL);
		return 0;
	}
	if (in_progress >= UPLINK_MAX_UPLOADS) {
		stats_inc(STAT_UPLOAD_BUSY);
		snprintf(why, sizeof(why), "%u block-wise uploads of this device in progress",
			 in_progress);
		reply(resp, s, dev, mid, NULL, COAP_RESPONSE_CODE(503),
		      "too many uploads at once, retry after Max-Age", why);
		return 0;
	}
	return 1;
}

coap_resource_t *uplink_resource(const struct config *c)
{
	static const coap_request_t methods[] = {
		COAP_REQUEST_GET, COAP_REQUEST_POST, COAP_REQUEST_PUT, COAP_REQUEST_DELETE,
		COAP_REQUEST_FETCH, COAP_REQUEST_PATCH, COAP_REQUEST_IPATCH,
	};
	coap_resource_t *r;

	U.conf = c;
	r = coap_resource_unknown_init2(on_request, 0);
	if (!r)
		return NULL;
	for (size_t i = 1; i < sizeof(methods) / sizeof(methods[0]); i++)
		coap_register_request_handler(r, methods[i], on_request);
	coap_register_request_handler(r, methods[0], on_request);
	return r;
}

void uplink_set_config(const struct config *c)
{
	U.conf = c;
}

void uplink_mqtt_state(int connected)
{
	struct pending *p, *next;

	if (connected)
		return;
	/* ack: broker readings already stored are answered now instead of after the PUBACK */
	for (p = U.pending; p; p = next) {
		next = p->next;
		if (p->broker && p->stored)
			pending_answer(p, COAP_RESPONSE_CODE(204));
	}
}

size_t uplink_pending(void)
{
	return U.n_pending;
}

size_t uplink_pending_acks(void)
{
	return U.n_acks;
}

void uplink_shutdown(void)
{
	struct pending *p, *next;

	/* stored readings are safe (delivered at the next start): 2.04, not a failure */
	for (p = U.pending; p; p = next) {
		next = p->next;
		if (p->stored)
			pending_answer(p, COAP_RESPONSE_CODE(204));
		else
			pending_free(p);
	}
}
