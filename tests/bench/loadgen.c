/* loadgen.c: the benchmark's load generator. Up to 20,000 DTLS 1.2 PSK sessions (a wolfSSL
 * client each, TLS_PSK_WITH_AES_128_CCM_8 as RFC 7252 requires) in one process on one UDP
 * socket: session i sends from its own loopback address (--base plus i, given per datagram with
 * IP_PKTINFO), so the server sees that many peers while the generator holds one descriptor, reads
 * in batches (recvmmsg) and writes in batches (sendmmsg).
 *
 *   coap2mqtt-loadgen --port P --keys FILE [--host 127.0.0.1] [--sessions N] [--handshakes C]
 *       [--readings R] [--window W] [--interval MS] [--ramp MS] [--type con|non]
 *       [--method post|put] [--path a/b] [--hold] [--timeout S] [--base 127.1.0.0]
 *
 * KEYS FILE: "IDENTITY KEY" per line (the key as text), the first N are used.
 * Every session comes up first (at most C handshakes at once); with --hold the readings wait for
 * SIGUSR1. Each device then sends R readings, payload "SEQ UNIX-TIME" (when it was built, for a
 * subscriber's latency): --interval 0 is a closed loop (W requests in flight per device, the next
 * as soon as one is answered, the first ones spread over --ramp ms); --interval MS an open loop
 * (one reading every MS per device, the devices spread evenly over the first interval).
 * CON requests are retransmitted as RFC 7252 says (2 s, doubling, 4 times); an unanswered NON
 * counts as lost after 10 s.
 *
 * stdout, a line per event: "device=ID event=dtls-connected", "device=ID seq=N code=C.DD
 * rtt_ms=X", "device=ID seq=N event=timeout", "device=ID event=failed reason=handshake", and at
 * the end "sent=N answered=N ok=N errors=N timeouts=N handshake_failures=N".
 * Exit 0 when every session came up and every reading was answered 2.xx, 1 otherwise, 2 on bad
 * arguments. Bounded: --timeout (default 300 s) ends the whole run.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include "psk.h"

#define LG_MAX_SESSIONS 65536
#define LG_MAX_WINDOW 8
#define LG_MSG 160			/* one request, header to payload */
#define LG_DGRAM 1500
#define LG_BATCH 64			/* datagrams per recvmmsg / sendmmsg */
#define LG_ACK_TIMEOUT_US 2000000	/* RFC 7252 ACK_TIMEOUT, no random factor */
#define LG_MAX_RETRANSMIT 4
#define LG_NON_LIFETIME_US 10000000
#define LG_HANDSHAKE_US 60000000	/* a handshake that takes longer failed */

enum { S_IDLE, S_HANDSHAKE, S_UP, S_FAILED };
enum { EV_SEND, EV_RETX, EV_HS };

struct slot {
	uint8_t msg[LG_MSG];
	uint8_t len, busy, tries, acked;
	uint16_t mid;
	uint32_t seq, token;
	int64_t t0;
};

struct sess {
	WOLFSSL *ssl;
	struct psk psk;			/* its app data */
	uint8_t state, want_send;
	uint16_t mid;
	uint32_t next_seq;		/* readings built so far */
	uint32_t token;
	uint32_t hs_gen;
	const uint8_t *in;		/* the datagram wolfSSL reads next */
	size_t in_len;
	int64_t hs_start, next_due;
	struct slot slot[LG_MAX_WINDOW];
};

struct ev {
	int64_t t;
	uint32_t s;
	uint8_t kind, slot;
	uint32_t gen;
};

static struct {
	const char *host, *keys, *path;
	int port, sessions, handshakes, window, con, post, hold;
	long readings, interval_ms, ramp_ms, timeout_s;
	struct in_addr base;
} o = { .host = "127.0.0.1", .path = "sensors/t", .sessions = 1, .handshakes = 40,
	.window = 1, .con = 1, .post = 1, .readings = 1, .ramp_ms = 1000, .timeout_s = 300 };

static struct sess *S;
static struct sockaddr_in server;
static int fd;
static uint8_t path_opts[LG_MSG];
static size_t path_len;

static struct ev *heap;
static size_t nheap, cheap;

static struct {
	struct mmsghdr m[LG_BATCH];
	struct iovec iov[LG_BATCH];
	uint8_t buf[LG_BATCH][LG_DGRAM];
	uint8_t ctl[LG_BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
	unsigned n;
} out, in;

static uint64_t sent, answered, ok, errors, timeouts, hs_failed, finished, up;
static volatile sig_atomic_t go;

static int64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- the timer heap: (time, session, kind); stale entries are dropped when they come up ---- */

static void ev_push(int64_t t, uint32_t s, int kind, int slot, uint32_t gen)
{
	size_t i;

	if (nheap == cheap) {
		size_t c = cheap ? 2 * cheap : 4096;
		struct ev *h = realloc(heap, c * sizeof(*h));

		if (!h) {
			fprintf(stderr, "loadgen: out of memory\n");
			exit(1);
		}
		heap = h;
		cheap = c;
	}
	for (i = nheap++; i > 0 && heap[(i - 1) / 2].t > t; i = (i - 1) / 2)
		heap[i] = heap[(i - 1) / 2];
	heap[i] = (struct ev){ .t = t, .s = s, .kind = (uint8_t)kind, .slot = (uint8_t)slot,
			       .gen = gen };
}

static struct ev ev_pop(void)
{
	struct ev top = heap[0], last = heap[--nheap];
	size_t i = 0;

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= nheap)
			break;
		if (c + 1 < nheap && heap[c + 1].t < heap[c].t)
			c++;
		if (heap[c].t >= last.t)
			break;
		heap[i] = heap[c];
		i = c;
	}
	if (nheap)
		heap[i] = last;
	return top;
}

/* ---- datagrams: session i is --base + i; the batch goes out at flush() ---- */

static struct in_addr sess_addr(uint32_t i)
{
	return (struct in_addr){ .s_addr = htonl(ntohl(o.base.s_addr) + i) };
}

static void flush(void)
{
	unsigned done = 0;

	while (done < out.n) {
		int r = sendmmsg(fd, out.m + done, out.n - done, 0);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != ENOBUFS)
				perror("loadgen: sendmmsg");
			break;		/* what is not sent is lost: CoAP and DTLS retransmit */
		}
		done += (unsigned)r;
	}
	out.n = 0;
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	struct sess *s = ctx;
	unsigned k;
	struct cmsghdr *c;
	struct in_pktinfo pi = { .ipi_spec_dst = sess_addr((uint32_t)(s - S)) };

	(void)ssl;
	if (sz <= 0 || sz > LG_DGRAM)
		return WOLFSSL_CBIO_ERR_GENERAL;
	if (out.n == LG_BATCH)
		flush();
	k = out.n++;
	memcpy(out.buf[k], buf, (size_t)sz);
	out.iov[k] = (struct iovec){ .iov_base = out.buf[k], .iov_len = (size_t)sz };
	out.m[k].msg_hdr = (struct msghdr){ .msg_name = &server, .msg_namelen = sizeof(server),
		.msg_iov = &out.iov[k], .msg_iovlen = 1, .msg_control = out.ctl[k],
		.msg_controllen = sizeof(out.ctl[k]) };
	c = CMSG_FIRSTHDR(&out.m[k].msg_hdr);
	c->cmsg_level = IPPROTO_IP;
	c->cmsg_type = IP_PKTINFO;
	c->cmsg_len = CMSG_LEN(sizeof(pi));
	memcpy(CMSG_DATA(c), &pi, sizeof(pi));
	return sz;
}

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	struct sess *s = ctx;
	size_t n = s->in_len;

	(void)ssl;
	if (!s->in)
		return WOLFSSL_CBIO_ERR_WANT_READ;
	if (n > (size_t)sz)
		n = (size_t)sz;		/* DTLS: the rest of the datagram is dropped */
	memcpy(buf, s->in, n);
	s->in = NULL;
	return (int)n;
}

/* ---- readings ---- */

static void send_slot(struct sess *s, struct slot *sl)
{
	if (wolfSSL_write(s->ssl, sl->msg, sl->len) != sl->len) {
		errors++;
		sl->busy = 0;
		finished++;
	}
}

/* A new reading in a free slot, if the device has one left to send; 1 when one went out. */
static int send_reading(struct sess *s, int64_t now)
{
	struct slot *sl = NULL;
	struct timespec rt;
	uint32_t i = (uint32_t)(s - S);
	size_t n = 0;
	int w;

	if (s->state != S_UP || s->next_seq >= (uint32_t)o.readings)
		return 0;
	for (w = 0; w < o.window && !sl; w++)
		if (!s->slot[w].busy)
			sl = &s->slot[w];
	if (!sl) {
		s->want_send = 1;
		return 0;
	}
	w = (int)(sl - s->slot);
	*sl = (struct slot){ .busy = 1, .mid = ++s->mid, .seq = ++s->next_seq,
			     .token = ++s->token, .t0 = now };
	sl->msg[n++] = (uint8_t)(0x40 | (o.con ? 0 : 0x10) | 4);	/* v1, CON/NON, TKL 4 */
	sl->msg[n++] = o.post ? 0x02 : 0x03;
	sl->msg[n++] = (uint8_t)(sl->mid >> 8);
	sl->msg[n++] = (uint8_t)sl->mid;
	memcpy(sl->msg + n, &sl->token, 4);
	n += 4;
	memcpy(sl->msg + n, path_opts, path_len);
	n += path_len;
	clock_gettime(CLOCK_REALTIME, &rt);
	sl->msg[n++] = 0xff;
	n += (size_t)snprintf((char *)sl->msg + n, LG_MSG - n, "%" PRIu32 " %lld.%06ld", sl->seq,
			      (long long)rt.tv_sec, rt.tv_nsec / 1000);
	sl->len = (uint8_t)n;
	sent++;
	send_slot(s, sl);
	if (sl->busy)
		ev_push(now + (o.con ? LG_ACK_TIMEOUT_US : LG_NON_LIFETIME_US), i, EV_RETX, w,
			sl->mid);
	return 1;
}

/* A datagram of application data from the server: a response to one of our requests. */
static void on_coap(struct sess *s, const uint8_t *p, size_t n, int64_t now)
{
	unsigned type, tkl, code;
	uint16_t mid;
	uint32_t tok;
	struct slot *sl = NULL;

	if (n < 4 || p[0] >> 6 != 1)
		return;
	type = (p[0] >> 4) & 3;
	tkl = p[0] & 15;
	code = p[1];
	mid = (uint16_t)(p[2] << 8 | p[3]);
	if (code == 0 && type == 2) {		/* empty ACK: the answer comes separately */
		for (int w = 0; w < o.window; w++)
			if (s->slot[w].busy && s->slot[w].mid == mid)
				s->slot[w].acked = 1;
		return;
	}
	if (code < 0x40 || tkl != 4 || n < 8)
		return;				/* a request or a token that is not ours */
	memcpy(&tok, p + 4, 4);
	if (type == 0) {			/* a separate response: ACK it */
		uint8_t ack[4] = { 0x60, 0, p[2], p[3] };

		wolfSSL_write(s->ssl, ack, sizeof(ack));
	}
	for (int w = 0; w < o.window && !sl; w++)
		if (s->slot[w].busy && s->slot[w].token == tok)
			sl = &s->slot[w];
	if (!sl)
		return;				/* a duplicate answer */
	answered++;
	if (code >> 5 == 2)
		ok++;
	else
		errors++;
	printf("device=%s seq=%" PRIu32 " code=%u.%02u rtt_ms=%.1f\n", s->psk.identity, sl->seq,
	       code >> 5, code & 31, (double)(now - sl->t0) / 1000);
	sl->busy = 0;
	finished++;
	if (o.interval_ms == 0 || s->want_send) {
		s->want_send = 0;
		send_reading(s, now);
	}
}

static void on_retx(struct sess *s, const struct ev *e, int64_t now)
{
	struct slot *sl = &s->slot[e->slot];

	if (!sl->busy || sl->mid != e->gen)
		return;
	if (o.con && !sl->acked && sl->tries < LG_MAX_RETRANSMIT) {
		sl->tries++;
		send_slot(s, sl);
		if (sl->busy)
			ev_push(now + ((int64_t)LG_ACK_TIMEOUT_US << sl->tries), e->s, EV_RETX,
				e->slot, sl->mid);
		return;
	}
	if (o.con && sl->acked && now - sl->t0 < LG_NON_LIFETIME_US * 3) {
		ev_push(now + LG_ACK_TIMEOUT_US, e->s, EV_RETX, e->slot, sl->mid);
		return;			/* ACKed: the separate response may still come */
	}
	printf("device=%s seq=%" PRIu32 " event=timeout\n", s->psk.identity, sl->seq);
	timeouts++;
	sl->busy = 0;
	finished++;
	if (o.interval_ms == 0)
		send_reading(s, now);
}

/* ---- handshakes ---- */

static int handshaking;
static uint32_t next_hs;

static void hs_step(struct sess *s, int64_t now)
{
	uint32_t i = (uint32_t)(s - S);
	int r = wolfSSL_connect(s->ssl), err;

	if (r == WOLFSSL_SUCCESS) {
		s->state = S_UP;
		handshaking--;
		up++;
		printf("device=%s event=dtls-connected\n", s->psk.identity);
		return;
	}
	err = wolfSSL_get_error(s->ssl, r);
	if (err == WOLFSSL_ERROR_WANT_READ || err == WOLFSSL_ERROR_WANT_WRITE) {
		int t = wolfSSL_dtls_get_current_timeout(s->ssl);

		ev_push(now + (int64_t)(t > 0 ? t : 1) * 1000000, i, EV_HS, 0, ++s->hs_gen);
		return;
	}
	printf("device=%s event=failed reason=handshake error=%d\n", s->psk.identity, err);
	s->state = S_FAILED;
	handshaking--;
	hs_failed++;
}

static void hs_start(WOLFSSL_CTX *ctx, int64_t now)
{
	while (handshaking < o.handshakes && next_hs < (uint32_t)o.sessions) {
		struct sess *s = &S[next_hs++];

		s->ssl = wolfSSL_new(ctx);
		if (!s->ssl) {
			fprintf(stderr, "loadgen: wolfSSL_new failed\n");
			exit(1);
		}
		wolfSSL_set_app_data(s->ssl, &s->psk);
		wolfSSL_SetIOReadCtx(s->ssl, s);
		wolfSSL_SetIOWriteCtx(s->ssl, s);
		wolfSSL_dtls_set_using_nonblock(s->ssl, 1);
		s->state = S_HANDSHAKE;
		s->hs_start = now;
		handshaking++;
		hs_step(s, now);
	}
}

static void on_hs_timer(struct sess *s, const struct ev *e, int64_t now)
{
	if (s->state != S_HANDSHAKE || e->gen != s->hs_gen)
		return;
	if (now - s->hs_start > LG_HANDSHAKE_US) {
		printf("device=%s event=failed reason=handshake-timeout\n", s->psk.identity);
		s->state = S_FAILED;
		handshaking--;
		hs_failed++;
		return;
	}
	if (wolfSSL_dtls_got_timeout(s->ssl) != WOLFSSL_SUCCESS) {
		printf("device=%s event=failed reason=handshake-retransmissions\n", s->psk.identity);
		s->state = S_FAILED;
		handshaking--;
		hs_failed++;
		return;
	}
	ev_push(now + (int64_t)wolfSSL_dtls_get_current_timeout(s->ssl) * 1000000,
		(uint32_t)(s - S), EV_HS, 0, ++s->hs_gen);
}

/* ---- input ---- */

static void on_datagram(const uint8_t *p, size_t n, const struct in_addr *dst, int64_t now)
{
	uint32_t i = ntohl(dst->s_addr) - ntohl(o.base.s_addr);
	struct sess *s;
	uint8_t plain[LG_DGRAM];
	int r;

	if (i >= (uint32_t)o.sessions)
		return;
	s = &S[i];
	s->in = p;
	s->in_len = n;
	if (s->state == S_HANDSHAKE) {
		hs_step(s, now);
	} else if (s->state == S_UP) {
		while ((r = wolfSSL_read(s->ssl, plain, sizeof(plain))) > 0)
			on_coap(s, plain, (size_t)r, now);
	}
	s->in = NULL;
}

static void receive(int64_t now)
{
	for (int round = 0; round < 16; round++) {
		int r;

		for (unsigned k = 0; k < LG_BATCH; k++) {
			in.iov[k] = (struct iovec){ .iov_base = in.buf[k], .iov_len = LG_DGRAM };
			in.m[k].msg_hdr = (struct msghdr){ .msg_iov = &in.iov[k], .msg_iovlen = 1,
				.msg_control = in.ctl[k], .msg_controllen = sizeof(in.ctl[k]) };
		}
		r = recvmmsg(fd, in.m, LG_BATCH, MSG_DONTWAIT, NULL);
		if (r <= 0)
			break;
		for (int k = 0; k < r; k++) {
			struct msghdr *h = &in.m[k].msg_hdr;

			for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c))
				if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
					struct in_pktinfo pi;

					memcpy(&pi, CMSG_DATA(c), sizeof(pi));
					on_datagram(in.buf[k], in.m[k].msg_len, &pi.ipi_addr, now);
				}
		}
		flush();
		if (r < LG_BATCH)
			break;
	}
}

/* ---- setup ---- */

static int read_keys(void)
{
	FILE *f = fopen(o.keys, "r");
	int n = 0;

	if (!f) {
		perror(o.keys);
		return -1;
	}
	while (n < o.sessions && fscanf(f, "%128s %64s", S[n].psk.identity, S[n].psk.key) == 2)
		n++;
	fclose(f);
	return n;
}

/* Uri-Path options for --path (segments of 1..12 bytes, 64 bytes in all). */
static int build_path(void)
{
	const char *p = o.path;
	size_t n = 0;

	while (*p) {
		size_t l = strcspn(p, "/");

		if (l == 0 || l > 12 || n + 1 + l > 64)
			return -1;
		uint8_t delta = n == 0 ? 0xb0 : 0x00;	/* Uri-Path (11), then the same again */

		path_opts[n++] = (uint8_t)(delta | l);
		memcpy(path_opts + n, p, l);
		n += l;
		p += l;
		if (*p == '/')
			p++;
	}
	path_len = n;
	return 0;
}

static void on_usr1(int sig)
{
	(void)sig;
	go = 1;
}

static long num(const char *name, const char *arg, long lo, long hi)
{
	char *end;
	long v = strtol(arg, &end, 10);

	if (*arg == '\0' || *end || v < lo || v > hi) {
		fprintf(stderr, "loadgen: %s: '%s' is not a number in %ld..%ld\n", name, arg, lo, hi);
		exit(2);
	}
	return v;
}

static void options(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "host", 1, 0, 'H' }, { "port", 1, 0, 'p' }, { "keys", 1, 0, 'k' },
		{ "sessions", 1, 0, 'n' }, { "handshakes", 1, 0, 'c' }, { "readings", 1, 0, 'r' },
		{ "window", 1, 0, 'w' }, { "interval", 1, 0, 'i' }, { "ramp", 1, 0, 'R' },
		{ "type", 1, 0, 't' }, { "method", 1, 0, 'm' }, { "path", 1, 0, 'P' },
		{ "hold", 0, 0, 'h' }, { "timeout", 1, 0, 'T' }, { "base", 1, 0, 'b' }, { 0 }
	};
	int c;

	inet_pton(AF_INET, "127.1.0.0", &o.base);
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'H': o.host = optarg; break;
		case 'p': o.port = (int)num("--port", optarg, 1, 65535); break;
		case 'k': o.keys = optarg; break;
		case 'n': o.sessions = (int)num("--sessions", optarg, 1, LG_MAX_SESSIONS); break;
		case 'c': o.handshakes = (int)num("--handshakes", optarg, 1, 10000); break;
		case 'r': o.readings = num("--readings", optarg, 0, 1000000); break;
		case 'w': o.window = (int)num("--window", optarg, 1, LG_MAX_WINDOW); break;
		case 'i': o.interval_ms = num("--interval", optarg, 0, 3600000); break;
		case 'R': o.ramp_ms = num("--ramp", optarg, 0, 3600000); break;
		case 'T': o.timeout_s = num("--timeout", optarg, 1, 86400); break;
		case 'h': o.hold = 1; break;
		case 'P': o.path = optarg; break;
		case 't':
			if (strcmp(optarg, "con") && strcmp(optarg, "non"))
				goto usage;
			o.con = strcmp(optarg, "con") == 0;
			break;
		case 'm':
			if (strcmp(optarg, "post") && strcmp(optarg, "put"))
				goto usage;
			o.post = strcmp(optarg, "post") == 0;
			break;
		case 'b':
			if (inet_pton(AF_INET, optarg, &o.base) != 1)
				goto usage;
			break;
		default:
			goto usage;
		}
	}
	if (optind == argc && o.port && o.keys && build_path() == 0 &&
	    (ntohl(o.base.s_addr) >> 24) == 127 &&
	    (ntohl(o.base.s_addr) & 0xffffff) + (uint32_t)o.sessions <= 0xffffff)
		return;
usage:
	fprintf(stderr, "usage: coap2mqtt-loadgen --port P --keys FILE [--host 127.0.0.1] "
		"[--sessions N] [--handshakes C] [--readings R] [--window W<=%d] [--interval MS] "
		"[--ramp MS] [--type con|non] [--method post|put] [--path a/b] [--hold] "
		"[--timeout S] [--base 127.B.C.D]\n(--path: segments of 1..12 bytes, 64 in all; "
		"--base and every session after it in 127.0.0.0/8)\n", LG_MAX_WINDOW);
	exit(2);
}

static int open_socket(void)
{
	struct sockaddr_in any = { .sin_family = AF_INET };
	int on = 1, buf = 8 << 20;

	fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
	if (fd < 0 || setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof(on)) < 0 ||
	    bind(fd, (struct sockaddr *)&any, sizeof(any)) < 0) {
		perror("loadgen: socket");
		return -1;
	}
	/* as much as net.core.rmem_max allows: 20,000 answers may arrive at once */
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
	return 0;
}

/* Every due timer; the time of the next one (or now + 100 ms). */
static int64_t run_timers(WOLFSSL_CTX *ctx, int64_t now)
{
	while (nheap && heap[0].t <= now) {
		struct ev e = ev_pop();
		struct sess *s = &S[e.s];

		if (e.kind == EV_HS)
			on_hs_timer(s, &e, now);
		else if (e.kind == EV_RETX)
			on_retx(s, &e, now);
		else if (s->state == S_UP && go) {
			if (send_reading(s, now) && o.interval_ms)
				s->next_due += o.interval_ms * 1000;
			else if (o.interval_ms)
				s->next_due = now + o.interval_ms * 1000;
			if (o.interval_ms && s->next_seq < (uint32_t)o.readings)
				ev_push(s->next_due, e.s, EV_SEND, 0, 0);
			/* closed loop: the other slots start with the first */
			while (o.interval_ms == 0 && send_reading(s, now))
				;
		}
	}
	hs_start(ctx, now);
	flush();
	return nheap && heap[0].t < now + 100000 ? heap[0].t : now + 100000;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	WOLFSSL_CTX *ctx;
	int64_t t_end, started = 0, flushed = 0;
	int ep;
	uint64_t total;
	int n;

	options(argc, argv);
	server.sin_family = AF_INET;
	server.sin_port = htons((uint16_t)o.port);
	if (inet_pton(AF_INET, o.host, &server.sin_addr) != 1) {
		fprintf(stderr, "loadgen: --host: an IPv4 address\n");
		return 2;
	}
	S = calloc((size_t)o.sessions, sizeof(*S));
	if (!S || (n = read_keys()) < 0)
		return 2;
	if (n < o.sessions) {
		fprintf(stderr, "loadgen: %s has %d devices, --sessions %d\n", o.keys, n, o.sessions);
		return 2;
	}
	sigaction(SIGUSR1, &sa, NULL);
	if (!o.hold)
		go = 1;
	setvbuf(stdout, NULL, _IOFBF, 1 << 20);
	if (open_socket() < 0)
		return 1;
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &(struct epoll_event){ .events = EPOLLIN }) < 0) {
		perror("loadgen: epoll");
		return 1;
	}
	wolfSSL_Init();
	ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
	if (!ctx || wolfSSL_CTX_set_cipher_list(ctx, "PSK-AES128-CCM8") != WOLFSSL_SUCCESS) {
		fprintf(stderr, "loadgen: no DTLS 1.2 PSK-AES128-CCM8 in this wolfSSL\n");
		return 1;
	}
	wolfSSL_CTX_set_psk_client_callback(ctx, psk_client_cb);
	wolfSSL_CTX_SetIORecv(ctx, io_recv);
	wolfSSL_CTX_SetIOSend(ctx, io_send);
	total = (uint64_t)o.sessions * (uint64_t)o.readings;
	t_end = now_us() + o.timeout_s * 1000000;
	for (;;) {
		int64_t now = now_us(), next;
		struct epoll_event ev;

		if (now >= t_end)
			break;
		if (!started && now - flushed >= 200000) {
			fflush(stdout);	/* whoever waits for the sessions counts these lines */
			flushed = now;
		}
		if (up + hs_failed == (uint64_t)o.sessions) {
			if (finished >= total && (go || !up))
				break;
			if (go && !started) {
				/* the readings start: device i's first at i/N of the ramp (closed) or
				 * of the interval (open) */
				int64_t span = (o.interval_ms ? o.interval_ms : o.ramp_ms) * 1000;

				started = now;
				fflush(stdout);
				for (int i = 0; i < o.sessions; i++) {
					if (S[i].state != S_UP) {
						finished += (uint64_t)o.readings;
						continue;
					}
					S[i].next_due = now + span * i / o.sessions;
					ev_push(S[i].next_due, (uint32_t)i, EV_SEND, 0, 0);
				}
			}
		}
		next = run_timers(ctx, now);
		if (epoll_wait(ep, &ev, 1, (int)((next - now + 999) / 1000)) > 0)
			receive(now_us());
	}
	fflush(stdout);
	printf("sent=%" PRIu64 " answered=%" PRIu64 " ok=%" PRIu64 " errors=%" PRIu64
	       " timeouts=%" PRIu64 " handshake_failures=%" PRIu64 "\n",
	       sent, answered, ok, errors, timeouts, hs_failed);
	fflush(stdout);
	for (int i = 0; i < o.sessions; i++)
		wolfSSL_free(S[i].ssl);
	wolfSSL_CTX_free(ctx);
	wolfSSL_Cleanup();
	free(S);
	free(heap);
	close(fd);
	close(ep);
	return hs_failed == 0 && ok == total ? 0 : 1;
}
