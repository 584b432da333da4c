/* pdu.c: tokens, Uri-Path, integer and Block options, peer and cipher names (see pdu.h). */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include "pdu.h"
#include "route.h"

void pdu_token(uint8_t *buf, size_t len)
{
	static uint64_t counter;

	if (getrandom(buf, len, GRND_NONBLOCK) == (ssize_t)len)
		return;
	/* no kernel entropy yet (early boot): libcoap's generator plus a counter keeps them unique */
	coap_prng(buf, len);
	counter++;
	for (size_t i = 0; i < len && i < sizeof(counter); i++)
		buf[i] ^= (uint8_t)(counter >> (8 * i));
}

void pdu_add_path(coap_pdu_t *pdu, const char *path)
{
	struct route_seg segs[ROUTE_MAX_SEGMENTS];
	size_t n = route_split(path, strlen(path), segs, ROUTE_MAX_SEGMENTS);

	for (size_t i = 0; i < n; i++)
		coap_add_option(pdu, COAP_OPTION_URI_PATH, segs[i].len, (const uint8_t *)segs[i].s);
}

void pdu_add_uint(coap_pdu_t *pdu, coap_option_num_t option, unsigned value)
{
	uint8_t buf[4];

	coap_add_option(pdu, option, coap_encode_var_safe(buf, sizeof(buf), value), buf);
}

void pdu_add_block_size(coap_pdu_t *pdu, coap_option_num_t option, size_t size)
{
	unsigned szx = 0;

	while (szx < 6 && ((size_t)16 << szx) < size)
		szx++;
	pdu_add_uint(pdu, option, szx);	/* NUM 0, M 0, SZX */
}

int pdu_partial_body(const coap_pdu_t *rcvd)
{
	coap_block_t b;

	return coap_get_block(rcvd, COAP_OPTION_BLOCK2, &b) && b.m;
}

const char *pdu_peer(const coap_session_t *s, char *buf, size_t len)
{
	const coap_address_t *a = s ? coap_session_get_addr_remote(s) : NULL;

	/* an IPv4 device on a listener of both families: its IPv4 address, not the mapped one */
	if (a && a->addr.sa.sa_family == AF_INET6 &&
	    IN6_IS_ADDR_V4MAPPED(&a->addr.sin6.sin6_addr)) {
		char v4[INET_ADDRSTRLEN];

		inet_ntop(AF_INET, &a->addr.sin6.sin6_addr.s6_addr[12], v4, sizeof(v4));
		snprintf(buf, len, "%s:%u", v4, (unsigned)ntohs(a->addr.sin6.sin6_port));
		return buf;
	}
	if (!a || coap_print_addr(a, (uint8_t *)buf, len) == 0)
		snprintf(buf, len, "?");
	return buf;
}

/* libcoap's wolfSSL backend hands out a pointer to the session's WOLFSSL object */
WOLFSSL *pdu_ssl(coap_session_t *s)
{
	coap_tls_library_t lib;
	WOLFSSL **pssl;

	if (coap_session_get_proto(s) == COAP_PROTO_DTLS &&
	    (pssl = coap_session_get_tls(s, &lib)) != NULL && lib == COAP_TLS_LIBRARY_WOLFSSL)
		return *pssl;
	return NULL;
}

const char *pdu_cipher(coap_session_t *s)
{
	WOLFSSL *ssl = pdu_ssl(s);
	const char *name = ssl ? wolfSSL_get_cipher(ssl) : NULL;

	return name ? name : "none";
}

unsigned pdu_mac_drops(coap_session_t *s)
{
	WOLFSSL *ssl = pdu_ssl(s);
	word32 drops = 0;

	/* counted by wolfSSL built with WOLFSSL_DTLS_DROP_STATS (scripts/bootstrap) */
	if (ssl)
		wolfSSL_dtls_get_drop_stats(ssl, &drops, NULL);
	return drops;
}
