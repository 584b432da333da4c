/* config.c: the only libyaml user — reads the YAML file into a validated, immutable struct config. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero, strdup */
#endif
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "log.h"	/* enum log_level values only; this module never logs */

#define CONF_MAX_FILE (4 * 1024 * 1024)	/* bytes */
#define CONF_MAX_DEPTH 16			/* nested lists / mappings */
#define CONF_MAX_ITEMS KEYS_MAX_ENTRIES	/* entries in one list (devices, routes) */
#define CONF_MAX_LISTEN 64			/* coap.listen URIs */
#define CONF_MAX_COMMANDS 1024			/* commands: each is a subscription; checked pairwise */
#define CONF_MAX_ERRORS 200			/* messages kept and printed; the rest are counted */
#define CONF_MAX_STR 4096			/* bytes in a string value */
#define CONF_MAX_PASSWORD 1024			/* bytes in password_file's first line */
#define CONF_NONE SIZE_MAX

#define DEFAULT_LISTEN "coaps://[::]:5684"
#define DEFAULT_CLIENT_ID "coap2mqtt"
#define DEFAULT_CA_FILE "/etc/ssl/certs/ca-certificates.crt"
#define DEFAULT_PERSISTENCE_DIR "/var/lib/coap2mqtt"
#define MANDATORY_CIPHER "TLS_PSK_WITH_AES_128_CCM_8"
#define CRED_PREFIX "$CREDENTIALS_DIRECTORY/"	/* systemd LoadCredential= folder */
#define STATUS_FMT "coap2mqtt/%s/status"		/* default mqtt.status_topic */

enum cn_type { CN_SCALAR, CN_SEQ, CN_MAP, CN_BAD };

/* One YAML node. Children form a list by index (first/next) inside cctx.node; a mapping's children
 * alternate key, value. key names the mapping key this node belongs to, for messages. */
struct cnode {
	enum cn_type type;
	int line, col;		/* 1-based */
	bool plain;		/* unquoted scalar */
	char *val;		/* scalar bytes, NUL-ended (may hold NULs: use len) */
	size_t len;
	const char *key;
	size_t first, last, next;
	size_t nkids;
};

/* One error message, kept so that all of them come out sorted by position. */
struct cmsg {
	int line, col;
	size_t seq;
	char *text;
};

struct cctx {
	const char *file;
	char *dir;		/* directory of file, NULL when relative paths need no prefix */
	FILE *errs;
	int nerr;
	int nprinted;		/* errors file_err printed at once, not kept */
	struct cmsg msg[CONF_MAX_ERRORS];
	size_t nmsg;
	const struct cnode *here;	/* position for messages from the keys file parser */
	struct cnode *node;
	size_t nnode, capnode;
	struct config *c;
	const struct cnode **dev_node;	/* identity node per config device */
	size_t dev_cap;
	const struct cnode **route_node;	/* path node per route */
	size_t route_cap;
};

struct shown {
	char s[64];
};

static const char *const cipher_names[] = {
	"TLS_PSK_WITH_AES_128_CCM_8", "TLS_PSK_WITH_AES_128_CCM", "TLS_PSK_WITH_AES_256_CCM_8",
	"TLS_PSK_WITH_AES_256_CCM", "TLS_PSK_WITH_AES_128_GCM_SHA256", "TLS_PSK_WITH_AES_256_GCM_SHA384",
	"TLS_PSK_WITH_AES_128_CBC_SHA256", "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256",
	"TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
};
#define N_CIPHERS (sizeof(cipher_names) / sizeof(cipher_names[0]))

/* ---- messages ---- */

/* Keeps one message; text is the whole line without the newline. */
static void conf_keep(struct cctx *x, int line, int col, char *text)
{
	if (text == NULL || x->nmsg == CONF_MAX_ERRORS) {
		free(text);
		return;
	}
	x->msg[x->nmsg] = (struct cmsg){ line, col, x->nmsg, text };
	x->nmsg++;
}

static void conf_vmsg(struct cctx *x, int line, int col, const char *key, const char *fmt, va_list ap)
{
	char what[1024], *text;

	x->nerr++;
	if (x->errs == NULL || x->nmsg == CONF_MAX_ERRORS)
		return;
	vsnprintf(what, sizeof(what), fmt, ap);
	if (asprintf(&text, "%s:%d:%d: %s%s%s", x->file, line, col, key ? key : "", key ? ": " : "",
		     what) < 0)
		text = NULL;
	conf_keep(x, line, col, text);
}

static int msg_cmp(const void *a, const void *b)
{
	const struct cmsg *ma = a, *mb = b;

	if (ma->line != mb->line)
		return ma->line < mb->line ? -1 : 1;
	if (ma->col != mb->col)
		return ma->col < mb->col ? -1 : 1;
	return ma->seq < mb->seq ? -1 : ma->seq > mb->seq;
}

/* Prints the kept messages in file order and frees them. */
static void conf_flush(struct cctx *x)
{
	size_t i;

	qsort(x->msg, x->nmsg, sizeof(x->msg[0]), msg_cmp);
	for (i = 0; i < x->nmsg; i++) {
		fprintf(x->errs, "%s\n", x->msg[i].text);
		free(x->msg[i].text);
	}
	if (x->errs != NULL && x->nerr > (int)x->nmsg + x->nprinted)
		fprintf(x->errs, "%s: %d more errors not shown\n", x->file,
			x->nerr - (int)x->nmsg - x->nprinted);
	x->nmsg = 0;
}

static void conf_errk(struct cctx *x, const struct cnode *n, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void conf_errk(struct cctx *x, const struct cnode *n, const char *key, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, n ? n->line : 1, n ? n->col : 1, key, fmt, ap);
	va_end(ap);
}

/* Reports at n, prefixed with the key n belongs to. */
static void conf_err(struct cctx *x, const struct cnode *n, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void conf_err(struct cctx *x, const struct cnode *n, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, n ? n->line : 1, n ? n->col : 1, n ? n->key : NULL, fmt, ap);
	va_end(ap);
}

static void conf_at(struct cctx *x, int line, int col, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));
static void conf_at(struct cctx *x, int line, int col, const char *key, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, line, col, key, fmt, ap);
	va_end(ap);
}

/* A value from the file, quoted, shortened and with control bytes replaced, for messages. */
static struct shown show(const char *s, size_t len)
{
	struct shown out;
	size_t i, o = 0, max = 40;

	out.s[o++] = '"';
	for (i = 0; i < len && i < max; i++) {
		unsigned char c = (unsigned char)s[i];

		out.s[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
	}
	if (len > max) {
		memcpy(out.s + o, "...", 3);
		o += 3;
	}
	out.s[o++] = '"';
	out.s[o] = '\0';
	return out;
}

/* Out of memory: counted as an error so that no half-built configuration is ever returned. */
static void conf_oom(struct cctx *x)
{
	conf_at(x, 1, 1, NULL, "out of memory");
}

static char *cstrdup(struct cctx *x, const char *s)
{
	char *d = strdup(s);

	if (d == NULL)
		conf_oom(x);
	return d;
}

static void *ccalloc(struct cctx *x, size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size);

	if (p == NULL)
		conf_oom(x);
	return p;
}

/* ---- tree building from libyaml events ---- */

static const struct cnode *kid(const struct cctx *x, const struct cnode *n)
{
	return n->first == CONF_NONE ? NULL : &x->node[n->first];
}

static const struct cnode *sib(const struct cctx *x, const struct cnode *n)
{
	return n->next == CONF_NONE ? NULL : &x->node[n->next];
}

/* Adds a node for event ev under parent (CONF_NONE for the root); returns its index or CONF_NONE. */
static size_t tree_add(struct cctx *x, size_t parent, enum cn_type type, const yaml_mark_t *mark)
{
	struct cnode *n, *p;
	size_t i;

	if (x->nnode == x->capnode) {
		size_t cap = x->capnode ? 2 * x->capnode : 256;
		struct cnode *nv = realloc(x->node, cap * sizeof(*nv));

		if (nv == NULL)
			return CONF_NONE;
		x->node = nv;
		x->capnode = cap;
	}
	i = x->nnode++;
	n = &x->node[i];
	*n = (struct cnode){ .type = type, .line = (int)mark->line + 1, .col = (int)mark->column + 1,
			     .first = CONF_NONE, .last = CONF_NONE, .next = CONF_NONE };
	if (parent == CONF_NONE)
		return i;
	p = &x->node[parent];
	if (p->type == CN_MAP && p->nkids % 2 == 1)
		n->key = x->node[p->last].type == CN_SCALAR ? x->node[p->last].val : NULL;
	else
		n->key = p->key;	/* list items and mapping keys speak for their container */
	if (p->last == CONF_NONE)
		p->first = i;
	else
		x->node[p->last].next = i;
	p->last = i;
	p->nkids++;
	return i;
}

static int tree_scalar(struct cctx *x, size_t parent, const yaml_event_t *ev)
{
	size_t i = tree_add(x, parent, CN_SCALAR, &ev->start_mark);
	struct cnode *n;

	if (i == CONF_NONE)
		return -1;
	n = &x->node[i];
	n->len = ev->data.scalar.length;
	n->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
	n->val = malloc(n->len + 1);
	if (n->val == NULL)
		return -1;
	memcpy(n->val, ev->data.scalar.value, n->len);
	n->val[n->len] = '\0';
	return 0;
}

static void tree_free(struct cctx *x)
{
	size_t i;

	for (i = 0; i < x->nnode; i++) {
		if (x->node[i].val)
			explicit_bzero(x->node[i].val, x->node[i].len);	/* may hold a key */
		free(x->node[i].val);
	}
	free(x->node);
	x->node = NULL;
	x->nnode = x->capnode = 0;
}

/* Line and column of a byte offset, for reader errors that carry only an offset. */
static void offset_pos(const unsigned char *buf, size_t len, size_t off, int *line, int *col)
{
	size_t i;

	*line = 1;
	*col = 1;
	for (i = 0; i < off && i < len; i++) {
		if (buf[i] == '\n') {
			(*line)++;
			*col = 1;
		} else {
			(*col)++;
		}
	}
}

static void syntax_error(struct cctx *x, const yaml_parser_t *p, const unsigned char *buf, size_t len)
{
	int line = (int)p->problem_mark.line + 1, col = (int)p->problem_mark.column + 1;
	const char *problem = p->problem ? p->problem : "malformed YAML";

	if (p->error == YAML_READER_ERROR) {
		offset_pos(buf, len, p->problem_offset, &line, &col);
		conf_at(x, line, col, "syntax", "%s (byte offset %zu)", problem, p->problem_offset);
	} else if (p->context != NULL) {
		conf_at(x, line, col, "syntax", "%s (%s at line %d column %d)", problem, p->context,
			(int)p->context_mark.line + 1, (int)p->context_mark.column + 1);
	} else {
		conf_at(x, line, col, "syntax", "%s", problem);
	}
}

struct tstack {
	size_t idx[CONF_MAX_DEPTH];
	int depth;
};

/* Opens a list or mapping; -1 stops the parse (error reported or out of memory). */
static int tree_open(struct cctx *x, struct tstack *st, enum cn_type type, const yaml_event_t *ev)
{
	size_t parent = st->depth ? st->idx[st->depth - 1] : CONF_NONE, i;

	if (st->depth == CONF_MAX_DEPTH) {
		conf_at(x, (int)ev->start_mark.line + 1, (int)ev->start_mark.column + 1, "syntax",
			"nesting deeper than %d levels", CONF_MAX_DEPTH);
		return -1;
	}
	i = tree_add(x, parent, type, &ev->start_mark);
	if (i == CONF_NONE)
		return -1;
	st->idx[st->depth++] = i;
	return 0;
}

/* Checks the item count of the container being filled; -1 when over the limit. */
static int tree_count(struct cctx *x, const struct tstack *st)
{
	const struct cnode *p;

	if (st->depth == 0)
		return 0;
	p = &x->node[st->idx[st->depth - 1]];
	if (p->nkids < (p->type == CN_MAP ? 2 * CONF_MAX_ITEMS : CONF_MAX_ITEMS))
		return 0;
	conf_err(x, p, "more than %d entries", CONF_MAX_ITEMS);
	return -1;
}

/* Handles one event; returns 1 at the end of the stream, 0 to go on, -1 to stop. */
static int tree_event(struct cctx *x, struct tstack *st, const yaml_event_t *ev, int *docs)
{
	size_t parent = st->depth ? st->idx[st->depth - 1] : CONF_NONE;

	if ((ev->type == YAML_SCALAR_EVENT || ev->type == YAML_SEQUENCE_START_EVENT ||
	     ev->type == YAML_MAPPING_START_EVENT || ev->type == YAML_ALIAS_EVENT) && tree_count(x, st) < 0)
		return -1;
	switch (ev->type) {
	case YAML_STREAM_END_EVENT:
		return 1;
	case YAML_DOCUMENT_START_EVENT:
		if (++*docs > 1) {
			conf_at(x, (int)ev->start_mark.line + 1, (int)ev->start_mark.column + 1, "syntax",
				"more than one YAML document (one configuration per file)");
			return -1;
		}
		return 0;
	case YAML_SCALAR_EVENT:
		return tree_scalar(x, parent, ev);
	case YAML_ALIAS_EVENT:
		conf_at(x, (int)ev->start_mark.line + 1, (int)ev->start_mark.column + 1, "syntax",
			"aliases (*%s) are not supported (write the value out)", ev->data.alias.anchor);
		return tree_add(x, parent, CN_BAD, &ev->start_mark) == CONF_NONE ? -1 : 0;
	case YAML_SEQUENCE_START_EVENT:
		return tree_open(x, st, CN_SEQ, ev);
	case YAML_MAPPING_START_EVENT:
		return tree_open(x, st, CN_MAP, ev);
	case YAML_SEQUENCE_END_EVENT:
	case YAML_MAPPING_END_EVENT:
		if (st->depth > 0)
			st->depth--;
		return 0;
	default:
		return 0;
	}
}

/* Parses buf into x->node; node 0 is the root when nnode > 0. Returns -1 after a reported error. */
static int tree_build(struct cctx *x, const unsigned char *buf, size_t len)
{
	yaml_parser_t p;
	yaml_event_t ev;
	struct tstack st = { .depth = 0 };
	int rc = 0, docs = 0, before;

	if (!yaml_parser_initialize(&p)) {
		conf_oom(x);
		return -1;
	}
	yaml_parser_set_input_string(&p, buf, len);
	while (rc == 0) {
		if (!yaml_parser_parse(&p, &ev)) {
			syntax_error(x, &p, buf, len);
			rc = -1;
			break;
		}
		before = x->nerr;
		rc = tree_event(x, &st, &ev, &docs);
		if (rc < 0 && x->nerr == before)
			conf_oom(x);
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&p);
	return rc < 0 ? -1 : 0;
}

/* ---- reading the file ---- */

static void file_err(struct cctx *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void file_err(struct cctx *x, const char *fmt, ...)
{
	va_list ap;

	x->nerr++;
	if (x->errs == NULL)
		return;
	x->nprinted++;
	fprintf(x->errs, "%s: ", x->file);
	va_start(ap, fmt);
	vfprintf(x->errs, fmt, ap);
	va_end(ap);
	fputc('\n', x->errs);
}

/* Reads the whole of fd (at most CONF_MAX_FILE bytes) into *buf; -1 after reporting. */
static int read_all(struct cctx *x, int fd, unsigned char **buf, size_t *len)
{
	ssize_t r = 0;

	*buf = malloc(CONF_MAX_FILE + 1);
	if (*buf == NULL) {
		file_err(x, "out of memory");
		return -1;
	}
	while (*len <= CONF_MAX_FILE && (r = read(fd, *buf + *len, CONF_MAX_FILE + 1 - *len)) > 0)
		*len += (size_t)r;
	if (r < 0) {
		file_err(x, "read error: %s", strerror(errno));
		return -1;
	}
	if (*len > CONF_MAX_FILE) {
		file_err(x, "larger than 4 MiB (at most %d bytes)", CONF_MAX_FILE);
		return -1;
	}
	return 0;
}

/* Reads the configuration file into *buf; -1 after reporting. */
static int read_file(struct cctx *x, unsigned char **buf, size_t *len)
{
	int fd = open(x->file, O_RDONLY | O_CLOEXEC), rc = -1;
	struct stat st;

	*buf = NULL;
	*len = 0;
	if (fd < 0) {
		file_err(x, "cannot open: %s", strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0)
		file_err(x, "cannot stat: %s", strerror(errno));
	else if (!S_ISREG(st.st_mode))
		file_err(x, "not a regular file");
	else if (st.st_size > CONF_MAX_FILE)
		file_err(x, "larger than 4 MiB (at most %d bytes)", CONF_MAX_FILE);
	else
		rc = read_all(x, fd, buf, len);
	close(fd);
	return rc;
}

/* ---- typed values ---- */

static const char *type_name(enum cn_type t)
{
	switch (t) {
	case CN_SCALAR:	return "a single value";
	case CN_SEQ:	return "a list";
	case CN_MAP:	return "a mapping";
	case CN_BAD:	return "an alias";
	}
	return "?";
}

static bool is_null(const struct cnode *n)
{
	return n->type == CN_SCALAR && n->plain &&
	       (n->len == 0 || strcmp(n->val, "~") == 0 || strcmp(n->val, "null") == 0 ||
		strcmp(n->val, "Null") == 0 || strcmp(n->val, "NULL") == 0);
}

/* true when n has type t (an empty value counts as an empty list or mapping); reports otherwise. */
static bool want_type(struct cctx *x, const struct cnode *n, enum cn_type t)
{
	if (n->type == t || is_null(n))
		return true;
	if (n->type != CN_BAD)
		conf_err(x, n, "expected %s, found %s", type_name(t), type_name(n->type));
	return false;
}

/* The scalar text of n, or NULL after reporting why there is none. */
static const char *scalar(struct cctx *x, const struct cnode *n, const char *what)
{
	if (n->type == CN_BAD)
		return NULL;
	if (n->type != CN_SCALAR) {
		conf_err(x, n, "expected %s, found %s", what, type_name(n->type));
		return NULL;
	}
	if (is_null(n)) {
		conf_err(x, n, "has no value (expected %s)", what);
		return NULL;
	}
	if (memchr(n->val, '\0', n->len) != NULL) {
		conf_err(x, n, "contains a NUL character");
		return NULL;
	}
	return n->val;
}

/* 0 with *out set; -1 when s is not a decimal integer; 1 when it overflows. */
static int parse_ll(const char *s, long long *out)
{
	unsigned long long v = 0;
	bool neg = false, over = false;
	const char *p = s;

	if (*p == '+' || *p == '-')
		neg = *p++ == '-';
	if (*p < '0' || *p > '9')
		return -1;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (ULLONG_MAX - 9) / 10)
			over = true;
		else
			v = v * 10 + (unsigned)(*p - '0');
	}
	if (*p != '\0')
		return -1;
	if (over || v > LLONG_MAX)
		return 1;
	*out = neg ? -(long long)v : (long long)v;
	return 0;
}

static bool get_int(struct cctx *x, const struct cnode *n, long long min, long long max, long long *out)
{
	const char *s = scalar(x, n, "an integer");
	long long v = 0;
	int rc;

	if (s == NULL)
		return false;
	rc = parse_ll(s, &v);
	if (rc < 0) {
		conf_err(x, n, "%s is not an integer (%lld..%lld)", show(s, n->len).s, min, max);
		return false;
	}
	if (rc > 0 || v < min || v > max) {
		conf_err(x, n, "%.40s is out of range %lld..%lld", s, min, max);
		return false;
	}
	*out = v;
	return true;
}

/* An integer that must be one of allowed[0..n); choices spells them out for the message. */
static bool get_choice(struct cctx *x, const struct cnode *n, const int *allowed, size_t nallowed,
		       const char *choices, int *out)
{
	const char *s = scalar(x, n, "an integer");
	long long v = 0;
	size_t i;
	int rc;

	if (s == NULL)
		return false;
	rc = parse_ll(s, &v);
	if (rc < 0) {
		conf_err(x, n, "%s is not an integer (%s)", show(s, n->len).s, choices);
		return false;
	}
	for (i = 0; i < nallowed && rc == 0; i++) {
		if (v == allowed[i]) {
			*out = allowed[i];
			return true;
		}
	}
	conf_err(x, n, "%.40s is not %s", s, choices);
	return false;
}

static bool get_bool(struct cctx *x, const struct cnode *n, bool *out)
{
	const char *s = scalar(x, n, "a boolean");

	if (s == NULL)
		return false;
	if (strcasecmp(s, "true") == 0 || strcasecmp(s, "yes") == 0) {
		*out = true;
		return true;
	}
	if (strcasecmp(s, "false") == 0 || strcasecmp(s, "no") == 0) {
		*out = false;
		return true;
	}
	conf_err(x, n, "%s is not a boolean (true, false, yes or no)", show(s, n->len).s);
	return false;
}

/* A non-empty string without control characters, at most max bytes; *out is replaced. */
static bool get_str(struct cctx *x, const struct cnode *n, size_t max, char **out)
{
	const char *s = scalar(x, n, "a string");
	size_t i;

	if (s == NULL)
		return false;
	if (n->len == 0) {
		conf_err(x, n, "must not be empty");
		return false;
	}
	if (n->len > max) {
		conf_err(x, n, "is longer than %zu bytes", max);
		return false;
	}
	for (i = 0; i < n->len; i++) {
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) {
			conf_err(x, n, "contains a control character");
			return false;
		}
	}
	free(*out);
	*out = cstrdup(x, s);
	return *out != NULL;
}

/* s made absolute against the config file's directory (relative paths are relative to it). */
static char *resolve(const struct cctx *x, const char *s)
{
	size_t dl, sl;
	char *r;

	if (s[0] == '/' || x->dir == NULL)
		return strdup(s);
	dl = strlen(x->dir);
	sl = strlen(s);
	r = malloc(dl + 1 + sl + 1);
	if (r == NULL)
		return NULL;
	memcpy(r, x->dir, dl);
	if (dl > 0 && x->dir[dl - 1] != '/')
		r[dl++] = '/';
	memcpy(r + dl, s, sl + 1);
	return r;
}

static bool get_path(struct cctx *x, const struct cnode *n, char **out)
{
	char *s = NULL;

	if (!get_str(x, n, CONF_MAX_STR, &s))
		return false;
	free(*out);
	*out = resolve(x, s);
	free(s);
	if (*out == NULL)
		conf_oom(x);
	return *out != NULL;
}

/* A file to read: like get_path, and "$CREDENTIALS_DIRECTORY/NAME" names a file passed by systemd's
 * LoadCredential= (the variable then must be set). */
static bool get_file(struct cctx *x, const struct cnode *n, char **out)
{
	const char *dir;
	char *s = NULL;
	size_t pl = strlen(CRED_PREFIX), dl;
	int rc;

	if (n->type != CN_SCALAR || strncmp(n->val, CRED_PREFIX, pl) != 0)
		return get_path(x, n, out);
	if (!get_str(x, n, CONF_MAX_STR, &s))
		return false;
	dir = getenv("CREDENTIALS_DIRECTORY");
	if (dir == NULL || *dir == '\0') {
		conf_err(x, n, "CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)");
		free(s);
		return false;
	}
	for (dl = strlen(dir); dl > 1 && dir[dl - 1] == '/'; dl--)
		;
	free(*out);
	rc = asprintf(out, "%.*s/%s", (int)dl, dir, s + pl);
	free(s);
	if (rc < 0) {
		*out = NULL;
		conf_oom(x);
	}
	return *out != NULL;
}

/* A fixed MQTT topic the gateway publishes on (status, metrics): no wildcards, no placeholders. */
static bool get_topic(struct cctx *x, const struct cnode *n, char **out)
{
	char err[256] = "";
	struct route *r = NULL;

	if (!get_str(x, n, CONF_MAX_STR, out))
		return false;
	if (strpbrk(*out, "{}") != NULL)
		conf_err(x, n, "must not contain '{' or '}' (this topic has no placeholders)");
	else if ((r = route_compile2("", *out, 0, err, sizeof(err))) == NULL)
		conf_err(x, n, "%s", strncmp(err, "topic ", 6) == 0 ? err + 6 : err);
	route_free(r);
	if (r != NULL)
		return true;
	free(*out);
	*out = NULL;
	return false;
}

/* ---- mappings ---- */

/* Collects the values of a mapping's known keys into val[] (NULL when absent); reports unknown and
 * repeated keys. names[] is NULL-terminated. Returns false when n is not a mapping. */
static bool conf_fields(struct cctx *x, const struct cnode *n, const char *const *names,
			const struct cnode **val)
{
	const struct cnode *k, *v;
	size_t i;

	for (i = 0; names[i]; i++)
		val[i] = NULL;
	if (n == NULL || is_null(n))
		return true;
	if (!want_type(x, n, CN_MAP))
		return false;
	for (k = kid(x, n); k && (v = sib(x, k)); k = sib(x, v)) {
		if (k->type != CN_SCALAR) {
			conf_err(x, k, "keys must be plain words, found %s", type_name(k->type));
			continue;
		}
		for (i = 0; names[i] && strcmp(names[i], k->val) != 0; i++)
			;
		if (names[i] == NULL) {
			char allowed[512] = "";

			for (i = 0; names[i]; i++)
				snprintf(allowed + strlen(allowed), sizeof(allowed) - strlen(allowed), "%s%s",
					 i ? ", " : "", names[i]);
			conf_err(x, k, "unknown key %s (allowed: %s)", show(k->val, k->len).s, allowed);
		} else if (val[i] != NULL) {
			conf_err(x, k, "%s given twice (first at line %d)", names[i], val[i]->line);
		} else {
			val[i] = v;
		}
	}
	return true;
}

/* ---- coap ---- */

/* Checks "HOST:PORT" or "[V6]:PORT" (port optional unless need_port); NULL or the reason. */
static const char *parse_hostport(const char *s, bool need_port, char **host, int *port)
{
	const char *end, *h = s;
	char v6[INET6_ADDRSTRLEN + 1];
	size_t hl, i;
	long long p = 0;

	if (*s == '[') {
		end = strchr(s, ']');
		if (end == NULL || (size_t)(end - s - 1) >= sizeof(v6))
			return "unclosed '[' around an IPv6 address";
		h = s + 1;
		hl = (size_t)(end - h);
		memcpy(v6, h, hl);
		v6[hl] = '\0';
		if (inet_pton(AF_INET6, v6, &(struct in6_addr){ 0 }) != 1)
			return "not a valid IPv6 address between [ and ]";
		end++;
	} else {
		end = s + strcspn(s, ":/");
		hl = (size_t)(end - h);
		for (i = 0; i < hl; i++)
			if (!((h[i] >= 'a' && h[i] <= 'z') || (h[i] >= 'A' && h[i] <= 'Z') ||
			      (h[i] >= '0' && h[i] <= '9') || h[i] == '.' || h[i] == '-' || h[i] == '_'))
				return "the host has a character other than letters, digits, '.', '-' and '_'";
		if (strchr(end, ':') != strrchr(end, ':'))
			return "an IPv6 address needs [brackets]";
	}
	if (hl == 0)
		return "no host";
	if (*end == '\0' && need_port)
		return "no :PORT";
	if (*end != '\0' && (*end != ':' || parse_ll(end + 1, &p) != 0 || end[1] < '0' || end[1] > '9'))
		return "the port is not a number (or there is text after it)";
	if (*end != '\0' && (p < 1 || p > 65535))
		return "the port is out of range 1..65535";
	if (port && *end != '\0')
		*port = (int)p;
	if (host && (*host = strndup(h, hl)) == NULL)
		return "out of memory";
	return NULL;
}

static void coap_listen(struct cctx *x, const struct cnode *n)
{
	struct conf_coap *cc = &x->c->coap;
	const struct cnode *it;
	const char *s, *why, *rest;

	if (!want_type(x, n, CN_SEQ))
		return;
	if (n->nkids == 0 || n->nkids > CONF_MAX_LISTEN) {
		conf_err(x, n, "needs 1..%d URIs (coaps://HOST:PORT)", CONF_MAX_LISTEN);
		return;
	}
	cc->listen = ccalloc(x, n->nkids, sizeof(*cc->listen));
	if (cc->listen == NULL)
		return;
	for (it = kid(x, n); it; it = sib(x, it)) {
		if ((s = scalar(x, it, "a URI")) == NULL)
			continue;
		rest = strncmp(s, "coaps://", 8) == 0 ? s + 8 : strncmp(s, "coap://", 7) == 0 ? s + 7 : NULL;
		why = rest ? parse_hostport(rest, true, NULL, NULL) : "the scheme is not coaps:// or coap://";
		if (why != NULL) {
			conf_err(x, it, "%s is not coaps://HOST:PORT or coap://HOST:PORT (%s)",
				 show(s, it->len).s, why);
			continue;
		}
		if ((cc->listen[cc->n_listen] = cstrdup(x, s)) != NULL)
			cc->n_listen++;
	}
}

static void coap_ciphers(struct cctx *x, const struct cnode *n)
{
	struct conf_coap *cc = &x->c->coap;
	const struct cnode *it;
	const char *s;
	unsigned seen = 0;
	size_t i;

	if (!want_type(x, n, CN_SEQ))
		return;
	cc->ciphers = ccalloc(x, N_CIPHERS, sizeof(*cc->ciphers));
	if (cc->ciphers == NULL)
		return;
	for (it = kid(x, n); it; it = sib(x, it)) {
		if ((s = scalar(x, it, "a cipher suite name")) == NULL)
			continue;
		for (i = 0; i < N_CIPHERS && strcmp(s, cipher_names[i]) != 0; i++)
			;
		if (i == N_CIPHERS) {
			conf_err(x, it, "%s is not a supported cipher suite (TLS_PSK_WITH_AES_128_CCM_8, "
				 "TLS_PSK_WITH_AES_128_CCM, TLS_PSK_WITH_AES_256_CCM_8, TLS_PSK_WITH_AES_256_CCM, "
				 "TLS_PSK_WITH_AES_128_GCM_SHA256, TLS_PSK_WITH_AES_256_GCM_SHA384, "
				 "TLS_PSK_WITH_AES_128_CBC_SHA256, TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256, "
				 "TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8)",
				 show(s, it->len).s);
		} else if (seen & (1u << i)) {
			conf_err(x, it, "%s is listed twice", cipher_names[i]);
		} else {
			seen |= 1u << i;
			if ((cc->ciphers[cc->n_ciphers] = cstrdup(x, s)) != NULL)
				cc->n_ciphers++;
		}
	}
	if (!(seen & 1u))
		conf_err(x, n, "must include %s (mandatory in RFC 7252)", MANDATORY_CIPHER);
}

static void coap_numbers(struct cctx *x, const struct cnode **v)
{
	static const int blocks[] = { 16, 32, 64, 128, 256, 512, 1024 };
	struct conf_coap *cc = &x->c->coap;
	long long ll;
	int b;

	if (v[1] && get_int(x, v[1], 1, 86400, &ll))
		cc->idle_timeout = (unsigned)ll;
	if (v[2] && get_int(x, v[2], 1, 1000000, &ll))
		cc->max_sessions = (unsigned)ll;
	if (v[3] && get_int(x, v[3], 1, 1048576, &ll))
		cc->max_payload = (size_t)ll;
	if (v[6] && get_choice(x, v[6], blocks, sizeof(blocks) / sizeof(blocks[0]),
			       "16, 32, 64, 128, 256, 512 or 1024", &b))
		cc->block_size = (unsigned)b;
	if (v[7] && get_int(x, v[7], 65536, 1ll << 30, &ll))
		cc->receive_buffer = (unsigned)ll;
}

static void conf_coap(struct cctx *x, const struct cnode *n)
{
	static const char *const names[] = { "listen", "idle_timeout", "max_sessions", "max_payload",
					     "ciphers", "psk_hint", "block_size", "receive_buffer", NULL };
	const struct cnode *v[9];
	struct conf_coap *cc = &x->c->coap;

	cc->idle_timeout = 300;
	cc->max_sessions = 20000;
	cc->max_payload = 1024;
	cc->block_size = 512;
	cc->receive_buffer = 4u << 20;
	if (!conf_fields(x, n, names, v))
		return;
	if (v[0])
		coap_listen(x, v[0]);
	coap_numbers(x, v);
	if (v[4])
		coap_ciphers(x, v[4]);
	if (v[5] && !is_null(v[5]))
		get_str(x, v[5], 128, &cc->psk_hint);
	if (cc->n_listen == 0 && v[0] == NULL) {
		free(cc->listen);
		cc->listen = ccalloc(x, 1, sizeof(*cc->listen));
		if (cc->listen && (cc->listen[0] = cstrdup(x, DEFAULT_LISTEN)) != NULL)
			cc->n_listen = 1;
	}
}

/* ---- devices ---- */

static int dev_append(struct cctx *x, struct key_entry *e, const struct cnode *idnode)
{
	struct config *c = x->c;

	if (c->n_devices == x->dev_cap) {
		size_t cap = x->dev_cap ? 2 * x->dev_cap : 16;
		struct key_entry *nv = realloc(c->devices, cap * sizeof(*nv));
		const struct cnode **nn;

		if (nv == NULL)
			return -1;
		c->devices = nv;
		nn = realloc(x->dev_node, cap * sizeof(*nn));
		if (nn == NULL)
			return -1;
		x->dev_node = nn;
		x->dev_cap = cap;
	}
	x->dev_node[c->n_devices] = idnode;
	c->devices[c->n_devices++] = *e;
	return 0;
}

static bool dev_identity(struct cctx *x, const struct cnode *n, struct key_entry *e)
{
	const char *s = scalar(x, n, "a string");

	if (s == NULL)
		return false;
	if (n->len > KEYS_MAX_IDENTITY) {
		conf_err(x, n, "is longer than %d bytes", KEYS_MAX_IDENTITY);
		return false;
	}
	if (!route_value_ok(s, n->len)) {
		conf_err(x, n, "%s is not valid in an MQTT topic (non-empty UTF-8 without '/', '+', '#' or "
			 "control characters)", show(s, n->len).s);
		return false;
	}
	e->identity = cstrdup(x, s);
	return e->identity != NULL;
}

/* Fills e->key from key (text) or key_hex; never echoes the key. */
static bool dev_key(struct cctx *x, const struct cnode *key, const struct cnode *hex, struct key_entry *e)
{
	const char *s, *why;
	int len;

	if (key) {
		if (key->type != CN_SCALAR || is_null(key)) {
			conf_err(x, key, "expected a string of %d..%d bytes", KEYS_MIN_KEY, KEYS_MAX_KEY);
			return false;
		}
		if (key->len < KEYS_MIN_KEY || key->len > KEYS_MAX_KEY) {
			conf_err(x, key, "key %s than %d bytes (%d..%d)", key->len < KEYS_MIN_KEY ?
				 "shorter" : "longer", key->len < KEYS_MIN_KEY ? KEYS_MIN_KEY : KEYS_MAX_KEY,
				 KEYS_MIN_KEY, KEYS_MAX_KEY);
			return false;
		}
		memcpy(e->key, key->val, key->len);
		e->key_len = key->len;
		return true;
	}
	if ((s = scalar(x, hex, "hex digits")) == NULL)
		return false;
	len = keys_decode_hex(s, e->key, sizeof(e->key), &why);
	if (len < 0 || len < KEYS_MIN_KEY) {
		conf_err(x, hex, "key %s (%d..%d bytes: %d..%d hex digits)", len < 0 ? why :
			 "shorter than 8 bytes", KEYS_MIN_KEY, KEYS_MAX_KEY, 2 * KEYS_MIN_KEY, 2 * KEYS_MAX_KEY);
		return false;
	}
	e->key_len = (size_t)len;
	return true;
}

static char *origin_of(const struct cctx *x, int line)
{
	int len = snprintf(NULL, 0, "%s:%d", x->file, line);
	char *s = len < 0 ? NULL : malloc((size_t)len + 1);

	if (s != NULL)
		snprintf(s, (size_t)len + 1, "%s:%d", x->file, line);
	return s;
}

static void conf_device(struct cctx *x, const struct cnode *n)
{
	static const char *const names[] = { "identity", "key", "key_hex", NULL };
	const struct cnode *v[4];
	struct key_entry e = { 0 };
	bool ok;

	if (!want_type(x, n, CN_MAP) || !conf_fields(x, n, names, v))
		return;
	if (v[0] == NULL)
		conf_err(x, n, "identity is required");
	if (v[1] && v[2])
		conf_err(x, v[2], "give key or key_hex, not both");
	else if (!v[1] && !v[2])
		conf_err(x, n, "key or key_hex is required");
	ok = v[0] && dev_identity(x, v[0], &e);
	ok = (v[1] || v[2]) && !(v[1] && v[2]) && dev_key(x, v[1], v[2], &e) && ok;
	if (ok && (e.origin = origin_of(x, v[0]->line)) != NULL && dev_append(x, &e, v[0]) == 0)
		return;
	if (ok)
		conf_oom(x);
	key_entry_clear(&e);
}

static void device_dups(struct cctx *x)
{
	struct config *c = x->c;
	struct keys *k = keys_new(c->devices, c->n_devices);
	size_t i;

	if (k == NULL) {
		conf_oom(x);
		return;
	}
	for (i = 0; i < c->n_devices; i++) {
		const struct key_entry *f = keys_find(k, c->devices[i].identity, strlen(c->devices[i].identity));

		if (f != NULL && f != &c->devices[i])
			conf_err(x, x->dev_node[i], "duplicate identity %s (first defined at line %d)",
				 show(f->identity, strlen(f->identity)).s, x->dev_node[f - c->devices]->line);
	}
	keys_free(k);
}

static void conf_devices(struct cctx *x, const struct cnode *n)
{
	const struct cnode *it;

	if (n == NULL || !want_type(x, n, CN_SEQ))
		return;
	for (it = kid(x, n); it; it = sib(x, it))
		conf_device(x, it);
	device_dups(x);
}

/* Messages from the keys file parser, kept at the position of devices_file. */
static void keys_sink(void *arg, const char *msg)
{
	struct cctx *x = arg;

	if (x->errs != NULL)
		conf_keep(x, x->here->line, x->here->col, strdup(msg));
}

static void conf_devices_file(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;

	if (n == NULL || !get_file(x, n, &c->devices_file))
		return;
	x->here = n;
	x->nerr += keys_parse_file(c->devices_file, &c->devices, &c->n_devices, keys_sink, x);
	x->dev_cap = c->n_devices;	/* the keys parser sized the array its own way */
}

/* ---- mqtt ---- */

static void mqtt_url(struct cctx *x, const struct cnode *n)
{
	struct conf_mqtt *m = &x->c->mqtt;
	const char *s, *rest, *why;

	if (!get_str(x, n, CONF_MAX_STR, &m->url))
		return;
	s = m->url;
	m->tls = strncmp(s, "mqtts://", 8) == 0;
	rest = m->tls ? s + 8 : strncmp(s, "mqtt://", 7) == 0 ? s + 7 : NULL;
	m->port = m->tls ? 8883 : 1883;
	why = rest ? parse_hostport(rest, false, &m->host, &m->port) : "the scheme is not mqtts:// or mqtt://";
	if (why != NULL)
		conf_err(x, n, "%s is not mqtts://HOST[:PORT] or mqtt://HOST[:PORT] (%s)", show(s, n->len).s,
			 why);
	else if (!m->tls && !m->insecure)
		conf_err(x, n, "mqtt:// sends without TLS (use mqtts://, or set insecure: true for a lab "
			 "broker)");
}

/* Opens path for reading; with private set, also refuses a file others may read. */
static bool file_check(struct cctx *x, const struct cnode *n, const char *key, const char *path,
		       bool private)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	bool ok = false;

	if (fd < 0) {
		conf_errk(x, n, key, "cannot read %s: %s", path, strerror(errno));
		return false;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		conf_errk(x, n, key, "%s is not a regular file", path);
	else if (private && (st.st_mode & 007) != 0)
		conf_errk(x, n, key, "%s is readable by others (mode %04o); chmod 640 it", path,
			  (unsigned)(st.st_mode & 07777));
	else
		ok = true;
	close(fd);
	return ok;
}

/* Reads the first line of the password file into m->password; never prints it. */
static void mqtt_password(struct cctx *x, const struct cnode *n)
{
	char *path = NULL, *nl, buf[CONF_MAX_PASSWORD + 2];
	ssize_t got;
	size_t len;
	int fd;

	if (!get_file(x, n, &path) || !file_check(x, n, "password_file", path, true) ||
	    (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		free(path);
		return;
	}
	got = read(fd, buf, sizeof(buf));
	close(fd);
	len = got > 0 ? (size_t)got : 0;
	if ((nl = memchr(buf, '\n', len)) != NULL)
		len = (size_t)(nl - buf);
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	if (len > CONF_MAX_PASSWORD)
		conf_err(x, n, "%s: first line is longer than %d bytes", path, CONF_MAX_PASSWORD);
	else if (len == 0)
		conf_err(x, n, "%s: first line is empty (it holds the password)", path);
	else if (memchr(buf, '\0', len) != NULL)
		conf_err(x, n, "%s: first line contains a NUL byte", path);
	else if ((x->c->mqtt.password = strndup(buf, len)) == NULL)
		conf_err(x, n, "out of memory");
	explicit_bzero(buf, sizeof(buf));
	free(path);
}

static void mqtt_files(struct cctx *x, const struct cnode **v)
{
	struct conf_mqtt *m = &x->c->mqtt;

	if (v[3])
		get_file(x, v[3], &m->ca_file);
	else
		m->ca_file = cstrdup(x, DEFAULT_CA_FILE);
	if (m->tls && m->ca_file)
		file_check(x, v[3] ? v[3] : v[0], "ca_file", m->ca_file, false);
	if (v[4] && !v[5])
		conf_err(x, v[4], "needs key_file too (both or neither)");
	if (v[5] && !v[4])
		conf_err(x, v[5], "needs cert_file too (both or neither)");
	if (v[4] && get_file(x, v[4], &m->cert_file) && m->tls)
		file_check(x, v[4], "cert_file", m->cert_file, false);
	if (v[5] && get_file(x, v[5], &m->key_file) && m->tls)
		file_check(x, v[5], "key_file", m->key_file, true);
	if ((v[4] || v[5]) && v[0] && m->url && !m->tls)
		conf_err(x, v[4] ? v[4] : v[5], "a client certificate needs mqtts://");
	if (v[7])
		mqtt_password(x, v[7]);
}

static void mqtt_client_id(struct cctx *x, const struct cnode *n)
{
	struct conf_mqtt *m = &x->c->mqtt;
	size_t i;

	if (!get_str(x, n, 64, &m->client_id))
		return;
	for (i = 0; m->client_id[i]; i++) {
		if ((unsigned char)m->client_id[i] <= 0x20 || (unsigned char)m->client_id[i] >= 0x7f) {
			conf_err(x, n, "%s has a space or non-ASCII character (1..64 printable ASCII "
				 "characters; [A-Za-z0-9_-], at most 23, is safest)", show(m->client_id, i + 1).s);
			return;
		}
	}
}

static void mqtt_numbers(struct cctx *x, const struct cnode **v)
{
	static const int versions[] = { 3, 5 };
	struct conf_mqtt *m = &x->c->mqtt;
	long long ll;

	if (v[8] && get_int(x, v[8], 5, 3600, &ll))
		m->keepalive = (int)ll;
	if (v[9])
		get_choice(x, v[9], versions, 2, "3 or 5", &m->version);
	if (v[11] && get_int(x, v[11], 1, 10000000, &ll))
		m->max_buffered = (int)ll;
	if (v[12] && get_int(x, v[12], 1, 65535, &ll))
		m->max_inflight = (int)ll;
	if (v[13] && get_int(x, v[13], 0, UINT32_MAX, &ll))
		m->session_expiry = (unsigned)ll;
	if (v[15] && get_int(x, v[15], 1ll << 20, 1ll << 40, &ll))
		m->max_buffered_bytes = (unsigned long long)ll;
}

/* status_topic as given, else coap2mqtt/<client_id>/status (idnode: client_id, for messages). */
static void mqtt_status_topic(struct cctx *x, const struct cnode *n, const struct cnode *idnode)
{
	struct conf_mqtt *m = &x->c->mqtt;

	if (n != NULL) {
		get_topic(x, n, &m->status_topic);
		return;
	}
	if (m->client_id == NULL)
		return;
	if (strpbrk(m->client_id, "+#{}") != NULL) {
		conf_err(x, idnode, "%s makes the default status_topic " STATUS_FMT " invalid (it may not "
			 "hold '+', '#', '{' or '}'; set status_topic)", show(m->client_id,
			 strlen(m->client_id)).s, m->client_id);
		return;
	}
	if (asprintf(&m->status_topic, STATUS_FMT, m->client_id) < 0) {
		m->status_topic = NULL;
		conf_oom(x);
	}
}

static void conf_mqtt(struct cctx *x, const struct cnode *n, const struct cnode *root)
{
	static const char *const names[] = { "url", "insecure", "client_id", "ca_file", "cert_file",
		"key_file", "username", "password_file", "keepalive", "version", "persistence_dir",
		"max_buffered", "max_inflight", "session_expiry", "status_topic", "max_buffered_bytes",
		NULL };
	const struct cnode *v[17];
	struct conf_mqtt *m = &x->c->mqtt;

	*m = (struct conf_mqtt){ .keepalive = 30, .version = 5, .max_buffered = 100000,
				 .max_buffered_bytes = 1ull << 30, .max_inflight = 1000,
				 .session_expiry = 86400 };
	if (n == NULL)
		conf_errk(x, root, "mqtt", "is required (at least url: mqtts://HOST[:PORT])");
	if (n == NULL || !conf_fields(x, n, names, v))
		return;
	if (v[1])
		get_bool(x, v[1], &m->insecure);
	if (v[0])
		mqtt_url(x, v[0]);
	else
		conf_errk(x, n, "mqtt", "url is required (mqtts://HOST[:PORT])");
	if (v[2])
		mqtt_client_id(x, v[2]);
	if (v[6])
		get_str(x, v[6], 65535, &m->username);
	mqtt_files(x, v);
	mqtt_numbers(x, v);
	if (m->password && !m->username && m->version == 3)
		conf_err(x, v[7], "needs username with MQTT 3.1.1 (version: 3)");
	if (v[10])
		get_path(x, v[10], &m->persistence_dir);
	if (m->client_id == NULL)
		m->client_id = cstrdup(x, DEFAULT_CLIENT_ID);
	if (m->persistence_dir == NULL)
		m->persistence_dir = cstrdup(x, DEFAULT_PERSISTENCE_DIR);
	mqtt_status_topic(x, v[14], v[2]);
}

/* ---- routes ---- */

static void route_methods(struct cctx *x, const struct cnode *n, unsigned *out)
{
	static const char *const mnames[] = { "GET", "POST", "PUT", "DELETE" };
	const struct cnode *it;
	const char *s;
	unsigned bits = 0, i;

	if (!want_type(x, n, CN_SEQ))
		return;
	for (it = kid(x, n); it; it = sib(x, it)) {
		if ((s = scalar(x, it, "a method")) == NULL)
			continue;
		for (i = 0; i < 4 && strcasecmp(s, mnames[i]) != 0; i++)
			;
		if (i == 4)
			conf_err(x, it, "%s is not GET, POST, PUT or DELETE", show(s, it->len).s);
		else if (bits & (1u << i))
			conf_err(x, it, "%s is listed twice", mnames[i]);
		bits |= i < 4 ? 1u << i : 0;
	}
	if (bits == 0 && n->nkids == 0)
		conf_err(x, n, "needs at least one of GET, POST, PUT or DELETE");
	*out = bits;	/* bit i is 1 << i: the same order as enum conf_method */
}

static void route_option(struct cctx *x, const struct cnode **v, struct conf_route *r)
{
	static const int qos[] = { 0, 1, 2 };
	const char *s;

	if (v[2])
		route_methods(x, v[2], &r->methods);
	if (v[3])
		get_choice(x, v[3], qos, 3, "0, 1 or 2", &r->qos);
	if (v[4])
		get_bool(x, v[4], &r->retain);
	if (v[5] && (s = scalar(x, v[5], "stored or broker")) != NULL) {
		if (strcmp(s, "stored") == 0)
			r->ack = CONF_ACK_STORED;
		else if (strcmp(s, "broker") == 0)
			r->ack = CONF_ACK_BROKER;
		else
			conf_err(x, v[5], "%s is not stored or broker", show(s, v[5]->len).s);
	}
	if (r->ack == CONF_ACK_BROKER && r->qos == 0)
		conf_err(x, v[5], "broker needs qos 1 or 2 (a qos 0 publish is never acknowledged)");
}

/* Compiles path + topic; reports route_compile's reason at the node it names. */
static bool route_build(struct cctx *x, const struct cnode **v, struct conf_route *r)
{
	char err[256] = "";

	r->route = route_compile(r->path, r->topic, err, sizeof(err));
	if (r->route != NULL)
		return true;
	if (strncmp(err, "topic ", 6) == 0)
		conf_err(x, v[1], "%s", err + 6);
	else
		conf_err(x, v[0], "%s", strncmp(err, "path ", 5) == 0 ? err + 5 : err);
	return false;
}

static int route_append(struct cctx *x, struct conf_route *r, const struct cnode *pathnode)
{
	struct config *c = x->c;

	if (c->n_routes == x->route_cap) {
		size_t cap = x->route_cap ? 2 * x->route_cap : 16;
		struct conf_route *nv = realloc(c->routes, cap * sizeof(*nv));
		const struct cnode **nn;

		if (nv == NULL)
			return -1;
		c->routes = nv;
		nn = realloc(x->route_node, cap * sizeof(*nn));
		if (nn == NULL)
			return -1;
		x->route_node = nn;
		x->route_cap = cap;
	}
	x->route_node[c->n_routes] = pathnode;
	c->routes[c->n_routes++] = *r;
	return 0;
}

static void conf_route(struct cctx *x, const struct cnode *n)
{
	static const char *const names[] = { "path", "topic", "methods", "qos", "retain", "ack", NULL };
	const struct cnode *v[7];
	struct conf_route r = { .methods = CONF_M_POST | CONF_M_PUT, .qos = 1, .ack = CONF_ACK_STORED,
				.line = n->line };
	int before = x->nerr;

	if (!want_type(x, n, CN_MAP) || !conf_fields(x, n, names, v))
		return;
	if (v[0] == NULL)
		conf_err(x, n, "path is required");
	if (v[1] == NULL)
		conf_err(x, n, "topic is required");
	if (v[0])
		get_str(x, v[0], CONF_MAX_STR, &r.path);
	if (v[1])
		get_str(x, v[1], CONF_MAX_STR, &r.topic);
	route_option(x, v, &r);
	if (r.path && r.topic && route_build(x, v, &r) && x->nerr == before) {
		if (route_append(x, &r, v[0]) == 0)
			return;
		conf_oom(x);
	}
	route_free(r.route);
	free(r.path);
	free(r.topic);
}

static int route_cmp(const void *a, const void *b)
{
	const struct conf_route *ra = *(const struct conf_route *const *)a;
	const struct conf_route *rb = *(const struct conf_route *const *)b;
	int c = strcmp(ra->path, rb->path);

	return c ? c : (ra->line > rb->line) - (ra->line < rb->line);
}

/* Reports every route whose path repeats an earlier route's path (sorted: O(n log n)). */
static void route_dups(struct cctx *x)
{
	struct config *c = x->c;
	struct conf_route **s = ccalloc(x, c->n_routes, sizeof(*s));
	size_t i, first = 0;

	if (s == NULL)
		return;
	for (i = 0; i < c->n_routes; i++)
		s[i] = &c->routes[i];
	qsort(s, c->n_routes, sizeof(*s), route_cmp);
	for (i = 1; i < c->n_routes; i++) {
		if (strcmp(s[i]->path, s[first]->path) != 0) {
			first = i;
			continue;
		}
		conf_err(x, x->route_node[s[i] - c->routes], "%s is already routed at line %d",
			 show(s[i]->path, strlen(s[i]->path)).s, s[first]->line);
	}
	free(s);
}

static void conf_routes(struct cctx *x, const struct cnode *n)
{
	const struct cnode *it;

	if (n == NULL || !want_type(x, n, CN_SEQ))
		return;
	for (it = kid(x, n); it; it = sib(x, it))
		conf_route(x, it);
	route_dups(x);
}

/* ---- observe ---- */

/* A resource path on a device: no leading '/', no empty segment, each segment fit for a topic. */
static bool observe_path(struct cctx *x, const struct cnode *n, struct conf_observe *o)
{
	struct route_seg seg[ROUTE_MAX_SEGMENTS];
	size_t nseg, i;

	if (!get_str(x, n, ROUTE_MAX_VALUE, &o->path))
		return false;
	if (o->path[0] == '/') {
		conf_err(x, n, "must not start with '/' (write \"temperature\" or \"a/b\")");
		return false;
	}
	nseg = route_split(o->path, n->len, seg, ROUTE_MAX_SEGMENTS);
	if (nseg == 0) {
		conf_err(x, n, "has more than %d segments", ROUTE_MAX_SEGMENTS);
		return false;
	}
	for (i = 0; i < nseg; i++) {
		if (seg[i].len == 0) {
			conf_err(x, n, "has an empty segment (between two '/' or at the end)");
			return false;
		}
		if (!route_value_ok(seg[i].s, seg[i].len)) {
			conf_err(x, n, "segment %s is not valid in an MQTT topic (UTF-8 without '+', '#' or "
				 "control characters)", show(seg[i].s, seg[i].len).s);
			return false;
		}
	}
	return true;
}

/* discover: true or path, exactly one; match only with discover. */
static void observe_what(struct cctx *x, const struct cnode *n, const struct cnode **v,
			 struct conf_observe *o)
{
	bool disc_ok = v[2] == NULL || get_bool(x, v[2], &o->discover);

	if (v[1] && o->discover)
		conf_err(x, v[2], "give path or discover: true, not both");
	else if (!v[1] && !o->discover && disc_ok)
		conf_err(x, n, "path or discover: true is required");
	if (v[1] && !o->discover)
		observe_path(x, v[1], o);
	if (v[3] && !o->discover && disc_ok)
		conf_err(x, v[3], "only with discover: true (it filters the discovered resources)");
	else if (v[3] && o->discover)
		get_str(x, v[3], CONF_MAX_STR, &o->match);
}

static void observe_rule(struct cctx *x, const struct cnode *n, struct conf_observe *o)
{
	static const char *const names[] = { "devices", "path", "discover", "match", "topic", "qos",
					     "retain", NULL };
	static const int qos[] = { 0, 1, 2 };
	const struct cnode *v[8];
	char err[256] = "";

	*o = (struct conf_observe){ .line = n->line };
	if (!want_type(x, n, CN_MAP) || !conf_fields(x, n, names, v))
		return;
	if (v[0])
		get_str(x, v[0], CONF_MAX_STR, &o->devices);
	else
		o->devices = cstrdup(x, "*");
	observe_what(x, n, v, o);
	if (v[4] == NULL)
		conf_err(x, n, "topic is required");
	else if (get_str(x, v[4], CONF_MAX_STR, &o->topic) &&
		 (o->route = route_compile2("{path+}", o->topic, 0, err, sizeof(err))) == NULL)
		conf_err(x, v[4], "%s", strncmp(err, "topic ", 6) == 0 ? err + 6 : err);
	if (v[5])
		get_choice(x, v[5], qos, 3, "0, 1 or 2", &o->qos);
	if (v[6])
		get_bool(x, v[6], &o->retain);
}

static void conf_observes(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	const struct cnode *it;

	if (n == NULL || !want_type(x, n, CN_SEQ) || n->nkids == 0)
		return;
	c->observe = ccalloc(x, n->nkids, sizeof(*c->observe));
	if (c->observe == NULL)
		return;
	for (it = kid(x, n); it; it = sib(x, it))
		observe_rule(x, it, &c->observe[c->n_observe++]);
}

/* ---- commands ---- */

static bool is_var_level(const struct route_seg *l)
{
	return l->len >= 2 && l->s[0] == '{' && l->s[l->len - 1] == '}';
}

static bool is_rest_level(const struct route_seg *l)
{
	return is_var_level(l) && l->len >= 3 && l->s[l->len - 2] == '+';
}

/* Checks the levels of a command topic (literals without wildcards, a {identity} level, a {name+}
 * level last) and builds its subscription filter: {x} → +, {x+} → #. The braces themselves are
 * checked by route_compile2 afterwards. */
static bool command_levels(struct cctx *x, const struct cnode *n, struct conf_command *cmd)
{
	struct route_seg lv[ROUTE_MAX_SEGMENTS];
	size_t nl = route_split(cmd->topic, strlen(cmd->topic), lv, ROUTE_MAX_SEGMENTS), i, pos = 0;
	bool identity = false;

	if (nl == 0) {
		conf_err(x, n, "has more than %d levels", ROUTE_MAX_SEGMENTS);
		return false;
	}
	for (i = 0; i < nl; i++) {
		const struct route_seg *l = &lv[i];

		if (!is_var_level(l) && (memchr(l->s, '+', l->len) || memchr(l->s, '#', l->len))) {
			conf_err(x, n, "must not contain '+' or '#' (MQTT wildcards; write {name} for one "
				 "level, {name+} for the rest)");
			return false;
		}
		if (!is_var_level(l) && l->len > 0 && !route_value_ok(l->s, l->len)) {
			conf_err(x, n, "level %s is not valid UTF-8", show(l->s, l->len).s);
			return false;
		}
		identity |= lv[i].len == 10 && memcmp(lv[i].s, "{identity}", 10) == 0;
	}
	if (!identity) {
		conf_err(x, n, "must contain a {identity} level (the device the command goes to)");
		return false;
	}
	if (!is_rest_level(&lv[nl - 1])) {
		conf_err(x, n, "must end with a {name+} level (the resource path, e.g. {path+})");
		return false;
	}
	if ((cmd->filter = ccalloc(x, strlen(cmd->topic) + 1, 1)) == NULL)
		return false;
	for (i = 0; i < nl; i++) {
		if (i > 0)
			cmd->filter[pos++] = '/';
		if (is_var_level(&lv[i])) {
			cmd->filter[pos++] = is_rest_level(&lv[i]) ? '#' : '+';
		} else {
			memcpy(cmd->filter + pos, lv[i].s, lv[i].len);
			pos += lv[i].len;
		}
	}
	return true;
}

/* Compiles topic (as the pattern) + response_topic or topic; v: topic, method, response_topic. */
static void command_route(struct cctx *x, const struct cnode **v, struct conf_command *cmd)
{
	char err[256] = "";

	cmd->route = route_compile2(cmd->topic, cmd->response_topic ? cmd->response_topic : cmd->topic,
				    ROUTE_IDENTITY_VAR, err, sizeof(err));
	if (cmd->route != NULL)
		return;
	if (strncmp(err, "topic ", 6) == 0)
		conf_err(x, cmd->response_topic ? v[2] : v[0], "%s", err + 6);
	else
		conf_err(x, v[0], "%s", strncmp(err, "path ", 5) == 0 ? err + 5 : err);
}

static void command_method(struct cctx *x, const struct cnode *n, unsigned *out)
{
	static const char *const mnames[] = { "GET", "POST", "PUT", "DELETE" };
	const char *s = scalar(x, n, "one method");
	unsigned i;

	if (s == NULL)
		return;
	for (i = 0; i < 4 && strcasecmp(s, mnames[i]) != 0; i++)
		;
	if (i == 4)
		conf_err(x, n, "%s is not GET, POST, PUT or DELETE", show(s, n->len).s);
	else
		*out = 1u << i;	/* the same order as enum conf_method */
}

/* nodes[0..1]: the topic and response_topic nodes, for the checks across commands. */
static void command_rule(struct cctx *x, const struct cnode *n, struct conf_command *cmd,
			 const struct cnode **nodes)
{
	static const char *const names[] = { "topic", "method", "response_topic", "ttl", "qos", NULL };
	static const int qos[] = { 0, 1, 2 };
	const struct cnode *v[6];
	long long ll;
	bool ok = false;

	*cmd = (struct conf_command){ .method = CONF_M_PUT, .ttl = 30, .qos = 1, .line = n->line };
	if (!want_type(x, n, CN_MAP) || !conf_fields(x, n, names, v))
		return;
	nodes[0] = v[0];
	nodes[1] = v[2];
	if (v[0] == NULL)
		conf_err(x, n, "topic is required");
	else if (get_str(x, v[0], CONF_MAX_STR, &cmd->topic))
		ok = command_levels(x, v[0], cmd);
	if (v[1])
		command_method(x, v[1], &cmd->method);
	if (v[2] && !get_str(x, v[2], CONF_MAX_STR, &cmd->response_topic))
		ok = false;
	if (ok)
		command_route(x, v, cmd);
	if (v[3] && get_int(x, v[3], 0, 86400, &ll))
		cmd->ttl = (unsigned)ll;
	if (v[4])
		get_choice(x, v[4], qos, 3, "0, 1 or 2", &cmd->qos);
}

static int command_cmp(const void *a, const void *b)
{
	const struct conf_command *ca = *(const struct conf_command *const *)a;
	const struct conf_command *cb = *(const struct conf_command *const *)b;
	int c = strcmp(ca->filter, cb->filter);

	return c ? c : (ca->line > cb->line) - (ca->line < cb->line);
}

/* Two commands on one subscription filter would both take every message: reported (sorted). */
static void command_dups(struct cctx *x, const struct cnode **nodes)
{
	struct config *c = x->c;
	struct conf_command **s = ccalloc(x, c->n_commands, sizeof(*s));
	size_t i, n = 0, first = 0;

	if (s == NULL)
		return;
	for (i = 0; i < c->n_commands; i++)
		if (c->commands[i].route != NULL)
			s[n++] = &c->commands[i];
	qsort(s, n, sizeof(*s), command_cmp);
	for (i = 1; i < n; i++) {
		if (strcmp(s[i]->filter, s[first]->filter) != 0) {
			first = i;
			continue;
		}
		conf_err(x, nodes[2 * (size_t)(s[i] - c->commands)], "subscribes to %s like the command at "
			 "line %d", show(s[i]->filter, strlen(s[i]->filter)).s, s[first]->line);
	}
	free(s);
}

/* 1 when MQTT filter f matches topic t ('+' one level, '#' the rest, zero levels included). */
static bool filter_matches(const char *f, const char *t)
{
	for (;;) {
		size_t fl = strcspn(f, "/"), tl = strcspn(t, "/");

		if (fl == 1 && f[0] == '#')
			return true;
		if (!(fl == 1 && f[0] == '+') && (fl != tl || memcmp(f, t, fl) != 0))
			return false;
		if (f[fl] == '\0' || t[tl] == '\0')
			return f[fl] == t[tl] || strcmp(f + fl, "/#") == 0;
		f += fl + 1;
		t += tl + 1;
	}
}

/* A response_topic that some command filter takes in again would feed the gateway's answers back
 * to devices. Checked on a sample with "{}" for every value: no literal level may hold braces,
 * so a value never equals a literal level by accident. */
static void command_loops(struct cctx *x, const struct cnode **nodes)
{
	struct config *c = x->c;
	struct route_seg lv[ROUTE_MAX_SEGMENTS], id;
	char sample[ROUTE_MAX_TOPIC];
	size_t i, j, k, nl;

	for (i = 0; i < c->n_commands; i++) {
		const struct conf_command *cmd = &c->commands[i];

		if (cmd->route == NULL || cmd->response_topic == NULL)
			continue;
		nl = route_split(cmd->topic, strlen(cmd->topic), lv, ROUTE_MAX_SEGMENTS);
		for (k = 0; k < nl; k++)
			if (is_var_level(&lv[k]))
				lv[k] = (struct route_seg){ "{}", 2 };
		if (route_match_id(cmd->route, lv, nl, &id, sample, sizeof(sample)) != ROUTE_OK)
			continue;
		for (j = 0; j < c->n_commands; j++) {
			if (c->commands[j].route == NULL || !filter_matches(c->commands[j].filter, sample))
				continue;
			conf_err(x, nodes[2 * i + 1], "would come back in as a command (it fits %s, the "
				 "topic of line %d)", show(c->commands[j].filter,
				 strlen(c->commands[j].filter)).s, c->commands[j].line);
			break;
		}
	}
}

static void conf_commands(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	const struct cnode *it, **nodes;

	if (n == NULL || !want_type(x, n, CN_SEQ) || n->nkids == 0)
		return;
	if (n->nkids > CONF_MAX_COMMANDS) {
		conf_err(x, n, "more than %d entries (each one is a subscription)", CONF_MAX_COMMANDS);
		return;
	}
	c->commands = ccalloc(x, n->nkids, sizeof(*c->commands));
	nodes = ccalloc(x, 2 * n->nkids, sizeof(*nodes));	/* topic, response_topic per command */
	if (c->commands == NULL || nodes == NULL) {
		free(nodes);
		return;
	}
	for (it = kid(x, n); it; it = sib(x, it)) {
		command_rule(x, it, &c->commands[c->n_commands], &nodes[2 * c->n_commands]);
		c->n_commands++;
	}
	command_dups(x, nodes);
	command_loops(x, nodes);
	free(nodes);
}

/* ---- presence, metrics ---- */

static void conf_presence(struct cctx *x, const struct cnode *n)
{
	struct config *c = x->c;
	char err[256] = "", *but;

	if (n == NULL || is_null(n) || !get_str(x, n, CONF_MAX_STR, &c->presence_topic))
		return;
	c->presence_route = route_compile2("", c->presence_topic, 0, err, sizeof(err));
	if (c->presence_route == NULL && strncmp(err, "topic uses ", 11) == 0 &&
	    (but = strstr(err, " but the path has no ")) != NULL)
		conf_err(x, n, "%.*s (only {identity} is available here)", (int)(but - err - 6), err + 6);
	else if (c->presence_route == NULL)
		conf_err(x, n, "%s", strncmp(err, "topic ", 6) == 0 ? err + 6 : err);
	else if (!route_uses_var(c->presence_route, "identity"))
		conf_err(x, n, "must contain {identity} (else every device would share one retained topic)");
}

static void conf_metrics(struct cctx *x, const struct cnode *n)
{
	static const char *const names[] = { "listen", "topic", "interval", NULL };
	const struct cnode *v[4];
	struct conf_metrics *mt = &x->c->metrics;
	const char *why;
	long long ll;

	mt->interval = 60;
	if (!conf_fields(x, n, names, v))
		return;
	if (v[0] && !is_null(v[0]) && get_str(x, v[0], CONF_MAX_STR, &mt->listen) &&
	    (why = parse_hostport(mt->listen, true, NULL, NULL)) != NULL)
		conf_err(x, v[0], "%s is not HOST:PORT or [IPv6]:PORT (%s)", show(mt->listen, v[0]->len).s,
			 why);
	if (v[1] && !is_null(v[1]))
		get_topic(x, v[1], &mt->topic);
	if (v[2] && get_int(x, v[2], 1, 86400, &ll))
		mt->interval = (unsigned)ll;
}

/* ---- top level ---- */

static void conf_log_level(struct cctx *x, const struct cnode *n)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	static const int levels[] = { LOG_LVL_ERROR, LOG_LVL_WARNING, LOG_LVL_INFO, LOG_LVL_DEBUG };
	const char *s = scalar(x, n, "a log level");
	size_t i;

	if (s == NULL)
		return;
	for (i = 0; i < 4; i++) {
		if (strcmp(s, names[i]) == 0) {
			x->c->log_level = levels[i];
			return;
		}
	}
	conf_err(x, n, "%s is not error, warning, info or debug", show(s, n->len).s);
}

static void conf_top(struct cctx *x)
{
	static const char *const names[] = { "log_level", "coap", "devices", "devices_file", "mqtt",
					     "routes", "observe", "commands", "presence_topic", "metrics",
					     NULL };
	const struct cnode *v[11], *root = x->nnode ? &x->node[0] : NULL;

	x->c->log_level = LOG_LVL_INFO;
	if (root && !is_null(root) && root->type != CN_MAP && root->type != CN_BAD) {
		conf_err(x, root, "the top level must be a mapping (log_level:, coap:, mqtt:, ...), found %s",
			 type_name(root->type));
		return;
	}
	conf_fields(x, root, names, v);
	if (v[0])
		conf_log_level(x, v[0]);
	conf_coap(x, v[1]);
	conf_devices(x, v[2]);
	conf_devices_file(x, v[3]);
	conf_mqtt(x, v[4], root);
	conf_routes(x, v[5]);
	conf_observes(x, v[6]);
	conf_commands(x, v[7]);
	conf_presence(x, v[8]);
	conf_metrics(x, v[9]);
}

static char *dir_of(const char *path)
{
	const char *slash = strrchr(path, '/');

	if (slash == NULL)
		return NULL;
	return strndup(path, slash == path ? 1 : (size_t)(slash - path));
}

struct config *conf_load(const char *path, FILE *errs)
{
	struct cctx x = { .file = path, .errs = errs };
	unsigned char *buf = NULL;
	size_t len = 0;

	if (path == NULL)
		return NULL;
	x.c = calloc(1, sizeof(*x.c));
	if (x.c == NULL || (x.c->file = strdup(path)) == NULL) {
		if (errs)
			fprintf(errs, "%s: out of memory\n", path);
		free(x.c);
		return NULL;
	}
	x.dir = dir_of(path);
	if (read_file(&x, &buf, &len) == 0 && tree_build(&x, buf, len) == 0)
		conf_top(&x);
	conf_flush(&x);
	if (buf)
		explicit_bzero(buf, len);
	free(buf);
	tree_free(&x);
	free(x.dev_node);
	free(x.route_node);
	free(x.dir);
	if (x.nerr > 0) {
		conf_free(x.c);
		return NULL;
	}
	return x.c;
}

static void free_strv(char **v, size_t n)
{
	size_t i;

	for (i = 0; v && i < n; i++)
		free(v[i]);
	free(v);
}

void conf_free(struct config *c)
{
	size_t i;

	if (c == NULL)
		return;
	free_strv(c->coap.listen, c->coap.n_listen);
	free_strv(c->coap.ciphers, c->coap.n_ciphers);
	free(c->coap.psk_hint);
	for (i = 0; i < c->n_devices; i++)
		key_entry_clear(&c->devices[i]);
	free(c->devices);
	free(c->devices_file);
	for (i = 0; i < c->n_routes; i++) {
		route_free(c->routes[i].route);
		free(c->routes[i].path);
		free(c->routes[i].topic);
	}
	free(c->routes);
	for (i = 0; i < c->n_observe; i++) {
		route_free(c->observe[i].route);
		free(c->observe[i].devices);
		free(c->observe[i].path);
		free(c->observe[i].match);
		free(c->observe[i].topic);
	}
	free(c->observe);
	for (i = 0; i < c->n_commands; i++) {
		route_free(c->commands[i].route);
		free(c->commands[i].topic);
		free(c->commands[i].filter);
		free(c->commands[i].response_topic);
	}
	free(c->commands);
	route_free(c->presence_route);
	free(c->presence_topic);
	free(c->metrics.listen);
	free(c->metrics.topic);
	free(c->mqtt.url);
	free(c->mqtt.host);
	free(c->mqtt.client_id);
	free(c->mqtt.ca_file);
	free(c->mqtt.cert_file);
	free(c->mqtt.key_file);
	free(c->mqtt.username);
	if (c->mqtt.password)
		explicit_bzero(c->mqtt.password, strlen(c->mqtt.password));
	free(c->mqtt.password);
	free(c->mqtt.persistence_dir);
	free(c->mqtt.status_topic);
	free(c->file);
	free(c);
}
