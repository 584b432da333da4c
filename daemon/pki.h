/* pki.h: X.509 certificates for devices (coap.pki): the gateway's certificate and key, the CAs
 * that sign device certificates, an optional revocation list; per handshake, the identity a
 * device's certificate carries and why one is refused. Every check is wolfSSL's. */
#ifndef C2M_PKI_H
#define C2M_PKI_H

#include <stddef.h>
#include <stdint.h>

#include "keys.h"

enum pki_part { PKI_CERT, PKI_KEY, PKI_CA, PKI_CRL };
enum pki_identity { PKI_ID_CN, PKI_ID_SAN_DNS, PKI_ID_SAN_URI };

struct pki_buf {
	char *pem;		/* the file as read, NUL-ended; a key is wiped on clear */
	size_t len;
};

struct pki_verifier;		/* the CAs and the CRL, for per-handshake checks */

/* Reads path as the given part (a key: a file nobody else may read) and checks its content:
 * a certificate chain, a private key, CA certificates, a CRL. Returns the number of errors
 * reported through err (0 = ok, out filled). */
int pki_read(const char *path, enum pki_part part, struct pki_buf *out, keys_error_fn err,
	     void *arg);
void pki_buf_clear(struct pki_buf *b, int secret);

/* The key belongs to the certificate; 0, or 1 after reporting. */
int pki_check_pair(const struct pki_buf *cert, const struct pki_buf *key, keys_error_fn err,
		   void *arg);

/* A verifier over the CAs and the CRL (crl may be NULL). NULL after reporting. */
struct pki_verifier *pki_verifier_new(const struct pki_buf *ca, const struct pki_buf *crl,
				      keys_error_fn err, void *arg);
void pki_verifier_free(struct pki_verifier *v);

/* Why the DER certificate der is refused (expired, not yet valid, unknown CA, revoked, ...), as
 * a short text; NULL when it verifies against the CAs and the CRL. */
const char *pki_refusal(const struct pki_verifier *v, const uint8_t *der, size_t len);
/* Whether the CRL (if any) revokes der: 1 = revoked, 0 = not. */
int pki_revoked(const struct pki_verifier *v, const uint8_t *der, size_t len);

/* The identity der carries (its subject's CN, or its first DNS or URI subject alternative
 * name) into out (NUL-ended, at most KEYS_MAX_IDENTITY bytes); its length, or -1 when it has
 * none or it is longer. The caller checks it may be a topic level. */
int pki_identity(const uint8_t *der, size_t len, enum pki_identity from,
		 char out[KEYS_MAX_IDENTITY + 1]);

#endif
