/* keys.h: the device credentials (identity → PSK, or → raw public key fingerprint, and back) and
 * the keys file format. */
#ifndef C2M_KEYS_H
#define C2M_KEYS_H

#include <stddef.h>
#include <stdint.h>

#define KEYS_MIN_KEY 8		/* bytes */
#define KEYS_MAX_KEY 64		/* bytes */
#define KEYS_MAX_IDENTITY 128	/* bytes */
#define KEYS_MAX_ENTRIES 100000	/* devices in one configuration (config + keys file) */
#define KEYS_RPK_LEN 32		/* SHA-256 of a SubjectPublicKeyInfo (RFC 7250 raw public key) */
#define KEYS_RPK_PREFIX "sha256:"
#define KEYS_RPK_TEXT (sizeof(KEYS_RPK_PREFIX) - 1 + 2 * KEYS_RPK_LEN + 1)

/* An OSCORE security context (RFC 8613), as the gateway sees it: its Sender ID is the device's
 * Recipient ID and its Recipient ID the device's Sender ID. */
#define KEYS_OSCORE_MAX_ID 7		/* bytes (AES-CCM-16-64-128: nonce 13 - 6) */
#define KEYS_OSCORE_MIN_SECRET 16	/* bytes of Master Secret */
#define KEYS_OSCORE_MAX_SECRET 64
#define KEYS_OSCORE_MAX_SALT 32
#define KEYS_OSCORE_ALG_CCM_16_64_128 10	/* COSE algorithm, RFC 8613's mandatory one */
struct key_oscore {
	uint8_t sender_id[KEYS_OSCORE_MAX_ID], recipient_id[KEYS_OSCORE_MAX_ID];
	size_t sender_id_len, recipient_id_len;
	uint8_t secret[KEYS_OSCORE_MAX_SECRET];
	size_t secret_len;
	uint8_t salt[KEYS_OSCORE_MAX_SALT];
	size_t salt_len;
	int alg;
};

/* One device: a PSK (key_len > 0), the fingerprint of its raw public key (has_rpk), a
 * certificate whose identity is this one (cert), or an OSCORE context (oscore). */
struct key_entry {
	char *identity;		/* NUL-ended, 1..KEYS_MAX_IDENTITY bytes, valid topic value */
	uint8_t key[KEYS_MAX_KEY];
	size_t key_len;
	uint8_t rpk[KEYS_RPK_LEN];
	int has_rpk;
	int cert;		/* authenticates with an X.509 certificate (coap.pki) */
	struct key_oscore *oscore;	/* OSCORE device (keys file): owned, wiped on clear */
	char *origin;		/* "file:line" where it was defined, for messages */
};

struct keys;			/* opaque: hash tables identity → entry, fingerprint → entry */

/* Error sink: called once per problem with a "file:line[:col]: what" message. */
typedef void (*keys_error_fn)(void *arg, const char *msg);

/* Parses a keys file: one "identity key", "identity hex:HEX", "identity rpk:sha256:HEX",
 * "identity certificate" or
 * "identity oscore:sender_id=HEX,recipient_id=HEX,secret=HEX[,salt=HEX][,alg=AES-CCM-16-64-128]"
 * per line,
 * '#' comments, blank lines.
 * Refuses files readable by "other" (mode & 007). Appends entries to *v, *n (realloc'ed). An
 * identity already in *v (earlier line, or an entry the caller put there) is reported with both places.
 * Returns the number of errors reported (0 = ok). */
int keys_parse_file(const char *path, struct key_entry **v, size_t *n, keys_error_fn err, void *arg);

/* Decodes a hex string (with or without a "hex:" prefix) into out; returns length or -1 (reason in
 * why, e.g. "has an odd number of hex digits"). Length limits beyond outlen are the caller's. */
int keys_decode_hex(const char *hex, uint8_t *out, size_t outlen, const char **why);

/* Parses "sha256:" and 64 hex digits into fp; NULL, or why not. */
const char *keys_decode_rpk(const char *text, uint8_t fp[KEYS_RPK_LEN]);
/* "sha256:" and 64 lower-case hex digits of fp into out (KEYS_RPK_TEXT bytes). */
void keys_format_rpk(const uint8_t fp[KEYS_RPK_LEN], char out[KEYS_RPK_TEXT]);

/* Reads a whole file of at most max bytes (a regular file; one nobody else may read when
 * secret), NUL-ended, without NUL bytes inside; *len its length. NULL after reporting one error. */
char *keys_read_file(const char *path, size_t max, int secret, size_t *len, keys_error_fn err,
		     void *arg);

/* Builds a lookup table over entries (borrowed, must outlive the table). NULL on OOM. */
struct keys *keys_new(const struct key_entry *v, size_t n);
void keys_free(struct keys *k);
const struct key_entry *keys_find(const struct keys *k, const char *identity, size_t len);
/* The OSCORE entry whose (gateway's) Recipient ID this is (the first one listed), or NULL. */
const struct key_entry *keys_find_oscore(const struct keys *k, const uint8_t *rid, size_t len);
/* Whether two OSCORE contexts are the same (both none counts as the same). */
int keys_oscore_equal(const struct key_oscore *x, const struct key_oscore *y);
/* The entry whose raw public key has this fingerprint (the first one listed), or NULL. */
const struct key_entry *keys_find_rpk(const struct keys *k, const uint8_t fp[KEYS_RPK_LEN]);
size_t keys_count(const struct keys *k);

void key_entry_clear(struct key_entry *e);	/* frees strings, wipes the key */

/* The gateway's own raw public key (coap.rpk.key_file): an EC P-256 private key in PEM. */
struct rpk_key {
	char *key_pem;			/* the private key as read, NUL-ended (wiped on clear) */
	size_t key_pem_len;
	char *pub_pem;			/* its public key, "-----BEGIN PUBLIC KEY-----" PEM */
	size_t pub_pem_len;
	uint8_t fp[KEYS_RPK_LEN];	/* SHA-256 of its SubjectPublicKeyInfo */
};

/* Reads and checks path (a regular file nobody else may read, holding one EC P-256 private key
 * in PEM). Returns the number of errors reported through err (0 = ok, k filled). */
int keys_load_rpk_key(const char *path, struct rpk_key *k, keys_error_fn err, void *arg);
void keys_rpk_key_clear(struct rpk_key *k);
/* The fingerprint of a DER SubjectPublicKeyInfo; 0, or -1 when it cannot be hashed. */
int keys_spki_fingerprint(const uint8_t *spki, size_t len, uint8_t fp[KEYS_RPK_LEN]);

#endif
