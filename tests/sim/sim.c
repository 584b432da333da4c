/* sim.c: coap2mqtt-sim, N simulated DTLS-PSK CoAP devices: readings out, served resources in. */
#include <coap3/coap.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef C2M_VERSION
#define C2M_VERSION "dev"
#endif

#define SIM_MAX_DEVICES		10000
#define SIM_MAX_WINDOW		1000
#define SIM_MAX_SLOTS		1000000		/* devices * window */
#define SIM_MAX_PAYLOAD		(1024 * 1024)
#define SIM_MAX_IDENTITY	128
#define SIM_MAX_KEY		64
#define SIM_MAX_SEGMENTS	64
#define SIM_MAX_SEGMENT		255		/* Uri-Path option length */
#define SIM_SHOW_PAYLOAD	64
#define SIM_TOKEN_LEN		8		/* slot(2) seq(4) random(2) */
#define SIM_NON_WAIT_US		2000000		/* NON_TIMEOUT: an unanswered NON frees its slot */
#define SIM_NON_DRAIN_US	500000		/* after the last NON, wait for answers */
#define SIM_STOP_DRAIN_US	1000000		/* after SIGINT/SIGTERM, wait for answers */
#define SIM_HOUSEKEEP_US	250000
#define SIM_PREPARE_US		50000	/* libcoap's timer scan at least this often */
#define SIM_EPOLL_BATCH		64
#define SIM_BACKOFF_MIN_US	1000000
#define SIM_BACKOFF_MAX_US	30000000
#define SIM_NEVER		INT64_MAX
#define SIM_MAX_OBS		8		/* observations held per device (--serve) */
#define SIM_OBS_TOKEN_MAX	8		/* tokens up to RFC 7252's 8 bytes */
#define SIM_MAX_LED		(64 * 1024)	/* largest led body accepted (4.13 above) */
#define SIM_LED_ECHO		256		/* a PUT answer echoes the new state up to this */
#define SIM_MAX_BODY		(64 * 1024)	/* largest --config-size */
#define SIM_MAX_CONFIG_COPIES	16		/* --config-copies */
#define SIM_SHOW_BODY		64

#define SIM_DEFAULT_PAYLOAD	"{\"device\":\"{id}\",\"seq\":{seq},\"value\":{value}}"

enum { EXIT_USAGE = 2 };

struct opts {
	const char *uri;
	const char *identity;		/* literal, or a printf format with one %d */
	bool identity_set;
	uint8_t key[SIM_MAX_KEY];
	size_t key_len;
	bool key_set;
	const char *keys_file;
	long devices;
	bool devices_set;
	long first;
	long source_port;	/* 0: the kernel picks each device's port */
	long count;
	long interval_ms;
	long ramp_ms;
	long window;
	coap_pdu_type_t type;
	coap_pdu_code_t method;
	const char *path;
	const char *payload;
	const char *payload_file;
	long content_format;
	long block_size;
	double timeout_s;
	bool timeout_set;
	double ack_timeout_s;		/* 0 = libcoap's default */
	double handshake_s;		/* 0 = libcoap's own limit */
	long max_handshakes;		/* 0 = unlimited */
	long max_retransmit;		/* -1 = libcoap's default */
	const char *cipher;
	int verbosity;			/* 0 quiet, 1 normal, 2 verbose, 3 debug */
	bool count_set;
	bool serve;			/* serve resources on each device's session */
	bool hold;			/* open the sessions, send readings after SIGUSR1 */
	long notify_ms;
	int notify_flags;		/* COAP_RESOURCE_FLAGS_NOTIFY_* */
	long stale_every;		/* 0 = never */
	long unknown_every;		/* 0 = never */
	long config_size;
	long config_copies;		/* config served at config, config2, ... configN */
	long stall_puts;		/* PUT/POSTs on led acknowledged but never answered */
	const char *oscore;		/* --oscore: the device's context, or NULL */
	long oscore_seq;		/* --oscore-seq: its first Sender Sequence Number */
	bool oscore_b2;			/* --oscore-b2: agree fresh keys first (RFC 8613 B.2) */
};

/* Resources a device serves with --serve. */
enum sim_res { RES_TEMPERATURE, RES_HUMIDITY, RES_CONFIG, RES_LED, RES_N };

static const char *const res_name[RES_N] = { "temperature", "humidity", "config", "led" };

/* An observation the gateway registered on this device's session (libcoap keeps the real
 * subscription; this is what the simulator reports and needs for its test hooks). */
struct obs_rec {
	uint8_t token[SIM_OBS_TOKEN_MAX];
	size_t token_len;		/* 0 = unused */
	enum sim_res res;
	uint32_t notifies;		/* notifications since the registration */
	uint32_t last_observe;		/* Observe value libcoap gave the last one */
	coap_mid_t last_mid;
};

/* A notification the simulator sends by hand, after libcoap's own ones went out. */
struct extra_notify {
	bool due;
	uint8_t token[SIM_OBS_TOKEN_MAX];
	size_t token_len;
	uint32_t observe;
};

struct slot {
	uint32_t seq;			/* 0 = free */
	uint16_t rnd;
	int64_t sent_us;
};

enum dev_state {
	DEV_IDLE,			/* no session; the next reading opens one */
	DEV_OPEN,			/* session exists (handshake or up) */
	DEV_DEAD,			/* session failed inside a callback; released by the loop */
	DEV_GAVE_UP,			/* handshake failed with --count > 0: no more readings */
};

struct device {
	char *identity;
	uint8_t key[SIM_MAX_KEY];
	size_t key_len;
	coap_session_t *session;
	enum dev_state state;
	bool up;			/* this session completed its handshake */
	bool hs_counted;		/* counted in sim.handshaking */
	bool reconnect;			/* open a new session once nothing is outstanding */
	uint32_t seq;			/* last sequence number used */
	unsigned outstanding;
	struct slot *slots;
	int64_t next_due_us;
	int64_t opened_us;
	int64_t backoff_us;
	double base_value;
	uint64_t rng;
	/* --serve */
	struct obs_rec obs[SIM_MAX_OBS];
	uint32_t res_seq[RES_N];	/* representations made per resource */
	double temperature, humidity;
	uint32_t tick;			/* value changes so far */
	uint8_t *led;
	size_t led_len;
	int led_cf;			/* -1 = none */
	struct extra_notify stale;	/* --stale-every: an older Observe number */
	struct extra_notify unknown;	/* --unknown-every: a token the gateway never gave */
	bool unknown_live;		/* waiting for the answer to it */
	int64_t open_after_us;		/* --serve: reopen the session from then on */
	int64_t wake_us;		/* when dev_tick() next wants to run */
	size_t heap_at;			/* 1 + its index in sim.due; 0 = not there */
	bool hs_queued;			/* in sim.hs_wait */
};

struct path_tmpl {
	char *seg[SIM_MAX_SEGMENTS];	/* raw segments: {id}, {seq}, %XX still in place */
	size_t n;
};

struct sim {
	struct opts o;
	coap_context_t *ctx;
	coap_address_t dst;
	coap_proto_t proto;
	char *sni;
	struct device *dev;
	size_t ndev;
	struct path_tmpl path;
	uint8_t *file_payload;
	size_t file_len;
	bool have_file;
	uint64_t sent, answered, ok, errors, timeouts, dtls_failed;
	uint64_t con_pending, non_pending;
	size_t gave_up;
	long handshaking;		/* DTLS handshakes in progress */
	int64_t deadline_us;		/* 0 = none */
	int64_t last_send_us;
	int64_t stop_us;		/* 0 = running */
	int64_t con_expire_us;
	int64_t handshake_us;		/* 0 = no limit of our own */
	int (*sec_default)(const SSL *, const SSL_CTX *, int, int, int, void *, void *);
	coap_resource_t *res[RES_N];	/* --serve */
	coap_resource_t *config_copy[SIM_MAX_CONFIG_COPIES];	/* config2.. (--config-copies) */
	int64_t next_notify_us;
	uint64_t notifies, puts;
	bool holding;			/* --hold, until SIGUSR1 */
	/* Which devices to tick: a heap by wake_us, plus a full sweep when set */
	struct device **due;
	size_t ndue;
	bool sweep;
	/* devices waiting for a handshake slot (--max-handshakes), first come first served */
	struct device **hs_wait;
	size_t hs_head, hs_len;
};

static volatile sig_atomic_t sim_signals, sim_release;

/* ---- small helpers ---- */

static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * The devices' wake-up times, in a binary heap: each loop turn ticks only the devices that are
 * due, so the simulator's cost per reading does not grow with its number of devices. Anything
 * that changes a device outside dev_tick() (an answer, a session event) makes it due at once
 * (dev_poke), as does the end of a handshake for the first device waiting for a slot; a full
 * sweep runs at the start, after housekeeping and on a signal.
 */
static bool
due_before(const struct device *a, const struct device *b)
{
	return a->wake_us < b->wake_us;
}

static void
due_set(struct sim *s, size_t i, struct device *d)
{
	s->due[i] = d;
	d->heap_at = i + 1;
}

static void
due_up(struct sim *s, size_t i)
{
	struct device *d = s->due[i];

	while (i > 0 && due_before(d, s->due[(i - 1) / 2])) {
		due_set(s, i, s->due[(i - 1) / 2]);
		i = (i - 1) / 2;
	}
	due_set(s, i, d);
}

static void
due_down(struct sim *s, size_t i)
{
	struct device *d = s->due[i];

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= s->ndue)
			break;
		if (c + 1 < s->ndue && due_before(s->due[c + 1], s->due[c]))
			c++;
		if (!due_before(s->due[c], d))
			break;
		due_set(s, i, s->due[c]);
		i = c;
	}
	due_set(s, i, d);
}

/* d next wants to run at t (SIM_NEVER: only when poked). */
static void
dev_want(struct sim *s, struct device *d, int64_t t)
{
	if (!s->due)
		return;		/* outside sim_loop() */
	if (d->heap_at) {
		size_t i = d->heap_at - 1;

		if (t == SIM_NEVER) {
			struct device *last = s->due[--s->ndue];

			d->heap_at = 0;
			if (i < s->ndue) {
				due_set(s, i, last);
				due_up(s, i);
				due_down(s, last->heap_at - 1);
			}
			return;
		}
		d->wake_us = t;
		due_up(s, i);
		due_down(s, d->heap_at - 1);
		return;
	}
	if (t == SIM_NEVER)
		return;
	d->wake_us = t;
	due_set(s, s->ndue++, d);
	due_up(s, s->ndue - 1);
}

static void
dev_poke(struct sim *s, struct device *d)
{
	dev_want(s, d, 0);
}

static uint64_t
rng_next(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static uint64_t
rng_seed(void)
{
	uint64_t v = 0;

	if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v))
		v = (uint64_t)now_us() ^ ((uint64_t)getpid() << 32);
	return v ? v : 0x9e3779b97f4a7c15ULL;
}

/* Writes bytes as text for a key=value line: printable ASCII as is, the rest escaped. */
static void
escape(const uint8_t *p, size_t n, bool quoted, char *out, size_t outsz)
{
	size_t o = 0;

	for (size_t i = 0; i < n && o + 5 < outsz; i++) {
		uint8_t c = p[i];

		if (c == '\\' || (c == '"' && quoted))
			o += (size_t)snprintf(out + o, outsz - o, "\\%c", c);
		else if (c == '\n')
			o += (size_t)snprintf(out + o, outsz - o, "\\n");
		else if (c > ' ' && c < 0x7f)
			out[o++] = (char)c;
		else if (c == ' ' && quoted)
			out[o++] = ' ';
		else
			o += (size_t)snprintf(out + o, outsz - o, "\\x%02x", c);
	}
	out[o] = '\0';
}

static const char *
dev_name(const struct device *d)
{
	static char buf[SIM_MAX_IDENTITY * 4 + 1];

	escape((const uint8_t *)d->identity, strlen(d->identity), false, buf, sizeof(buf));
	return buf;
}

static int
hex_val(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decodes hex (optionally "hex:"-prefixed) into out; returns the length or -1. */
static int
hex_decode(const char *hex, uint8_t *out, size_t outlen)
{
	size_t n;

	if (strncasecmp(hex, "hex:", 4) == 0)
		hex += 4;
	n = strlen(hex);
	if (n == 0 || n % 2 != 0 || n / 2 > outlen)
		return -1;
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hex_val(hex[2 * i]), lo = hex_val(hex[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return (int)(n / 2);
}

/* ---- command line ---- */

static void
usage(FILE *f)
{
	fputs(
"usage: coap2mqtt-sim [options]\n"
"Runs N simulated devices, each with its own DTLS-PSK CoAP session, sending readings\n"
"and (--serve) serving resources on that session.\n"
"\n"
"  --uri URI            gateway, default coaps://127.0.0.1:5684 (coap:// = NoSec);\n"
"                       a path in the URI goes before --path\n"
"  --identity ID        PSK identity, default sensor-%03d (one device: sensor-001); a\n"
"                       printf format with one %d numbers the devices from --first\n"
"                       (needed with --devices > 1); a literal % is written %%\n"
"  --first K            number of the first device, default 1\n"
"  --source-port P      device i (from 0) sends from port P+i, default: a port the kernel\n"
"                       picks (libcoap sets SO_REUSEADDR, so two of them can be given the\n"
"                       same port, and a gateway then sees one peer); P+devices-1 <= 65535\n"
"  --key KEY            PSK key as text (all devices share it)\n"
"  --oscore SPEC        protect every message with OSCORE (RFC 8613), one device:\n"
"                       sender_id=HEX,recipient_id=HEX,secret=HEX[,salt=HEX] as the\n"
"                       device sees them; over coap:// (or inside coaps:// with a key)\n"
"  --oscore-seq N       the device's first Sender Sequence Number, default 0\n"
"  --oscore-b2          first agree fresh keys with the gateway (RFC 8613 Appendix B.2), as a\n"
"                       device that keeps no sequence number across restarts does\n"
"  --key-hex HEX        PSK key as hex instead\n"
"  --keys FILE          devices from a keys file instead: \"identity key\" or\n"
"                       \"identity hex:HEX\" per line, '#' comments; the first N entries\n"
"  --devices N          number of devices (sessions), 1..10000, default 1 (--keys: all)\n"
"  --count M            readings per device, default 1 (--serve: 0); 0 = until\n"
"                       SIGINT/SIGTERM (--serve: no readings)\n"
"  --interval MS        between one device's readings, default 1000; 0 = as fast as\n"
"                       the window allows\n"
"  --ramp MS            spread the devices' first readings evenly over MS (each keeps its\n"
"                       phase), default the interval; 0 = all at once\n"
"  --window W           outstanding requests per device, 1..1000, default 1; it is also\n"
"                       the session's NSTART (an unanswered NON stops counting after\n"
"                       min(2 s, interval))\n"
"  --type con|non       message type, default con\n"
"  --method post|put    request method, default post\n"
"  --path PATH          Uri-Path split on '/', default sensors/temperature; {id} and {seq}\n"
"                       are replaced and %XX decoded to raw bytes within each segment\n"
"  --payload TEXT       {id}, {seq}, {value} replaced, {time} by the wall-clock time it\n"
"                       was sent (seconds.microseconds), default\n"
"                       " SIM_DEFAULT_PAYLOAD "\n"
"  --payload-file FILE  send the file's bytes verbatim (at most 1 MiB, block-wise if large)\n"
"  --content-format N   Content-Format, default 50 (application/json); -1 = none\n"
"  --block-size N       largest Block1 size: 16, 32, ..., 1024 (default 1024)\n"
"  --timeout S          overall deadline in seconds; default 60 with --count > 0, none with\n"
"                       --count 0 or --serve; 0 = none. Unanswered requests then count as\n"
"                       timeouts\n"
"  --ack-timeout S      CoAP ACK_TIMEOUT, at least 1 (libcoap's limit), default 2\n"
"  --max-retransmit N   CoAP MAX_RETRANSMIT, 1..20 (also bounds DTLS handshake retries),\n"
"                       default 4\n"
"  --handshake-timeout S  a DTLS handshake not done by then fails (dtls-failed), default 5;\n"
"                       0 = libcoap's own limit (31 s or more). A wrong key shows only this\n"
"                       way: DTLS silently drops records it cannot decrypt\n"
"  --max-handshakes N   DTLS handshakes in progress at once, default 100 (what a libcoap\n"
"                       server accepts by default); 0 = no limit\n"
"  --cipher LIST        offer only these DTLS cipher suites (OpenSSL or IANA names,\n"
"                       ':'-separated), e.g. PSK-AES128-CCM8\n"
"  --hold               open every device's session at start (--max-handshakes at a time) and\n"
"                       send no reading before SIGUSR1; --ramp and --interval count from\n"
"                       then (a benchmark measures readings with every session up)\n"
"  --serve              each device serves, on the session it opened, as a sensor node:\n"
"                       temperature, humidity (GET, observable), config (GET, observable,\n"
"                       --config-size bytes, block-wise), led (PUT/POST stores, GET reads,\n"
"                       DELETE clears); .well-known/core lists them (;obs). The session is\n"
"                       opened at start, kept until the deadline or a signal, and reopened\n"
"                       when it ends; readings (--count) can be sent as well\n"
"  --notify-interval MS  observable values change every MS (1..86400000), default 1000\n"
"  --notify-type con|non|non-always  notification type, default non: NON with every\n"
"                       5th CON (RFC 7641 4.5, libcoap's rule); non-always: only NON\n"
"  --stale-every K      after every K-th (K >= 2) temperature notification of an\n"
"                       observation, send one more on its token with an Observe number\n"
"                       lower than the previous one (reordered, stale)\n"
"  --unknown-every K    after every K-th temperature notification, send a CON\n"
"                       notification on a token the gateway never gave (expects RST)\n"
"  --config-size N      bytes of the config resource, 64..65536, default 3072\n"
"  --config-copies N    config is also served (and observable) at config2 .. configN,\n"
"                       1..16, default 1: bodies fetched block-wise side by side\n"
"  --stall-puts N       the first N PUT/POSTs on led (per simulator) are acknowledged\n"
"                       (empty ACK, a separate response to come) and never answered\n"
"  --quiet              print only dtls-failed lines and the summary\n"
"  --verbose            also dtls-connected events and libcoap's info log (stderr);\n"
"                       twice: libcoap's debug log\n"
"  --help, --version\n"
"\n"
"Output on stdout, one line per event:\n"
"  device=ID seq=N code=2.04 rtt_ms=4.1 payload=\"...\"  a response (payload escaped,\n"
"                                                     first 64 bytes; rtt from first send)\n"
"  device=ID seq=N event=timeout                      no response (retries exhausted,\n"
"                                                     or deadline)\n"
"  device=ID seq=N event=failed reason=R              request failed (rst, tls, ...)\n"
"  device=ID event=dtls-failed                        handshake failed or not done by the\n"
"                                                     handshake timeout or at exit\n"
"  device=ID event=dtls-closed                        an up session ended; it reconnects\n"
"  device=ID event=dtls-connected cipher=C            (--verbose, --hold) handshake done\n"
"  sent=N answered=N ok=N errors=N timeouts=N         on exit; ok = 2.xx responses,\n"
"                                                     errors = other responses and\n"
"                                                     failed requests (--serve adds\n"
"                                                     notifies=N puts=N)\n"
"--serve adds (TOKEN in hex, SHA in hex, TYPE con|non|ack):\n"
"  device=ID event=observe path=P token=TOKEN         an observation registered\n"
"  device=ID event=observe-cancel path=P token=TOKEN reason=R  cancel (GET Observe 1),\n"
"                                                     rst, timeout, replaced, closed\n"
"  device=ID event=notify path=P token=TOKEN seq=N observe=V type=TYPE value=X [first=1]\n"
"                                                     a representation with Observe\n"
"                                                     (config: bytes=N sha256=SHA; the\n"
"                                                     registration's answer has first=1;\n"
"                                                     --stale-every ones stale=1)\n"
"  device=ID event=notify path=temperature token=TOKEN unknown=1  --unknown-every\n"
"  device=ID event=rst path=P token=TOKEN [unknown=1]  the gateway reset a notification\n"
"  device=ID event=get path=P                         a GET without Observe\n"
"  device=ID event=put|post path=led bytes=N sha256=SHA payload=\"...\"  the whole body\n"
"  device=ID event=delete path=led\n"
"A device whose handshake fails stops (with --count 0 it retries, backing off to 30 s);\n"
"a CON timeout makes the device open a new session for its next reading.\n"
"Exit status: 0 when all readings were sent and every CON got a 2.xx, with no errors,\n"
"timeouts or failed handshakes; 1 otherwise; 2 for usage errors.\n", f);
}

static bool
parse_long(const char *name, const char *arg, long min, long max, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(arg, &end, 10);
	if (errno != 0 || end == arg || *end != '\0' || v < min || v > max) {
		fprintf(stderr, "coap2mqtt-sim: %s: '%s' is not a number in %ld..%ld\n",
		    name, arg, min, max);
		return false;
	}
	*out = v;
	return true;
}

static bool
parse_double(const char *name, const char *arg, double min, double max, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (errno != 0 || end == arg || *end != '\0' || !(v >= min && v <= max)) {
		fprintf(stderr, "coap2mqtt-sim: %s: '%s' is not a number in %g..%g\n",
		    name, arg, min, max);
		return false;
	}
	*out = v;
	return true;
}

/* Counts integer conversions in an identity format; -1 when it holds anything else. */
static int
id_format_convs(const char *f)
{
	int n = 0;

	for (const char *p = f; *p; p++) {
		if (*p != '%')
			continue;
		if (*++p == '%')
			continue;
		p += strspn(p, "-+ 0#");
		p += strspn(p, "0123456789");
		if (*p != 'd' && *p != 'i' && *p != 'u' && *p != 'x' && *p != 'X')
			return -1;
		n++;
	}
	return n;
}

static void
opts_defaults(struct opts *o)
{
	memset(o, 0, sizeof(*o));
	o->uri = "coaps://127.0.0.1:5684";
	o->identity = "sensor-%03d";
	o->devices = 1;
	o->first = 1;
	o->count = 1;
	o->interval_ms = 1000;
	o->window = 1;
	o->ramp_ms = -1;
	o->type = COAP_MESSAGE_CON;
	o->method = COAP_REQUEST_CODE_POST;
	o->path = "sensors/temperature";
	o->payload = SIM_DEFAULT_PAYLOAD;
	o->content_format = COAP_MEDIATYPE_APPLICATION_JSON;
	o->max_retransmit = -1;
	o->handshake_s = 5;
	o->max_handshakes = 100;
	o->verbosity = 1;
	o->notify_ms = 1000;
	o->notify_flags = COAP_RESOURCE_FLAGS_NOTIFY_NON;
	o->config_size = 3072;
	o->config_copies = 1;
}

enum {
	OPT_URI = 256, OPT_OSCORE, OPT_OSCORE_SEQ, OPT_OSCORE_B2, OPT_IDENTITY, OPT_FIRST, OPT_SOURCE_PORT, OPT_KEY, OPT_KEY_HEX, OPT_KEYS, OPT_DEVICES,
	OPT_COUNT, OPT_INTERVAL, OPT_RAMP, OPT_WINDOW, OPT_TYPE, OPT_METHOD, OPT_PATH,
	OPT_PAYLOAD, OPT_PAYLOAD_FILE, OPT_CF, OPT_BLOCK, OPT_TIMEOUT, OPT_ACK_TIMEOUT,
	OPT_MAX_RETRANSMIT, OPT_HANDSHAKE, OPT_MAX_HS, OPT_CIPHER, OPT_QUIET, OPT_VERBOSE, OPT_HELP,
	OPT_VERSION, OPT_HOLD, OPT_SERVE, OPT_NOTIFY_INTERVAL, OPT_NOTIFY_TYPE, OPT_STALE_EVERY,
	OPT_UNKNOWN_EVERY, OPT_CONFIG_SIZE, OPT_CONFIG_COPIES, OPT_STALL_PUTS,
};

static const struct option long_opts[] = {
	{ "uri", required_argument, NULL, OPT_URI },
	{ "identity", required_argument, NULL, OPT_IDENTITY },
	{ "oscore", required_argument, NULL, OPT_OSCORE },
	{ "oscore-seq", required_argument, NULL, OPT_OSCORE_SEQ },
	{ "oscore-b2", no_argument, NULL, OPT_OSCORE_B2 },
	{ "first", required_argument, NULL, OPT_FIRST },
	{ "source-port", required_argument, NULL, OPT_SOURCE_PORT },
	{ "key", required_argument, NULL, OPT_KEY },
	{ "key-hex", required_argument, NULL, OPT_KEY_HEX },
	{ "keys", required_argument, NULL, OPT_KEYS },
	{ "devices", required_argument, NULL, OPT_DEVICES },
	{ "count", required_argument, NULL, OPT_COUNT },
	{ "interval", required_argument, NULL, OPT_INTERVAL },
	{ "ramp", required_argument, NULL, OPT_RAMP },
	{ "window", required_argument, NULL, OPT_WINDOW },
	{ "type", required_argument, NULL, OPT_TYPE },
	{ "method", required_argument, NULL, OPT_METHOD },
	{ "path", required_argument, NULL, OPT_PATH },
	{ "payload", required_argument, NULL, OPT_PAYLOAD },
	{ "payload-file", required_argument, NULL, OPT_PAYLOAD_FILE },
	{ "content-format", required_argument, NULL, OPT_CF },
	{ "block-size", required_argument, NULL, OPT_BLOCK },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "ack-timeout", required_argument, NULL, OPT_ACK_TIMEOUT },
	{ "max-retransmit", required_argument, NULL, OPT_MAX_RETRANSMIT },
	{ "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE },
	{ "max-handshakes", required_argument, NULL, OPT_MAX_HS },
	{ "cipher", required_argument, NULL, OPT_CIPHER },
	{ "quiet", no_argument, NULL, OPT_QUIET },
	{ "verbose", no_argument, NULL, OPT_VERBOSE },
	{ "help", no_argument, NULL, OPT_HELP },
	{ "version", no_argument, NULL, OPT_VERSION },
	{ "serve", no_argument, NULL, OPT_SERVE },
	{ "hold", no_argument, NULL, OPT_HOLD },
	{ "notify-interval", required_argument, NULL, OPT_NOTIFY_INTERVAL },
	{ "notify-type", required_argument, NULL, OPT_NOTIFY_TYPE },
	{ "stale-every", required_argument, NULL, OPT_STALE_EVERY },
	{ "unknown-every", required_argument, NULL, OPT_UNKNOWN_EVERY },
	{ "config-size", required_argument, NULL, OPT_CONFIG_SIZE },
	{ "config-copies", required_argument, NULL, OPT_CONFIG_COPIES },
	{ "stall-puts", required_argument, NULL, OPT_STALL_PUTS },
	{ NULL, 0, NULL, 0 },
};

static bool
opt_key(struct opts *o, const char *arg, bool hex)
{
	int n;

	if (hex) {
		n = hex_decode(arg, o->key, sizeof(o->key));
	} else {
		n = (int)strlen(arg);
		if (n > 0 && n <= SIM_MAX_KEY)
			memcpy(o->key, arg, (size_t)n);
		else
			n = -1;
	}
	if (n <= 0) {
		fprintf(stderr, "coap2mqtt-sim: %s: a key of 1..%d bytes is needed%s\n",
		    hex ? "--key-hex" : "--key", SIM_MAX_KEY,
		    hex ? " (an even number of hex digits)" : "");
		return false;
	}
	o->key_len = (size_t)n;
	o->key_set = true;
	return true;
}

static bool
opt_enum(const char *name, const char *arg, const char *a, const char *b, int va, int vb,
    int *out)
{
	if (strcasecmp(arg, a) == 0)
		*out = va;
	else if (strcasecmp(arg, b) == 0)
		*out = vb;
	else {
		fprintf(stderr, "coap2mqtt-sim: %s: '%s' is not %s or %s\n", name, arg, a, b);
		return false;
	}
	return true;
}

static int
opt_num(const char *name, const char *arg, long min, long max, long *out)
{
	return parse_long(name, arg, min, max, out) ? 0 : -1;
}

static int
opt_real(const char *name, const char *arg, double min, double max, double *out)
{
	return parse_double(name, arg, min, max, out) ? 0 : -1;
}

static int
opt_type(struct opts *o, const char *arg)
{
	int v;

	if (!opt_enum("--type", arg, "con", "non", COAP_MESSAGE_CON, COAP_MESSAGE_NON, &v))
		return -1;
	o->type = (coap_pdu_type_t)v;
	return 0;
}

static int
opt_method(struct opts *o, const char *arg)
{
	int v;

	if (!opt_enum("--method", arg, "post", "put", COAP_REQUEST_CODE_POST,
	    COAP_REQUEST_CODE_PUT, &v))
		return -1;
	o->method = (coap_pdu_code_t)v;
	return 0;
}

static int
opt_notify_type(struct opts *o, const char *arg)
{
	if (strcasecmp(arg, "con") == 0)
		o->notify_flags = COAP_RESOURCE_FLAGS_NOTIFY_CON;
	else if (strcasecmp(arg, "non") == 0)
		o->notify_flags = COAP_RESOURCE_FLAGS_NOTIFY_NON;
	else if (strcasecmp(arg, "non-always") == 0)
		o->notify_flags = COAP_RESOURCE_FLAGS_NOTIFY_NON |
		    COAP_RESOURCE_FLAGS_NOTIFY_NON_ALWAYS;
	else {
		fprintf(stderr, "coap2mqtt-sim: --notify-type: '%s' is not con, non or "
		    "non-always\n", arg);
		return -1;
	}
	return 0;
}

/* One option; returns 0 ok, 1 stop with success (help/version), -1 usage error. */
static int
opt_one(struct opts *o, int c, const char *arg)
{
	switch (c) {
	case OPT_URI:		o->uri = arg; return 0;
	case OPT_OSCORE:	o->oscore = arg; return 0;
	case OPT_OSCORE_B2:	o->oscore_b2 = true; return 0;
	case OPT_OSCORE_SEQ:
		return opt_num("--oscore-seq", arg, 0, LONG_MAX, &o->oscore_seq);
	case OPT_IDENTITY:	o->identity = arg; o->identity_set = true; return 0;
	case OPT_FIRST:
		return opt_num("--first", arg, 0, INT_MAX - SIM_MAX_DEVICES, &o->first);
	case OPT_SOURCE_PORT:	return opt_num("--source-port", arg, 1, 65535, &o->source_port);
	case OPT_KEY:		return opt_key(o, arg, false) ? 0 : -1;
	case OPT_KEY_HEX:	return opt_key(o, arg, true) ? 0 : -1;
	case OPT_KEYS:		o->keys_file = arg; return 0;
	case OPT_DEVICES:
		o->devices_set = true;
		return opt_num("--devices", arg, 1, SIM_MAX_DEVICES, &o->devices);
	case OPT_COUNT:
		o->count_set = true;
		return opt_num("--count", arg, 0, UINT32_MAX - 1, &o->count);
	case OPT_INTERVAL:	return opt_num("--interval", arg, 0, 86400000, &o->interval_ms);
	case OPT_RAMP:		return opt_num("--ramp", arg, 0, 86400000, &o->ramp_ms);
	case OPT_WINDOW:	return opt_num("--window", arg, 1, SIM_MAX_WINDOW, &o->window);
	case OPT_TYPE:		return opt_type(o, arg);
	case OPT_METHOD:	return opt_method(o, arg);
	case OPT_PATH:		o->path = arg; return 0;
	case OPT_PAYLOAD:	o->payload = arg; return 0;
	case OPT_PAYLOAD_FILE:	o->payload_file = arg; return 0;
	case OPT_CF:
		return opt_num("--content-format", arg, -1, 65535, &o->content_format);
	case OPT_BLOCK:		return opt_num("--block-size", arg, 16, 1024, &o->block_size);
	case OPT_TIMEOUT:
		o->timeout_set = true;
		return opt_real("--timeout", arg, 0, 31536000, &o->timeout_s);
	case OPT_ACK_TIMEOUT:	return opt_real("--ack-timeout", arg, 1, 600, &o->ack_timeout_s);
	case OPT_MAX_RETRANSMIT:
		return opt_num("--max-retransmit", arg, 1, 20, &o->max_retransmit);
	case OPT_HANDSHAKE:
		return opt_real("--handshake-timeout", arg, 0, 3600, &o->handshake_s);
	case OPT_MAX_HS:
		return opt_num("--max-handshakes", arg, 0, SIM_MAX_DEVICES, &o->max_handshakes);
	case OPT_CIPHER:	o->cipher = arg; return 0;
	case OPT_QUIET:		o->verbosity = 0; return 0;
	case OPT_VERBOSE:	o->verbosity = o->verbosity < 1 ? 2 : o->verbosity + 1; return 0;
	case OPT_SERVE:		o->serve = true; return 0;
	case OPT_HOLD:		o->hold = true; return 0;
	case OPT_NOTIFY_INTERVAL:
		return opt_num("--notify-interval", arg, 1, 86400000, &o->notify_ms);
	case OPT_NOTIFY_TYPE:	return opt_notify_type(o, arg);
	case OPT_STALE_EVERY:
		return opt_num("--stale-every", arg, 2, INT_MAX, &o->stale_every);
	case OPT_UNKNOWN_EVERY:
		return opt_num("--unknown-every", arg, 1, INT_MAX, &o->unknown_every);
	case OPT_CONFIG_SIZE:
		return opt_num("--config-size", arg, 64, SIM_MAX_BODY, &o->config_size);
	case OPT_CONFIG_COPIES:
		return opt_num("--config-copies", arg, 1, SIM_MAX_CONFIG_COPIES, &o->config_copies);
	case OPT_STALL_PUTS:
		return opt_num("--stall-puts", arg, 0, INT_MAX, &o->stall_puts);
	case OPT_HELP:		usage(stdout); return 1;
	case OPT_VERSION:
		printf("coap2mqtt-sim %s (libcoap %s)\n", C2M_VERSION, LIBCOAP_PACKAGE_VERSION);
		return 1;
	default:		usage(stderr); return -1;
	}
}

/* Checks that need more than one option. */
static bool
opts_check(struct opts *o)
{
	int convs = id_format_convs(o->identity);

	if (o->oscore && (o->keys_file || o->devices > 1)) {
		fprintf(stderr, "coap2mqtt-sim: --oscore is for one device (no --keys, no --devices)\n");
		return false;
	}
	if (o->keys_file && (o->identity_set || o->key_set)) {
		fprintf(stderr, "coap2mqtt-sim: --keys replaces --identity and --key/--key-hex\n");
		return false;
	}
	if (!o->keys_file && (convs < 0 || convs > 1)) {
		fprintf(stderr, "coap2mqtt-sim: --identity: '%s' may hold one %%d and no other "
		    "conversion (use %%%% for a literal %%)\n", o->identity);
		return false;
	}
	if (!o->keys_file && convs == 0 && o->devices > 1) {
		fprintf(stderr, "coap2mqtt-sim: --identity: with --devices %ld it needs one %%d, "
		    "e.g. sensor-%%03d\n", o->devices);
		return false;
	}
	if (o->block_size && (o->block_size & (o->block_size - 1))) {
		fprintf(stderr, "coap2mqtt-sim: --block-size: %ld is not a power of 2 in "
		    "16..1024\n", o->block_size);
		return false;
	}
	if (!o->serve && (o->stale_every || o->unknown_every)) {
		fprintf(stderr, "coap2mqtt-sim: --stale-every and --unknown-every need --serve\n");
		return false;
	}
	if (o->serve && !o->count_set)
		o->count = 0;
	if (!o->timeout_set)
		o->timeout_s = o->count > 0 && !o->serve ? 60 : 0;
	if (o->ramp_ms < 0)
		o->ramp_ms = o->interval_ms;
	return true;
}

static int
opts_parse(struct opts *o, int argc, char **argv)
{
	int c, r;

	opts_defaults(o);
	while ((c = getopt_long(argc, argv, "", long_opts, NULL)) != -1) {
		r = opt_one(o, c, optarg);
		if (r != 0)
			return r;
	}
	if (optind < argc) {
		fprintf(stderr, "coap2mqtt-sim: unexpected argument '%s' (see --help)\n",
		    argv[optind]);
		return -1;
	}
	return opts_check(o) ? 0 : -1;
}

/* ---- devices: keys file, identities ---- */

static bool
dev_set(struct device *d, const char *identity, const uint8_t *key, size_t key_len)
{
	size_t n = strlen(identity);

	if (n == 0 || n > SIM_MAX_IDENTITY || key_len > SIM_MAX_KEY)
		return false;
	d->identity = strdup(identity);
	if (!d->identity)
		return false;
	memcpy(d->key, key, key_len);
	d->key_len = key_len;
	return true;
}

/* One keys-file line: "identity key" or "identity hex:HEX"; returns an error text or NULL. */
static const char *
keys_line(char *line, struct device *d)
{
	char *save, *id, *key, *extra;
	uint8_t k[SIM_MAX_KEY];
	int n;

	id = strtok_r(line, " \t", &save);
	key = strtok_r(NULL, " \t", &save);
	extra = strtok_r(NULL, " \t", &save);
	if (!key || (extra && extra[0] != '#'))
		return "expected \"identity key\" or \"identity hex:HEX\"";
	if (strlen(id) > SIM_MAX_IDENTITY)
		return "identity longer than 128 bytes";
	if (strncasecmp(key, "hex:", 4) == 0)
		n = hex_decode(key, k, sizeof(k));
	else if ((n = (int)strlen(key)) <= SIM_MAX_KEY)
		memcpy(k, key, (size_t)n);
	else
		n = -1;
	if (n <= 0)
		return "key must be 1..64 bytes (hex: an even number of hex digits)";
	return dev_set(d, id, k, (size_t)n) ? NULL : "out of memory";
}

/* Loads up to max entries (0 = all) from a keys file into s->dev. */
static bool
keys_load(struct sim *s, const char *file, size_t max)
{
	FILE *f = fopen(file, "r");
	char *line = NULL;
	size_t cap = 0, lineno = 0, alloc = 0;
	int errors = 0;

	if (!f) {
		fprintf(stderr, "coap2mqtt-sim: %s: %s\n", file, strerror(errno));
		return false;
	}
	while (getline(&line, &cap, f) != -1 && (max == 0 || s->ndev < max)) {
		char *p = line + strspn(line, " \t");
		const char *err;

		lineno++;
		p[strcspn(p, "\r\n")] = '\0';
		if (*p == '\0' || *p == '#')
			continue;
		if (s->ndev == SIM_MAX_DEVICES) {
			fprintf(stderr, "%s:%zu: more than %d devices\n", file, lineno,
			    SIM_MAX_DEVICES);
			errors++;
			break;
		}
		if (s->ndev == alloc) {
			size_t grow = alloc ? alloc * 2 : 64;
			struct device *nd = realloc(s->dev, grow * sizeof(*nd));

			if (!nd) {
				errors++;
				break;
			}
			s->dev = nd;
			alloc = grow;
		}
		memset(&s->dev[s->ndev], 0, sizeof(s->dev[0]));
		if ((err = keys_line(p, &s->dev[s->ndev])) != NULL) {
			fprintf(stderr, "%s:%zu: %s\n", file, lineno, err);
			errors++;
			continue;
		}
		s->ndev++;
	}
	free(line);
	fclose(f);
	if (errors == 0 && s->ndev == 0)
		fprintf(stderr, "coap2mqtt-sim: %s: no devices in the file\n", file);
	return errors == 0 && s->ndev > 0;
}

static bool
devices_from_opts(struct sim *s)
{
	const struct opts *o = &s->o;
	char id[SIM_MAX_IDENTITY + 2];

	s->dev = calloc((size_t)o->devices, sizeof(*s->dev));
	if (!s->dev)
		return false;
	for (long i = 0; i < o->devices; i++) {
		int n;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
		n = snprintf(id, sizeof(id), o->identity, (int)(o->first + i));	/* one %d */
#pragma GCC diagnostic pop
		if (n < 0 || (size_t)n > SIM_MAX_IDENTITY ||
		    !dev_set(&s->dev[i], id, o->key, o->key_len)) {
			fprintf(stderr, "coap2mqtt-sim: --identity: '%s' gives an identity that is "
			    "empty or longer than %d bytes\n", o->identity, SIM_MAX_IDENTITY);
			return false;
		}
		s->ndev++;
	}
	return true;
}

/* Creates the devices and their request slots; false = usage error (already reported). */
static bool
devices_init(struct sim *s)
{
	const struct opts *o = &s->o;
	uint64_t seed = rng_seed();

	if (o->keys_file) {
		if (!keys_load(s, o->keys_file, o->devices_set ? (size_t)o->devices : 0))
			return false;
		if (o->devices_set && s->ndev < (size_t)o->devices) {
			fprintf(stderr, "coap2mqtt-sim: --devices %ld: %s has only %zu entries\n",
			    o->devices, o->keys_file, s->ndev);
			return false;
		}
	} else if (!devices_from_opts(s)) {
		return false;
	}
	if (o->source_port && (size_t)o->source_port + s->ndev - 1 > 65535) {
		fprintf(stderr, "coap2mqtt-sim: --source-port + devices - 1 is at most 65535\n");
		return false;
	}
	if (s->ndev * (size_t)o->window > SIM_MAX_SLOTS) {
		fprintf(stderr, "coap2mqtt-sim: --devices x --window is at most %d\n",
		    SIM_MAX_SLOTS);
		return false;
	}
	for (size_t i = 0; i < s->ndev; i++) {
		struct device *d = &s->dev[i];

		d->slots = calloc((size_t)o->window, sizeof(*d->slots));
		if (!d->slots)
			return false;
		d->rng = seed + 0x9e3779b97f4a7c15ULL * (i + 1);
		d->base_value = 18.0 + (double)(rng_next(&d->rng) % 800) / 100.0;
		d->backoff_us = SIM_BACKOFF_MIN_US;
		d->next_due_us = (int64_t)o->ramp_ms * 1000 * (int64_t)i / (int64_t)s->ndev;
	}
	return true;
}

static void
devices_free(struct sim *s)
{
	for (size_t i = 0; i < s->ndev; i++) {
		free(s->dev[i].identity);
		free(s->dev[i].slots);
		free(s->dev[i].led);
		memset(s->dev[i].key, 0, sizeof(s->dev[i].key));
	}
	free(s->dev);
	s->dev = NULL;
	s->ndev = 0;
}

/* ---- request contents: path and payload ---- */

static size_t
put_bytes(uint8_t *out, size_t cap, size_t at, const void *p, size_t n)
{
	if (out && at < cap)
		memcpy(out + at, p, n < cap - at ? n : cap - at);
	return at + n;
}

/* Expands a template into out and returns its length (may exceed cap; out may be NULL):
 * {id}, {seq}, and {value} and {time} when given (payloads); %XX escapes when pct (path
 * segments). */
static size_t
tmpl_expand(const char *t, const char *id, uint32_t seq, const char *value, const char *now,
    bool pct, uint8_t *out, size_t cap)
{
	char num[16];
	size_t n = 0;

	while (*t) {
		if (strncmp(t, "{id}", 4) == 0) {
			n = put_bytes(out, cap, n, id, strlen(id));
			t += 4;
		} else if (strncmp(t, "{seq}", 5) == 0) {
			snprintf(num, sizeof(num), "%" PRIu32, seq);
			n = put_bytes(out, cap, n, num, strlen(num));
			t += 5;
		} else if (value && strncmp(t, "{value}", 7) == 0) {
			n = put_bytes(out, cap, n, value, strlen(value));
			t += 7;
		} else if (now && strncmp(t, "{time}", 6) == 0) {
			n = put_bytes(out, cap, n, now, strlen(now));
			t += 6;
		} else if (pct && t[0] == '%' && hex_val(t[1]) >= 0 && hex_val(t[2]) >= 0) {
			uint8_t b = (uint8_t)(hex_val(t[1]) << 4 | hex_val(t[2]));

			n = put_bytes(out, cap, n, &b, 1);
			t += 3;
		} else {
			n = put_bytes(out, cap, n, t++, 1);
		}
	}
	return n;
}

static bool
path_seg_check(const char *seg, size_t longest_id)
{
	char id[SIM_MAX_IDENTITY + 1];

	for (const char *p = strchr(seg, '%'); p; p = strchr(p + 1, '%')) {
		if (hex_val(p[1]) < 0 || hex_val(p[2]) < 0) {
			fprintf(stderr, "coap2mqtt-sim: --path: '%s': '%%' must start a %%XX "
			    "escape\n", seg);
			return false;
		}
	}
	memset(id, 'x', longest_id);
	id[longest_id] = '\0';
	if (tmpl_expand(seg, id, UINT32_MAX, NULL, NULL, true, NULL, 0) > SIM_MAX_SEGMENT) {
		fprintf(stderr, "coap2mqtt-sim: --path: segment '%s' can exceed %d bytes\n", seg,
		    SIM_MAX_SEGMENT);
		return false;
	}
	return true;
}

/* Splits "uri-path/--path" into raw segments; a single leading '/' is ignored, an empty
 * path gives no Uri-Path option and "a//b" an empty segment. */
static bool
path_init(struct sim *s, const coap_uri_t *uri)
{
	size_t longest = 0, ulen = uri->path.length, plen = strlen(s->o.path);
	char *all = malloc(ulen + plen + 2), *p, *slash;
	bool ok = true;

	if (!all)
		return false;
	if (ulen)
		memcpy(all, uri->path.s, ulen);
	snprintf(all + ulen, plen + 2, "%s%s", ulen && plen ? "/" : "", s->o.path);
	for (size_t i = 0; i < s->ndev; i++) {
		if (strlen(s->dev[i].identity) > longest)
			longest = strlen(s->dev[i].identity);
	}
	for (p = all + (all[0] == '/'); ok && *all; p = slash + 1) {
		slash = strchr(p, '/');
		if (s->path.n == SIM_MAX_SEGMENTS) {
			fprintf(stderr, "coap2mqtt-sim: --path: more than %d segments\n",
			    SIM_MAX_SEGMENTS);
			ok = false;
			break;
		}
		s->path.seg[s->path.n] = strndup(p, slash ? (size_t)(slash - p) : strlen(p));
		ok = s->path.seg[s->path.n] && path_seg_check(s->path.seg[s->path.n], longest);
		s->path.n++;
		if (!slash)
			break;
	}
	free(all);
	return ok;
}

/* A plausible temperature: a per-device base, a slow wave and a little noise. */
static double
reading_value(struct device *d, uint32_t seq)
{
	double noise = (double)(rng_next(&d->rng) % 41) / 100.0 - 0.2;

	return d->base_value + 2.0 * sin((double)seq / 10.0) + noise;
}

static bool
payload_file_load(struct sim *s, const char *file)
{
	FILE *f = fopen(file, "rb");
	size_t n;

	if (!f) {
		fprintf(stderr, "coap2mqtt-sim: %s: %s\n", file, strerror(errno));
		return false;
	}
	s->file_payload = malloc(SIM_MAX_PAYLOAD + 1);
	n = s->file_payload ? fread(s->file_payload, 1, SIM_MAX_PAYLOAD + 1, f) : 0;
	if (!s->file_payload || ferror(f) || n > SIM_MAX_PAYLOAD) {
		fprintf(stderr, "coap2mqtt-sim: %s: %s\n", file,
		    n > SIM_MAX_PAYLOAD ? "larger than 1 MiB" : "cannot read");
		fclose(f);
		return false;
	}
	fclose(f);
	s->file_len = n;
	s->have_file = true;
	return true;
}

/* ---- output ---- */

static void
print_response(struct device *d, uint32_t seq, coap_pdu_code_t code, double rtt_ms,
    const uint8_t *data, size_t len)
{
	char shown[SIM_SHOW_PAYLOAD * 4 + 1];

	escape(data, len < SIM_SHOW_PAYLOAD ? len : SIM_SHOW_PAYLOAD, true, shown, sizeof(shown));
	printf("device=%s seq=%" PRIu32 " code=%d.%02d rtt_ms=%.1f payload=\"%s\"\n", dev_name(d),
	    seq, COAP_RESPONSE_CLASS(code), code & 0x1f, rtt_ms, shown);
}

static void
print_summary(const struct sim *s)
{
	printf("sent=%" PRIu64 " answered=%" PRIu64 " ok=%" PRIu64 " errors=%" PRIu64
	    " timeouts=%" PRIu64, s->sent, s->answered, s->ok, s->errors, s->timeouts);
	if (s->o.serve)
		printf(" notifies=%" PRIu64 " puts=%" PRIu64, s->notifies, s->puts);
	printf("\n");
}

static const char *
nack_name(coap_nack_reason_t r)
{
	switch (r) {
	case COAP_NACK_TOO_MANY_RETRIES:	return "timeout";
	case COAP_NACK_NOT_DELIVERABLE:		return "not-deliverable";
	case COAP_NACK_RST:			return "rst";
	case COAP_NACK_TLS_FAILED:		return "tls";
	case COAP_NACK_ICMP_ISSUE:		return "icmp";
	case COAP_NACK_BAD_RESPONSE:		return "bad-response";
	case COAP_NACK_TLS_LAYER_FAILED:	return "tls";
	default:				return "other";
	}
}

/* ---- request slots (token = slot, seq, random) ---- */

static void
token_make(const struct slot *sl, unsigned idx, uint8_t tok[SIM_TOKEN_LEN])
{
	tok[0] = (uint8_t)(idx >> 8);
	tok[1] = (uint8_t)idx;
	tok[2] = (uint8_t)(sl->seq >> 24);
	tok[3] = (uint8_t)(sl->seq >> 16);
	tok[4] = (uint8_t)(sl->seq >> 8);
	tok[5] = (uint8_t)sl->seq;
	tok[6] = (uint8_t)(sl->rnd >> 8);
	tok[7] = (uint8_t)sl->rnd;
}

/* The outstanding request a token names, or NULL (late, unknown or foreign). */
static struct slot *
slot_find(const struct sim *s, struct device *d, coap_bin_const_t tok)
{
	uint8_t want[SIM_TOKEN_LEN];
	unsigned idx;

	if (tok.length != SIM_TOKEN_LEN)
		return NULL;
	idx = (unsigned)tok.s[0] << 8 | tok.s[1];
	if (idx >= (unsigned)s->o.window || d->slots[idx].seq == 0)
		return NULL;
	token_make(&d->slots[idx], idx, want);
	return memcmp(want, tok.s, SIM_TOKEN_LEN) == 0 ? &d->slots[idx] : NULL;
}

static void
slot_free(struct sim *s, struct device *d, struct slot *sl)
{
	if (sl->seq == 0)
		return;
	sl->seq = 0;
	d->outstanding--;
	dev_poke(s, d);
	if (s->o.type == COAP_MESSAGE_CON)
		s->con_pending--;
	else
		s->non_pending--;
}

static int
slot_take(struct device *d, long window)
{
	for (long i = 0; i < window; i++) {
		if (d->slots[i].seq == 0)
			return (int)i;
	}
	return -1;
}

/* A CON request that will get no answer; the device reconnects before its next reading. */
static void
slot_timeout(struct sim *s, struct device *d, struct slot *sl, const char *why)
{
	s->timeouts++;
	if (s->o.verbosity >= 1)
		printf("device=%s seq=%" PRIu32 " event=timeout%s%s\n", dev_name(d), sl->seq,
		    why ? " reason=" : "", why ? why : "");
	d->reconnect = true;
	slot_free(s, d, sl);
}

static void
slot_failed(struct sim *s, struct device *d, struct slot *sl, const char *why)
{
	s->errors++;
	if (s->o.verbosity >= 1)
		printf("device=%s seq=%" PRIu32 " event=failed reason=%s\n", dev_name(d), sl->seq,
		    why);
	slot_free(s, d, sl);
}

/* Gives up unanswered requests past their time; NON ones silently. */
static void
dev_expire(struct sim *s, struct device *d, int64_t now)
{
	int64_t non_wait = s->o.interval_ms ? s->o.interval_ms * 1000 : SIM_NON_WAIT_US;

	if (non_wait > SIM_NON_WAIT_US)
		non_wait = SIM_NON_WAIT_US;
	for (long i = 0; i < s->o.window && d->outstanding; i++) {
		struct slot *sl = &d->slots[i];

		if (sl->seq == 0)
			continue;
		if (s->o.type == COAP_MESSAGE_CON && now - sl->sent_us >= s->con_expire_us)
			slot_timeout(s, d, sl, "no-response");
		else if (s->o.type == COAP_MESSAGE_NON && now - sl->sent_us >= non_wait - 1000)
			slot_free(s, d, sl);
	}
}

/* ---- --serve: what a sensor node serves on the session it opened ---- */

static struct sim *
sim_of(const coap_session_t *session)
{
	return coap_context_get_app_data(coap_session_get_context(session));
}

static void
hex_str(const uint8_t *p, size_t n, char *out, size_t outsz)
{
	size_t o = 0;

	for (size_t i = 0; i < n && o + 3 <= outsz; i++)
		o += (size_t)snprintf(out + o, outsz - o, "%02x", p[i]);
	out[o] = '\0';
}

static void
sha256_hex(const uint8_t *p, size_t n, char out[65])
{
	uint8_t md[EVP_MAX_MD_SIZE];
	unsigned mdlen = 0;

	if (!EVP_Digest(p ? (const void *)p : "", n, md, &mdlen, EVP_sha256(), NULL))
		mdlen = 0;
	hex_str(md, mdlen, out, 65);
}

static uint32_t
opt_uint(const coap_opt_t *opt)
{
	return coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));
}

/* Writes s as the inside of a JSON string; returns the length (out may be NULL). */
static size_t
json_str(const char *s, char *out, size_t cap)
{
	char esc[8];
	size_t n = 0;

	for (; *s; s++) {
		uint8_t c = (uint8_t)*s;

		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			n = put_bytes((uint8_t *)out, cap, n, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			n = put_bytes((uint8_t *)out, cap, n, esc, 6);
		} else {
			n = put_bytes((uint8_t *)out, cap, n, s, 1);
		}
	}
	return n;
}

static enum sim_res
res_of(coap_resource_t *r)
{
	return (enum sim_res)(intptr_t)coap_resource_get_userdata(r);
}

static struct obs_rec *
obs_find(struct device *d, const uint8_t *tok, size_t len)
{
	for (size_t i = 0; i < SIM_MAX_OBS; i++) {
		struct obs_rec *o = &d->obs[i];

		if (o->token_len && o->token_len == len && memcmp(o->token, tok, len) == 0)
			return o;
	}
	return NULL;
}

static struct obs_rec *
obs_find_mid(struct device *d, coap_mid_t mid)
{
	for (size_t i = 0; i < SIM_MAX_OBS; i++) {
		if (d->obs[i].token_len && d->obs[i].last_mid == mid)
			return &d->obs[i];
	}
	return NULL;
}

static void
print_token_event(struct sim *s, struct device *d, const char *event, enum sim_res res,
    const uint8_t *tok, size_t len, const char *extra)
{
	char hex[SIM_OBS_TOKEN_MAX * 2 + 1];

	if (s->o.verbosity < 1)
		return;
	hex_str(tok, len, hex, sizeof(hex));
	printf("device=%s event=%s path=%s token=%s%s\n", dev_name(d), event, res_name[res], hex,
	    extra);
}

static void
obs_end(struct sim *s, struct device *d, struct obs_rec *o, const char *why)
{
	char extra[48];

	snprintf(extra, sizeof(extra), " reason=%s", why);
	print_token_event(s, d, "observe-cancel", o->res, o->token, o->token_len, extra);
	if (d->stale.due && d->stale.token_len == o->token_len &&
	    memcmp(d->stale.token, o->token, o->token_len) == 0)
		d->stale.due = false;
	memset(o, 0, sizeof(*o));
}

/* The session ended: libcoap dropped its subscriptions with it. */
static void
obs_clear(struct sim *s, struct device *d, const char *why)
{
	for (size_t i = 0; i < SIM_MAX_OBS; i++) {
		if (d->obs[i].token_len)
			obs_end(s, d, &d->obs[i], why);
	}
	d->stale.due = false;
	d->unknown.due = false;
	d->unknown_live = false;
}

/* A registration; libcoap replaces an observation of the same resource on the session. */
static struct obs_rec *
obs_add(struct sim *s, struct device *d, enum sim_res res, coap_bin_const_t tok)
{
	struct obs_rec *free_rec = NULL;

	if (tok.length > SIM_OBS_TOKEN_MAX)
		return NULL;
	for (size_t i = 0; i < SIM_MAX_OBS; i++) {
		struct obs_rec *o = &d->obs[i];

		if (o->token_len && o->res == res)
			obs_end(s, d, o, "replaced");
		if (!o->token_len && !free_rec)
			free_rec = o;
	}
	if (!free_rec)
		return NULL;
	memcpy(free_rec->token, tok.s, tok.length);
	free_rec->token_len = tok.length;
	free_rec->res = res;
	print_token_event(s, d, "observe", res, tok.s, tok.length, "");
	return free_rec;
}

/* Values change with every --notify-interval tick: a slow wave plus a little noise. */
static void
serve_values(struct device *d)
{
	double t = (double)d->tick;

	d->temperature = d->base_value + 2.0 * sin(t / 10.0) +
	    (double)(rng_next(&d->rng) % 41) / 100.0 - 0.2;
	d->humidity = 45.0 + 10.0 * sin(t / 17.0) + (double)(rng_next(&d->rng) % 101) / 100.0;
}

/* {"device":"ID","temperature":21.37,"seq":N} (humidity alike); returns a malloc'd body. */
static uint8_t *
body_reading(const struct device *d, enum sim_res res, uint32_t seq, bool unknown, size_t *len)
{
	size_t idn = json_str(d->identity, NULL, 0);
	size_t cap = idn + 128;
	char *b = malloc(cap), *id = malloc(idn + 1);
	int n = -1;

	if (b && id) {
		json_str(d->identity, id, idn);
		id[idn] = '\0';
		n = snprintf(b, cap, "{\"device\":\"%s\",\"%s\":%.2f,\"seq\":%" PRIu32 "%s}", id,
		    res_name[res], res == RES_HUMIDITY ? d->humidity : d->temperature, seq,
		    unknown ? ",\"unknown\":true" : "");
	}
	free(id);
	if (n < 0 || (size_t)n >= cap) {
		free(b);
		return NULL;
	}
	*len = (size_t)n;
	return (uint8_t *)b;
}

/* {"device":"ID","seq":N,"data":"..."} of exactly --config-size bytes (when the identity
 * leaves room): data[i] = ALPHA[(i + seq) % 36], so every version differs in every block. */
static uint8_t *
body_config(const struct sim *s, const struct device *d, uint32_t seq, size_t *len)
{
	static const char alpha[] = "abcdefghijklmnopqrstuvwxyz0123456789";
	size_t idn = json_str(d->identity, NULL, 0), size = (size_t)s->o.config_size;
	size_t cap = idn + size + 64, n;
	char *b = malloc(cap);
	int head;

	if (!b)
		return NULL;
	head = snprintf(b, cap, "{\"device\":\"");
	n = (size_t)head + json_str(d->identity, b + head, cap - (size_t)head);
	n += (size_t)snprintf(b + n, cap - n, "\",\"seq\":%" PRIu32 ",\"data\":\"", seq);
	for (size_t i = 0; n + 2 < size; i++)
		b[n++] = alpha[(i + seq) % (sizeof(alpha) - 1)];
	b[n++] = '"';
	b[n++] = '}';
	*len = n;
	return (uint8_t *)b;
}

static void
body_release(coap_session_t *session, void *app_ptr)
{
	(void)session;
	free(app_ptr);
}

/* Bookkeeping for a representation that carries Observe; returns the record. */
static struct obs_rec *
serve_observed(struct sim *s, struct device *d, enum sim_res res, const coap_pdu_t *request,
    const coap_pdu_t *response, bool *first)
{
	coap_opt_iterator_t oi;
	coap_opt_t *given = coap_check_option(response, COAP_OPTION_OBSERVE, &oi);
	coap_bin_const_t tok = coap_pdu_get_token(request);
	struct obs_rec *o;

	*first = false;
	if (!given)
		return NULL;
	o = obs_find(d, tok.s, tok.length);
	if (!o) {
		o = obs_add(s, d, res, tok);
		*first = true;
	}
	if (!o)
		return NULL;
	o->last_observe = opt_uint(given);
	o->last_mid = coap_pdu_get_mid(response);
	if (*first || res != RES_TEMPERATURE)
		return o;
	o->notifies++;
	if (s->o.stale_every && o->notifies % (uint32_t)s->o.stale_every == 0 &&
	    o->last_observe > 0) {
		memcpy(d->stale.token, o->token, o->token_len);
		d->stale.token_len = o->token_len;
		d->stale.observe = o->last_observe - 1;
		d->stale.due = true;
	}
	if (s->o.unknown_every && o->notifies % (uint32_t)s->o.unknown_every == 0)
		d->unknown.due = true;
	return o;
}

static const char *
type_name(coap_pdu_type_t t)
{
	switch (t) {
	case COAP_MESSAGE_CON:	return "con";
	case COAP_MESSAGE_NON:	return "non";
	case COAP_MESSAGE_ACK:	return "ack";
	default:		return "rst";
	}
}

static void
print_notify(struct sim *s, struct device *d, const struct obs_rec *o, uint32_t seq,
    uint32_t observe, coap_pdu_type_t type, const uint8_t *body, size_t len, const char *flags)
{
	char hex[SIM_OBS_TOKEN_MAX * 2 + 1], sha[65], what[96];

	s->notifies++;
	if (s->o.verbosity < 1)
		return;
	hex_str(o->token, o->token_len, hex, sizeof(hex));
	if (o->res == RES_CONFIG) {
		sha256_hex(body, len, sha);
		snprintf(what, sizeof(what), "bytes=%zu sha256=%s", len, sha);
	} else {
		snprintf(what, sizeof(what), "value=%.2f", o->res == RES_HUMIDITY ? d->humidity :
		    d->temperature);
	}
	printf("device=%s event=notify path=%s token=%s seq=%" PRIu32 " observe=%" PRIu32
	    " type=%s %s%s\n", dev_name(d), res_name[o->res], hex, seq, observe, type_name(type),
	    what, flags);
}

/* GET on temperature, humidity, config and led; registration, cancel and notifications. */
static void
on_get(coap_resource_t *r, coap_session_t *session, const coap_pdu_t *request,
    const coap_string_t *query, coap_pdu_t *response)
{
	struct device *d = coap_session_get_app_data(session);
	struct sim *s = sim_of(session);
	enum sim_res res = res_of(r);
	coap_opt_iterator_t oi;
	coap_opt_t *want = coap_check_option(request, COAP_OPTION_OBSERVE, &oi);
	coap_bin_const_t tok = coap_pdu_get_token(request);
	struct obs_rec *o = NULL;
	bool first = false;
	uint8_t *body;
	size_t len = 0;
	uint32_t seq;
	int cf = COAP_MEDIATYPE_APPLICATION_JSON;

	if (!d) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE);
		return;
	}
	if (want && opt_uint(want) == COAP_OBSERVE_CANCEL) {
		if ((o = obs_find(d, tok.s, tok.length)) != NULL)
			obs_end(s, d, o, "cancel");
		else
			print_token_event(s, d, "observe-cancel", res, tok.s, tok.length,
			    " reason=cancel");
		o = NULL;
	} else if (res != RES_LED) {
		o = serve_observed(s, d, res, request, response, &first);
	}
	if (!o && !(want && opt_uint(want) == COAP_OBSERVE_CANCEL) && s->o.verbosity >= 1)
		printf("device=%s event=get path=%s\n", dev_name(d), res_name[res]);
	if (res == RES_LED) {
		len = d->led_len;
		body = len ? malloc(len) : NULL;
		if (body)
			memcpy(body, d->led, len);
		cf = d->led_cf >= 0 ? d->led_cf : COAP_MEDIATYPE_TEXT_PLAIN;
		seq = 0;
	} else {
		seq = ++d->res_seq[res];
		body = res == RES_CONFIG ? body_config(s, d, seq, &len) :
		    body_reading(d, res, seq, false, &len);
	}
	if (len && !body) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_INTERNAL_ERROR);
		return;
	}
	coap_pdu_set_code(response, COAP_RESPONSE_CODE_CONTENT);
	if (o) {
		print_notify(s, d, o, seq, o->last_observe, coap_pdu_get_type(response), body, len,
		    first ? " first=1" : "");
	}
	/* large bodies go block-wise (Block2); libcoap keeps and frees the body */
	coap_add_data_large_response(r, session, request, response, query, (uint16_t)cf, -1, 0,
	    len, body, body ? body_release : NULL, body);
}

/* PUT/POST on led: the whole (block-wise reassembled) body becomes its state. */
static void
on_put(coap_resource_t *r, coap_session_t *session, const coap_pdu_t *request,
    const coap_string_t *query, coap_pdu_t *response)
{
	struct device *d = coap_session_get_app_data(session);
	struct sim *s = sim_of(session);
	const uint8_t *data = NULL;
	size_t len = 0, offset, total;
	coap_opt_iterator_t oi;
	coap_opt_t *cfo = coap_check_option(request, COAP_OPTION_CONTENT_FORMAT, &oi);
	char sha[65], shown[SIM_SHOW_BODY * 4 + 1];
	uint8_t *copy = NULL, cfb[4];

	(void)r;
	(void)query;
	if (!d) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE);
		return;
	}
	if (!coap_get_data_large(request, &len, &data, &offset, &total))
		len = 0;
	if (len > SIM_MAX_LED) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE);
		return;
	}
	if (len && (copy = malloc(len)) == NULL) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_INTERNAL_ERROR);
		return;
	}
	if (len)
		memcpy(copy, data, len);
	free(d->led);
	d->led = copy;
	d->led_len = len;
	d->led_cf = cfo ? (int)opt_uint(cfo) : -1;
	s->puts++;
	if (s->o.verbosity >= 1) {
		sha256_hex(copy, len, sha);
		escape(copy ? copy : (const uint8_t *)"", len < SIM_SHOW_BODY ? len : SIM_SHOW_BODY,
		    true, shown, sizeof(shown));
		printf("device=%s event=%s path=led bytes=%zu sha256=%s payload=\"%s\"\n",
		    dev_name(d), coap_pdu_get_code(request) == COAP_REQUEST_CODE_POST ? "post" :
		    "put", len, sha, shown);
	}
	if (s->o.stall_puts > 0) {
		/* an empty ACK now, and the response never: a device that hangs mid-request */
		s->o.stall_puts--;
		if (coap_register_async(session, request, 0) != NULL) {
			if (s->o.verbosity >= 1)
				printf("device=%s event=stalled path=led\n", dev_name(d));
			return;
		}
	}
	coap_pdu_set_code(response, COAP_RESPONSE_CODE_CHANGED);
	if (len == 0 || len > SIM_LED_ECHO)
		return;
	if (cfo)
		coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
		    coap_encode_var_safe(cfb, sizeof(cfb), (unsigned)d->led_cf), cfb);
	coap_add_data(response, len, d->led);
}

static void
on_delete(coap_resource_t *r, coap_session_t *session, const coap_pdu_t *request,
    const coap_string_t *query, coap_pdu_t *response)
{
	struct device *d = coap_session_get_app_data(session);

	(void)r;
	(void)request;
	(void)query;
	if (!d) {
		coap_pdu_set_code(response, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE);
		return;
	}
	free(d->led);
	d->led = NULL;
	d->led_len = 0;
	d->led_cf = -1;
	if (sim_of(session)->o.verbosity >= 1)
		printf("device=%s event=delete path=led\n", dev_name(d));
	coap_pdu_set_code(response, COAP_RESPONSE_CODE_DELETED);
}

/* One notification built by hand: 2.05 with Observe, Content-Format 50 and a reading. */
static bool
send_notify(struct device *d, coap_pdu_type_t type, const uint8_t *tok, size_t toklen,
    uint32_t observe, uint32_t seq, bool unknown)
{
	coap_pdu_t *pdu = coap_new_pdu(type, COAP_RESPONSE_CODE_CONTENT, d->session);
	uint8_t buf[4], *body;
	size_t len = 0;
	bool ok;

	if (!pdu)
		return false;
	body = body_reading(d, RES_TEMPERATURE, seq, unknown, &len);
	ok = body && coap_add_token(pdu, toklen, tok) &&
	    coap_add_option(pdu, COAP_OPTION_OBSERVE, coap_encode_var_safe(buf, sizeof(buf),
	    observe), buf) &&
	    coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf,
	    sizeof(buf), COAP_MEDIATYPE_APPLICATION_JSON), buf) &&
	    coap_add_data(pdu, len, body);
	free(body);
	if (!ok) {
		coap_delete_pdu(pdu);
		return false;
	}
	return coap_send(d->session, pdu) != COAP_INVALID_MID;
}

/* --stale-every: the observation's token, an Observe number below the last one. */
static void
send_stale(struct sim *s, struct device *d)
{
	struct obs_rec *o = obs_find(d, d->stale.token, d->stale.token_len);
	coap_pdu_type_t type = s->o.notify_flags & COAP_RESOURCE_FLAGS_NOTIFY_CON ?
	    COAP_MESSAGE_CON : COAP_MESSAGE_NON;
	uint32_t seq;

	d->stale.due = false;
	if (!o)
		return;
	seq = ++d->res_seq[RES_TEMPERATURE];
	if (!send_notify(d, type, o->token, o->token_len, d->stale.observe, seq, false)) {
		fprintf(stderr, "coap2mqtt-sim: device=%s: stale notification not sent\n",
		    dev_name(d));
		return;
	}
	print_notify(s, d, o, seq, d->stale.observe, type, NULL, 0, " stale=1");
}

/* --unknown-every: a CON notification on a fresh random token, so RST comes back. */
static void
send_unknown(struct sim *s, struct device *d)
{
	uint64_t r = rng_next(&d->rng);

	d->unknown.due = false;
	for (size_t i = 0; i < SIM_OBS_TOKEN_MAX; i++)
		d->unknown.token[i] = (uint8_t)(r >> (8 * i));
	d->unknown.token_len = SIM_OBS_TOKEN_MAX;
	if (!send_notify(d, COAP_MESSAGE_CON, d->unknown.token, d->unknown.token_len,
	    d->res_seq[RES_TEMPERATURE] + 2, 0, true)) {
		fprintf(stderr, "coap2mqtt-sim: device=%s: unknown-token notification not sent\n",
		    dev_name(d));
		return;
	}
	d->unknown_live = true;
	print_token_event(s, d, "notify", RES_TEMPERATURE, d->unknown.token,
	    d->unknown.token_len, " unknown=1");
}

/* A notification (ours or libcoap's) was reset or never acknowledged; true = it was one. */
static bool
serve_nack(struct sim *s, struct device *d, const coap_pdu_t *sent, coap_nack_reason_t reason,
    coap_mid_t mid)
{
	struct obs_rec *o;
	coap_bin_const_t tok;

	if (!sent) {
		/* an RST to a NON notification names only its message ID */
		if (reason != COAP_NACK_RST || (o = obs_find_mid(d, mid)) == NULL)
			return false;
		print_token_event(s, d, "rst", o->res, o->token, o->token_len, "");
		obs_end(s, d, o, "rst");
		return true;
	}
	if (COAP_RESPONSE_CLASS(coap_pdu_get_code(sent)) < 2)
		return false;
	tok = coap_pdu_get_token(sent);
	if (d->unknown_live && tok.length == d->unknown.token_len &&
	    memcmp(tok.s, d->unknown.token, tok.length) == 0) {
		d->unknown_live = false;
		print_token_event(s, d, reason == COAP_NACK_RST ? "rst" : "notify-failed",
		    RES_TEMPERATURE, tok.s, tok.length, " unknown=1");
		return true;
	}
	if ((o = obs_find(d, tok.s, tok.length)) == NULL)
		return true;
	if (reason == COAP_NACK_RST) {
		print_token_event(s, d, "rst", o->res, o->token, o->token_len, "");
		obs_end(s, d, o, "rst");
	} else if (reason == COAP_NACK_TOO_MANY_RETRIES) {
		obs_end(s, d, o, "timeout");	/* libcoap dropped the observer */
	}
	return true;
}

/* The notify tick: every device's values change, observers are told. */
static void
serve_tick(struct sim *s)
{
	for (size_t i = 0; i < s->ndev; i++) {
		s->dev[i].tick++;
		serve_values(&s->dev[i]);
	}
	coap_resource_notify_observers(s->res[RES_TEMPERATURE], NULL);
	coap_resource_notify_observers(s->res[RES_HUMIDITY], NULL);
	coap_resource_notify_observers(s->res[RES_CONFIG], NULL);
	for (long i = 1; i < s->o.config_copies; i++)
		coap_resource_notify_observers(s->config_copy[i], NULL);
}

static coap_resource_t *
serve_resource(struct sim *s, enum sim_res res, const char *name, const char *rt)
{
	coap_resource_t *r = coap_resource_init(coap_new_str_const((const uint8_t *)name,
	    strlen(name)), s->o.notify_flags | COAP_RESOURCE_FLAGS_RELEASE_URI);

	if (!r)
		return NULL;
	coap_resource_set_userdata(r, (void *)(intptr_t)res);
	coap_register_request_handler(r, COAP_REQUEST_GET, on_get);
	if (res == RES_LED) {
		coap_register_request_handler(r, COAP_REQUEST_PUT, on_put);
		coap_register_request_handler(r, COAP_REQUEST_POST, on_put);
		coap_register_request_handler(r, COAP_REQUEST_DELETE, on_delete);
	} else {
		/* libcoap writes ";obs" into .well-known/core for observable resources */
		coap_resource_set_get_observable(r, 1);
		coap_add_attr(r, coap_make_str_const("ct"), coap_make_str_const("50"), 0);
	}
	coap_add_attr(r, coap_make_str_const("rt"), coap_make_str_const(rt), 0);
	coap_add_resource(s->ctx, r);
	return r;
}

static bool
serve_init(struct sim *s)
{
	static const char *const rt[RES_N] = { "\"temperature-c\"", "\"humidity-p\"",
	    "\"config\"", "\"light\"" };

	if (!s->o.serve)
		return true;
	for (int i = 0; i < RES_N; i++) {
		s->res[i] = serve_resource(s, (enum sim_res)i, res_name[i], rt[i]);
		if (!s->res[i])
			return false;
	}
	for (long i = 1; i < s->o.config_copies; i++) {
		char name[32];

		snprintf(name, sizeof(name), "config%ld", i + 1);
		s->config_copy[i] = serve_resource(s, RES_CONFIG, name, rt[RES_CONFIG]);
		if (!s->config_copy[i])
			return false;
	}
	/* reassembled Block1 bodies are bounded: 4.13 beyond the led's limit */
	coap_context_set_body_limits(s->ctx, SIM_MAX_LED, 0);
	for (size_t i = 0; i < s->ndev; i++) {
		s->dev[i].led_cf = -1;
		serve_values(&s->dev[i]);
	}
	return true;
}

/* ---- sessions ---- */

/* OpenSSL security callback: offers only the --cipher suites, defers the rest. */
static int
cipher_filter(const SSL *ssl, const SSL_CTX *ctx, int op, int bits, int nid, void *other, void *ex)
{
	struct sim *s = ex;

	if ((op & SSL_SECOP_OTHER_TYPE) == SSL_SECOP_OTHER_CIPHER && other) {
		const SSL_CIPHER *c = other;
		const char *name = SSL_CIPHER_get_name(c), *std = SSL_CIPHER_standard_name(c);
		char list[256], *save, *tok;
		bool allowed = false;

		snprintf(list, sizeof(list), "%s", s->o.cipher);
		tok = strtok_r(list, ":, ", &save);
		for (; tok && !allowed; tok = strtok_r(NULL, ":, ", &save))
			allowed = strcasecmp(tok, name) == 0 || (std && strcasecmp(tok, std) == 0);
		if (!allowed)
			return 0;
	}
	return s->sec_default(ssl, ctx, op, bits, nid, other, ex);
}

/* Installs cipher_filter on the DTLS context behind a first session (sessions made later
 * inherit it); libcoap's OpenSSL backend has no cipher setting of its own. */
static bool
cipher_install(struct sim *s, coap_session_t *probe)
{
	coap_tls_library_t lib;
	SSL *ssl = coap_session_get_tls(probe, &lib);
	SSL_CTX *ctx;
	STACK_OF(SSL_CIPHER) *offered;
	bool any = false;

	if (!ssl || lib != COAP_TLS_LIBRARY_OPENSSL) {
		fprintf(stderr, "coap2mqtt-sim: --cipher needs libcoap's OpenSSL backend\n");
		return false;
	}
	ctx = SSL_get_SSL_CTX(ssl);
	s->sec_default = SSL_CTX_get_security_callback(ctx);
	SSL_CTX_set0_security_ex_data(ctx, s);
	SSL_CTX_set_security_callback(ctx, cipher_filter);
	offered = SSL_get_ciphers(ssl);
	for (int i = 0; i < sk_SSL_CIPHER_num(offered) && !any; i++) {
		const SSL_CIPHER *c = sk_SSL_CIPHER_value(offered, i);

		any = cipher_filter(ssl, ctx, SSL_SECOP_CIPHER_SUPPORTED,
		    SSL_CIPHER_get_bits(c, NULL), 0, (void *)c, s) != 0;
	}
	if (!any) {
		fprintf(stderr, "coap2mqtt-sim: --cipher %s: none of these suites is available; "
		    "DTLS 1.2 PSK suites here:", s->o.cipher);
		for (int i = 0; i < sk_SSL_CIPHER_num(offered); i++) {
			const SSL_CIPHER *c = sk_SSL_CIPHER_value(offered, i);

			if (strcmp(SSL_CIPHER_get_version(c), "TLSv1.3") != 0)
				fprintf(stderr, " %s", SSL_CIPHER_get_name(c));
		}
		fprintf(stderr, "\n");
	}
	return any;
}

/* The device's PSK credentials for a coaps:// session. */
static void
psk_setup(struct sim *s, struct device *d, coap_dtls_cpsk_t *psk)
{
	memset(psk, 0, sizeof(*psk));
	psk->version = COAP_DTLS_CPSK_SETUP_VERSION;
	psk->client_sni = s->sni;
	psk->psk_info.identity.s = (const uint8_t *)d->identity;
	psk->psk_info.identity.length = strlen(d->identity);
	psk->psk_info.key.s = d->key;
	psk->psk_info.key.length = d->key_len;
}

/* --oscore: "k=HEX,..." into libcoap's configuration text (coap-oscore-conf(5)); NULL when
 * a field is not sender_id, recipient_id, secret or salt, or a value is not hex. */
static coap_oscore_conf_t *
oscore_conf(const char *spec, uint64_t seq, bool b2)
{
	static const char *const keys[][2] = { { "sender_id", "sender_id" },
	    { "recipient_id", "recipient_id" }, { "secret", "master_secret" },
	    { "salt", "master_salt" } };
	char conf[2048], field[512];
	size_t len = 0;
	const char *p = spec;

	while (*p) {
		size_t fl = strcspn(p, ","), i;
		const char *eq;

		if (fl >= sizeof(field))
			return NULL;
		memcpy(field, p, fl);
		field[fl] = '\0';
		p += fl + (p[fl] == ',');
		if ((eq = strchr(field, '=')) == NULL || strspn(eq + 1, "0123456789abcdefABCDEF") !=
		    strlen(eq + 1) || strlen(eq + 1) % 2)
			return NULL;
		for (i = 0; i < 4; i++)
			if (strlen(keys[i][0]) == (size_t)(eq - field) &&
			    strncmp(field, keys[i][0], (size_t)(eq - field)) == 0)
				break;
		if (i == 4)
			return NULL;
		len += (size_t)snprintf(conf + len, sizeof(conf) - len, "%s,hex,\"%s\"\n",
		    keys[i][1], eq + 1);
		if (len >= sizeof(conf))
			return NULL;
	}
	len += (size_t)snprintf(conf + len, sizeof(conf) - len, "replay_window,integer,32\n"
	    "aead_alg,integer,10\nhkdf_alg,integer,-10\nrfc8613_b_1_2,bool,true\n"
	    "rfc8613_b_2,bool,%s\n", b2 ? "true" : "false");
	if (len >= sizeof(conf))
		return NULL;
	return coap_new_oscore_conf((coap_str_const_t){ len, (const uint8_t *)conf }, NULL, NULL,
	    seq);
}

static coap_session_t *
oscore_session_new(struct sim *s, struct device *d, coap_address_t *local)
{
	coap_oscore_conf_t *oc = oscore_conf(s->o.oscore, (uint64_t)s->o.oscore_seq,
	    s->o.oscore_b2);
	coap_dtls_cpsk_t psk;

	if (!oc) {
		fprintf(stderr, "coap2mqtt-sim: --oscore: '%s' is not sender_id=HEX,recipient_id=HEX,"
		    "secret=HEX[,salt=HEX]\n", s->o.oscore);
		return NULL;
	}
	if (s->proto == COAP_PROTO_UDP)
		return coap_new_client_session_oscore(s->ctx, local, &s->dst, s->proto, oc);
	psk_setup(s, d, &psk);
	return coap_new_client_session_oscore_psk(s->ctx, local, &s->dst, s->proto, &psk, oc);
}

static coap_session_t *
session_new(struct sim *s, struct device *d)
{
	coap_dtls_cpsk_t psk;
	coap_address_t src, *local = NULL;

	if (s->o.source_port) {
		/* the wildcard address of the gateway's family, this device's own port */
		coap_address_init(&src);
		src.size = s->dst.size;
		src.addr.sa.sa_family = s->dst.addr.sa.sa_family;
		coap_address_set_port(&src, (uint16_t)(s->o.source_port + (d - s->dev)));
		local = &src;
	}
	if (s->o.oscore)
		return oscore_session_new(s, d, local);
	if (s->proto == COAP_PROTO_UDP)
		return coap_new_client_session(s->ctx, local, &s->dst, s->proto);
	psk_setup(s, d, &psk);
	return coap_new_client_session_psk2(s->ctx, local, &s->dst, s->proto, &psk);
}

static void
session_tune(struct sim *s, coap_session_t *session)
{
	if (s->o.ack_timeout_s > 0) {
		coap_fixed_point_t t;

		t.integer_part = (uint16_t)s->o.ack_timeout_s;
		t.fractional_part = (uint16_t)((s->o.ack_timeout_s - t.integer_part) * 1000 + 0.5);
		if (t.fractional_part > 999)
			t.fractional_part = 999;
		coap_session_set_ack_timeout(session, t);
	}
	if (s->o.max_retransmit >= 0)
		coap_session_set_max_retransmit(session, (uint16_t)s->o.max_retransmit);
	coap_session_set_nstart(session, (uint16_t)s->o.window);
}

/* Ends the device's place among the handshakes in progress (done, failed or closed). */
static void
dev_hs_end(struct sim *s, struct device *d)
{
	if (!d->hs_counted)
		return;
	d->hs_counted = false;
	s->handshaking--;
	if (s->hs_len) {
		/* the first device waiting for a slot */
		struct device *w = s->hs_wait[s->hs_head];

		s->hs_head = (s->hs_head + 1) % s->ndev;
		s->hs_len--;
		w->hs_queued = false;
		dev_poke(s, w);
	}
}

static bool
dev_open(struct sim *s, struct device *d)
{
	coap_session_t *session = session_new(s, d);

	if (!session)
		return false;
	session_tune(s, session);
	coap_session_set_app_data(session, d);
	d->session = session;
	d->state = DEV_OPEN;
	d->opened_us = now_us();
	d->up = s->proto == COAP_PROTO_UDP;
	d->hs_counted = !d->up;
	s->handshaking += d->hs_counted;
	d->reconnect = false;
	return true;
}

/* --cipher: a first session (released at once) gives access to the DTLS context. */
static bool
cipher_init(struct sim *s)
{
	coap_session_t *probe;
	bool ok;

	if (!s->o.cipher)
		return true;
	if (s->proto == COAP_PROTO_UDP) {
		fprintf(stderr, "coap2mqtt-sim: --cipher needs coaps://\n");
		return false;
	}
	probe = session_new(s, &s->dev[0]);
	if (!probe) {
		fprintf(stderr, "coap2mqtt-sim: cannot create a session\n");
		return false;
	}
	ok = cipher_install(s, probe);
	coap_session_release(probe);
	return ok;
}

static void
dev_close(struct sim *s, struct device *d)
{
	dev_hs_end(s, d);
	if (!d->session)
		return;
	coap_session_set_app_data(d->session, NULL);
	if (s->o.serve) {
		/* subscriptions hold references: end them (and the DTLS session) now */
		obs_clear(s, d, "closed");
		coap_session_disconnected(d->session, COAP_NACK_NOT_DELIVERABLE);
	}
	coap_session_release(d->session);
	d->session = NULL;
}

/* The session failed or ended (from a libcoap callback: the loop releases it later). */
static void
dev_lost(struct sim *s, struct device *d, const char *why)
{
	if (d->state != DEV_OPEN)
		return;
	dev_hs_end(s, d);
	if (!d->up) {
		s->dtls_failed++;
		printf("device=%s event=dtls-failed\n", dev_name(d));
	} else if (s->o.verbosity >= 1) {
		printf("device=%s event=dtls-closed\n", dev_name(d));
	}
	if (s->o.verbosity >= 2)
		fprintf(stderr, "coap2mqtt-sim: device=%s session lost: %s\n", dev_name(d), why);
	obs_clear(s, d, "closed");
	for (long i = 0; i < s->o.window && d->outstanding; i++) {
		if (d->slots[i].seq != 0 && s->o.type == COAP_MESSAGE_CON)
			slot_failed(s, d, &d->slots[i], why);
		else
			slot_free(s, d, &d->slots[i]);
	}
	d->state = DEV_DEAD;
	dev_poke(s, d);
}

static void
dev_connected(struct sim *s, struct device *d)
{
	coap_tls_library_t lib;
	SSL *ssl = coap_session_get_tls(d->session, &lib);
	const char *cipher = "?";

	d->up = true;
	dev_hs_end(s, d);
	dev_poke(s, d);
	d->backoff_us = SIM_BACKOFF_MIN_US;
	if (ssl && lib == COAP_TLS_LIBRARY_OPENSSL && SSL_get_current_cipher(ssl))
		cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(ssl));
	if (s->o.verbosity >= 2 || s->o.hold)
		printf("device=%s event=dtls-connected cipher=%s\n", dev_name(d), cipher);
}

/* Releases a dead session (outside libcoap callbacks); retries later or gives up. */
static void
dev_release(struct sim *s, struct device *d, int64_t now)
{
	bool was_up = d->up;

	dev_close(s, d);
	if (!was_up && s->o.count > 0 && !s->o.serve) {
		d->state = DEV_GAVE_UP;
		s->gave_up++;
		return;
	}
	d->state = DEV_IDLE;
	d->open_after_us = was_up ? now : now + d->backoff_us;
	if (!was_up) {
		if (d->next_due_us < now + d->backoff_us)
			d->next_due_us = now + d->backoff_us;
		d->backoff_us *= 2;
		if (d->backoff_us > SIM_BACKOFF_MAX_US)
			d->backoff_us = SIM_BACKOFF_MAX_US;
	}
}

/* ---- libcoap callbacks ---- */

static int
on_event(coap_session_t *session, const coap_event_t event)
{
	struct device *d = coap_session_get_app_data(session);
	struct sim *s = sim_of(session);

	if (!d || d->session != session)
		return 0;
	switch (event) {
	case COAP_EVENT_DTLS_CONNECTED:
		dev_connected(s, d);
		break;
	case COAP_EVENT_DTLS_CLOSED:
		dev_lost(s, d, "dtls-closed");
		break;
	case COAP_EVENT_DTLS_ERROR:
		dev_lost(s, d, "dtls-error");
		break;
	case COAP_EVENT_SESSION_FAILED:
		dev_lost(s, d, "session-failed");
		break;
	case COAP_EVENT_SESSION_CLOSED:
		dev_lost(s, d, "session-closed");
		break;
	default:
		break;
	}
	return 0;
}

static coap_response_t
on_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
    const coap_mid_t mid)
{
	struct device *d = coap_session_get_app_data(session);
	struct sim *s = sim_of(session);
	coap_pdu_code_t code = coap_pdu_get_code(rcvd);
	const uint8_t *data = NULL;
	size_t len = 0, offset, total;
	struct slot *sl;

	(void)sent;
	(void)mid;
	sl = d ? slot_find(s, d, coap_pdu_get_token(rcvd)) : NULL;
	if (!sl) {
		if (s->o.verbosity >= 2)
			fprintf(stderr, "coap2mqtt-sim: late or unknown response %d.%02d ignored\n",
			    COAP_RESPONSE_CLASS(code), code & 0x1f);
		return COAP_RESPONSE_OK;
	}
	if (!coap_get_data_large(rcvd, &len, &data, &offset, &total))
		len = 0;
	s->answered++;
	if (COAP_RESPONSE_CLASS(code) == 2)
		s->ok++;
	else
		s->errors++;
	if (s->o.verbosity >= 1)
		print_response(d, sl->seq, code, (double)(now_us() - sl->sent_us) / 1e3, data, len);
	slot_free(s, d, sl);
	return COAP_RESPONSE_OK;
}

static void
on_nack(coap_session_t *session, const coap_pdu_t *sent, const coap_nack_reason_t reason,
    const coap_mid_t mid)
{
	struct device *d = coap_session_get_app_data(session);
	struct sim *s = sim_of(session);
	struct slot *sl;

	if (!d || reason == COAP_NACK_ICMP_ISSUE)	/* ICMP: libcoap keeps trying */
		return;
	if (s->o.serve && serve_nack(s, d, sent, reason, mid))
		return;
	if (!sent)
		return;
	sl = slot_find(s, d, coap_pdu_get_token(sent));
	if (!sl)
		return;
	if (reason == COAP_NACK_TOO_MANY_RETRIES)
		slot_timeout(s, d, sl, NULL);
	else
		slot_failed(s, d, sl, nack_name(reason));
}

static void
on_log(coap_log_t level, const char *message)
{
	(void)level;
	fprintf(stderr, "libcoap: %s", message);
}

/* ---- sending ---- */

static void
payload_release(coap_session_t *session, void *app_ptr)
{
	(void)session;
	free(app_ptr);
}

static bool
pdu_add_path(struct sim *s, struct device *d, coap_pdu_t *pdu, uint32_t seq)
{
	uint8_t seg[SIM_MAX_SEGMENT];

	for (size_t i = 0; i < s->path.n; i++) {
		size_t n = tmpl_expand(s->path.seg[i], d->identity, seq, NULL, NULL, true, seg,
		    sizeof(seg));

		if (n > sizeof(seg) || !coap_add_option(pdu, COAP_OPTION_URI_PATH, n, seg))
			return false;
	}
	return true;
}

static bool
pdu_add_payload(struct sim *s, struct device *d, coap_pdu_t *pdu, uint32_t seq)
{
	char value[32], now[32];
	struct timespec ts;
	uint8_t *buf;
	size_t n;

	if (s->have_file)
		return s->file_len == 0 || coap_add_data_large_request(d->session, pdu, s->file_len,
		    s->file_payload, NULL, NULL);
	snprintf(value, sizeof(value), "%.2f", reading_value(d, seq));
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(now, sizeof(now), "%lld.%06ld", (long long)ts.tv_sec, ts.tv_nsec / 1000);
	n = tmpl_expand(s->o.payload, d->identity, seq, value, now, false, NULL, 0);
	if (n == 0)
		return true;
	if (n > SIM_MAX_PAYLOAD || (buf = malloc(n)) == NULL)
		return false;
	tmpl_expand(s->o.payload, d->identity, seq, value, now, false, buf, n);
	return coap_add_data_large_request(d->session, pdu, n, buf, payload_release, buf);
}

static coap_pdu_t *
pdu_build(struct sim *s, struct device *d, struct slot *sl, unsigned idx)
{
	uint8_t tok[SIM_TOKEN_LEN], cf[4];
	coap_pdu_t *pdu = coap_new_pdu(s->o.type, s->o.method, d->session);

	if (!pdu)
		return NULL;
	token_make(sl, idx, tok);
	if (!coap_add_token(pdu, sizeof(tok), tok) || !pdu_add_path(s, d, pdu, sl->seq))
		goto fail;
	if (s->o.content_format >= 0 && !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT,
	    coap_encode_var_safe(cf, sizeof(cf), (unsigned)s->o.content_format), cf))
		goto fail;
	if (!pdu_add_payload(s, d, pdu, sl->seq))
		goto fail;
	return pdu;
fail:
	coap_delete_pdu(pdu);
	return NULL;
}

/* Sends the device's next reading (a free slot exists); failures are counted as errors. */
static void
dev_send(struct sim *s, struct device *d, int64_t now)
{
	int idx = slot_take(d, s->o.window);
	struct slot *sl;
	coap_pdu_t *pdu;

	if (idx < 0)
		return;
	sl = &d->slots[idx];
	sl->seq = ++d->seq;
	sl->rnd = (uint16_t)rng_next(&d->rng);
	sl->sent_us = now;
	d->outstanding++;
	if (s->o.type == COAP_MESSAGE_CON)
		s->con_pending++;
	else
		s->non_pending++;
	s->sent++;
	s->last_send_us = now;
	pdu = pdu_build(s, d, sl, (unsigned)idx);
	if (!pdu)
		slot_failed(s, d, sl, "build");
	else if (coap_send(d->session, pdu) == COAP_INVALID_MID && sl->seq == d->seq)
		slot_failed(s, d, sl, "send");
}

/* ---- the loop ---- */

static bool
dev_all_sent(const struct sim *s, const struct device *d)
{
	if (s->o.serve && s->o.count == 0)
		return true;		/* a sensor node that only serves */
	return s->o.count > 0 && d->seq >= (uint32_t)s->o.count;
}

static void
dev_schedule(struct sim *s, struct device *d, int64_t now)
{
	if (s->o.interval_ms == 0)
		return;
	d->next_due_us += s->o.interval_ms * 1000;
	if (d->next_due_us < now)
		d->next_due_us = now;
}

/* Makes room for a due NON reading: the oldest unanswered NON is no longer waited for. */
static void
dev_drop_oldest_non(struct sim *s, struct device *d)
{
	struct slot *old = NULL;

	for (long i = 0; i < s->o.window; i++) {
		if (d->slots[i].seq && (!old || d->slots[i].sent_us < old->sent_us))
			old = &d->slots[i];
	}
	if (old)
		slot_free(s, d, old);
}

/* Every handshake slot is taken (--max-handshakes): d waits in line until a handshake ends. */
static bool
handshakes_full(struct sim *s, struct device *d)
{
	if (!s->o.max_handshakes || s->proto == COAP_PROTO_UDP ||
	    s->handshaking < s->o.max_handshakes)
		return false;
	if (!d->hs_queued && s->hs_wait) {
		s->hs_wait[(s->hs_head + s->hs_len++) % s->ndev] = d;
		d->hs_queued = true;
	}
	return true;
}

/* Opens d's session; when none can be created, d is lost as a failed session and false comes
 * back. */
static bool
dev_open_or_lose(struct sim *s, struct device *d)
{
	if (dev_open(s, d))
		return true;
	fprintf(stderr, "coap2mqtt-sim: device=%s: cannot create a session\n", dev_name(d));
	d->state = DEV_OPEN;
	d->up = false;
	dev_lost(s, d, "session-create");
	return false;
}

/* --serve: keeps a session open and sends the test hooks' notifications; returns when it
 * next wants to run. */
static int64_t
dev_serve(struct sim *s, struct device *d, int64_t now)
{
	if (s->stop_us)
		return SIM_NEVER;
	if (d->state == DEV_IDLE) {
		if (now < d->open_after_us)
			return d->open_after_us;
		if (handshakes_full(s, d))
			return SIM_NEVER;	/* woken when a handshake ends */
		if (!dev_open_or_lose(s, d))
			return now;
	}
	if (d->state == DEV_OPEN && d->up && d->stale.due)
		send_stale(s, d);
	if (d->state == DEV_OPEN && d->up && d->unknown.due)
		send_unknown(s, d);
	return SIM_NEVER;
}

/* Deferred session work, then due readings; returns when the device next wants to run. */
static int64_t dev_tick_readings(struct sim *s, struct device *d, int64_t now);

static int64_t
dev_tick(struct sim *s, struct device *d, int64_t now)
{
	int64_t w = SIM_NEVER, r;

	if (d->state == DEV_DEAD)
		dev_release(s, d, now);
	if (d->reconnect && d->outstanding == 0 && d->state == DEV_OPEN) {
		dev_close(s, d);
		d->state = DEV_IDLE;
	}
	if (s->o.serve)
		w = dev_serve(s, d, now);
	r = dev_tick_readings(s, d, now);
	return r < w ? r : w;
}

static int64_t
dev_tick_readings(struct sim *s, struct device *d, int64_t now)
{
	int64_t hs_wake = SIM_NEVER;

	if (d->state == DEV_OPEN && !d->up && s->handshake_us) {
		if (now - d->opened_us >= s->handshake_us) {
			dev_lost(s, d, "handshake-timeout");
			return now;
		}
		hs_wake = d->opened_us + s->handshake_us;
	}
	if (s->holding && !s->stop_us) {
		/* --hold: only the session, as many handshakes at once as allowed */
		if (d->state == DEV_IDLE && !handshakes_full(s, d) && !dev_open_or_lose(s, d))
			return now;
		return hs_wake;
	}
	if (d->state == DEV_GAVE_UP || s->stop_us || dev_all_sent(s, d))
		return hs_wake;
	for (long n = 0; n < s->o.window && now >= d->next_due_us && !dev_all_sent(s, d); n++) {
		if (d->outstanding >= (unsigned)s->o.window && s->o.type == COAP_MESSAGE_NON &&
		    s->o.interval_ms > 0)
			dev_drop_oldest_non(s, d);
		if (d->outstanding >= (unsigned)s->o.window)
			return hs_wake;
		if (d->state == DEV_IDLE && handshakes_full(s, d))
			return hs_wake;		/* woken when a handshake ends */
		if (d->state == DEV_IDLE && !dev_open_or_lose(s, d))
			return now;
		dev_send(s, d, now);
		dev_schedule(s, d, now);
	}
	if (d->outstanding >= (unsigned)s->o.window || dev_all_sent(s, d))
		return hs_wake;
	return d->next_due_us < hs_wake ? d->next_due_us : hs_wake;
}

static bool
dev_handshaking(const struct device *d)
{
	return d->state == DEV_OPEN && !d->up;
}

/* All readings sent (or given up) and no handshake still deciding their fate. */
static bool
sim_devices_done(const struct sim *s)
{
	if (s->o.count == 0 || s->o.serve)
		return false;		/* until the deadline or a signal */
	for (size_t i = 0; i < s->ndev; i++) {
		const struct device *d = &s->dev[i];

		if (d->state == DEV_DEAD || dev_handshaking(d) ||
		    (d->state != DEV_GAVE_UP && !dev_all_sent(s, d)))
			return false;
	}
	return true;
}

/* Whether to leave the loop now; *wake is lowered to when this should be asked again. */
static bool
sim_done(struct sim *s, int64_t now, int64_t *wake)
{
	int64_t drain_end = 0;

	if (sim_signals >= 2 || (s->deadline_us && now >= s->deadline_us))
		return true;
	if (s->stop_us)
		drain_end = s->stop_us + SIM_STOP_DRAIN_US;
	else if (sim_devices_done(s))
		drain_end = s->last_send_us + SIM_NON_DRAIN_US;
	else
		return false;
	if (s->con_pending == 0 && (s->non_pending == 0 || now >= drain_end))
		return true;
	if (s->stop_us && now >= drain_end)
		return true;
	if (drain_end > now && drain_end < *wake)
		*wake = drain_end;
	return false;
}

static void
sim_housekeep(struct sim *s, int64_t now)
{
	for (size_t i = 0; i < s->ndev; i++) {
		if (s->dev[i].outstanding)
			dev_expire(s, &s->dev[i], now);
	}
}

/*
 * libcoap's own coap_io_process() walks every session before each epoll_wait() to find its next
 * timeout: with thousands of devices in one process that walk was most of the simulator's CPU.
 * Like the gateway, the loop calls coap_io_prepare_epoll() (the walk: retransmissions, DTLS and
 * session timers) only when libcoap's timerfd fires and at least every SIM_PREPARE_US, and
 * hands what epoll reports to coap_io_do_epoll() (deps-patches/libcoap/0001).
 */
static int
sim_io(struct sim *s, int efd, int64_t wake, int64_t *next_prepare)
{
	struct epoll_event ev[SIM_EPOLL_BATCH];
	int64_t now = now_us();
	int n, timer = 0;

	if (now >= *next_prepare) {
		coap_tick_t t;

		coap_ticks(&t);
		coap_io_prepare_epoll(s->ctx, t);
		*next_prepare = now + SIM_PREPARE_US;
	}
	if (*next_prepare < wake)
		wake = *next_prepare;
	n = epoll_wait(efd, ev, SIM_EPOLL_BATCH, wake <= now ? 0 : (int)((wake - now + 999) / 1000));
	if (n < 0)
		return errno == EINTR ? 0 : -1;
	for (int i = 0; i < n; i++)
		if (ev[i].data.ptr == NULL)
			timer = 1;	/* libcoap's timerfd: its due work runs in the prepare */
	if (n > 0)
		coap_io_do_epoll(s->ctx, ev, (size_t)n);
	if (timer)
		*next_prepare = 0;
	return 0;
}

/* Runs one device's due work; it next wants to run at the time it returns, or at once if
 * something happened to it meanwhile. */
static void
sim_tick_one(struct sim *s, struct device *d, int64_t now)
{
	int64_t w;

	dev_want(s, d, SIM_NEVER);
	w = dev_tick(s, d, now);
	if (d->heap_at && w > now)
		w = now + 1;	/* poked while it ran: again next turn */
	else if (w <= now)
		w = now + 1;	/* not in this turn again */
	dev_want(s, d, w);
}

/* Ticks the devices that are due (all of them on a sweep). */
static void
sim_tick(struct sim *s, int64_t now)
{
	if (s->sweep || s->o.serve) {
		s->sweep = false;
		for (size_t i = 0; i < s->ndev; i++)
			sim_tick_one(s, &s->dev[i], now);
		return;
	}
	while (s->ndue && s->due[0]->wake_us <= now)
		sim_tick_one(s, s->due[0], now);
}

static int sim_run(struct sim *s);

static int
sim_loop(struct sim *s)
{
	int r;

	s->due = calloc(s->ndev, sizeof(*s->due));
	s->hs_wait = calloc(s->ndev, sizeof(*s->hs_wait));
	if (!s->due || !s->hs_wait) {
		free(s->due);
		free(s->hs_wait);
		fprintf(stderr, "coap2mqtt-sim: out of memory\n");
		return -1;
	}
	s->ndue = 0;
	s->sweep = true;
	r = sim_run(s);
	for (size_t i = 0; i < s->ndev; i++) {
		s->dev[i].heap_at = 0;
		s->dev[i].hs_queued = false;
	}
	free(s->due);
	free(s->hs_wait);
	s->due = NULL;
	s->hs_wait = NULL;
	s->hs_len = 0;
	s->ndue = 0;
	return r;
}

static int
sim_run(struct sim *s)
{
	int64_t start = now_us(), next_house = start, next_prepare = 0;
	int efd = coap_context_get_coap_fd(s->ctx);

	s->holding = s->o.hold;

	for (size_t i = 0; i < s->ndev; i++) {
		s->dev[i].next_due_us += start;
		s->dev[i].open_after_us = s->dev[i].next_due_us;	/* --serve: same ramp */
	}
	s->next_notify_us = start + s->o.notify_ms * 1000;
	if (s->o.timeout_s > 0)
		s->deadline_us = start + (int64_t)(s->o.timeout_s * 1e6);
	for (;;) {
		int64_t now = now_us(), wake;

		if (ferror(stdout))
			return -1;	/* the reader went away */
		if (sim_signals && !s->stop_us) {
			s->stop_us = now;
			s->sweep = true;
		}
		if (s->holding && sim_release) {
			/* the readings' schedule starts now */
			s->holding = false;
			for (size_t i = 0; i < s->ndev; i++)
				s->dev[i].next_due_us += now - start;
			s->sweep = true;
		}
		if (now >= next_house) {
			sim_housekeep(s, now);
			next_house = now + SIM_HOUSEKEEP_US;
			s->sweep = true;
		}
		if (s->o.serve && !s->stop_us && now >= s->next_notify_us) {
			serve_tick(s);
			s->next_notify_us += s->o.notify_ms * 1000;
			if (s->next_notify_us <= now)
				s->next_notify_us = now + s->o.notify_ms * 1000;
		}
		wake = next_house;
		if (s->o.serve && s->next_notify_us < wake)
			wake = s->next_notify_us;
		sim_tick(s, now);
		if (s->ndue && s->due[0]->wake_us < wake)
			wake = s->due[0]->wake_us;
		if (sim_done(s, now, &wake))
			return 0;
		if (s->deadline_us && s->deadline_us < wake)
			wake = s->deadline_us;
		if (efd < 0 ? coap_io_process(s->ctx, wake <= (now = now_us()) ? COAP_IO_NO_WAIT :
		    (uint32_t)((wake - now + 999) / 1000)) < 0 : sim_io(s, efd, wake, &next_prepare) < 0) {
			fprintf(stderr, "coap2mqtt-sim: waiting for the network failed: %s\n",
			    strerror(errno));
			return -1;
		}
	}
}

/* At exit: a handshake still going failed; unanswered CON requests are timeouts, NON ones
 * were not promised an answer. */
static void
sim_abandon(struct sim *s)
{
	for (size_t i = 0; i < s->ndev; i++) {
		struct device *d = &s->dev[i];

		if (dev_handshaking(d))
			dev_lost(s, d, "handshake-incomplete");
		for (long j = 0; j < s->o.window && d->outstanding; j++) {
			if (d->slots[j].seq && s->o.type == COAP_MESSAGE_CON)
				slot_timeout(s, d, &d->slots[j], "deadline");
			else
				slot_free(s, d, &d->slots[j]);
		}
	}
}

static int
sim_status(const struct sim *s)
{
	uint64_t expected = (uint64_t)s->ndev * (uint64_t)s->o.count;

	if (s->dtls_failed || s->errors || s->timeouts)
		return 1;
	if (s->o.count > 0 && s->sent != expected)
		return 1;
	if (s->o.type == COAP_MESSAGE_CON && s->ok != s->sent)
		return 1;
	return 0;
}

/* ---- setup and teardown ---- */

static void
on_signal(int sig)
{
	(void)sig;
	if (sim_signals < 2)
		sim_signals++;
}

static void
on_release(int sig)
{
	(void)sig;
	sim_release = 1;
}

static void
signals_init(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sa.sa_handler = on_release;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* One UDP socket per session: lift the descriptor limit as far as allowed. */
static void
fd_limit_raise(size_t need)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need)
		return;
	rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need ? need : rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need)
		fprintf(stderr, "coap2mqtt-sim: only %llu file descriptors for %zu sessions\n",
		    (unsigned long long)rl.rlim_cur, need);
}

/* Parses --uri, resolves the gateway and builds the path template; 2 = usage, 1 = runtime. */
static int
target_init(struct sim *s)
{
	coap_uri_t uri;
	coap_addr_info_t *ai;
	char host[256];

	if (coap_split_uri((const uint8_t *)s->o.uri, strlen(s->o.uri), &uri) < 0 ||
	    (uri.scheme != COAP_URI_SCHEME_COAP && uri.scheme != COAP_URI_SCHEME_COAPS) ||
	    uri.host.length == 0 || uri.host.length >= sizeof(host) || uri.query.length) {
		fprintf(stderr, "coap2mqtt-sim: --uri: '%s' is not coaps://host[:port] or "
		    "coap://host[:port]\n", s->o.uri);
		return EXIT_USAGE;
	}
	if (uri.scheme == COAP_URI_SCHEME_COAPS && !s->o.keys_file && !s->o.key_set) {
		fprintf(stderr, "coap2mqtt-sim: coaps:// needs --key, --key-hex or --keys\n");
		return EXIT_USAGE;
	}
	if (!path_init(s, &uri))
		return EXIT_USAGE;
	memcpy(host, uri.host.s, uri.host.length);
	host[uri.host.length] = '\0';
	ai = coap_resolve_address_info(&uri.host, uri.port, uri.port, uri.port, uri.port, 0,
	    1 << uri.scheme, COAP_RESOLVE_TYPE_REMOTE);
	if (!ai) {
		fprintf(stderr, "coap2mqtt-sim: --uri: cannot resolve '%s'\n", host);
		return 1;
	}
	s->proto = ai->proto;
	s->dst = ai->addr;
	coap_free_address_info(ai);
	if (!coap_host_is_unix_domain(&uri.host) && strspn(host, "0123456789.:[]") != strlen(host))
		s->sni = strdup(host);
	return 0;
}

static bool
context_init(struct sim *s)
{
	s->ctx = coap_new_context(NULL);
	if (!s->ctx)
		return false;
	coap_context_set_app_data(s->ctx, s);
	coap_context_set_block_mode(s->ctx, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
	if (s->o.block_size)
		coap_context_set_max_block_size(s->ctx, (size_t)s->o.block_size);
	coap_register_response_handler(s->ctx, on_response);
	coap_register_nack_handler(s->ctx, on_nack);
	coap_register_event_handler(s->ctx, on_event);
	return true;
}

/* MAX_TRANSMIT_WAIT plus a margin: a CON answered by an empty ACK waits this long. */
static void
expiry_init(struct sim *s)
{
	double ack = s->o.ack_timeout_s > 0 ? s->o.ack_timeout_s : 2.0;
	long mr = s->o.max_retransmit >= 0 ? s->o.max_retransmit : 4;

	s->con_expire_us = (int64_t)(ack * 1.5 * (double)((1L << (mr + 1)) - 1) * 1e6) + 5000000;
	s->handshake_us = (int64_t)(s->o.handshake_s * 1e6);
	if (s->proto == COAP_PROTO_UDP)
		s->handshake_us = 0;
}

static void
log_init(int verbosity)
{
	coap_log_t level = verbosity == 0 ? COAP_LOG_ERR : verbosity == 1 ? COAP_LOG_WARN :
	    verbosity == 2 ? COAP_LOG_INFO : COAP_LOG_DEBUG;

	coap_set_log_handler(on_log);
	coap_set_log_level(level);
	coap_dtls_set_log_level(level);
}

static int
sim_init(struct sim *s)
{
	int r;

	if (!devices_init(s))
		return EXIT_USAGE;
	if (s->o.payload_file && !payload_file_load(s, s->o.payload_file))
		return EXIT_USAGE;
	if ((r = target_init(s)) != 0)
		return r;
	if (s->proto != COAP_PROTO_UDP && !coap_dtls_is_supported()) {
		fprintf(stderr, "coap2mqtt-sim: this libcoap has no DTLS\n");
		return 1;
	}
	fd_limit_raise(s->ndev + 64);
	expiry_init(s);
	if (!context_init(s) || !serve_init(s)) {
		fprintf(stderr, "coap2mqtt-sim: cannot create a CoAP context\n");
		return 1;
	}
	return cipher_init(s) ? 0 : EXIT_USAGE;
}

static void
sim_shutdown(struct sim *s)
{
	for (size_t i = 0; i < s->ndev; i++)
		dev_close(s, &s->dev[i]);
	if (s->ctx)
		coap_free_context(s->ctx);
	s->ctx = NULL;
	devices_free(s);
	for (size_t i = 0; i < s->path.n; i++)
		free(s->path.seg[i]);
	free(s->file_payload);
	free(s->sni);
}

int
main(int argc, char **argv)
{
	struct sim s;
	int r;

	setvbuf(stdout, NULL, _IOLBF, 0);
	memset(&s, 0, sizeof(s));
	r = opts_parse(&s.o, argc, argv);
	if (r != 0)
		return r > 0 ? 0 : EXIT_USAGE;
	coap_startup();
	log_init(s.o.verbosity);
	signals_init();
	r = sim_init(&s);
	if (r == 0) {
		r = sim_loop(&s) == 0 ? 0 : 1;
		sim_abandon(&s);
		print_summary(&s);
		r = r ? r : sim_status(&s);
	}
	sim_shutdown(&s);
	coap_cleanup();
	return r;
}
