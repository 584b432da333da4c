/* pdu.h: what several modules put into CoAP messages, or say about a session, built one way. */
#ifndef C2M_PDU_H
#define C2M_PDU_H

#include <stddef.h>
#include <stdint.h>

#include <coap3/coap.h>

/* Fills buf with unpredictable bytes (tokens). */
void pdu_token(uint8_t *buf, size_t len);
/* Adds "a/b/c" as Uri-Path options. */
void pdu_add_path(coap_pdu_t *pdu, const char *path);
/* Adds an option holding an unsigned integer (Content-Format, Max-Age, Observe, Size1). */
void pdu_add_uint(coap_pdu_t *pdu, coap_option_num_t option, unsigned value);
/* Adds a Block option (COAP_OPTION_BLOCK1 or BLOCK2, block 0) asking for blocks of `size` bytes
 * (16..1024, a power of two) on what is sent or wanted back; libcoap then uses that size
 * (RFC 7959 §2.3). */
void pdu_add_block_size(coap_pdu_t *pdu, coap_option_num_t option, size_t size);
/* Nonzero when a response is one block of a body libcoap did not reassemble (it still carries
 * Block2 with more to come): the body was over a limit (deps-patches/libcoap/0003, 0014). */
int pdu_partial_body(const coap_pdu_t *rcvd);
/* "addr:port" of the session's peer into buf ("?" when there is none). */
const char *pdu_peer(const coap_session_t *s, char *buf, size_t len);
/* The session's wolfSSL object (a DTLS session of the gateway's wolfSSL build), or NULL. */
struct WOLFSSL;
struct WOLFSSL *pdu_ssl(coap_session_t *s);
/* Name of the session's negotiated DTLS cipher suite, "none" without DTLS. */
const char *pdu_cipher(coap_session_t *s);
/* Records of the session's DTLS that did not decrypt (bad MAC) and were dropped. In a handshake,
 * the device's Finished under a different key: the one sure sign of a wrong PSK. */
unsigned pdu_mac_drops(coap_session_t *s);

#endif
