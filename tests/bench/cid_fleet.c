/* cid_fleet.c: many DTLS 1.2 PSK sessions with Connection IDs (RFC 9146) on wolfSSL, for the
 * benchmark that moves them all at once (tests/bench/cid_move.py): as when a NAT or a cellular
 * network gives every device a new port.
 *
 *   coap2mqtt-cid-fleet HOST PORT KEYS_FILE COUNT
 *
 * Makes COUNT sessions (the first COUNT "identity key" lines of KEYS_FILE), one socket each,
 * handshakes one after the other, prints "handshakes=N cid=N seconds=S" and then reads commands
 * from stdin, one per line:
 *   stay   each session sends one CON POST to sensors/cid and waits for its answer
 *   move   every session first takes a new socket (a new source port), then each does the same
 *   quit
 * printing "round=stay|move answered=N seconds=S" after each; the caller measures the gateway
 * between command and answer. Exit 0 at quit, 1 when a handshake fails, 2 on bad arguments.
 * Every wait is bounded (5 s per answer, 10 s per handshake flight).
 */
#include <arpa/inet.h>
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

#include "psk.h"

#define MAX_DGRAM 1500
#define MAX_SESSIONS 20000

struct sess {
	WOLFSSL *ssl;
	int fd;
	int connected;
	struct psk psk;
	uint16_t mid;
};

static struct sockaddr_in server;

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	struct sess *s = ctx;

	(void)ssl;
	if (sendto(s->fd, buf, (size_t)sz, 0, (struct sockaddr *)&server, sizeof(server)) < 0)
		return WOLFSSL_CBIO_ERR_GENERAL;
	return sz;
}

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
	struct sess *s = ctx;
	struct pollfd p = { .fd = s->fd, .events = POLLIN };
	ssize_t n;

	(void)ssl;
	if (poll(&p, 1, 1000) <= 0)
		return s->connected ? WOLFSSL_CBIO_ERR_WANT_READ : WOLFSSL_CBIO_ERR_TIMEOUT;
	n = recv(s->fd, buf, (size_t)sz, 0);
	return n < 0 ? WOLFSSL_CBIO_ERR_GENERAL : (int)n;
}

static int new_socket(void)
{
	struct sockaddr_in any = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0 || bind(fd, (struct sockaddr *)&any, sizeof(any)) < 0) {
		perror("cid-fleet: socket");
		exit(1);
	}
	return fd;
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One CON POST sensors/cid, payload "m"; 1 when answered 2.04 within 5 s. */
static int reading(struct sess *s)
{
	unsigned char msg[64], in[MAX_DGRAM], tok[4];
	size_t n = 0;
	time_t deadline = time(NULL) + 5;

	s->mid++;
	memcpy(tok, &s->mid, 2);
	tok[2] = 0xc1;
	tok[3] = 0xd0;
	msg[n++] = 0x40 | 4;		/* version 1, CON, token length 4 */
	msg[n++] = 0x02;		/* POST */
	msg[n++] = (unsigned char)(s->mid >> 8);
	msg[n++] = (unsigned char)s->mid;
	memcpy(msg + n, tok, 4);
	n += 4;
	msg[n++] = 0xb7;		/* Uri-Path, 7 bytes */
	memcpy(msg + n, "sensors", 7);
	n += 7;
	msg[n++] = 0x03;		/* Uri-Path, 3 bytes */
	memcpy(msg + n, "cid", 3);
	n += 3;
	msg[n++] = 0xff;
	msg[n++] = 'm';
	if (wolfSSL_write(s->ssl, msg, (int)n) != (int)n)
		return 0;
	while (time(NULL) < deadline) {
		int r = wolfSSL_read(s->ssl, in, sizeof(in));

		if (r >= 8 && memcmp(in + 4, tok, 4) == 0 && in[1] != 0)
			return in[1] == ((2 << 5) | 4);
	}
	return 0;
}

static int read_keys(const char *path, struct sess *v, int count)
{
	FILE *f = fopen(path, "r");
	int n = 0;

	if (!f)
		return 0;
	while (n < count && fscanf(f, "%128s %64s", v[n].psk.identity, v[n].psk.key) == 2)
		n++;
	fclose(f);
	return n;
}

int main(int argc, char **argv)
{
	static struct sess v[MAX_SESSIONS];
	WOLFSSL_CTX *ctx;
	char cmd[32];
	int count, cids = 0;
	double t0;

	if (argc != 5 || (count = atoi(argv[4])) < 1 || count > MAX_SESSIONS) {
		fprintf(stderr, "usage: coap2mqtt-cid-fleet HOST PORT KEYS_FILE COUNT (1..%d)\n",
			MAX_SESSIONS);
		return 2;
	}
	server.sin_family = AF_INET;
	server.sin_port = htons((uint16_t)atoi(argv[2]));
	if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1 ||
	    read_keys(argv[3], v, count) != count) {
		fprintf(stderr, "cid-fleet: an IPv4 address, and a keys file of %d devices\n", count);
		return 2;
	}
	wolfSSL_Init();
	ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
	if (!ctx || wolfSSL_CTX_set_cipher_list(ctx, "PSK-AES128-CCM8") != WOLFSSL_SUCCESS)
		return 1;
	wolfSSL_CTX_set_psk_client_callback(ctx, psk_client_cb);
	t0 = now_s();
	for (int i = 0; i < count; i++) {
		struct sess *s = &v[i];

		s->fd = new_socket();
		s->mid = (uint16_t)(i * 7);
		s->ssl = wolfSSL_new(ctx);
		if (!s->ssl || wolfSSL_dtls_cid_use(s->ssl) != WOLFSSL_SUCCESS ||
		    wolfSSL_dtls_cid_set(s->ssl, NULL, 0) != WOLFSSL_SUCCESS)
			return 1;
		wolfSSL_set_app_data(s->ssl, &s->psk);
		wolfSSL_SSLSetIORecv(s->ssl, io_recv);
		wolfSSL_SSLSetIOSend(s->ssl, io_send);
		wolfSSL_SetIOReadCtx(s->ssl, s);
		wolfSSL_SetIOWriteCtx(s->ssl, s);
		if (wolfSSL_connect(s->ssl) != WOLFSSL_SUCCESS) {
			fprintf(stderr, "cid-fleet: handshake %d failed: %d\n", i,
				wolfSSL_get_error(s->ssl, 0));
			return 1;
		}
		s->connected = 1;
		cids += wolfSSL_dtls_cid_is_enabled(s->ssl) != 0;
	}
	printf("handshakes=%d cid=%d seconds=%.2f\n", count, cids, now_s() - t0);
	fflush(stdout);
	while (fgets(cmd, sizeof(cmd), stdin)) {
		int move = strncmp(cmd, "move", 4) == 0, answered = 0;

		if (strncmp(cmd, "quit", 4) == 0)
			break;
		if (!move && strncmp(cmd, "stay", 4) != 0)
			continue;
		t0 = now_s();
		/* every session at once on a new port (as a NAT rebinding them all), then each
		 * sends from there */
		for (int i = 0; move && i < count; i++) {
			int old = v[i].fd;

			v[i].fd = new_socket();	/* made while the old one is open: another port */
			close(old);
		}
		for (int i = 0; i < count; i++)
			answered += reading(&v[i]);
		printf("round=%s answered=%d seconds=%.3f\n", move ? "move" : "stay", answered,
		       now_s() - t0);
		fflush(stdout);
	}
	for (int i = 0; i < count; i++) {
		wolfSSL_free(v[i].ssl);
		close(v[i].fd);
	}
	wolfSSL_CTX_free(ctx);
	wolfSSL_Cleanup();
	return 0;
}
