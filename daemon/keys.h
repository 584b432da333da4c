/* keys.h: the PSK store (identity → key) and the keys file format. */
#ifndef C2M_KEYS_H
#define C2M_KEYS_H

#include <stddef.h>
#include <stdint.h>

#define KEYS_MIN_KEY 8		/* bytes */
#define KEYS_MAX_KEY 64		/* bytes */
#define KEYS_MAX_IDENTITY 128	/* bytes */
#define KEYS_MAX_ENTRIES 100000	/* devices in one configuration (config + keys file) */

struct key_entry {
	char *identity;		/* NUL-ended, 1..KEYS_MAX_IDENTITY bytes, valid topic value */
	uint8_t key[KEYS_MAX_KEY];
	size_t key_len;
	char *origin;		/* "file:line" where it was defined, for messages */
};

struct keys;			/* opaque: hash table identity → entry */

/* Error sink: called once per problem with a "file:line[:col]: what" message. */
typedef void (*keys_error_fn)(void *arg, const char *msg);

/* Parses a keys file: one "identity key" or "identity hex:HEX" per line, '#' comments, blank lines.
 * Refuses files readable by "other" (mode & 007). Appends entries to *v, *n (realloc'ed). An
 * identity already in *v (earlier line, or an entry the caller put there) is reported with both places.
 * Returns the number of errors reported (0 = ok). */
int keys_parse_file(const char *path, struct key_entry **v, size_t *n, keys_error_fn err, void *arg);

/* Decodes a hex string (with or without a "hex:" prefix) into out; returns length or -1 (reason in
 * why, e.g. "has an odd number of hex digits"). Length limits beyond outlen are the caller's. */
int keys_decode_hex(const char *hex, uint8_t *out, size_t outlen, const char **why);

/* Builds a lookup table over entries (borrowed, must outlive the table). NULL on OOM. */
struct keys *keys_new(const struct key_entry *v, size_t n);
void keys_free(struct keys *k);
const struct key_entry *keys_find(const struct keys *k, const char *identity, size_t len);
size_t keys_count(const struct keys *k);

void key_entry_clear(struct key_entry *e);	/* frees strings, wipes the key */

#endif
