/* exchange.h: recent confirmable exchanges per device identity, remembered for EXCHANGE_LIFETIME
 * so that a retransmission — on the same DTLS session or on a new one — is answered with the
 * first answer and never processed twice (RFC 7252 §4.5). */
#ifndef C2M_EXCHANGE_H
#define C2M_EXCHANGE_H

#include <stddef.h>
#include <stdint.h>

#define EXCH_LIFETIME_S 247		/* RFC 7252 EXCHANGE_LIFETIME */
#define EXCH_PER_DEVICE 4096		/* exchanges one device may have in that time */
#define EXCH_MAX 1000000		/* all devices together (about 64 MB) */

struct exch;

int exch_init(void);
void exch_shutdown(void);
/* The exchange (key, mid, token) seen in the last EXCH_LIFETIME_S, or NULL. The token is part of
 * it: a retransmission repeats both, while a device that rebooted and happens to reuse a recent
 * MID (RFC 7252 §4.4 asks for a random initial one) sends a new token with it. */
struct exch *exch_find(const char *key, uint16_t mid, const uint8_t *tok, size_t tok_len);
/* Remembers (key, mid, token), pending (code 0). NULL when the device's window or the budget is
 * full: the request is then refused (5.03) rather than forgotten. */
struct exch *exch_add(const char *key, uint16_t mid, const uint8_t *tok, size_t tok_len);
/* 0 while pending, else the response code sent. */
uint8_t exch_code(const struct exch *e);
void exch_set_code(struct exch *e, uint8_t code);
/* What the owner of a pending exchange keeps with it (NULL when answered). */
void *exch_ctx(const struct exch *e);
void exch_set_ctx(struct exch *e, void *ctx);
size_t exch_count(void);

#endif
