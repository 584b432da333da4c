/* device.c: devices by identity — the current session, presence on MQTT — and per-session state
 * (peer, handshake deadline), driven by libcoap session events. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "config.h"
#include "device.h"
#include "hmap.h"
#include "keys.h"
#include "log.h"
#include "loop.h"
#include "mqtt.h"
#include "pdu.h"
#include "stats.h"

/* A handshake not done this long after the identity was accepted is looked at: a device
 * Finished that did not decrypt means a wrong key; otherwise the link is slow or lossy (RFC 6347
 * retransmits from 1 s, doubling), the handshake goes on and is looked at again as often. */
#define DEV_HANDSHAKE_S 10

struct dev_sess {
	coap_session_t *session;
	struct device *dev;		/* set once established */
	char identity[KEYS_MAX_IDENTITY + 1];
	uint8_t rpk[KEYS_RPK_LEN];	/* the raw public key it authenticated with (has_rpk) */
	int has_rpk;
	int is_cert;			/* authenticated with a certificate */
	uint8_t *cert;			/* the certificate it authenticated with (DER), or NULL */
	size_t cert_len;
	char peer[64];
	coap_address_t addr;		/* the peer's address as peer shows it */
	int closed;			/* DTLS_CLOSED seen */
	struct event *hs_timer;		/* handshake deadline, armed once the identity is known */
	int hs_slow;			/* the deadline passed without a verdict (logged once) */
	struct device *owner;		/* the configured identity it claimed (handshake or done) */
	struct dev_sess *onext, *oprev;	/* the owner's sessions */
	struct event *close_ev;		/* a refused request: closed once the answer is out */
	struct key_oscore *oscore;	/* the OSCORE context its requests verified under, or NULL */
};

struct device {
	char identity[KEYS_MAX_IDENTITY + 1];
	struct dev_sess *cur;		/* established session, NULL when offline */
	void *observe, *command;	/* owned by observe.c / command.c */
	struct log_budget log;		/* the lines this device causes */
	struct dev_sess *sessions;	/* every session under this identity, handshakes included */
	struct event *idle_ev;		/* OSCORE: offline after coap.idle_timeout without a
					 * request that verified */
};

static struct {
	const struct config *conf;
	struct hmap *by_id;		/* identity → struct device */
	struct dev_hooks hooks;
	size_t n_sess, n_online;
	struct log_budget anon;		/* lines of sessions without a configured identity */
} D;

size_t dev_sessions(void)
{
	return D.n_sess;
}

size_t dev_online(void)
{
	return D.n_online;
}

int dev_init(const struct config *c, const struct dev_hooks *hooks)
{
	D.conf = c;
	D.hooks = *hooks;
	snprintf(D.anon.label, sizeof(D.anon.label), "identity=- source=\"sessions without a "
		 "configured identity\"");
	D.by_id = hmap_new();
	return D.by_id ? 0 : -1;
}

void dev_set_config(const struct config *c)
{
	D.conf = c;
}

/* ---- presence ---- */

static void presence(struct device *d, const char *state, const char *reason)
{
	char topic[ROUTE_MAX_TOPIC];
	struct mqtt_msg m;

	if (!D.conf->presence_route ||
	    route_match(D.conf->presence_route, NULL, 0, d->identity, topic, sizeof(topic)) != ROUTE_OK)
		return;
	m = (struct mqtt_msg){ .topic = topic, .payload = state, .len = strlen(state), .qos = 1,
			       .retain = 1, .content_format = 0, .identity = d->identity,
			       .reason = reason };
	if (mqtt_publish(&m, NULL, NULL) != MQTT_SEND_OK) {
		stats_inc(STAT_DROPPED);
		log_src(&d->log, LOG_LVL_WARNING, "peer=%s identity=%s presence=%s "
			"outcome=not-published reason=\"MQTT buffer full\"",
			d->cur ? d->cur->peer : "-", d->identity, state);
	}
}

/* ---- devices by identity ---- */

/* The device of a configured identity (made on first use), or with unlisted, of any identity
 * (a certificate that verified under coap.pki.allow_unlisted). */
static struct device *dev_lookup(const char *identity, size_t len, int unlisted)
{
	struct device *d;

	if (!D.by_id)
		return NULL;	/* after dev_shutdown(): what is torn down later finds no device */
	d = hmap_get(D.by_id, identity, len);

	if (d)
		return d;
	if (len > KEYS_MAX_IDENTITY || (!unlisted && !keys_find(loop_keys(), identity, len)))
		return NULL;
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	memcpy(d->identity, identity, len);
	snprintf(d->log.label, sizeof(d->log.label), "identity=%s", d->identity);
	if (hmap_put(D.by_id, identity, len, d) < 0) {
		free(d);
		return NULL;
	}
	return d;
}

struct device *dev_find(const char *identity, size_t len)
{
	return dev_lookup(identity, len, 0);
}

/* Sessions of certificates that verified may be devices nobody listed. */
static struct device *sess_device(const struct dev_sess *s)
{
	return dev_lookup(s->identity, strlen(s->identity),
			  s->is_cert && D.conf->coap.pki.allow_unlisted);
}

/* Every session that claims a configured identity is on that device's list, from the PSK
 * callback on, so that revoking the identity reaches all of them (dev_apply_keys). */
static void sess_attach(struct dev_sess *s)
{
	struct device *d;

	if (s->owner || (d = sess_device(s)) == NULL)
		return;
	s->owner = d;
	s->oprev = NULL;
	s->onext = d->sessions;
	if (d->sessions)
		d->sessions->oprev = s;
	d->sessions = s;
}

static void sess_detach(struct dev_sess *s)
{
	if (!s->owner)
		return;
	if (s->oprev)
		s->oprev->onext = s->onext;
	else
		s->owner->sessions = s->onext;
	if (s->onext)
		s->onext->oprev = s->oprev;
	s->owner = NULL;
	s->onext = s->oprev = NULL;
}

const char *dev_identity(const struct device *d)
{
	return d->identity;
}

coap_session_t *dev_session(const struct device *d)
{
	return d->cur ? d->cur->session : NULL;
}

const char *dev_peer(const struct device *d)
{
	return d->cur ? d->cur->peer : "-";
}

struct log_budget *dev_log(struct device *d)
{
	return &d->log;
}

struct log_budget *dev_sess_log(struct dev_sess *s)
{
	struct device *d = s->dev ? s->dev : dev_find(s->identity, strlen(s->identity));

	return d ? &d->log : &D.anon;
}

struct log_budget *dev_session_log(coap_session_t *s)
{
	struct dev_sess *d = coap_session_get_app_data(s);

	return d ? dev_sess_log(d) : &D.anon;
}

void **dev_observe_slot(struct device *d)
{
	return &d->observe;
}

void **dev_command_slot(struct device *d)
{
	return &d->command;
}

static void close_later(struct dev_sess *d);

static void dev_up(struct dev_sess *s)
{
	struct device *d = sess_device(s);

	if (!d) {
		/* no longer configured (dev_apply_keys closes such handshakes at the reload; this
		 * is the same rule for one that finished first) */
		close_later(s);
		return;
	}
	if (d->cur && d->cur != s) {
		log_src(&d->log, LOG_LVL_INFO, "peer=%s identity=%s session=replaced by=%s",
			d->cur->peer, d->identity, s->peer);
		d->cur->dev = NULL;
		if (D.hooks.down)
			D.hooks.down(d, "replaced");
	} else {
		D.n_online++;
	}
	d->cur = s;
	s->dev = d;
	presence(d, "online", NULL);
	if (D.hooks.up)
		D.hooks.up(d);
}

static void dev_down(struct dev_sess *s, const char *reason)
{
	struct device *d = s->dev;

	if (!d || d->cur != s)
		return;
	log_src(&d->log, LOG_LVL_INFO, "peer=%s identity=%s presence=offline reason=\"%s\"",
		s->peer, d->identity, reason);
	if (D.hooks.down)
		D.hooks.down(d, reason);
	d->cur = NULL;
	s->dev = NULL;
	D.n_online--;
	presence(d, "offline", reason);
}

/* ---- per-session state ---- */

static void sess_fill_identity(struct dev_sess *d)
{
	const coap_bin_const_t *id = coap_session_get_psk_identity(d->session);

	if (d->has_rpk || d->is_cert)
		return;		/* the identity its raw public key or certificate gave */
	if (!id || id->length == 0 || id->length > KEYS_MAX_IDENTITY) {
		/* coap:// (NoSec) sessions carry no identity */
		snprintf(d->identity, sizeof(d->identity), "anonymous");
		return;
	}
	memcpy(d->identity, id->s, id->length);
	d->identity[id->length] = '\0';
}

/* A session with a Connection ID follows its device to a new address once a record from there
 * authenticated (deps-patches/libcoap/0017): the log says so, and peer= names the new one. */
static void sess_follow(struct dev_sess *d)
{
	const coap_address_t *now = coap_session_get_addr_remote(d->session);
	char old[sizeof(d->peer)];

	if (!now || coap_address_equals(now, &d->addr))
		return;
	memcpy(old, d->peer, sizeof(old));
	coap_address_copy(&d->addr, now);
	pdu_peer(d->session, d->peer, sizeof(d->peer));
	log_src(dev_sess_log(d), LOG_LVL_INFO, "peer=%s identity=%s session=moved to=%s "
		"reason=\"a record with its connection id came from there\"", old, d->identity,
		d->peer);
}

struct dev_sess *dev_sess_get(coap_session_t *s)
{
	struct dev_sess *d = coap_session_get_app_data(s);

	if (d) {
		sess_follow(d);
		return d;
	}
	d = calloc(1, sizeof(*d));
	if (!d) {
		log_error("device: out of memory for a new session");
		return NULL;
	}
	d->session = s;
	sess_fill_identity(d);
	pdu_peer(s, d->peer, sizeof(d->peer));
	if (coap_session_get_addr_remote(s))
		coap_address_copy(&d->addr, coap_session_get_addr_remote(s));
	coap_session_set_app_data(s, d);
	D.n_sess++;
	return d;
}

const char *dev_sess_identity(const struct dev_sess *d)
{
	return d->identity;
}

const char *dev_sess_peer(const struct dev_sess *d)
{
	return d->peer;
}

static void on_handshake_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct dev_sess *d = arg;
	struct timeval tv = { DEV_HANDSHAKE_S, 0 };

	(void)fd;
	(void)what;
	/* DTLS drops records it cannot decrypt: a wrong key shows only as the device's Finished
	 * dropped for its MAC, and the handshake then never completes */
	if (pdu_mac_drops(d->session) > 0) {
		stats_inc(STAT_HS_WRONG_KEY);
		log_src(dev_sess_log(d), LOG_LVL_WARNING, "peer=%s identity=%s handshake=failed "
			"reason=\"the device's Finished did not decrypt\" "
			"hint=\"the device's key is probably wrong\"", d->peer, d->identity);
		/* it cannot complete: its place goes back now, not after libcoap's retries */
		sess_detach(d);
		coap_session_disconnected(d->session, COAP_NACK_TLS_FAILED);
		return;
	}
	if (!d->hs_slow) {
		d->hs_slow = 1;
		log_src(dev_sess_log(d), LOG_LVL_INFO, "peer=%s identity=%s handshake=slow "
			"reason=\"not completed within %ds\" hint=\"a slow or lossy link; still waiting\"",
			d->peer, d->identity, DEV_HANDSHAKE_S);
	}
	evtimer_add(d->hs_timer, &tv);
}

void dev_handshake_start(coap_session_t *s, const struct key_entry *e, const uint8_t *cert,
			 size_t len)
{
	struct dev_sess *d = dev_sess_get(s);
	struct timeval tv = { DEV_HANDSHAKE_S, 0 };

	if (!d)
		return;
	snprintf(d->identity, sizeof(d->identity), "%s", e->identity);
	d->has_rpk = e->has_rpk;
	if (e->has_rpk)
		memcpy(d->rpk, e->rpk, sizeof(d->rpk));
	free(d->cert);
	d->cert = NULL;
	d->cert_len = 0;
	/* kept to check against a CRL that a reload brings; without memory, the identity is
	 * still the certificate's (not a PSK one) */
	if (cert && (d->cert = malloc(len ? len : 1)) != NULL) {
		memcpy(d->cert, cert, len);
		d->cert_len = len;
	}
	d->is_cert = cert != NULL;
	sess_attach(d);
	if (!d->hs_timer)
		d->hs_timer = evtimer_new(loop_base(), on_handshake_deadline, d);
	if (d->hs_timer)
		evtimer_add(d->hs_timer, &tv);
}

static void sess_free(coap_session_t *s)
{
	struct dev_sess *d = coap_session_get_app_data(s);

	if (!d)
		return;
	/* evicted: closed to make room at coap.max_sessions for a client that proved its address
	 * (the one silent for longest goes; deps-patches/libcoap/0010) */
	dev_down(d, d->closed ? "closed" : coap_session_get_evicted(s) ? "evicted" : "idle timeout");
	coap_session_set_app_data(s, NULL);
	sess_detach(d);
	if (d->hs_timer)
		event_free(d->hs_timer);
	if (d->close_ev)
		event_free(d->close_ev);
	D.n_sess--;
	free(d->cert);
	if (d->oscore) {
		explicit_bzero(d->oscore, sizeof(*d->oscore));
		free(d->oscore);
	}
	free(d);
}

/* The peer sent an identity, raw public key or certificate identity the key store does not
 * hold (a callback refused it). */
static int identity_unknown(coap_session_t *s)
{
	const coap_bin_const_t *id = coap_session_get_psk_identity(s);

	return loop_handshake_refused(s) ||
	       (id && id->length && !keys_find(loop_keys(), (const char *)id->s, id->length));
}

void dev_session_event(coap_session_t *s, coap_event_t ev)
{
	struct dev_sess *d;

	switch (ev) {
	case COAP_EVENT_DTLS_CONNECTED:
		d = dev_sess_get(s);
		if (!d)
			break;
		sess_fill_identity(d);	/* known for sure once the handshake is done */
		sess_attach(d);
		if (d->hs_timer)
			evtimer_del(d->hs_timer);
		stats_inc(STAT_HANDSHAKE_OK);
		log_src(dev_sess_log(d), LOG_LVL_INFO, "peer=%s identity=%s handshake=ok cipher=%s",
			d->peer, d->identity, pdu_cipher(s));
		dev_up(d);
		break;
	case COAP_EVENT_DTLS_ERROR:
		d = coap_session_get_app_data(s);
		/* once per handshake: the deadline stops only at a verdict (a wrong key, counted
		 * already) or at the handshake's end, and an error after it is no handshake failure */
		if (d && d->hs_timer && !evtimer_pending(d->hs_timer, NULL))
			break;
		stats_inc(d ? STAT_HS_DTLS_ERROR :
			  loop_handshake_refused(s) == LOOP_REFUSED_CERT ? STAT_HS_BAD_CERT :
			  identity_unknown(s) ? STAT_HS_UNKNOWN_IDENTITY : STAT_HS_DTLS_ERROR);
		break;
	case COAP_EVENT_DTLS_CLOSED:
		d = coap_session_get_app_data(s);
		if (d) {
			d->closed = 1;
			dev_down(d, "closed");
		}
		break;
	case COAP_EVENT_SERVER_SESSION_DEL:
		sess_free(s);
		break;
	default:
		break;
	}
}

static void each_fn(void *val, void *arg)
{
	void (*fn)(struct device *) = *(void (**)(struct device *))arg;

	fn(val);
}

static void each_online_fn(void *val, void *arg)
{
	struct device *d = val;

	if (d->cur)
		each_fn(val, arg);
}

void dev_each(void (*fn)(struct device *d))
{
	hmap_each(D.by_id, each_fn, &fn);
}

void dev_each_online(void (*fn)(struct device *d))
{
	hmap_each(D.by_id, each_online_fn, &fn);
}

/* Why s may no longer speak for its identity under the keys k: removed, or its key changed
 * (a handshake in progress holds the key it was given); NULL while it may. */
static const char *revoked(const struct dev_sess *d, const struct keys *k)
{
	const struct key_entry *e = keys_find(k, d->identity, strlen(d->identity));
	const coap_bin_const_t *key = coap_session_get_psk_key(d->session);

	if (d->oscore) {
		if (!e)
			return "device removed";
		return keys_oscore_equal(e->oscore, d->oscore) ? NULL : "its OSCORE context changed";
	}
	if (d->is_cert) {
		if (d->cert && pki_revoked(loop_pki(), d->cert, d->cert_len))
			return "certificate revoked";
		if (e ? e->cert : D.conf->coap.pki.allow_unlisted)
			return NULL;
		return e ? "listed with a PSK or raw public key now" : "device removed";
	}
	if (!e)
		return "device removed";
	if (d->has_rpk)
		return e->has_rpk && memcmp(e->rpk, d->rpk, sizeof(d->rpk)) == 0 ? NULL :
		       "raw public key changed";
	if (key && (key->length != e->key_len || memcmp(key->s, e->key, e->key_len) != 0))
		return "key changed";
	return NULL;
}

static void sess_close(struct dev_sess *s, const char *why)
{
	log_info("peer=%s identity=%s session=closing reason=\"%s\"%s", s->peer, s->identity, why,
		 s->dev ? "" : " state=handshake");
	sess_detach(s);
	dev_down(s, why);
	if (coap_session_get_proto(s->session) == COAP_PROTO_DTLS)
		coap_session_disconnected(s->session, COAP_NACK_TLS_FAILED);
	/* an OSCORE session keeps its address only: its context is gone with the reload, and
	 * libcoap frees it once idle */
}

static void apply_keys_fn(void *val, void *arg)
{
	struct device *d = val;
	const struct keys *k = arg;
	const char *why;

	for (struct dev_sess *s = d->sessions, *next; s; s = next) {
		next = s->onext;
		if ((why = revoked(s, k)) != NULL)
			sess_close(s, why);
	}
}

static void on_close_later(evutil_socket_t fd, short what, void *arg)
{
	struct dev_sess *d = arg;

	(void)fd;
	(void)what;
	sess_close(d, "identity revoked");
}

/* Closed from the loop once what libcoap is doing with the session now (sending an answer,
 * finishing a handshake) is done. */
static void close_later(struct dev_sess *d)
{
	static const struct timeval now = { 0, 0 };

	if (!d->close_ev)
		d->close_ev = evtimer_new(loop_base(), on_close_later, d);
	if (d->close_ev && !evtimer_pending(d->close_ev, NULL))
		evtimer_add(d->close_ev, &now);
}

const char *dev_sess_refused(struct dev_sess *d)
{
	const char *why;

	if ((coap_session_get_proto(d->session) != COAP_PROTO_DTLS && !d->oscore) ||
	    (why = revoked(d, loop_keys())) == NULL)
		return NULL;
	close_later(d);
	return why;
}

void dev_apply_keys(const struct keys *k)
{
	hmap_each(D.by_id, apply_keys_fn, (void *)k);
}

/* ---- OSCORE ---- */

static void on_oscore_idle(evutil_socket_t fd, short what, void *arg)
{
	struct device *d = arg;

	(void)fd;
	(void)what;
	if (d->cur && d->cur->oscore)
		dev_down(d->cur, "idle timeout");
}

const char *dev_oscore_request(struct dev_sess *s, const struct key_entry *e)
{
	struct timeval tv = { (time_t)D.conf->coap.idle_timeout, 0 };
	struct device *d;

	if (coap_session_get_proto(s->session) == COAP_PROTO_DTLS) {
		/* OSCORE inside DTLS: both must name the same device */
		return strcmp(s->identity, e->identity) == 0 ? NULL :
		       "its OSCORE context is another device's than its DTLS identity";
	}
	if (s->oscore && (strcmp(s->identity, e->identity) != 0 ||
			  !keys_oscore_equal(s->oscore, e->oscore))) {
		if (strcmp(s->identity, e->identity) != 0) {
			/* another device now sends from this address (a NAT gave it away) */
			sess_detach(s);
			dev_down(s, "replaced");
		}
		/* else its context changed by a reload, which closed the session's use of the
		 * old one: this request verified under the new one */
		explicit_bzero(s->oscore, sizeof(*s->oscore));
		free(s->oscore);
		s->oscore = NULL;
	}
	if (!s->oscore) {
		if ((s->oscore = malloc(sizeof(*s->oscore))) == NULL)
			return "gateway out of memory";
		*s->oscore = *e->oscore;
		snprintf(s->identity, sizeof(s->identity), "%s", e->identity);
		sess_attach(s);
	}
	if ((d = sess_device(s)) == NULL)
		return "device removed";
	if (!d->idle_ev && (d->idle_ev = evtimer_new(loop_base(), on_oscore_idle, d)) == NULL)
		return "gateway out of memory";
	evtimer_add(d->idle_ev, &tv);
	if (d->cur != s) {
		log_src(dev_sess_log(s), LOG_LVL_INFO, "peer=%s identity=%s oscore=ok", s->peer,
			s->identity);
		dev_up(s);
	}
	return NULL;
}

int dev_sess_oscore(const struct dev_sess *s)
{
	return s->oscore != NULL;
}

/* ---- teardown ---- */

static void dev_free_one(void *val, void *arg)
{
	struct device *d = val;

	(void)arg;
	if (d->cur) {
		presence(d, "offline", "gateway stopped");
		d->cur->dev = NULL;
		d->cur = NULL;
	}
	for (struct dev_sess *s = d->sessions; s; s = s->onext)
		s->owner = NULL;	/* sessions outlive the devices at shutdown */
	if (d->idle_ev)
		event_free(d->idle_ev);
	log_budget_forget(&d->log);
	free(d);
}

void dev_shutdown(void)
{
	log_budget_flush();
	hmap_each(D.by_id, dev_free_one, NULL);
	hmap_free(D.by_id);
	D.by_id = NULL;
	D.n_online = 0;
}
