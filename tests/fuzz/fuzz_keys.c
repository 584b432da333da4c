/* fuzz_keys.c: libFuzzer target for the keys file parser and the identity lookup table built over
 * what it accepted. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_files.h"
#include "keys.h"
#include "route.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static FILE *devnull;

static void on_error(void *arg, const char *msg)
{
	int *count = arg;

	if (msg == NULL || msg[0] == '\0')
		abort();	/* every problem is reported with a message */
	(*count)++;
	fputs(msg, devnull);
}

/* What the parser accepted must be what the gateway may use. */
static void check_entry(const struct key_entry *e)
{
	size_t len = strlen(e->identity);

	if (len == 0 || len > KEYS_MAX_IDENTITY || !route_value_ok(e->identity, len))
		abort();
	if (e->origin == NULL)
		abort();
	/* a PSK of a valid length, or a raw public key fingerprint, a certificate or an OSCORE
	 * context and no PSK */
	if (e->has_rpk + e->cert + (e->oscore != NULL) > 1)
		abort();
	if (e->has_rpk || e->cert || e->oscore ? e->key_len != 0 :
	    e->key_len < KEYS_MIN_KEY || e->key_len > KEYS_MAX_KEY)
		abort();
	/* an OSCORE context within RFC 8613's bounds, its two IDs different */
	if (e->oscore && (e->oscore->sender_id_len > KEYS_OSCORE_MAX_ID ||
			  e->oscore->recipient_id_len > KEYS_OSCORE_MAX_ID ||
			  e->oscore->secret_len < KEYS_OSCORE_MIN_SECRET ||
			  e->oscore->secret_len > KEYS_OSCORE_MAX_SECRET ||
			  e->oscore->salt_len > KEYS_OSCORE_MAX_SALT ||
			  e->oscore->alg != KEYS_OSCORE_ALG_CCM_16_64_128 ||
			  (e->oscore->sender_id_len == e->oscore->recipient_id_len &&
			   memcmp(e->oscore->sender_id, e->oscore->recipient_id,
				  e->oscore->sender_id_len) == 0)))
		abort();
}

/* Every accepted identity is found, and found as itself (the first definition wins). */
static void check_lookup(const struct key_entry *v, size_t n, const uint8_t *data, size_t size)
{
	struct keys *k = keys_new(v, n);
	size_t i;

	if (k == NULL)
		abort();
	if (keys_count(k) > n)
		abort();
	for (i = 0; i < n; i++) {
		const struct key_entry *e = keys_find(k, v[i].identity, strlen(v[i].identity));

		if (e == NULL || strcmp(e->identity, v[i].identity) != 0)
			abort();
		/* a fingerprint finds a device with that very fingerprint */
		if (v[i].has_rpk && ((e = keys_find_rpk(k, v[i].rpk)) == NULL ||
				     memcmp(e->rpk, v[i].rpk, KEYS_RPK_LEN) != 0))
			abort();		/* a Recipient ID finds a device with that very ID */
		if (v[i].oscore &&
		    ((e = keys_find_oscore(k, v[i].oscore->recipient_id,
					   v[i].oscore->recipient_id_len)) == NULL ||
		     !e->oscore || e->oscore->recipient_id_len != v[i].oscore->recipient_id_len ||
		     memcmp(e->oscore->recipient_id, v[i].oscore->recipient_id,
			    v[i].oscore->recipient_id_len) != 0))
			abort();
	}
	/* arbitrary bytes, NUL and all, as an identity from a handshake; as a key's fingerprint */
	keys_find(k, (const char *)data, size);
	if (size >= KEYS_RPK_LEN)
		keys_find_rpk(k, data);
	keys_find_oscore(k, data, size < 8 ? size : 8);
	if (size > 1)
		keys_find(k, (const char *)data + 1, size - 1);
	keys_free(k);
}

/* The input as a "hex:..." key (as in the config's key_hex): a length in range, or a reason. */
static void check_hex(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	uint8_t out[KEYS_MAX_KEY];
	const char *why = NULL;
	int len;

	if (s == NULL)
		return;
	memcpy(s, data, size);
	s[size] = '\0';
	len = keys_decode_hex(s, out, sizeof(out), &why);
	if (len < 0 ? why == NULL : len == 0 || (size_t)len > sizeof(out))
		abort();
	free(s);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	devnull = fopen("/dev/null", "w");
	if (devnull == NULL)
		fuzz_fail("/dev/null");
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[PATH_MAX];
	struct key_entry *v = calloc(1, sizeof(*v));
	size_t n = 1, i;
	int errors = 0, rc;

	if (v == NULL)
		return 0;
	/* one entry from the config's devices: list, so duplicates across both are exercised */
	v[0].identity = strdup("window-livingroom");
	v[0].origin = strdup("coap2mqtt.yaml:42");
	memcpy(v[0].key, "0123456789", 10);
	v[0].key_len = 10;
	if (v[0].identity == NULL || v[0].origin == NULL)
		abort();
	fuzz_files_write("devices.keys", data, size, 0600, path, sizeof(path));
	rc = keys_parse_file(path, &v, &n, on_error, &errors);
	if (rc != errors)
		abort();	/* the return value counts the reported problems */
	for (i = 0; i < n; i++)
		check_entry(&v[i]);
	check_lookup(v, n, data, size);
	check_hex(data, size);
	for (i = 0; i < n; i++)
		key_entry_clear(&v[i]);
	free(v);
	return 0;
}
