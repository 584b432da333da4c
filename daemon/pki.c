/* pki.c: device certificates (coap.pki) — reading and checking the gateway's certificate, key,
 * CAs and CRL with wolfSSL, and per handshake: a device certificate's identity, and why one is
 * refused. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero */
#endif
#include "pki.h"

#include <stdlib.h>
#include <string.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/error-ssl.h>
#include <wolfssl/openssl/x509v3.h>	/* WOLFSSL_GEN_DNS, WOLFSSL_GEN_URI */
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/rsa.h>

#define PKI_FILE_MAX (1u << 20)		/* certificates, keys, CA bundles */
#define PKI_CRL_MAX (16u << 20)		/* a CRL of a large fleet */

struct pki_verifier {
	WOLFSSL_CERT_MANAGER *cm;
	int crl;			/* a CRL is loaded */
};

static void report(keys_error_fn err, void *arg, const char *path, const char *what)
{
	char msg[512];

	snprintf(msg, sizeof(msg), "%s: %s", path, what);
	if (err)
		err(arg, msg);
}

void pki_buf_clear(struct pki_buf *b, int secret)
{
	if (b == NULL)
		return;
	if (secret && b->pem)
		explicit_bzero(b->pem, b->len);
	free(b->pem);
	b->pem = NULL;
	b->len = 0;
}

/* wolfSSL keeps no global state the gateway relies on between these calls; each pairs its
 * wolfSSL_Init() with a wolfSSL_Cleanup() (reference counted, as libcoap's is). */
static int content_ok(enum pki_part part, const struct pki_buf *b, const char **why)
{
	WOLFSSL_CERT_MANAGER *cm;
	WOLFSSL_CTX *ctx;
	int ok = 0;

	wolfSSL_Init();
	switch (part) {
	case PKI_CERT:
		ctx = wolfSSL_CTX_new(wolfDTLSv1_2_server_method());
		ok = ctx && wolfSSL_CTX_use_certificate_chain_buffer(ctx,
			(const unsigned char *)b->pem, (long)b->len) == WOLFSSL_SUCCESS;
		*why = "holds no PEM certificate (-----BEGIN CERTIFICATE-----)";
		wolfSSL_CTX_free(ctx);
		break;
	case PKI_KEY:
		ctx = wolfSSL_CTX_new(wolfDTLSv1_2_server_method());
		ok = ctx && wolfSSL_CTX_use_PrivateKey_buffer(ctx, (const unsigned char *)b->pem,
			(long)b->len, WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS;
		*why = "holds no PEM private key (-----BEGIN PRIVATE KEY----- or "
		       "-----BEGIN EC PRIVATE KEY-----)";
		wolfSSL_CTX_free(ctx);
		break;
	case PKI_CA:
		cm = wolfSSL_CertManagerNew();
		ok = cm && wolfSSL_CertManagerLoadCABuffer(cm, (const unsigned char *)b->pem,
			(long)b->len, WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS;
		*why = "holds no usable PEM CA certificate (expired, or not a CA?)";
		wolfSSL_CertManagerFree(cm);
		break;
	case PKI_CRL:
		/* signed by one of the CAs: checked with them (pki_verifier_new) */
		ok = strstr(b->pem, "-----BEGIN X509 CRL-----") != NULL;
		*why = "holds no PEM CRL (-----BEGIN X509 CRL-----; openssl crl -outform PEM)";
		break;
	}
	wolfSSL_Cleanup();
	return ok;
}

int pki_read(const char *path, enum pki_part part, struct pki_buf *out, keys_error_fn err,
	     void *arg)
{
	const char *why = NULL;

	memset(out, 0, sizeof(*out));
	out->pem = keys_read_file(path, part == PKI_CRL ? PKI_CRL_MAX : PKI_FILE_MAX,
				  part == PKI_KEY, &out->len, err, arg);
	if (out->pem == NULL)
		return 1;
	if (!content_ok(part, out, &why)) {
		report(err, arg, path, why);
		pki_buf_clear(out, part == PKI_KEY);
		return 1;
	}
	return 0;
}

#define PKI_DER_MAX 8192

/* The SubjectPublicKeyInfo of a PEM private key (EC or RSA) into spki; its length, or -1. */
static int key_spki(const struct pki_buf *key, uint8_t *spki, word32 cap)
{
	uint8_t der[PKI_DER_MAX];
	int n = wc_KeyPemToDer((const unsigned char *)key->pem, (int)key->len, der,
			       (int)sizeof(der), NULL), r = -1;
	word32 idx = 0;
	ecc_key ec;
	RsaKey rsa;

	if (n <= 0)
		return -1;
	if (wc_ecc_init(&ec) == 0) {
		if (wc_EccPrivateKeyDecode(der, &idx, &ec, (word32)n) == 0 &&
		    (ec.type != ECC_PRIVATEKEY_ONLY || wc_ecc_make_pub(&ec, NULL) == 0))
			r = wc_EccPublicKeyToDer(&ec, spki, cap, 1);
		wc_ecc_free(&ec);
	}
	idx = 0;
	if (r <= 0 && wc_InitRsaKey(&rsa, NULL) == 0) {
		if (wc_RsaPrivateKeyDecode(der, &idx, &rsa, (word32)n) == 0)
			r = wc_RsaKeyToPublicDer(&rsa, spki, cap);
		wc_FreeRsaKey(&rsa);
	}
	explicit_bzero(der, sizeof(der));
	return r > 0 ? r : -1;
}

/* The SubjectPublicKeyInfo of the first certificate of a PEM chain; its length, or -1. */
static int cert_spki(const struct pki_buf *cert, uint8_t *spki, word32 cap)
{
	uint8_t der[PKI_DER_MAX];
	int n = wc_CertPemToDer((const unsigned char *)cert->pem, (int)cert->len, der,
				(int)sizeof(der), CERT_TYPE);

	if (n <= 0 || wc_GetSubjectPubKeyInfoDerFromCert(der, (word32)n, spki, &cap) != 0)
		return -1;
	return (int)cap;
}

int pki_check_pair(const struct pki_buf *cert, const struct pki_buf *key, keys_error_fn err,
		   void *arg)
{
	uint8_t a[PKI_DER_MAX], b[PKI_DER_MAX];
	WOLFSSL_CTX *ctx;
	int ok, na, nb;

	wolfSSL_Init();
	ctx = wolfSSL_CTX_new(wolfDTLSv1_2_server_method());
	ok = ctx && wolfSSL_CTX_use_certificate_chain_buffer(ctx, (const unsigned char *)cert->pem,
			(long)cert->len) == WOLFSSL_SUCCESS &&
	     wolfSSL_CTX_use_PrivateKey_buffer(ctx, (const unsigned char *)key->pem,
			(long)key->len, WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS &&
	     wolfSSL_CTX_check_private_key(ctx) == WOLFSSL_SUCCESS;
	wolfSSL_CTX_free(ctx);
	wolfSSL_Cleanup();
	/* wolfSSL's check above does not compare an EC key with the certificate's public key
	 * (that needs WOLFSSL_VALIDATE_ECC_IMPORT): the public keys are compared here */
	na = cert_spki(cert, a, sizeof(a));
	nb = key_spki(key, b, sizeof(b));
	ok = ok && na > 0 && na == nb && memcmp(a, b, (size_t)na) == 0;
	if (!ok && err)
		err(arg, "coap.pki: key_file is not the private key of cert_file's certificate");
	return !ok;
}

struct pki_verifier *pki_verifier_new(const struct pki_buf *ca, const struct pki_buf *crl,
				      keys_error_fn err, void *arg)
{
	struct pki_verifier *v = calloc(1, sizeof(*v));

	if (v == NULL) {
		if (err)
			err(arg, "coap.pki: out of memory");
		return NULL;
	}
	wolfSSL_Init();
	v->cm = wolfSSL_CertManagerNew();
	if (v->cm == NULL || wolfSSL_CertManagerLoadCABuffer(v->cm, (const unsigned char *)ca->pem,
			(long)ca->len, WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS) {
		if (err)
			err(arg, "coap.pki: ca_file: cannot load its CA certificates");
		pki_verifier_free(v);
		return NULL;
	}
	if (crl && crl->pem) {
		int r = wolfSSL_CertManagerEnableCRL(v->cm, 0);

		if (r == WOLFSSL_SUCCESS)
			r = wolfSSL_CertManagerLoadCRLBuffer(v->cm, (const unsigned char *)crl->pem,
							     (long)crl->len, WOLFSSL_FILETYPE_PEM);
		if (r != WOLFSSL_SUCCESS) {
			char msg[256];

			snprintf(msg, sizeof(msg), "coap.pki: crl_file: not a CRL signed by a CA of "
				 "ca_file (%s)", wolfSSL_ERR_reason_error_string((unsigned long)-r));
			if (err)
				err(arg, msg);
			pki_verifier_free(v);
			return NULL;
		}
		v->crl = 1;
	}
	return v;
}

void pki_verifier_free(struct pki_verifier *v)
{
	if (v == NULL)
		return;
	if (v->cm)
		wolfSSL_CertManagerFree(v->cm);
	free(v);
	wolfSSL_Cleanup();
}

const char *pki_refusal(const struct pki_verifier *v, const uint8_t *der, size_t len)
{
	int r;

	if (v == NULL || der == NULL || len == 0 || len > PKI_FILE_MAX)
		return "unreadable certificate";
	r = wolfSSL_CertManagerVerifyBuffer(v->cm, der, (long)len, WOLFSSL_FILETYPE_ASN1);
	switch (r) {
	case WOLFSSL_SUCCESS:
		return NULL;
	case ASN_AFTER_DATE_E:
		return "certificate expired";
	case ASN_BEFORE_DATE_E:
		return "certificate not yet valid";
	case ASN_NO_SIGNER_E:
		return "certificate not signed by a CA of coap.pki.ca_file";
	case ASN_VERSION_E:
		return "certificate is not X.509 version 3";
	case ASN_SIG_CONFIRM_E:
		return "certificate signature does not verify";
	case CRL_CERT_REVOKED:
		return "certificate revoked (coap.pki.crl_file)";
	case CRL_MISSING:
		return "no CRL of its CA in coap.pki.crl_file";
	default:
		return "certificate does not verify";
	}
}

int pki_revoked(const struct pki_verifier *v, const uint8_t *der, size_t len)
{
	if (v == NULL || !v->crl)
		return 0;
	if (der == NULL || len == 0 || len > PKI_FILE_MAX)
		return 1;
	return wolfSSL_CertManagerCheckCRL(v->cm, (unsigned char *)(uintptr_t)der, (long)len) ==
	       CRL_CERT_REVOKED;
}

/* The first subject alternative name of this type, as raw bytes. */
static int san(WOLFSSL_X509 *x, int type, char *out)
{
	WOLFSSL_GENERAL_NAMES *names = wolfSSL_X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
	int n = -1;

	for (int i = 0; names && i < wolfSSL_sk_GENERAL_NAME_num(names); i++) {
		WOLFSSL_GENERAL_NAME *g = wolfSSL_sk_GENERAL_NAME_value(names, i);
		WOLFSSL_ASN1_STRING *s;

		if (g == NULL || g->type != type)
			continue;
		s = type == WOLFSSL_GEN_DNS ? g->d.dNSName : g->d.uniformResourceIdentifier;
		if (s && wolfSSL_ASN1_STRING_length(s) > 0 &&
		    wolfSSL_ASN1_STRING_length(s) <= KEYS_MAX_IDENTITY) {
			n = wolfSSL_ASN1_STRING_length(s);
			memcpy(out, wolfSSL_ASN1_STRING_data(s), (size_t)n);
			out[n] = '\0';
		}
		break;
	}
	if (names)
		wolfSSL_GENERAL_NAMES_free(names);
	return n;
}

int pki_identity(const uint8_t *der, size_t len, enum pki_identity from,
		 char out[KEYS_MAX_IDENTITY + 1])
{
	WOLFSSL_X509 *x;
	int n = -1;

	if (der == NULL || len == 0 || len > PKI_FILE_MAX)
		return -1;
	x = wolfSSL_X509_d2i(NULL, der, (int)len);
	if (x == NULL)
		return -1;
	if (from == PKI_ID_CN) {
		char cn[KEYS_MAX_IDENTITY + 2];

		n = wolfSSL_X509_NAME_get_text_by_NID(wolfSSL_X509_get_subject_name(x),
						      NID_commonName, cn, (int)sizeof(cn));
		if (n > 0 && n <= KEYS_MAX_IDENTITY && memchr(cn, '\0', (size_t)n) == NULL)
			memcpy(out, cn, (size_t)n + 1);
		else
			n = -1;
	} else {
		n = san(x, from == PKI_ID_SAN_DNS ? WOLFSSL_GEN_DNS : WOLFSSL_GEN_URI, out);
	}
	wolfSSL_X509_free(x);
	return n;
}
