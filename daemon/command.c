/* command.c: MQTT → CoAP. A message on a command topic becomes a CON request on the device's live
 * session (NSTART 1: one outstanding request per device, the rest queued in order, each bounded by
 * its ttl); the response, or an error when there is none, is published to the response topic. */
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "command.h"
#include "config.h"
#include "device.h"
#include "hmap.h"
#include "log.h"
#include "loop.h"
#include "mqtt.h"
#include "pdu.h"
#include "route.h"
#include "stats.h"

#define CMD_TOKEN_LEN 8
#define CMD_MAX_PER_DEVICE 256		/* queued commands per device */
#define CMD_MAX_TOTAL 100000		/* queued commands in all */
#define CMD_MAX_DEVICE_BYTES (64 * 1024)	/* payloads queued for one device */
#define CMD_MAX_TOTAL_BYTES (16 * 1024 * 1024)	/* payloads queued in all */

/* Where a command's answer goes (also for a command refused before it was queued). */
struct cmd_to {
	struct device *dev;
	char path[ROUTE_MAX_TOPIC];
	char resp_topic[ROUTE_MAX_TOPIC];	/* "" = nowhere to answer */
	int qos;
	const void *corr;			/* MQTT 5 Correlation Data, echoed */
	size_t corr_len;
};

struct cmd {
	struct cmd_to to;
	coap_pdu_code_t method;
	int content_format;
	uint8_t *payload;
	size_t len;
	uint8_t *corr;				/* owns to.corr */
	uint8_t token[CMD_TOKEN_LEN];
	coap_session_t *session;		/* set once sent */
	unsigned timeout;			/* s for the answer once sent */
	struct event *ttl_timer;		/* queued: ttl; sent: timeout */
	struct cmd *next;
};

struct cmdq {
	struct cmd *head, *tail;	/* head is in flight when head->session is set */
	size_t n;
	size_t bytes;			/* payloads and correlation data queued */
};

static struct {
	const struct config *conf;
	struct route **path_routes;	/* per rule: topic pattern → "{rest+}" (the Uri-Path) */
	size_t n_routes;
	struct hmap *by_token;
	size_t queued;
	size_t bytes;			/* payloads and correlation data of every queued command */
	struct log_budget refused;	/* lines about refused commands (their publishers cause them) */
} C;

size_t command_queued(void)
{
	return C.queued;
}

static struct cmdq *queue_of(struct device *d, int create)
{
	struct cmdq **slot = (struct cmdq **)dev_command_slot(d);

	if (!*slot && create)
		*slot = calloc(1, sizeof(**slot));
	return *slot;
}

/* ---- answers to MQTT ---- */

static void answer(const struct cmd_to *to, const char *code, const void *data, size_t len, int cf)
{
	struct mqtt_msg m;

	if (!to->resp_topic[0]) {
		log_src(dev_log(to->dev), LOG_LVL_INFO, "peer=%s identity=%s path=/%s "
			"command=answered code=%s outcome=not-published reason=\"no response topic\"",
			dev_peer(to->dev), dev_identity(to->dev), to->path, code);
		return;
	}
	m = (struct mqtt_msg){ .topic = to->resp_topic, .payload = data, .len = len, .qos = to->qos,
			       .content_format = cf, .identity = dev_identity(to->dev),
			       .coap_code = code, .correlation = to->corr,
			       .correlation_len = to->corr_len };
	if (mqtt_publish(&m, NULL, NULL) != MQTT_SEND_OK) {
		stats_inc(STAT_DROPPED);
		log_src(dev_log(to->dev), LOG_LVL_WARNING, "peer=%s identity=%s path=/%s "
			"command=answered code=%s outcome=dropped topic=%s reason=\"MQTT buffer "
			"full\"", dev_peer(to->dev), dev_identity(to->dev), to->path, code,
			to->resp_topic);
	}
}

static void answer_error(const struct cmd_to *to, const char *code, const char *why)
{
	char text[160];

	snprintf(text, sizeof(text), "%s %s", code, why);
	log_src(dev_log(to->dev), LOG_LVL_WARNING, "peer=%s identity=%s path=/%s command=failed "
		"code=%s reason=\"%s\"", dev_peer(to->dev), dev_identity(to->dev), to->path, code,
		why);
	stats_inc(STAT_COMMAND_ERRORS);
	answer(to, code, text, strlen(text), 0);
}

/* ---- queue ---- */

static void cmd_free(struct cmd *c)
{
	hmap_del(C.by_token, c->token, sizeof(c->token));
	if (c->ttl_timer)
		event_free(c->ttl_timer);
	free(c->payload);
	free(c->corr);
	C.bytes -= c->len + c->to.corr_len;
	free(c);
	C.queued--;
}

static void unlink_cmd(struct cmdq *q, struct cmd *c)
{
	struct cmd **pp = &q->head, *prev = NULL;

	for (; *pp; prev = *pp, pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			if (q->tail == c)
				q->tail = prev;
			q->n--;
			q->bytes -= c->len + c->to.corr_len;
			return;
		}
}

static void send_next(struct device *d);

/* Every command ends here. code != NULL: it failed, and the error is published to its response
 * topic (code NULL: the device's answer already was). It leaves its queue and is freed; with
 * next, the device's next command is sent (not when the device's session is going away). */
static void cmd_done(struct cmd *c, const char *code, const char *why, int next)
{
	struct device *d = c->to.dev;
	struct cmdq *q = queue_of(d, 0);

	if (code)
		answer_error(&c->to, code, why);
	if (q)
		unlink_cmd(q, c);
	cmd_free(c);
	if (next)
		send_next(d);
}

static void on_ttl(evutil_socket_t fd, short what, void *arg)
{
	struct cmd *c = arg;

	(void)fd;
	(void)what;
	if (c->session) {
		/* sent and acknowledged, perhaps, but never answered: libcoap forgets such a
		 * request without telling; the device's next command must not wait behind it */
		cmd_done(c, "5.04", "no response", 1);
		return;
	}
	cmd_done(c, "5.04", dev_session(c->to.dev) ? "timeout: queued behind other commands" :
		 "device offline", 0);
}

static int cmd_send(struct cmd *c, coap_session_t *s)
{
	coap_pdu_t *pdu = coap_new_pdu(COAP_MESSAGE_CON, c->method, s);
	struct timeval tv = { 0, 0 };

	if (!pdu)
		return -1;
	pdu_token(c->token, sizeof(c->token));
	coap_add_token(pdu, sizeof(c->token), c->token);
	pdu_add_path(pdu, c->to.path);
	if (c->content_format >= 0)
		pdu_add_uint(pdu, COAP_OPTION_CONTENT_FORMAT, (unsigned)c->content_format);
	/* only when block-wise is needed anyway: Block options are critical (RFC 7959 §2.1) */
	if (c->len > loop_block_size())
		pdu_add_block_size(pdu, COAP_OPTION_BLOCK1, loop_block_size());
	/* larger than one datagram: libcoap sends it block-wise (RFC 7959 Block1) */
	if (c->len && !coap_add_data_large_request(s, pdu, c->len, c->payload, NULL, NULL)) {
		coap_delete_pdu(pdu);
		return -1;
	}
	if (hmap_put(C.by_token, c->token, sizeof(c->token), c) < 0) {
		coap_delete_pdu(pdu);
		return -1;
	}
	if (coap_send(s, pdu) == COAP_INVALID_MID) {
		hmap_del(C.by_token, c->token, sizeof(c->token));
		return -1;
	}
	c->session = s;
	tv.tv_sec = (time_t)c->timeout;
	evtimer_del(c->ttl_timer);
	evtimer_add(c->ttl_timer, &tv);
	loop_kick();
	return 0;
}

static void send_next(struct device *d)
{
	struct cmdq *q = queue_of(d, 0);
	coap_session_t *s = dev_session(d);

	while (q && q->head && !q->head->session && s) {
		struct cmd *c = q->head;

		if (cmd_send(c, s) == 0) {
			stats_inc(STAT_COMMANDS);
			log_debug("peer=%s identity=%s path=/%s command=sent", dev_peer(d),
				  dev_identity(d), c->to.path);
			return;
		}
		cmd_done(c, "5.00", "could not send the request", 0);
	}
}

/* ---- MQTT in ---- */

static coap_pdu_code_t method_code(unsigned m)
{
	switch (m) {
	case CONF_M_GET: return COAP_REQUEST_CODE_GET;
	case CONF_M_POST: return COAP_REQUEST_CODE_POST;
	case CONF_M_DELETE: return COAP_REQUEST_CODE_DELETE;
	default: return COAP_REQUEST_CODE_PUT;
	}
}

/* Why a command's own MQTT 5 Response Topic t is not used, or NULL when it is: the gateway
 * would publish its answer there with its own credentials, so t must fit one of the command's
 * response_topics and be none of the topics the gateway takes commands from or publishes
 * readings, notifications, presence, status or metrics on. */
static const char *response_refusal(const struct conf_command *r, const char *t)
{
	const struct config *c = C.conf;
	size_t i;

	if (!*t || strlen(t) >= ROUTE_MAX_TOPIC || strpbrk(t, "+#"))
		return "not a topic name";
	for (i = 0; i < r->n_response_topics; i++)
		if (route_filter_matches(r->response_topics[i], t))
			break;
	if (i == r->n_response_topics)
		return "not in the command's response_topics";
	for (i = 0; i < c->n_commands; i++)
		if (route_filter_matches(c->commands[i].filter, t))
			return "a topic the gateway takes commands from";
	for (i = 0; i < c->n_routes; i++)
		if (route_template_covers(c->routes[i].topic, t))
			return "a topic the gateway publishes readings on";
	for (i = 0; i < c->n_observe; i++)
		if (route_template_covers(c->observe[i].topic, t))
			return "a topic the gateway publishes notifications on";
	if ((c->presence_topic && route_template_covers(c->presence_topic, t)) ||
	    (c->mqtt.status_topic && strcmp(c->mqtt.status_topic, t) == 0) ||
	    (c->metrics.topic && strcmp(c->metrics.topic, t) == 0))
		return "a topic the gateway publishes its own state on";
	return NULL;
}

static struct cmd *cmd_new(const struct cmd_to *to, const struct conf_command *r,
			   const struct mqtt_in *m)
{
	struct cmd *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	C.queued++;
	c->to = *to;
	c->len = m->len;
	C.bytes += c->len + c->to.corr_len;	/* cmd_free() takes it back, whatever happens */
	c->method = method_code(r->method);
	c->timeout = r->timeout;
	c->content_format = mqtt_content_format(m->content_type);
	c->payload = m->len ? malloc(m->len) : NULL;
	c->corr = m->correlation_len ? malloc(m->correlation_len) : NULL;
	c->ttl_timer = evtimer_new(loop_base(), on_ttl, c);
	if ((m->len && !c->payload) || (m->correlation_len && !c->corr) || !c->ttl_timer) {
		cmd_free(c);
		return NULL;
	}
	if (m->len)
		memcpy(c->payload, m->payload, m->len);
	if (c->corr)
		memcpy(c->corr, m->correlation, m->correlation_len);
	c->to.corr = c->corr;
	return c;
}

static void enqueue(struct device *d, const struct conf_command *r, const struct mqtt_in *m,
		    const char *path, const char *resp)
{
	struct cmdq *q = queue_of(d, 1);
	struct cmd *c;
	struct timeval tv = { (time_t)r->ttl, 0 };
	struct cmd_to to = { .dev = d, .qos = r->qos, .corr = m->correlation,
			     .corr_len = m->correlation_len };

	size_t bytes = m->len + m->correlation_len;

	snprintf(to.path, sizeof(to.path), "%s", path);
	snprintf(to.resp_topic, sizeof(to.resp_topic), "%s", resp);
	if (m->len > r->max_payload) {
		answer_error(&to, "4.13", "payload over the command's max_payload");
		return;
	}
	/* what a publisher can make the gateway hold is bounded, per device and in all */
	if (!q || q->n >= CMD_MAX_PER_DEVICE || C.queued >= CMD_MAX_TOTAL ||
	    q->bytes + bytes > CMD_MAX_DEVICE_BYTES || C.bytes + bytes > CMD_MAX_TOTAL_BYTES ||
	    (c = cmd_new(&to, r, m)) == NULL) {
		answer_error(&to, "5.03", "command queue full");
		return;
	}
	if (!dev_session(d) && r->ttl == 0) {
		cmd_done(c, "5.04", "device offline", 0);
		return;
	}
	evtimer_add(c->ttl_timer, &tv);
	if (q->tail)
		q->tail->next = c;
	else
		q->head = c;
	q->tail = c;
	q->n++;
	q->bytes += bytes;
	send_next(d);
}

void command_on_message(const struct mqtt_in *m)
{
	struct route_seg segs[ROUTE_MAX_SEGMENTS], id;
	size_t n = route_split(m->topic, strlen(m->topic), segs, ROUTE_MAX_SEGMENTS);

	for (size_t i = 0; i < C.conf->n_commands && i < C.n_routes; i++) {
		const struct conf_command *r = &C.conf->commands[i];
		char resp[ROUTE_MAX_TOPIC], path[ROUTE_MAX_TOPIC];
		struct device *d;

		if (route_match_id(r->route, segs, n, &id, resp, sizeof(resp)) != ROUTE_OK ||
		    route_match_id(C.path_routes[i], segs, n, &id, path, sizeof(path)) != ROUTE_OK)
			continue;
		if (m->response_topic) {
			const char *why = response_refusal(r, m->response_topic);

			if (!why) {
				snprintf(resp, sizeof(resp), "%s", m->response_topic);
			} else if (r->response_topic) {
				log_src(&C.refused, LOG_LVL_WARNING, "topic=%s response_topic=\"%s\" "
					"command=redirected to=%s reason=\"%s\"", m->topic,
					m->response_topic, resp, why);
			} else {
				log_src(&C.refused, LOG_LVL_WARNING, "topic=%s response_topic=\"%s\" "
					"command=refused reason=\"%s; no response_topic is configured\"",
					m->topic, m->response_topic, why);
				return;
			}
		} else if (!r->response_topic) {
			resp[0] = '\0';
		}
		d = dev_find(id.s, id.len);
		if (!d) {
			log_src(&C.refused, LOG_LVL_WARNING, "topic=%s identity=\"%.*s\" "
				"command=refused reason=\"not a configured device\"", m->topic,
				(int)id.len, id.s);
			return;
		}
		enqueue(d, r, m, path, resp);
		return;
	}
	log_src(&C.refused, LOG_LVL_WARNING, "topic=%s command=refused reason=\"no command rule "
		"fits (bad identity or path value?)\"", m->topic);
}

/* ---- CoAP in ---- */

int command_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd)
{
	coap_bin_const_t tok = coap_pdu_get_token(rcvd);
	struct cmd *c = hmap_get(C.by_token, tok.s, tok.length);
	coap_pdu_code_t code = coap_pdu_get_code(rcvd);
	const uint8_t *data = NULL;
	size_t len = 0, off = 0, total = 0;
	coap_opt_iterator_t oi;
	coap_opt_t *cf;
	char cs[24];

	(void)sent;
	if (!c || c->session != s)
		return 0;
	if (pdu_partial_body(rcvd)) {
		cmd_done(c, "5.02", "the device's answer is over the limit the gateway fetches", 1);
		return 1;
	}
	coap_get_data_large(rcvd, &len, &data, &off, &total);
	cf = coap_check_option(rcvd, COAP_OPTION_CONTENT_FORMAT, &oi);
	snprintf(cs, sizeof(cs), "%u.%02u", code >> 5, code & 31);
	log_debug("peer=%s identity=%s path=/%s command=answered code=%s bytes=%zu",
		  dev_peer(c->to.dev), dev_identity(c->to.dev), c->to.path, cs, len);
	answer(&c->to, cs, data, len, cf ? (int)coap_decode_var_bytes(coap_opt_value(cf),
								     coap_opt_length(cf)) : -1);
	cmd_done(c, NULL, NULL, 1);
	return 1;
}

int command_nack(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason)
{
	coap_bin_const_t tok = coap_pdu_get_token(sent);
	struct cmd *c = hmap_get(C.by_token, tok.s, tok.length);

	if (!c || c->session != s)
		return 0;
	cmd_done(c, "5.04", reason == COAP_NACK_TOO_MANY_RETRIES ? "timeout: no answer" :
		 reason == COAP_NACK_RST ? "reset by the device" : "not deliverable", 1);
	return 1;
}

void command_device_up(struct device *d)
{
	send_next(d);
}

void command_device_down(struct device *d, const char *reason)
{
	struct cmdq *q = queue_of(d, 0);

	/* the one in flight is lost with its session; queued ones wait for their ttl */
	if (q && q->head && q->head->session) {
		char why[64];

		snprintf(why, sizeof(why), "device disconnected (%s)", reason);
		cmd_done(q->head, "5.04", why, 0);
	}
}

/* ---- configuration ---- */

static void free_routes(void)
{
	for (size_t i = 0; i < C.n_routes; i++)
		route_free(C.path_routes[i]);
	free(C.path_routes);
	C.path_routes = NULL;
	C.n_routes = 0;
}

/* The Uri-Path is the topic's last {name+} value: compile topic → "{name+}" per rule. */
static int build_routes(const struct config *c)
{
	C.path_routes = calloc(c->n_commands ? c->n_commands : 1, sizeof(*C.path_routes));
	if (!C.path_routes)
		return -1;
	for (size_t i = 0; i < c->n_commands; i++) {
		const char *t = c->commands[i].topic, *last = strrchr(t, '{');
		char tmpl[80], why[300];
		struct route_error err;

		if (!last || strlen(last) >= sizeof(tmpl))
			return -1;
		snprintf(tmpl, sizeof(tmpl), "%s", last);
		C.path_routes[i] = route_compile2(t, tmpl, ROUTE_IDENTITY_VAR, &err);
		if (!C.path_routes[i]) {
			log_error("command topic %s: %s", t, route_error_str(&err, why, sizeof(why)));
			return -1;
		}
		C.n_routes++;
	}
	return 0;
}

static void subscribe(const struct config *c)
{
	char *filters[c->n_commands ? c->n_commands : 1];
	int qos[c->n_commands ? c->n_commands : 1];

	for (size_t i = 0; i < c->n_commands; i++) {
		filters[i] = c->commands[i].filter;
		qos[i] = c->commands[i].qos;
	}
	mqtt_set_subscriptions(filters, qos, c->n_commands);
}

int command_init(const struct config *c)
{
	C.conf = c;
	snprintf(C.refused.label, sizeof(C.refused.label), "source=\"commands refused\"");
	C.by_token = hmap_new();
	if (!C.by_token || build_routes(c) < 0)
		return -1;
	subscribe(c);
	return 0;
}

void command_set_config(const struct config *c)
{
	free_routes();
	C.conf = c;
	if (build_routes(c) < 0)
		log_error("reload: command rules could not be prepared; commands are refused");
	subscribe(c);
}

static void drain(struct device *d)
{
	struct cmdq *q = queue_of(d, 0);

	while (q && q->head)
		cmd_done(q->head, "5.03", "gateway stopping", 0);
	free(q);
	*dev_command_slot(d) = NULL;
}

void command_shutdown(void)
{
	dev_each(drain);
	free_routes();
	hmap_free(C.by_token);
	C.by_token = NULL;
}
