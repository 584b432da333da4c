/* loop.c: libevent owns the process; libcoap's epoll fd is one libevent event, and libcoap's timers
 * are re-armed from our own timer instead of after every packet (see deps-patches/libcoap). */
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/event.h>
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include "config.h"
#include "keys.h"
#include "log.h"
#include "loop.h"
#include "pdu.h"

#define LOOP_EPOLL_BATCH 64
#define LOOP_EPOLL_ROUNDS 32		/* rounds per wake-up before yielding to other events: libcoap
					 * reads one datagram per ready socket and round */
#define LOOP_PREPARE_MS 100		/* libcoap timer scan at most this often when idle */
#define LOOP_PREPARE_SLICES 10		/* every session looked at once a second, a tenth on each
					 * tick (idle time, block transfers: timeouts of seconds) */
#define LOOP_LIBCOAP_LOG_PER_S 20	/* libcoap log lines per second, beyond: counted */
#define LOOP_MAX_ENDPOINTS 32		/* listening sockets (coap.listen entries x addresses) */

static struct {
	struct loop_handlers h;		/* the bridge, as main.c wired it */
	struct event_base *base;
	coap_context_t *coap;
	struct event *coap_ev, *tick_ev, *kick_ev;
	const struct keys *keys;
	coap_bin_const_t psk_out;	/* key handed to libcoap (it copies it at once) */
	char ciphers[1024];		/* cipher list from coap.ciphers, "" = library default */
	size_t block_size;		/* coap.block_size */
	int kicked;
	unsigned receive_buffer;	/* coap.receive_buffer */
	struct log_budget hs_log;	/* handshake failures logged here (peers cause them) */
	coap_session_t *refused;	/* the handshake a callback just refused, logged there */
	int refused_why;		/* LOOP_REFUSED_* */
	const struct conf_pki *pki;	/* the current coap.pki (cert_file NULL: none) */
	struct {
		int fd;
		char name[64];
		coap_address_t addr;	/* bound to */
		unsigned modes;		/* enum conf_mode: what its handshakes may use */
	} ep[LOOP_MAX_ENDPOINTS];	/* listening sockets */
	size_t n_ep;
} L;

struct event_base *loop_base(void)
{
	return L.base;
}

coap_context_t *loop_coap(void)
{
	return L.coap;
}

coap_front_door_t loop_front_door(void)
{
	coap_front_door_t fd = { 0 };

	if (L.coap)
		coap_context_get_front_door(L.coap, &fd);
	return fd;
}

size_t loop_block_size(void)
{
	return L.block_size;
}

/* A listening socket's receive buffer. Datagrams that arrive while the loop is busy wait there;
 * the kernel's default (net.core.rmem_default, ~208 KiB: a few hundred datagrams) overflows when
 * a fleet reports at the same moment, and each drop costs a device a retransmission (2 s and
 * more). Linux caps SO_RCVBUF at net.core.rmem_max; SO_RCVBUFFORCE passes the cap where the
 * process may (CAP_NET_ADMIN). What the kernel reports is twice the usable size. */
static void set_receive_buffer(int fd, const char *name, unsigned want)
{
	int v = (int)want, got = 0;
	socklen_t len = sizeof(got);

	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof(v)) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &got, &len) < 0) {
		log_warn("loop: listen=%s receive_buffer=%u outcome=failed error=\"%s\"", name, want,
			 strerror(errno));
		return;
	}
	if ((unsigned)got / 2 < want &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &v, sizeof(v)) == 0) {
		len = sizeof(got);
		if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &got, &len) < 0)
			got = 0;
	}
	if ((unsigned)got / 2 < want)
		log_warn("loop: listen=%s receive_buffer=%u outcome=capped effective=%d hint=\"raise "
			 "net.core.rmem_max to %u (sysctl)\"", name, want, got / 2, want);
	else
		log_debug("loop: listen=%s receive_buffer=%u outcome=ok", name, want);
}

/* The libcoap settings that apply to the running context (at start, and again on reload). */
static void apply_coap_limits(const struct config *c)
{
	coap_context_set_session_timeout(L.coap, c->coap.idle_timeout);
	coap_context_set_max_idle_sessions(L.coap, c->coap.max_sessions);
	/* only clients that echoed their cookie get this far (deps-patches/libcoap/0010); beyond
	 * the limit a new one takes the place of the one that waited longest (0005) */
	coap_context_set_max_handshake_sessions(L.coap, c->coap.max_handshakes);
	coap_context_set_max_handshakes_per_ip(L.coap, c->coap.max_handshakes_per_ip);
	/* reassembled bodies are bounded (deps-patches/libcoap/0003): an upload over max_payload
	 * gets 4.13 + Size1 at its first block; responses and notifications may be larger */
	coap_context_set_body_limits(L.coap, c->coap.max_payload, LOOP_MAX_RESPONSE_BODY);
}

void loop_set_config(const struct config *c, const struct keys *k)
{
	size_t n = 0;

	L.block_size = c->coap.block_size;

	L.keys = k;
	L.pki = &c->coap.pki;
	L.ciphers[0] = '\0';
	/* wolfSSL takes IANA names in its cipher list */
	for (size_t i = 0; i < c->coap.n_ciphers && n < sizeof(L.ciphers); i++)
		n += (size_t)snprintf(L.ciphers + n, sizeof(L.ciphers) - n, "%s%s", i ? ":" : "",
				      c->coap.ciphers[i]);
	/* applied by libcoap to each new server session (deps-patches/libcoap/0002) */
	if (!coap_wolfssl_set_server_cipher_list(L.ciphers))
		log_error("loop: out of memory setting coap.ciphers");
	L.receive_buffer = c->coap.receive_buffer;
	for (size_t i = 0; i < L.n_ep; i++)
		set_receive_buffer(L.ep[i].fd, L.ep[i].name, L.receive_buffer);
	if (L.coap)
		apply_coap_limits(c);	/* a reload; at start loop_init() does it */
}

const struct keys *loop_keys(void)
{
	return L.keys;
}

const struct pki_verifier *loop_pki(void)
{
	return L.pki ? L.pki->verifier : NULL;
}

/* The modes of the listener s came in on: the one bound to its local port and address (or to
 * any address). A walk of the listeners, a few at most; never of the sessions. */
unsigned loop_session_modes(const coap_session_t *s)
{
	const coap_address_t *local = coap_session_get_addr_local(s);
	unsigned any = 0;

	if (local == NULL)
		return 0;
	for (size_t i = 0; i < L.n_ep; i++) {
		const coap_address_t *a = &L.ep[i].addr;

		if (coap_address_get_port(a) != coap_address_get_port(local))
			continue;
		if (coap_address_equals(a, local))
			return L.ep[i].modes;
		if (coap_address_isany(a))
			any |= L.ep[i].modes;
	}
	return any;
}

/* Whether the listener of s takes this mode; logs the refusal when not. */
static int mode_allowed(coap_session_t *s, unsigned mode, const char *identity)
{
	static const char *const names[] = { "", "PSK", "raw public keys", "", "certificates" };
	char peer[64];

	if (loop_session_modes(s) & mode)
		return 1;
	log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=\"%s\" handshake=refused "
		"reason=\"this listener does not take %s\" hint=\"see ?modes= in coap.listen\"",
		pdu_peer(s, peer, sizeof(peer)), identity, names[mode]);
	L.refused = s;
	L.refused_why = LOOP_REFUSED_IDENTITY;
	return 0;
}

/* A callback refuses s: logged there, counted once, and its DTLS error not logged again. */
static void refuse(coap_session_t *s, int why)
{
	L.refused = s;
	L.refused_why = why;
}

static void identity_str(const coap_bin_const_t *id, char *buf, size_t len)
{
	size_t j = 0;

	/* printable for logs: control bytes and quotes escaped, bounded */
	for (size_t i = 0; id && i < id->length && j + 5 < len; i++) {
		uint8_t c = id->s[i];

		if (c < 0x20 || c == 0x7f || c == '"' || c == '\\')
			j += (size_t)snprintf(buf + j, len - j, "\\x%02x", c);
		else
			buf[j++] = (char)c;
	}
	buf[j] = '\0';
}

static const coap_bin_const_t *on_psk_identity(coap_bin_const_t *identity, coap_session_t *s,
					       void *arg)
{
	const struct key_entry *e;
	char peer[64], id[KEYS_MAX_IDENTITY * 4 + 8];

	(void)arg;
	identity_str(identity, id, sizeof(id));
	if (!mode_allowed(s, CONF_MODE_PSK, id))
		return NULL;
	e = identity && identity->length <= KEYS_MAX_IDENTITY ?
		keys_find(L.keys, (const char *)identity->s, identity->length) : NULL;
	if (!e) {
		log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=\"%s\" handshake=refused "
			"reason=\"unknown identity\" hint=\"add it to devices or devices_file\"",
			pdu_peer(s, peer, sizeof(peer)), id);
		return NULL;
	}
	if (e->has_rpk || e->cert) {
		log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=\"%s\" handshake=refused "
			"reason=\"the device is listed with a %s, not a PSK\"",
			pdu_peer(s, peer, sizeof(peer)), e->identity,
			e->has_rpk ? "raw public key" : "certificate");
		refuse(s, LOOP_REFUSED_IDENTITY);
		return NULL;
	}
	L.h.handshake_start(s, e, NULL, 0);
	L.psk_out.s = e->key;
	L.psk_out.length = e->key_len;
	return &L.psk_out;
}

/* A device's raw public key (RFC 7250), as wolfSSL received it in the handshake: a DER
 * SubjectPublicKeyInfo. Accepted when its SHA-256 is listed; else refused, and the log names the
 * fingerprint it presented, for the operator to add. */
static int on_rpk(const uint8_t *spki, size_t len, coap_session_t *s, unsigned depth)
{
	uint8_t fp[KEYS_RPK_LEN];
	char peer[64], text[KEYS_RPK_TEXT];
	const struct key_entry *e;

	if (depth != 0)
		return 0;	/* a raw public key has no chain */
	if (keys_spki_fingerprint(spki, len, fp) < 0) {
		log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=- handshake=refused "
			"reason=\"unreadable raw public key\"", pdu_peer(s, peer, sizeof(peer)));
		refuse(s, LOOP_REFUSED_IDENTITY);
		return 0;
	}
	keys_format_rpk(fp, text);
	e = keys_find_rpk(L.keys, fp);
	if (!e) {
		log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=- rpk=%s handshake=refused "
			"reason=\"unknown raw public key\" hint=\"add it to devices or devices_file "
			"as rpk: %s\"", pdu_peer(s, peer, sizeof(peer)), text, text);
		refuse(s, LOOP_REFUSED_IDENTITY);
		return 0;
	}
	L.h.handshake_start(s, e, NULL, 0);
	return 1;
}

/* A device's X.509 certificate (depth 0; its CAs at 1 and up), after wolfSSL checked it against
 * coap.pki.ca_file (validated) or found it wanting (deps-patches/libcoap/0023 tells of those
 * too). Accepted when it verified, the CRL does not revoke it, and the identity it carries
 * (coap.pki.identity) may be a topic level and is listed with auth: certificate (or
 * coap.pki.allow_unlisted). Every refusal is logged with the peer, the identity and why. */
static int on_cert(const uint8_t *der, size_t len, coap_session_t *s, unsigned depth,
		   int validated)
{
	const struct conf_pki *p = L.pki;
	char peer[64], id[KEYS_MAX_IDENTITY + 1], shown[KEYS_MAX_IDENTITY * 4 + 8];
	const char *why = NULL, *hint = "";
	const struct key_entry *e = NULL;
	struct key_entry unlisted = { 0 };
	int n, kind = LOOP_REFUSED_CERT;

	if (L.refused == s)
		return 0;	/* said already, for a certificate of its chain */
	if (depth != 0 && validated)
		return 1;	/* a CA of the device's chain, verified by wolfSSL */
	n = pki_identity(der, len, p->identity, id);
	if (n >= 0) {
		coap_bin_const_t b = { (size_t)n, (const uint8_t *)id };

		identity_str(&b, shown, sizeof(shown));
	} else {
		snprintf(shown, sizeof(shown), "-");
	}
	if (!validated) {
		why = pki_refusal(p->verifier, der, len);
		if (why == NULL)
			why = depth ? "a CA certificate of its chain does not verify" :
				      "certificate does not verify";
	} else if (pki_revoked(p->verifier, der, len)) {
		why = "certificate revoked (coap.pki.crl_file)";
	} else if (n < 0) {
		why = p->identity == PKI_ID_CN ? "certificate has no subject CN of 1..128 bytes" :
		      p->identity == PKI_ID_SAN_DNS ? "certificate has no DNS subject alternative "
						      "name of 1..128 bytes" :
		      "certificate has no URI subject alternative name of 1..128 bytes";
		kind = LOOP_REFUSED_IDENTITY;
	} else if (!route_value_ok(id, (size_t)n)) {
		why = "identity is not valid in an MQTT topic (UTF-8 without '/', '+', '#' or "
		      "control characters)";
		kind = LOOP_REFUSED_IDENTITY;
	} else if ((e = keys_find(L.keys, id, (size_t)n)) != NULL && !e->cert) {
		why = e->has_rpk ? "the device is listed with a raw public key, not a certificate" :
				   "the device is listed with a PSK, not a certificate";
		kind = LOOP_REFUSED_IDENTITY;
	} else if (e == NULL && !p->allow_unlisted) {
		why = "identity not listed";
		hint = " hint=\"add it to devices with auth: certificate, or set "
		       "coap.pki.allow_unlisted\"";
		kind = LOOP_REFUSED_IDENTITY;
	}
	if (why) {
		log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=\"%s\" auth=certificate "
			"handshake=refused reason=\"%s\"%s", pdu_peer(s, peer, sizeof(peer)), shown,
			why, hint);
		refuse(s, kind);
		return 0;
	}
	if (e == NULL) {
		unlisted.identity = id;
		unlisted.cert = 1;
		e = &unlisted;
	}
	L.h.handshake_start(s, e, der, len);
	return 1;
}

/* Every peer key wolfSSL received: a raw public key or a certificate, by what the handshake
 * negotiated (one endpoint serves both, deps-patches/libcoap/0022). */
static int on_peer_key(const char *cn, const uint8_t *der, size_t len, coap_session_t *s,
		       unsigned depth, int validated, void *arg)
{
	WOLFSSL *ssl = pdu_ssl(s);
	int type = WOLFSSL_CERT_TYPE_UNKNOWN;

	(void)cn;
	(void)arg;
	if (L.refused == s)
		return 0;	/* said already, for a certificate of its chain */
	if (ssl && wolfSSL_get_negotiated_client_cert_type(ssl, &type) == WOLFSSL_SUCCESS &&
	    type == WOLFSSL_CERT_TYPE_RPK)
		return mode_allowed(s, CONF_MODE_RPK, "-") && validated &&
		       on_rpk(der, len, s, depth);
	if (L.pki == NULL || L.pki->cert_file == NULL)
		return 0;
	return mode_allowed(s, CONF_MODE_X509, "-") && on_cert(der, len, s, depth, validated);
}

/* The gateway's own key pair for raw public key handshakes, beside PSK on the same endpoints:
 * each handshake takes what the device offers. The PEM buffers are the start-up
 * configuration's, which lives as long as the context (libcoap reads them for each session). */
static int rpk_setup(const struct config *c)
{
	coap_dtls_pki_t pki;
	coap_pki_key_define_t *d = &pki.pki_key.key.define;

	if (!c->coap.rpk_key_file)
		return 0;
	if (!coap_dtls_rpk_is_supported()) {
		log_error("loop: coap.rpk is set but this libcoap/wolfSSL build has no raw public keys");
		return -1;
	}
	memset(&pki, 0, sizeof(pki));
	pki.version = COAP_DTLS_PKI_SETUP_VERSION;
	pki.verify_peer_cert = 1;
	pki.is_rpk_not_cert = 1;
	pki.validate_cn_call_back = on_peer_key;
	pki.pki_key.key_type = COAP_PKI_KEY_DEFINE;
	d->public_cert.s_byte = c->coap.rpk.pub_pem;
	d->public_cert_len = c->coap.rpk.pub_pem_len;
	d->public_cert_def = COAP_PKI_KEY_DEF_RPK_BUF;
	d->private_key.s_byte = c->coap.rpk.key_pem;
	d->private_key_len = c->coap.rpk.key_pem_len;
	d->private_key_def = COAP_PKI_KEY_DEF_RPK_BUF;
	d->ca_def = COAP_PKI_KEY_DEF_PEM;
	if (!coap_context_set_pki(L.coap, &pki)) {
		log_error("loop: the DTLS library refused the raw public key setup (%s)",
			  c->coap.rpk_key_file);
		return -1;
	}
	return 0;
}

/* Intermediate CAs a device certificate's chain may have between it and coap.pki.ca_file. */
#define LOOP_CERT_CHAIN_DEPTH 4

/* The gateway's certificate for X.509 handshakes, beside PSK and raw public keys on the same
 * endpoints (deps-patches/libcoap/0022). wolfSSL verifies device certificates against the CAs
 * that coap_context_set_pki_root_cas() loaded (once, into the DTLS context); the CRL and the
 * identity are checked in on_cert(). The PEM buffers are the start-up configuration's. */
static int pki_setup(const struct config *c)
{
	const struct conf_pki *p = &c->coap.pki;
	coap_dtls_pki_t pki;
	coap_pki_key_define_t *d = &pki.pki_key.key.define;

	if (!p->cert_file)
		return 0;
	memset(&pki, 0, sizeof(pki));
	pki.version = COAP_DTLS_PKI_SETUP_VERSION;
	pki.verify_peer_cert = 1;
	pki.cert_chain_validation = 1;
	pki.cert_chain_verify_depth = LOOP_CERT_CHAIN_DEPTH;
	pki.validate_cn_call_back = on_peer_key;
	pki.pki_key.key_type = COAP_PKI_KEY_DEFINE;
	d->public_cert.s_byte = p->cert.pem;
	d->public_cert_len = p->cert.len;
	d->public_cert_def = COAP_PKI_KEY_DEF_PEM_BUF;
	d->private_key.s_byte = p->key.pem;
	d->private_key_len = p->key.len;
	d->private_key_def = COAP_PKI_KEY_DEF_PEM_BUF;
	d->ca_def = COAP_PKI_KEY_DEF_PEM;
	if (!coap_context_set_pki(L.coap, &pki)) {
		log_error("loop: the DTLS library refused the certificate setup (%s)", p->cert_file);
		return -1;
	}
	return 0;
}

/* libcoap bounds a server's DTLS handshake by the session's MAX_RETRANSMIT: with CoAP's 4 it
 * gave up 31 s after the session was made (its flight resent at 1, 2, 4, 8 and 16 s), whatever
 * the device did meanwhile, and on a lossy radio link a handshake legitimately takes longer (RFC
 * 6347 4.2.4: the device's timers double from 1 s too). During the handshake the session may
 * resend its flight 7 times (127 s); CoAP's own retransmissions are back to 4 once it is up. A
 * session that stays silent meanwhile is what coap.max_handshakes makes room from first. */
#define LOOP_HANDSHAKE_RETRANSMIT 7

static int on_coap_event(coap_session_t *s, const coap_event_t ev)
{
	char peer[64], id[KEYS_MAX_IDENTITY * 4 + 8];

	switch (ev) {
	case COAP_EVENT_SERVER_SESSION_NEW:
		coap_session_set_max_retransmit(s, LOOP_HANDSHAKE_RETRANSMIT);
		break;
	case COAP_EVENT_DTLS_CONNECTED:
		coap_session_set_max_retransmit(s, COAP_DEFAULT_MAX_RETRANSMIT);
		break;
	case COAP_EVENT_DTLS_ERROR: {
		const coap_bin_const_t *bid = coap_session_get_psk_identity(s);

		identity_str(bid, id, sizeof(id));
		/* a refusal was logged by the PSK or raw public key callback already */
		if (s == L.refused)
			;
		else if (bid && bid->length && keys_find(L.keys, (const char *)bid->s, bid->length))
			log_src(&L.hs_log, LOG_LVL_WARNING, "peer=%s identity=\"%s\" "
				"handshake=failed reason=\"wrong key or no common cipher suite\" "
				"hint=\"check the device's key\"", pdu_peer(s, peer, sizeof(peer)), id);
		else if (!bid || !bid->length)
			log_src(&L.hs_log, LOG_LVL_INFO, "peer=%s identity=- handshake=failed "
				"reason=\"before an identity was sent\"", pdu_peer(s, peer, sizeof(peer)));
		break;
	}
	default:
		break;
	}
	L.h.session_event(s, ev);
	if (ev == COAP_EVENT_DTLS_ERROR && s == L.refused)
		L.refused = NULL;
	return 0;
}

int loop_handshake_refused(const coap_session_t *s)
{
	return s == L.refused ? L.refused_why : 0;
}

/* Responses and notifications to the gateway's own requests (observe, commands). */
static coap_response_t on_response(coap_session_t *s, const coap_pdu_t *sent,
				   const coap_pdu_t *rcvd, const coap_mid_t mid)
{
	char peer[64], id[KEYS_MAX_IDENTITY * 4 + 8];

	(void)mid;
	if (L.h.response(s, sent, rcvd))
		return COAP_RESPONSE_OK;
	identity_str(coap_session_get_psk_identity(s), id, sizeof(id));
	log_debug("peer=%s identity=\"%s\" response=reset reason=\"unknown token\"",
		  pdu_peer(s, peer, sizeof(peer)), id);
	return COAP_RESPONSE_FAIL;	/* libcoap answers RST (RFC 7641 §3.6) */
}

static void on_nack(coap_session_t *s, const coap_pdu_t *sent, const coap_nack_reason_t reason,
		    const coap_mid_t mid)
{
	(void)mid;
	if (sent)
		L.h.nack(s, sent, reason);
}

/* libcoap's own messages name no peer and a hostile peer can trigger them per datagram: at most
 * LOOP_LIBCOAP_LOG_PER_S a second reach the log (debug level excepted), the rest are counted. */
static void on_libcoap_log(coap_log_t level, const char *message)
{
	static time_t window;
	static unsigned in_window, suppressed;
	enum log_level l = level <= COAP_LOG_ERR ? LOG_LVL_ERROR :
			   level == COAP_LOG_WARN ? LOG_LVL_WARNING :
			   level <= COAP_LOG_INFO ? LOG_LVL_INFO : LOG_LVL_DEBUG;
	time_t now = time(NULL);

	if (l > log_get_level())
		return;
	if (now != window) {
		if (suppressed)
			log_warn("libcoap: %u more messages suppressed (malformed traffic?)", suppressed);
		window = now;
		in_window = suppressed = 0;
	}
	if (l != LOG_LVL_DEBUG && ++in_window > LOOP_LIBCOAP_LOG_PER_S) {
		suppressed++;
		return;
	}
	log_msg(l, "libcoap: %s", message);
}

/* libcoap's due work and its timer. When its timer fires and after a send: only what can be
 * due sooner (handshake retransmissions, the CON send queue, notifications), so that the cost of
 * a timer does not grow with the sessions (deps-patches/libcoap/0018; a walk of 20,000 sessions
 * ten times a second was 4 % of a core). On each tick also a tenth of the other sessions (idle
 * time, block transfers; 0037): all of them once a second, and no walk of all at once (with
 * 20,000 sessions one took 2.4 ms, a pause of the loop every second). At start, everything. */
enum prepare_what { PREPARE_SOON, PREPARE_SLICE, PREPARE_ALL };

static void prepare(enum prepare_what what)
{
	coap_tick_t now;

	coap_ticks(&now);
	if (what == PREPARE_ALL)
		coap_io_prepare_epoll(L.coap, now);
	else if (what == PREPARE_SLICE)
		coap_io_prepare_epoll_slice(L.coap, now, LOOP_PREPARE_SLICES);
	else
		coap_io_prepare_epoll_handshakes(L.coap, now);
	L.kicked = 0;
}

static void on_coap_fd(evutil_socket_t fd, short what, void *arg)
{
	struct epoll_event events[LOOP_EPOLL_BATCH];
	int timer_fired = 0;

	(void)what;
	(void)arg;
	for (int round = 0; round < LOOP_EPOLL_ROUNDS; round++) {
		int n = epoll_wait(fd, events, LOOP_EPOLL_BATCH, 0);

		if (n < 0) {
			if (errno != EINTR)
				log_error("loop: epoll_wait: %s", strerror(errno));
			break;
		}
		for (int i = 0; i < n; i++)
			if (events[i].data.ptr == NULL)
				timer_fired = 1;
		if (n == 0)
			break;
		coap_io_do_epoll(L.coap, events, (size_t)n);
	}
	/* libcoap's timerfd fired: run its due work (retransmissions, timeouts) and re-arm it */
	if (timer_fired || L.kicked)
		prepare(PREPARE_SOON);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	prepare(PREPARE_SLICE);
	log_budget_tick();
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	if (L.kicked)
		prepare(PREPARE_SOON);
}

void loop_kick(void)
{
	if (!L.kicked) {
		L.kicked = 1;
		event_active(L.kick_ev, EV_TIMEOUT, 0);
	}
}

static int add_listener(const char *uri, unsigned modes)
{
	coap_uri_t u;
	coap_str_const_t host;
	coap_addr_info_t *info, *ai;
	int n = 0;

	/* ?modes= is the gateway's, not part of the address */
	if (coap_split_uri((const uint8_t *)uri, strcspn(uri, "?"), &u) < 0) {
		log_error("loop: listen %s: not a coap:// or coaps:// URI", uri);
		return -1;
	}
	host.s = u.host.s;
	host.length = u.host.length;
	info = coap_resolve_address_info(&host, u.port, u.port, u.port, u.port, AF_UNSPEC,
					 1 << u.scheme, COAP_RESOLVE_TYPE_LOCAL);
	if (!info) {
		log_error("loop: listen %s: cannot resolve the address", uri);
		return -1;
	}
	for (ai = info; ai; ai = ai->next) {
		coap_endpoint_t *ep;

		if (L.n_ep == LOOP_MAX_ENDPOINTS) {
			log_error("loop: listen %s: more than %d listening sockets", uri,
				  LOOP_MAX_ENDPOINTS);
			coap_free_address_info(info);
			return -1;
		}
		ep = coap_new_endpoint(L.coap, &ai->addr, ai->proto);
		if (!ep) {
			log_error("loop: listen %s: cannot bind (address in use or not local?)", uri);
			coap_free_address_info(info);
			return -1;
		}
		/* the socket stays libcoap's (deps-patches/libcoap/0008) */
		L.ep[L.n_ep].fd = coap_endpoint_get_fd(ep);
		L.ep[L.n_ep].addr = ai->addr;
		L.ep[L.n_ep].modes = modes;
		snprintf(L.ep[L.n_ep].name, sizeof(L.ep[L.n_ep].name), "%.*s",
			 (int)strcspn(uri, "?"), uri);
		if (L.ep[L.n_ep].fd >= 0)
			set_receive_buffer(L.ep[L.n_ep++].fd, uri, L.receive_buffer);
		n++;
	}
	coap_free_address_info(info);
	return n > 0 ? 0 : -1;
}

static int coap_setup(const struct config *c)
{
	coap_dtls_spsk_t psk;
	coap_resource_t *r;
	coap_log_t lvl = c->log_level >= LOG_LVL_DEBUG ? COAP_LOG_DEBUG : COAP_LOG_WARN;

	coap_startup();
	coap_set_log_handler(on_libcoap_log);
	coap_set_log_level(lvl);
	coap_dtls_set_log_level(lvl);
	L.coap = coap_new_context(NULL);
	if (!L.coap) {
		log_error("loop: cannot create the CoAP context");
		return -1;
	}
	/* before the DTLS context exists: it loads them once when it is made */
	if (c->coap.pki.ca_file && !coap_context_set_pki_root_cas(L.coap, c->coap.pki.ca_file,
								   NULL)) {
		log_error("loop: the DTLS library refused the CAs of %s", c->coap.pki.ca_file);
		return -1;
	}
	memset(&psk, 0, sizeof(psk));
	psk.version = COAP_DTLS_SPSK_SETUP_VERSION;
	psk.validate_id_call_back = on_psk_identity;
	if (c->coap.psk_hint) {
		psk.psk_info.hint.s = (const uint8_t *)c->coap.psk_hint;
		psk.psk_info.hint.length = strlen(c->coap.psk_hint);
	}
	if (!coap_context_set_psk2(L.coap, &psk)) {
		log_error("loop: the DTLS library refused the PSK setup");
		return -1;
	}
	if (pki_setup(c) < 0 || rpk_setup(c) < 0)
		return -1;
	/* Connection IDs (RFC 9146), found by one hash lookup (0015) and followed only once a
	 * record authenticates (0017); their length (0025) is fixed while sessions exist */
	if (!coap_context_set_server_cid(L.coap, c->coap.cid ? c->coap.cid_length : 0)) {
		log_error("loop: coap.cid_length %u is not supported", c->coap.cid_length);
		return -1;
	}
	apply_coap_limits(c);
	coap_context_set_block_mode(L.coap, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
	coap_register_event_handler(L.coap, on_coap_event);
	coap_register_response_handler(L.coap, on_response);
	coap_register_nack_handler(L.coap, on_nack);
	/* reassembled bodies grow as their blocks arrive, whatever size they announce; per device,
	 * at most two uploads and LOOP_MAX_RESPONSE_BODIES of bodies at once (0014) */
	coap_context_set_response_bodies_limit(L.coap, LOOP_MAX_RESPONSE_BODIES);
	coap_context_set_block1_start(L.coap, L.h.block1_start);
	r = L.h.resource(c);
	if (!r) {
		log_error("loop: cannot create the request handler");
		return -1;
	}
	coap_add_resource(L.coap, r);
	for (size_t i = 0; i < c->coap.n_listen; i++)
		if (add_listener(c->coap.listen[i], c->coap.listen_modes[i]) < 0)
			return -1;
	return 0;
}

int loop_init(const struct config *c, const struct keys *k, const struct loop_handlers *h)
{
	struct timeval tick = { 0, LOOP_PREPARE_MS * 1000 };
	int fd;

	L.h = *h;
	loop_set_config(c, k);
	snprintf(L.hs_log.label, sizeof(L.hs_log.label), "identity=- source=\"handshakes refused "
		 "or failed\"");
	L.base = event_base_new();
	if (!L.base) {
		log_error("loop: cannot create the event base");
		return -1;
	}
	if (coap_setup(c) < 0)
		return -1;
	fd = coap_context_get_coap_fd(L.coap);
	if (fd < 0) {
		log_error("loop: libcoap has no epoll fd (built without epoll?)");
		return -1;
	}
	L.coap_ev = event_new(L.base, fd, EV_READ | EV_PERSIST, on_coap_fd, NULL);
	L.tick_ev = event_new(L.base, -1, EV_PERSIST, on_tick, NULL);
	L.kick_ev = event_new(L.base, -1, 0, on_kick, NULL);
	if (!L.coap_ev || !L.tick_ev || !L.kick_ev || event_add(L.coap_ev, NULL) < 0 ||
	    event_add(L.tick_ev, &tick) < 0) {
		log_error("loop: cannot register loop events");
		return -1;
	}
	prepare(PREPARE_ALL);
	return 0;
}

int loop_run(void)
{
	return event_base_dispatch(L.base);
}

void loop_stop(void)
{
	event_base_loopbreak(L.base);
}

void loop_close_listeners(void)
{
	if (L.coap_ev)
		event_del(L.coap_ev);
}

void loop_shutdown(void)
{
	if (L.coap_ev)
		event_free(L.coap_ev);
	if (L.tick_ev)
		event_free(L.tick_ev);
	if (L.kick_ev)
		event_free(L.kick_ev);
	L.coap_ev = L.tick_ev = L.kick_ev = NULL;
	if (L.coap)
		coap_free_context(L.coap);
	L.coap = NULL;
	L.n_ep = 0;
	coap_wolfssl_set_server_cipher_list(NULL);
	coap_cleanup();
	if (L.base)
		event_base_free(L.base);
	L.base = NULL;
}
