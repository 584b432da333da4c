/* uplink.c: one handler for every device request: route it, hand it to mqtt, answer the device
 * once the reading is safe — piggybacked for `ack: stored`, separately after the PUBACK for
 * `ack: broker`. Every CoAP error code the gateway sends is chosen here. */
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "device.h"
#include "log.h"
#include "loop.h"
#include "mqtt.h"
#include "route.h"
#include "stats.h"
#include "uplink.h"

#define UPLINK_RETRY_S 30	/* Max-Age on 5.03: when the device should try again */

/* A CON reading on an `ack: broker` route waiting for its PUBACK. */
struct pending {
	coap_session_t *session;	/* referenced while pending */
	coap_async_t *async;		/* libcoap answered the CON with an empty ACK */
	uint8_t token[8];
	size_t token_len;
	coap_mid_t mid;
	int answered;
	struct pending *prev, *next;
};

static struct {
	const struct config *conf;
	struct pending *pending;
	size_t n_pending;
} U;

static void set_error(coap_pdu_t *resp, uint8_t code, const char *diag)
{
	coap_pdu_set_code(resp, code);
	if (code == COAP_RESPONSE_CODE(503)) {
		uint8_t buf[4];

		coap_add_option(resp, COAP_OPTION_MAXAGE,
				coap_encode_var_safe(buf, sizeof(buf), UPLINK_RETRY_S), buf);
	}
	if (diag)
		coap_add_data(resp, strlen(diag), (const uint8_t *)diag);
}

static void count_code(uint8_t code)
{
	switch (code) {
	case COAP_RESPONSE_CODE(204): stats_inc(STAT_RESP_2_04); break;
	case COAP_RESPONSE_CODE(400): stats_inc(STAT_RESP_4_00); break;
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
}

/* The separate response for an `ack: broker` reading (libcoap sent the empty ACK already). */
static void pending_answer(struct pending *p, uint8_t code)
{
	coap_pdu_t *pdu;
	struct dev_sess *dev;

	if (p->answered)
		return;
	p->answered = 1;
	count_code(code);
	dev = dev_sess_get(p->session);
	if (dev)
		dev_dedup_store(dev, p->mid, code);
	if (coap_session_get_state(p->session) != COAP_SESSION_STATE_ESTABLISHED)
		return;
	pdu = coap_pdu_init(COAP_MESSAGE_CON, code, coap_new_message_id(p->session),
			    coap_session_max_pdu_size(p->session));
	if (!pdu)
		return;
	coap_add_token(pdu, p->token_len, p->token);
	if (code == COAP_RESPONSE_CODE(503)) {
		uint8_t buf[4];

		coap_add_option(pdu, COAP_OPTION_MAXAGE,
				coap_encode_var_safe(buf, sizeof(buf), UPLINK_RETRY_S), buf);
	}
	if (coap_send(p->session, pdu) == COAP_INVALID_MID)
		log_warn("peer=%s identity=%s separate response not sent", dev ? dev_sess_peer(dev) : "?",
			 dev ? dev_sess_identity(dev) : "?");
	loop_kick();
}

static void pending_free(struct pending *p)
{
	pending_unlink(p);
	if (p->async)
		coap_free_async(p->session, p->async);
	coap_session_release(p->session);
	free(p);
}

static void on_broker_done(void *arg, enum mqtt_status st)
{
	struct pending *p = arg;

	if (st == MQTT_FAILED) {
		stats_inc(STAT_PUBLISH_FAILED);
		pending_answer(p, COAP_RESPONSE_CODE(503));
	} else {
		/* delivered, or (shutdown) kept in the persistent store for the next start */
		pending_answer(p, COAP_RESPONSE_CODE(204));
	}
	pending_free(p);
}

static void on_stored_done(void *arg, enum mqtt_status st)
{
	(void)arg;
	if (st == MQTT_FAILED)
		stats_inc(STAT_PUBLISH_FAILED);
}

/* Publishes and waits for the PUBACK; returns 0 when the answer is left to on_broker_done. */
static int publish_await(coap_session_t *s, const coap_pdu_t *req, const struct mqtt_msg *m)
{
	struct pending *p = calloc(1, sizeof(*p));
	coap_bin_const_t tok = coap_pdu_get_token(req);

	if (!p)
		return -1;
	p->async = coap_register_async(s, req, 0);
	if (!p->async) {
		free(p);
		return -1;
	}
	p->session = coap_session_reference(s);
	p->token_len = tok.length <= sizeof(p->token) ? tok.length : sizeof(p->token);
	memcpy(p->token, tok.s, p->token_len);
	p->mid = coap_pdu_get_mid(req);
	p->next = U.pending;
	if (U.pending)
		U.pending->prev = p;
	U.pending = p;
	U.n_pending++;
	if (mqtt_publish(m, on_broker_done, p) != MQTT_SEND_OK) {
		pending_free(p);
		return -1;
	}
	return 0;
}

static void on_request(coap_resource_t *res, coap_session_t *s, const coap_pdu_t *req,
		       const coap_string_t *query, coap_pdu_t *resp)
{
	struct dev_sess *dev = dev_sess_get(s);
	struct uplink_decision d;
	struct mqtt_msg m;
	const uint8_t *data = NULL;
	size_t len = 0, offset = 0, total = 0;
	int con = coap_pdu_get_type(req) == COAP_MESSAGE_CON;
	coap_mid_t mid = coap_pdu_get_mid(req);
	uint8_t code;

	(void)res;
	(void)query;
	stats_inc(STAT_REQUESTS);
	if (!dev) {
		set_error(resp, COAP_RESPONSE_CODE(503), "gateway out of memory");
		return;
	}
	if (con && (code = dev_dedup_find(dev, mid)) != 0) {
		/* retransmission of a CON already handled: same answer, nothing published again */
		stats_inc(STAT_DUPLICATES);
		coap_pdu_set_code(resp, code);
		log_debug("peer=%s identity=%s mid=%u duplicate answered %u.%02u", dev_sess_peer(dev),
			  dev_sess_identity(dev), (unsigned)mid, code >> 5, code & 31);
		return;
	}
	uplink_decide(U.conf, req, dev_sess_identity(dev), &d);
	coap_get_data_large(req, &len, &data, &offset, &total);
	if (d.route && total > U.conf->coap.max_payload) {
		uint8_t buf[4];

		d.code = COAP_RESPONSE_CODE(413);
		d.diag = "payload too large";
		coap_add_option(resp, COAP_OPTION_SIZE1,
				coap_encode_var_safe(buf, sizeof(buf), (unsigned)U.conf->coap.max_payload),
				buf);
		d.route = NULL;
	}
	if (!d.route) {
		set_error(resp, d.code, d.diag);
		count_code(d.code);
		if (con)
			dev_dedup_store(dev, mid, d.code);
		log_info("peer=%s identity=%s mid=%u refused %u.%02u: %s", dev_sess_peer(dev), dev_sess_identity(dev),
			 (unsigned)mid, d.code >> 5, d.code & 31, d.diag);
		return;
	}
	m = (struct mqtt_msg){ .topic = d.topic, .payload = data, .len = len, .qos = d.route->qos,
			       .retain = d.route->retain, .content_format = content_format(req),
			       .identity = dev_sess_identity(dev) };
	if (con && d.route->ack == CONF_ACK_BROKER && mqtt_connected()) {
		if (publish_await(s, req, &m) == 0) {
			stats_inc(STAT_PUBLISHED);
			return;		/* code stays 0: libcoap sends the empty ACK */
		}
		code = COAP_RESPONSE_CODE(503);
	} else {
		switch (mqtt_publish(&m, on_stored_done, NULL)) {
		case MQTT_SEND_OK:
			stats_inc(STAT_PUBLISHED);
			code = COAP_RESPONSE_CODE(204);
			break;
		case MQTT_SEND_FULL:
			log_warn("peer=%s identity=%s topic=%s refused 5.03: buffer full (%zu readings "
				 "waiting for the broker); raise mqtt.max_buffered or check the broker",
				 dev_sess_peer(dev), dev_sess_identity(dev), d.topic, mqtt_outstanding());
			code = COAP_RESPONSE_CODE(503);
			break;
		default:
			code = COAP_RESPONSE_CODE(503);
			break;
		}
	}
	if (code == COAP_RESPONSE_CODE(503))
		set_error(resp, code, "cannot accept now, retry after Max-Age");
	else
		coap_pdu_set_code(resp, code);
	count_code(code);
	if (con)
		dev_dedup_store(dev, mid, code);
	log_debug("peer=%s identity=%s mid=%u topic=%s bytes=%zu %u.%02u", dev_sess_peer(dev),
		  dev_sess_identity(dev), (unsigned)mid, d.topic, len, code >> 5, code & 31);
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
	if (connected)
		return;
	/* the readings are in the persistent store: answer now instead of after the PUBACK */
	for (struct pending *p = U.pending; p; p = p->next)
		pending_answer(p, COAP_RESPONSE_CODE(204));
}

size_t uplink_pending(void)
{
	return U.n_pending;
}

void uplink_shutdown(void)
{
	while (U.pending)
		pending_free(U.pending);
}
