/* device.c: per-session device state — identity, peer, recent CON exchanges — created on first
 * use and freed when libcoap deletes the session. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "device.h"
#include "keys.h"
#include "log.h"
#include "loop.h"
#include "stats.h"

struct device {
	coap_session_t *session;
	char identity[KEYS_MAX_IDENTITY + 1];
	char peer[64];
	struct {
		coap_mid_t mid;
		uint8_t code;		/* 0 = slot unused */
	} recent[DEV_DEDUP_SLOTS];
	unsigned next_slot;
	int up;
	struct event *hs_timer;		/* handshake deadline, armed once the identity is known */
};

#define DEV_HANDSHAKE_S 10	/* a PSK handshake not done by then has failed (wrong key) */

static size_t n_devices;

size_t dev_count(void)
{
	return n_devices;
}

static void dev_fill_identity(struct device *d)
{
	const coap_bin_const_t *id = coap_session_get_psk_identity(d->session);

	if (!id || id->length == 0 || id->length > KEYS_MAX_IDENTITY) {
		/* coap:// (NoSec) sessions carry no identity */
		snprintf(d->identity, sizeof(d->identity), "anonymous");
		return;
	}
	memcpy(d->identity, id->s, id->length);
	d->identity[id->length] = '\0';
}

struct device *dev_get(coap_session_t *s)
{
	struct device *d = coap_session_get_app_data(s);

	if (d)
		return d;
	d = calloc(1, sizeof(*d));
	if (!d) {
		log_error("device: out of memory for a new session");
		return NULL;
	}
	d->session = s;
	dev_fill_identity(d);
	loop_peer(s, d->peer, sizeof(d->peer));
	coap_session_set_app_data(s, d);
	n_devices++;
	return d;
}

const char *dev_identity(const struct device *d)
{
	return d->identity;
}

const char *dev_peer(const struct device *d)
{
	return d->peer;
}

uint8_t dev_dedup_find(const struct device *d, coap_mid_t mid)
{
	for (unsigned i = 0; i < DEV_DEDUP_SLOTS; i++)
		if (d->recent[i].code && d->recent[i].mid == mid)
			return d->recent[i].code;
	return 0;
}

void dev_dedup_store(struct device *d, coap_mid_t mid, uint8_t code)
{
	for (unsigned i = 0; i < DEV_DEDUP_SLOTS; i++)
		if (d->recent[i].code && d->recent[i].mid == mid) {
			d->recent[i].code = code;
			return;
		}
	d->recent[d->next_slot].mid = mid;
	d->recent[d->next_slot].code = code;
	d->next_slot = (d->next_slot + 1) % DEV_DEDUP_SLOTS;
}

static void on_handshake_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct device *d = arg;

	(void)fd;
	(void)what;
	/* DTLS drops records it cannot decrypt, so a wrong key shows only as silence */
	stats_inc(STAT_HANDSHAKE_FAILED);
	log_warn("peer=%s identity=%s handshake failed: not completed within %ds; the device's key "
		 "is probably wrong", d->peer, d->identity, DEV_HANDSHAKE_S);
}

void dev_handshake_start(coap_session_t *s, const char *identity)
{
	struct device *d = dev_get(s);
	struct timeval tv = { DEV_HANDSHAKE_S, 0 };

	if (!d)
		return;
	snprintf(d->identity, sizeof(d->identity), "%s", identity);
	if (!d->hs_timer)
		d->hs_timer = evtimer_new(loop_base(), on_handshake_deadline, d);
	if (d->hs_timer)
		evtimer_add(d->hs_timer, &tv);
}

static void dev_free(coap_session_t *s, const char *reason)
{
	struct device *d = coap_session_get_app_data(s);

	if (!d)
		return;
	if (d->up)
		log_info("peer=%s identity=%s session ended reason=%s", d->peer, d->identity, reason);
	coap_session_set_app_data(s, NULL);
	if (d->hs_timer)
		event_free(d->hs_timer);
	n_devices--;
	free(d);
}

void dev_session_event(coap_session_t *s, coap_event_t ev)
{
	struct device *d;

	switch (ev) {
	case COAP_EVENT_DTLS_CONNECTED:
		d = dev_get(s);
		if (!d)
			break;
		dev_fill_identity(d);	/* known only once the handshake is done */
		d->up = 1;
		if (d->hs_timer)
			evtimer_del(d->hs_timer);
		stats_inc(STAT_HANDSHAKE_OK);
		log_info("peer=%s identity=%s handshake ok cipher=%s", d->peer, d->identity,
			 loop_cipher(s));
		break;
	case COAP_EVENT_DTLS_ERROR:
		stats_inc(STAT_HANDSHAKE_FAILED);
		break;
	case COAP_EVENT_DTLS_CLOSED:
		d = coap_session_get_app_data(s);
		if (d && d->up) {
			log_info("peer=%s identity=%s dtls closed", d->peer, d->identity);
			d->up = 0;
		}
		break;
	case COAP_EVENT_SERVER_SESSION_DEL:
		dev_free(s, "deleted");
		break;
	default:
		break;
	}
}
