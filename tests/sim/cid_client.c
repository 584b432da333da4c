/* cid_client.c: a DTLS 1.2 PSK client with a Connection ID (RFC 9146) on wolfSSL, for the tests:
 * one session that moves between UDP sockets (as a NAT rebinding moves a device), and a record
 * of that session with a broken MAC sent from yet another socket (as anyone who sees the CID on
 * the path can send one).
 *
 *   coap2mqtt-cid-client HOST PORT IDENTITY KEY STEP...
 *
 * Steps, in order:
 *   send:PATH:PAYLOAD    a CON POST from the current socket; prints
 *                        "step=N code=C.DD port=P" with the answer and the local port, or
 *                        "step=N code=none port=P" when none came within 5 s
 *   move                 the records that follow leave from a new socket (a new source port)
 *   forge:PATH:PAYLOAD   a CON POST record made by the session, one byte of its ciphertext
 *                        flipped, sent from a new socket that is then read for 2 s; prints
 *                        "step=N forged=sent port=P answered=BYTES"
 *   serve:SECONDS        answers the gateway's requests on the current socket for that long
 *                        (2.04 piggybacked, payload "done"), printing
 *                        "step=N served=PATH method=M port=P" for each
 *   observe:PATH         waits up to 15 s for the gateway's GET with Observe on PATH and
 *                        answers 2.05, Observe 1, payload "v0"; prints "step=N observed=PATH"
 *   notify:COUNT         sends COUNT notifications of that resource from the current socket,
 *                        300 ms apart (NON 2.05, Observe and payload "vK" counting on)
 *
 * Exit 0 when the handshake and every step ran (the answers are the caller's to judge), 1 on a
 * handshake or I/O failure, 2 on bad arguments. The CoAP messages are written here by hand: a
 * test speaks the protocol from outside.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#define MAX_DGRAM 1500

static struct {
	struct sockaddr_in server;
	int fd;				/* the socket records go out of and answers come in */
	int capture;			/* the next record is kept in captured, not sent */
	int connected;			/* handshake done: a quiet second is no retransmission cue */
	unsigned char captured[MAX_DGRAM];
	int captured_len;
	const char *identity, *key;
	uint16_t mid;
	unsigned char obs_token[8];	/* the gateway's observation (observe:) */
	int obs_token_len;
	unsigned obs_seq;
} C;

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	(void)ssl;
	(void)ctx;
	if (C.capture) {
		if (sz > (int)sizeof(C.captured))
			return WOLFSSL_CBIO_ERR_GENERAL;
		memcpy(C.captured, buf, (size_t)sz);
		C.captured_len = sz;
		C.capture = 0;
		return sz;
	}
	if (sendto(C.fd, buf, (size_t)sz, 0, (struct sockaddr *)&C.server, sizeof(C.server)) < 0)
		return WOLFSSL_CBIO_ERR_GENERAL;
	return sz;
}

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	struct pollfd p = { .fd = C.fd, .events = POLLIN };
	ssize_t n;

	(void)ssl;
	(void)ctx;
	/* during the handshake a quiet second makes wolfSSL retransmit its flight; afterwards it
	 * only means nothing came yet (a timeout there would end the session's reads for good) */
	if (poll(&p, 1, 1000) <= 0)
		return C.connected ? WOLFSSL_CBIO_ERR_WANT_READ : WOLFSSL_CBIO_ERR_TIMEOUT;
	n = recv(C.fd, buf, (size_t)sz, 0);
	return n < 0 ? WOLFSSL_CBIO_ERR_GENERAL : (int)n;
}

static unsigned int psk_cb(WOLFSSL *ssl, const char *hint, char *identity, unsigned int id_max,
			   unsigned char *key, unsigned int key_max)
{
	size_t il = strlen(C.identity), kl = strlen(C.key);

	(void)ssl;
	(void)hint;
	if (il >= id_max || kl > key_max)
		return 0;
	memcpy(identity, C.identity, il + 1);
	memcpy(key, C.key, kl);
	return (unsigned int)kl;
}

static int new_socket(void)
{
	struct sockaddr_in any = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0 || bind(fd, (struct sockaddr *)&any, sizeof(any)) < 0) {
		perror("cid-client: socket");
		exit(1);
	}
	return fd;
}

static unsigned local_port(int fd)
{
	struct sockaddr_in a;
	socklen_t len = sizeof(a);

	return getsockname(fd, (struct sockaddr *)&a, &len) == 0 ? ntohs(a.sin_port) : 0;
}

/* CON POST with a 4-byte token, one Uri-Path option per segment, then the payload. */
static size_t coap_post(unsigned char *out, size_t max, const char *path, const char *payload,
			uint16_t mid, const unsigned char tok[4])
{
	size_t n = 0, last = 0;
	const char *seg = path;

	out[n++] = 0x40 | 4;	/* version 1, CON, token length 4 */
	out[n++] = 0x02;	/* POST */
	out[n++] = (unsigned char)(mid >> 8);
	out[n++] = (unsigned char)mid;
	memcpy(out + n, tok, 4);
	n += 4;
	while (*seg) {
		const char *end = strchr(seg, '/');
		size_t len = end ? (size_t)(end - seg) : strlen(seg);
		size_t delta = 11 - last;

		if (len > 12 || n + 1 + len + 1 > max)
			return 0;	/* short segments only: this is a test client */
		out[n++] = (unsigned char)((delta << 4) | len);
		memcpy(out + n, seg, len);
		n += len;
		last = 11;
		seg = end ? end + 1 : seg + len;
	}
	if (*payload) {
		size_t len = strlen(payload);

		if (n + 1 + len > max)
			return 0;
		out[n++] = 0xff;
		memcpy(out + n, payload, len);
		n += len;
	}
	return n;
}

static int split(char *arg, char **path, char **payload)
{
	char *a = strchr(arg, ':'), *b = a ? strchr(a + 1, ':') : NULL;

	if (!b)
		return -1;
	*a = *b = '\0';
	*path = a + 1;
	*payload = b + 1;
	return 0;
}

static void step_send(WOLFSSL *ssl, int step, const char *path, const char *payload)
{
	unsigned char msg[512], in[MAX_DGRAM], tok[4] = { 0xc1, 0xd0, (unsigned char)step, 0 };
	size_t n = coap_post(msg, sizeof(msg), path, payload, ++C.mid, tok);
	time_t deadline = time(NULL) + 5;

	if (n == 0 || wolfSSL_write(ssl, msg, (int)n) != (int)n) {
		fprintf(stderr, "cid-client: step %d: write failed\n", step);
		exit(1);
	}
	while (time(NULL) < deadline) {
		int r = wolfSSL_read(ssl, in, sizeof(in));

		if (r >= 8 && memcmp(in + 4, tok, 4) == 0 && in[1] != 0) {
			printf("step=%d code=%u.%02u port=%u\n", step, in[1] >> 5, in[1] & 31,
			       local_port(C.fd));
			fflush(stdout);
			return;
		}
	}
	printf("step=%d code=none port=%u\n", step, local_port(C.fd));
	fflush(stdout);
}

/* Uri-Path of a request, '/'-joined, into out (options before Uri-Path are skipped). */
static void request_path(const unsigned char *m, int len, char *out, size_t max)
{
	int i = 4 + (m[0] & 15);
	unsigned opt = 0;
	size_t n = 0;

	out[0] = '\0';
	while (i < len && m[i] != 0xff) {
		unsigned delta = m[i] >> 4, olen = m[i] & 15;

		i++;
		if (delta == 13)
			delta = 13 + m[i++];
		if (olen == 13)
			olen = 13 + m[i++];
		if (delta > 13 || olen > 13 || i + (int)olen > len)
			return;	/* long option headers: not from this gateway's commands */
		opt += delta;
		if (opt == 11 && n + olen + 2 < max) {
			if (n)
				out[n++] = '/';
			memcpy(out + n, m + i, olen);
			n += olen;
			out[n] = '\0';
		}
		i += (int)olen;
	}
}

static void step_serve(WOLFSSL *ssl, int step, int seconds)
{
	time_t deadline = time(NULL) + seconds;

	while (time(NULL) < deadline) {
		unsigned char in[MAX_DGRAM], out[64];
		int r = wolfSSL_read(ssl, in, sizeof(in)), tkl;
		char path[128];

		if (r < 4 || (in[0] >> 4 & 3) != 0 || in[1] == 0 || in[1] > 31)
			continue;	/* a CON request only */
		tkl = in[0] & 15;
		if (tkl > 8 || 4 + tkl > r)
			continue;
		request_path(in, r, path, sizeof(path));
		out[0] = (unsigned char)(0x60 | tkl);	/* ACK */
		out[1] = 0x44;				/* 2.04 */
		out[2] = in[2];
		out[3] = in[3];
		memcpy(out + 4, in + 4, (size_t)tkl);
		memcpy(out + 4 + tkl, "\xff" "done", 5);
		wolfSSL_write(ssl, out, 4 + tkl + 5);
		printf("step=%d served=%s method=%u port=%u\n", step, path, in[1],
		       local_port(C.fd));
		fflush(stdout);
	}
}

static void step_observe(WOLFSSL *ssl, int step, const char *want)
{
	time_t deadline = time(NULL) + 15;

	while (time(NULL) < deadline) {
		unsigned char in[MAX_DGRAM], out[32];
		int r = wolfSSL_read(ssl, in, sizeof(in)), tkl;
		char path[128];

		if (r < 4 || (in[0] >> 4 & 3) != 0 || in[1] != 0x01)
			continue;	/* a CON GET only */
		tkl = in[0] & 15;
		if (tkl > 8 || 4 + tkl > r)
			continue;
		request_path(in, r, path, sizeof(path));
		if (strcmp(path, want) != 0)
			continue;
		memcpy(C.obs_token, in + 4, (size_t)tkl);
		C.obs_token_len = tkl;
		C.obs_seq = 1;
		out[0] = (unsigned char)(0x60 | tkl);	/* ACK */
		out[1] = 0x45;				/* 2.05 */
		out[2] = in[2];
		out[3] = in[3];
		memcpy(out + 4, in + 4, (size_t)tkl);
		memcpy(out + 4 + tkl, "\x61\x01\xff" "v0", 5);	/* Observe (6): 1 */
		wolfSSL_write(ssl, out, 4 + tkl + 5);
		printf("step=%d observed=%s port=%u\n", step, path, local_port(C.fd));
		fflush(stdout);
		return;
	}
	printf("step=%d observed=none\n", step);
	fflush(stdout);
}

static void step_notify(WOLFSSL *ssl, int step, int count)
{
	for (int i = 0; i < count; i++) {
		unsigned char out[40];
		int n, tkl = C.obs_token_len;

		C.obs_seq++;
		out[0] = (unsigned char)(0x50 | tkl);	/* NON */
		out[1] = 0x45;				/* 2.05 */
		out[2] = (unsigned char)(++C.mid >> 8);
		out[3] = (unsigned char)C.mid;
		memcpy(out + 4, C.obs_token, (size_t)tkl);
		n = 4 + tkl;
		out[n++] = 0x61;			/* Observe, one byte */
		out[n++] = (unsigned char)C.obs_seq;
		n += snprintf((char *)out + n, sizeof(out) - (size_t)n, "\xffv%u", C.obs_seq - 1);
		wolfSSL_write(ssl, out, n);
		printf("step=%d notified=v%u port=%u\n", step, C.obs_seq - 1, local_port(C.fd));
		fflush(stdout);
		usleep(300000);
	}
}

static void step_forge(WOLFSSL *ssl, int step, const char *path, const char *payload)
{
	unsigned char msg[512], tok[4] = { 0xf0, 0x0d, (unsigned char)step, 0 };
	size_t n = coap_post(msg, sizeof(msg), path, payload, ++C.mid, tok);
	int fd = new_socket();
	struct pollfd p = { .fd = fd, .events = POLLIN };
	long answered = 0;
	time_t deadline;

	C.capture = 1;
	if (n == 0 || wolfSSL_write(ssl, msg, (int)n) != (int)n || C.captured_len < 20) {
		fprintf(stderr, "cid-client: step %d: could not make the record\n", step);
		exit(1);
	}
	C.captured[C.captured_len - 1] ^= 0x5a;	/* inside the CCM tag: the MAC no longer holds */
	if (sendto(fd, C.captured, (size_t)C.captured_len, 0, (struct sockaddr *)&C.server,
		   sizeof(C.server)) < 0) {
		perror("cid-client: sendto");
		exit(1);
	}
	deadline = time(NULL) + 2;
	while (time(NULL) < deadline) {
		unsigned char in[MAX_DGRAM];

		if (poll(&p, 1, 200) > 0) {
			ssize_t r = recv(fd, in, sizeof(in), 0);

			if (r > 0)
				answered += r;
		}
	}
	printf("step=%d forged=sent port=%u answered=%ld\n", step, local_port(fd), answered);
	fflush(stdout);
	close(fd);
}

int main(int argc, char **argv)
{
	WOLFSSL_CTX *ctx;
	WOLFSSL *ssl;

	if (argc < 6) {
		fprintf(stderr, "usage: coap2mqtt-cid-client HOST PORT IDENTITY KEY STEP...\n");
		return 2;
	}
	C.server.sin_family = AF_INET;
	C.server.sin_port = htons((uint16_t)atoi(argv[2]));
	if (inet_pton(AF_INET, argv[1], &C.server.sin_addr) != 1) {
		fprintf(stderr, "cid-client: HOST must be an IPv4 address\n");
		return 2;
	}
	C.identity = argv[3];
	C.key = argv[4];
	C.fd = new_socket();
	C.mid = (uint16_t)getpid();

	wolfSSL_Init();
	ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
	if (!ctx || wolfSSL_CTX_set_cipher_list(ctx, "PSK-AES128-CCM8") != WOLFSSL_SUCCESS) {
		fprintf(stderr, "cid-client: no PSK-AES128-CCM8 in this wolfSSL\n");
		return 1;
	}
	wolfSSL_CTX_set_psk_client_callback(ctx, psk_cb);
	ssl = wolfSSL_new(ctx);
	if (!ssl || wolfSSL_dtls_cid_use(ssl) != WOLFSSL_SUCCESS ||
	    wolfSSL_dtls_cid_set(ssl, NULL, 0) != WOLFSSL_SUCCESS) {
		fprintf(stderr, "cid-client: cannot offer a connection id\n");
		return 1;
	}
	wolfSSL_SSLSetIORecv(ssl, io_recv);
	wolfSSL_SSLSetIOSend(ssl, io_send);
	if (wolfSSL_connect(ssl) != WOLFSSL_SUCCESS) {
		fprintf(stderr, "cid-client: handshake failed: %d\n", wolfSSL_get_error(ssl, 0));
		return 1;
	}
	C.connected = 1;
	{
		unsigned int tx = 0;

		if (wolfSSL_dtls_cid_get_tx_size(ssl, &tx) != WOLFSSL_SUCCESS)
			tx = 0;
		printf("handshake=ok cid=%s tx_cid_size=%u port=%u\n",
		       wolfSSL_dtls_cid_is_enabled(ssl) ? "yes" : "no", tx, local_port(C.fd));
	}
	fflush(stdout);
	for (int i = 5; i < argc; i++) {
		char *path, *payload;

		if (strcmp(argv[i], "move") == 0) {
			close(C.fd);
			C.fd = new_socket();
		} else if (strncmp(argv[i], "send:", 5) == 0 && split(argv[i], &path, &payload) == 0) {
			step_send(ssl, i - 4, path, payload);
		} else if (strncmp(argv[i], "observe:", 8) == 0) {
			step_observe(ssl, i - 4, argv[i] + 8);
		} else if (strncmp(argv[i], "notify:", 7) == 0) {
			step_notify(ssl, i - 4, atoi(argv[i] + 7));
		} else if (strncmp(argv[i], "serve:", 6) == 0) {
			step_serve(ssl, i - 4, atoi(argv[i] + 6));
		} else if (strncmp(argv[i], "forge:", 6) == 0 && split(argv[i], &path, &payload) == 0) {
			step_forge(ssl, i - 4, path, payload);
		} else {
			fprintf(stderr, "cid-client: bad step %s\n", argv[i]);
			return 2;
		}
	}
	wolfSSL_free(ssl);
	wolfSSL_CTX_free(ctx);
	wolfSSL_Cleanup();
	return 0;
}
