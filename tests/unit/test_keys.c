/* test_keys.c: unit tests for the keys file parser, hex decoding and the identity lookup table. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "keys.h"

#define MSG_MAX 16

struct msgs {
	char text[MSG_MAX][512];
	int n;
};

static void collect(void *arg, const char *msg)
{
	struct msgs *m = arg;

	if (m->n < MSG_MAX)
		snprintf(m->text[m->n], sizeof(m->text[0]), "%s", msg);
	m->n++;
}

/* Writes content to a new temporary file with the given mode; path receives its name. */
static void write_temp(char *path, size_t len, const char *content, mode_t mode)
{
	int fd;

	snprintf(path, len, "/tmp/c2m-keys-XXXXXX");
	fd = mkstemp(path);
	CHECK(fd >= 0);
	if (fd < 0)
		return;
	CHECK(write(fd, content, strlen(content)) == (ssize_t)strlen(content));
	close(fd);
	CHECK(chmod(path, mode) == 0);
}

static void free_entries(struct key_entry *v, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		key_entry_clear(&v[i]);
	free(v);
}

/* Parses content (mode 0640) and returns the error count; entries in *v / *n. */
static int parse(const char *content, mode_t mode, struct key_entry **v, size_t *n, struct msgs *m,
		 char *path, size_t pathlen)
{
	int rc;

	write_temp(path, pathlen, content, mode);
	rc = keys_parse_file(path, v, n, collect, m);
	unlink(path);
	return rc;
}

static int has_msg(const struct msgs *m, const char *want)
{
	int i;

	for (i = 0; i < m->n && i < MSG_MAX; i++)
		if (strstr(m->text[i], want) != NULL)
			return 1;
	fprintf(stderr, "no message contains \"%s\"; got %d:\n", want, m->n);
	for (i = 0; i < m->n && i < MSG_MAX; i++)
		fprintf(stderr, "  %s\n", m->text[i]);
	return 0;
}

/* A message about line `line` of the keys file at path. */
static int has_line_msg(const struct msgs *m, const char *path, int line, const char *text)
{
	char want[256];

	snprintf(want, sizeof(want), "%s:%d: %s", path, line, text);
	return has_msg(m, want);
}

static void test_valid(void)
{
	char path[64], origin[80];
	struct key_entry *v = NULL;
	size_t n = 0;
	struct msgs m = { .n = 0 };
	int rc = parse("# devices\n"
		       "\n"
		       "sensor-1 secretkey1\n"
		       "  \t# indented comment\n"
		       "sensor-2\thex:00112233445566778899AABBCCDDEEFF\r\n"
		       "température  12345678   \n"
		       "last hex:0001020304050607", 0640, &v, &n, &m, path, sizeof(path));

	CHECK(rc == 0);
	CHECK(m.n == 0);
	CHECK(n == 4);
	if (n != 4) {
		free_entries(v, n);
		return;
	}
	CHECK_STR(v[0].identity, "sensor-1");
	CHECK(v[0].key_len == 10 && memcmp(v[0].key, "secretkey1", 10) == 0);
	snprintf(origin, sizeof(origin), "%s:3", path);
	CHECK_STR(v[0].origin, origin);
	CHECK_STR(v[1].identity, "sensor-2");
	CHECK(v[1].key_len == 16 && v[1].key[0] == 0x00 && v[1].key[1] == 0x11 && v[1].key[15] == 0xff);
	CHECK_STR(v[2].identity, "température");
	CHECK(v[2].key_len == 8);
	CHECK_STR(v[3].identity, "last");
	CHECK(v[3].key_len == 8 && v[3].key[7] == 7);
	free_entries(v, n);
}

static void test_errors(void)
{
	char path[64], want[256];
	struct key_entry *v = NULL;
	size_t n = 0;
	struct msgs m = { .n = 0 };
	int rc = parse("a shortkey\n"				/* 1: 8 bytes is the minimum: ok */
		       "b short\n"				/* 2: 5 bytes */
		       "c hex:0011\n"				/* 3: 2 bytes */
		       "d hex:001\n"				/* 4: odd */
		       "e hex:zz11223344556677\n"		/* 5: not hex */
		       "a anotherkey\n"				/* 6: duplicate of line 1 */
		       "f\n"					/* 7: no key */
		       "g key with spaces\n"			/* 8: spaces */
		       "a/b longenoughkey\n"			/* 9: bad identity */
		       "h 0123456789012345678901234567890123456789012345678901234567890123456789\n"
		       "ok goodgoodkey\n",			/* 11: ok */
		       0600, &v, &n, &m, path, sizeof(path));

	CHECK(rc == 9);
	CHECK(m.n == 9);
	CHECK(n == 2);
	CHECK(has_line_msg(&m, path, 2, "key shorter than 8 bytes"));
	CHECK(has_line_msg(&m, path, 3, "key shorter than 8 bytes"));
	CHECK(has_line_msg(&m, path, 4, "hex key has an odd number of hex digits"));
	CHECK(has_line_msg(&m, path, 5, "hex key has a character that is not a hex digit"));
	snprintf(want, sizeof(want), "%s:6: duplicate identity \"a\" (first defined at %s:1)", path, path);
	CHECK(has_msg(&m, want));
	CHECK(has_line_msg(&m, path, 7, "identity without a key"));
	CHECK(has_line_msg(&m, path, 8, "text after the key"));
	CHECK(has_line_msg(&m, path, 9, "identity is not valid"));
	CHECK(has_line_msg(&m, path, 10, "key longer than 64 bytes"));
	/* no message ever shows a key */
	for (int i = 0; i < m.n && i < MSG_MAX; i++)
		CHECK(strstr(m.text[i], "anotherkey") == NULL && strstr(m.text[i], "zz11") == NULL &&
		      strstr(m.text[i], "0011") == NULL && strstr(m.text[i], "with spaces") == NULL);
	free_entries(v, n);
}

static void test_permissions(void)
{
	char path[64], want[256];
	struct key_entry *v = NULL;
	size_t n = 0;
	struct msgs m = { .n = 0 };
	int rc = parse("a goodgoodkey\n", 0644, &v, &n, &m, path, sizeof(path));

	CHECK(rc == 1);
	CHECK(m.n == 1);
	CHECK(n == 0);
	snprintf(want, sizeof(want), "%s: readable by others (mode 0644); chmod 640 it", path);
	CHECK(has_msg(&m, want));
	free_entries(v, n);

	m.n = 0;
	v = NULL;
	rc = keys_parse_file("/nonexistent/c2m.keys", &v, &n, collect, &m);
	CHECK(rc == 1);
	CHECK(has_msg(&m, "/nonexistent/c2m.keys: cannot open: No such file or directory"));
	free(v);
}

/* Entries already in *v (e.g. from the config file) count for duplicates. */
static void test_existing(void)
{
	char path[64];
	struct key_entry *v = calloc(1, sizeof(*v));
	size_t n = 1;
	struct msgs m = { .n = 0 };
	int rc;

	if (v == NULL)
		return;
	v[0].identity = strdup("cfg-dev");
	v[0].origin = strdup("coap2mqtt.yaml:12");
	v[0].key_len = 8;
	rc = parse("x 12345678\ncfg-dev 12345678\n", 0600, &v, &n, &m, path, sizeof(path));
	CHECK(rc == 1);
	CHECK(n == 2);
	CHECK(has_msg(&m, ":2: duplicate identity \"cfg-dev\" (first defined at coap2mqtt.yaml:12)"));
	free_entries(v, n);
}

static void test_decode_hex(void)
{
	uint8_t out[4];
	const char *why = NULL;

	CHECK(keys_decode_hex("hex:0aFf", out, sizeof(out), &why) == 2 && out[0] == 0x0a && out[1] == 0xff);
	CHECK(keys_decode_hex("01020304", out, sizeof(out), &why) == 4 && out[3] == 4);
	CHECK(keys_decode_hex("0102030405", out, sizeof(out), &why) == -1);
	CHECK_STR(why, "is too long");
	CHECK(keys_decode_hex("", out, sizeof(out), &why) == -1);
	CHECK_STR(why, "is empty");
	CHECK(keys_decode_hex("0g", out, sizeof(out), &why) == -1);
	CHECK(keys_decode_hex("abc", out, sizeof(out), NULL) == -1);
}

static void test_lookup(void)
{
	enum { N = 1000 };
	struct key_entry *v = calloc(N, sizeof(*v));
	struct keys *k;
	char id[32];
	size_t i, hits = 0, right = 0;

	if (v == NULL)
		return;
	for (i = 0; i < N; i++) {
		snprintf(id, sizeof(id), "device-%zu", i);
		v[i].identity = strdup(id);
		v[i].key_len = 8;
		memcpy(v[i].key, &i, sizeof(i));
	}
	k = keys_new(v, N);
	CHECK(k != NULL);
	CHECK(keys_count(k) == N);
	for (i = 0; i < N; i++) {
		const struct key_entry *e;

		snprintf(id, sizeof(id), "device-%zu", i);
		e = keys_find(k, id, strlen(id));
		hits += e != NULL;
		right += e == &v[i];
	}
	CHECK(hits == N);
	CHECK(right == N);
	CHECK(keys_find(k, "device-1000", 11) == NULL);
	CHECK(keys_find(k, "device-", 7) == NULL);
	CHECK(keys_find(k, "device-10", 8) == &v[1]);	/* length, not NUL, ends the identity */
	CHECK(keys_find(k, "device-1\0", 9) == NULL);
	CHECK(keys_find(k, "", 0) == NULL);
	CHECK(keys_find(NULL, "device-1", 8) == NULL);
	keys_free(k);

	k = keys_new(v, 0);
	CHECK(k != NULL && keys_count(k) == 0 && keys_find(k, "device-1", 8) == NULL);
	keys_free(k);

	key_entry_clear(&v[5]);
	CHECK(v[5].identity == NULL && v[5].key_len == 0 && v[5].key[0] == 0);
	free_entries(v, N);
}

/* Raw public key devices: "rpk:sha256:HEX" lines, the fingerprint table, its text form. */
static void test_rpk(void)
{
	static const char fp1[] = "sha256:00112233445566778899aabbccddeeff"
				  "00112233445566778899aabbccddeeff";
	char path[64], text[KEYS_RPK_TEXT], content[512];
	struct key_entry *v = NULL;
	size_t n = 0;
	struct msgs m = { .n = 0 };
	uint8_t fp[KEYS_RPK_LEN];
	struct keys *k;
	int rc;

	snprintf(content, sizeof(content),
		 "meter-1 rpk:%s\n"			/* 1: ok */
		 "meter-2 rpk:sha256:0011\n"		/* 2: too short */
		 "meter-3 rpk:md5:0011\n"		/* 3: not sha256 */
		 "meter-4 rpk:sha256:%.62szz\n"	/* 4: not hex */
		 "psk-1 longenoughkey\n",		/* 5: a PSK device beside them */
		 fp1, fp1 + 7);
	rc = parse(content, 0600, &v, &n, &m, path, sizeof(path));
	CHECK(rc == 3);
	CHECK(n == 2);
	CHECK(has_line_msg(&m, path, 2, "raw public key: must have 64 hex digits"));
	CHECK(has_line_msg(&m, path, 3, "raw public key: must start with sha256:"));
	CHECK(has_line_msg(&m, path, 4, "raw public key: has a character that is not a hex"));
	CHECK_STR(v[0].identity, "meter-1");
	CHECK(v[0].has_rpk && v[0].key_len == 0 && v[0].rpk[0] == 0x00 && v[0].rpk[31] == 0xff);
	CHECK(!v[1].has_rpk && v[1].key_len == 13);
	keys_format_rpk(v[0].rpk, text);
	CHECK_STR(text, fp1);
	k = keys_new(v, n);
	CHECK(k != NULL);
	CHECK(keys_find_rpk(k, v[0].rpk) == &v[0]);
	CHECK(keys_find(k, "meter-1", 7) == &v[0]);
	memcpy(fp, v[0].rpk, sizeof(fp));
	fp[31] ^= 1;
	CHECK(keys_find_rpk(k, fp) == NULL);
	CHECK(keys_decode_rpk(fp1, fp) == NULL && memcmp(fp, v[0].rpk, sizeof(fp)) == 0);
	/* "hex:" and 60 digits are 64 characters but 30 bytes: refused with a reason (it was
	 * refused with no reason, which a message then printed from a wild pointer) */
	CHECK_STR(keys_decode_rpk("sha256:hex:000102030405060708090a0b0c0d0e0f101112131415161718191a"
				  "1b1c1d", fp), "must have 64 hex digits after sha256:");
	keys_free(k);
	free_entries(v, n);
}

int main(void)
{
	test_rpk();
	test_valid();
	test_errors();
	test_permissions();
	test_existing();
	test_decode_hex();
	test_lookup();
	return check_done();
}
