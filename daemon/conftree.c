/* conftree.c: the configuration file as a tree of positioned nodes (libyaml's events), typed
 * getters and "FILE:LINE:COL: KEY: message" errors in file order. See conftree.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero, asprintf */
#endif
#include "conftree.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#define CRED_PREFIX "$CREDENTIALS_DIRECTORY/"	/* systemd LoadCredential= folder */

/* ---- messages ---- */

/* Keeps one message; text is the whole line without the newline. */
void ct_keep(struct ctree *x, int line, int col, char *text)
{
	if (text == NULL || x->nmsg == CONF_MAX_ERRORS) {
		free(text);
		return;
	}
	x->msg[x->nmsg] = (struct cmsg){ line, col, x->nmsg, text };
	x->nmsg++;
}

static void conf_vmsg(struct ctree *x, int line, int col, const char *key, const char *fmt, va_list ap)
{
	char what[1024], *text;

	x->nerr++;
	if (x->errs == NULL || x->nmsg == CONF_MAX_ERRORS)
		return;
	vsnprintf(what, sizeof(what), fmt, ap);
	if (asprintf(&text, "%s:%d:%d: %s%s%s", x->file, line, col, key ? key : "", key ? ": " : "",
		     what) < 0)
		text = NULL;
	ct_keep(x, line, col, text);
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
void conf_flush(struct ctree *x)
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

void conf_errk(struct ctree *x, const struct cnode *n, const char *key, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, n ? n->line : 1, n ? n->col : 1, key, fmt, ap);
	va_end(ap);
}

/* Reports at n, prefixed with the key n belongs to. */
void conf_err(struct ctree *x, const struct cnode *n, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, n ? n->line : 1, n ? n->col : 1, n ? n->key : NULL, fmt, ap);
	va_end(ap);
}

void conf_at(struct ctree *x, int line, int col, const char *key, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	conf_vmsg(x, line, col, key, fmt, ap);
	va_end(ap);
}

/* A value from the file, quoted, shortened and with control bytes replaced, for messages. */
struct shown ct_show(const char *s, size_t len)
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
void conf_oom(struct ctree *x)
{
	conf_at(x, 1, 1, NULL, "out of memory");
}

char *ct_strdup(struct ctree *x, const char *s)
{
	char *d = strdup(s);

	if (d == NULL)
		conf_oom(x);
	return d;
}

void *ct_calloc(struct ctree *x, size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size);

	if (p == NULL)
		conf_oom(x);
	return p;
}

/* ---- tree building from libyaml events ---- */

const struct cnode *ct_kid(const struct ctree *x, const struct cnode *n)
{
	return n->first == CONF_NONE ? NULL : &x->node[n->first];
}

const struct cnode *ct_sib(const struct ctree *x, const struct cnode *n)
{
	return n->next == CONF_NONE ? NULL : &x->node[n->next];
}

/* Adds a node for event ev under parent (CONF_NONE for the root); returns its index or CONF_NONE. */
static size_t tree_add(struct ctree *x, size_t parent, enum cn_type type, const yaml_mark_t *mark)
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

static int tree_scalar(struct ctree *x, size_t parent, const yaml_event_t *ev)
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

void ct_free(struct ctree *x)
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

static void syntax_error(struct ctree *x, const yaml_parser_t *p, const unsigned char *buf, size_t len)
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
static int tree_open(struct ctree *x, struct tstack *st, enum cn_type type, const yaml_event_t *ev)
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
static int tree_count(struct ctree *x, const struct tstack *st)
{
	const struct cnode *p;

	if (st->depth == 0)
		return 0;
	p = &x->node[st->idx[st->depth - 1]];
	if (p->nkids < (p->type == CN_MAP ? 2 * x->max_items : x->max_items))
		return 0;
	conf_err(x, p, "more than %zu entries", x->max_items);
	return -1;
}

/* Handles one event; returns 1 at the end of the stream, 0 to go on, -1 to stop. */
static int tree_event(struct ctree *x, struct tstack *st, const yaml_event_t *ev, int *docs)
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
int ct_parse(struct ctree *x, const unsigned char *buf, size_t len)
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

void ct_file_err(struct ctree *x, const char *fmt, ...)
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
static int read_all(struct ctree *x, int fd, unsigned char **buf, size_t *len)
{
	ssize_t r = 0;

	*buf = malloc(CONF_MAX_FILE + 1);
	if (*buf == NULL) {
		ct_file_err(x, "out of memory");
		return -1;
	}
	while (*len <= CONF_MAX_FILE && (r = read(fd, *buf + *len, CONF_MAX_FILE + 1 - *len)) > 0)
		*len += (size_t)r;
	if (r < 0) {
		ct_file_err(x, "read error: %s", strerror(errno));
		return -1;
	}
	if (*len > CONF_MAX_FILE) {
		ct_file_err(x, "larger than 4 MiB (at most %d bytes)", CONF_MAX_FILE);
		return -1;
	}
	return 0;
}

/* Reads the configuration file into *buf; -1 after reporting. */
int ct_read(struct ctree *x, unsigned char **buf, size_t *len)
{
	int fd = open(x->file, O_RDONLY | O_CLOEXEC), rc = -1;
	struct stat st;

	*buf = NULL;
	*len = 0;
	if (fd < 0) {
		ct_file_err(x, "cannot open: %s", strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0)
		ct_file_err(x, "cannot stat: %s", strerror(errno));
	else if (!S_ISREG(st.st_mode))
		ct_file_err(x, "not a regular file");
	else if (st.st_size > CONF_MAX_FILE)
		ct_file_err(x, "larger than 4 MiB (at most %d bytes)", CONF_MAX_FILE);
	else
		rc = read_all(x, fd, buf, len);
	close(fd);
	return rc;
}

/* ---- typed values ---- */

const char *ct_type_name(enum cn_type t)
{
	switch (t) {
	case CN_SCALAR:	return "a single value";
	case CN_SEQ:	return "a list";
	case CN_MAP:	return "a mapping";
	case CN_BAD:	return "an alias";
	}
	return "?";
}

bool ct_is_null(const struct cnode *n)
{
	return n->type == CN_SCALAR && n->plain &&
	       (n->len == 0 || strcmp(n->val, "~") == 0 || strcmp(n->val, "null") == 0 ||
		strcmp(n->val, "Null") == 0 || strcmp(n->val, "NULL") == 0);
}

/* true when n has type t (an empty value counts as an empty list or mapping); reports otherwise. */
bool ct_want(struct ctree *x, const struct cnode *n, enum cn_type t)
{
	if (n->type == t || ct_is_null(n))
		return true;
	if (n->type != CN_BAD)
		conf_err(x, n, "expected %s, found %s", ct_type_name(t), ct_type_name(n->type));
	return false;
}

/* The scalar text of n, or NULL after reporting why there is none. */
const char *ct_scalar(struct ctree *x, const struct cnode *n, const char *what)
{
	if (n->type == CN_BAD)
		return NULL;
	if (n->type != CN_SCALAR) {
		conf_err(x, n, "expected %s, found %s", what, ct_type_name(n->type));
		return NULL;
	}
	if (ct_is_null(n)) {
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
int ct_parse_ll(const char *s, long long *out)
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

bool ct_int(struct ctree *x, const struct cnode *n, long long min, long long max, long long *out)
{
	const char *s = ct_scalar(x, n, "an integer");
	long long v = 0;
	int rc;

	if (s == NULL)
		return false;
	rc = ct_parse_ll(s, &v);
	if (rc < 0) {
		conf_err(x, n, "%s is not an integer (%lld..%lld)", ct_show(s, n->len).s, min, max);
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
bool ct_choice(struct ctree *x, const struct cnode *n, const int *allowed, size_t nallowed,
	       const char *choices, int *out)
{
	const char *s = ct_scalar(x, n, "an integer");
	long long v = 0;
	size_t i;
	int rc;

	if (s == NULL)
		return false;
	rc = ct_parse_ll(s, &v);
	if (rc < 0) {
		conf_err(x, n, "%s is not an integer (%s)", ct_show(s, n->len).s, choices);
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

bool ct_enum(struct ctree *x, const struct cnode *n, const char *what, const char *const *names,
	     size_t count, bool fold, int *out)
{
	const char *s = ct_scalar(x, n, what);
	char choices[256] = "";
	size_t i;

	if (s == NULL)
		return false;
	for (i = 0; i < count; i++) {
		if ((fold ? strcasecmp(s, names[i]) : strcmp(s, names[i])) == 0) {
			*out = (int)i;
			return true;
		}
	}
	for (i = 0; i < count; i++)
		snprintf(choices + strlen(choices), sizeof(choices) - strlen(choices), "%s%s",
			 i == 0 ? "" : i + 1 == count ? " or " : ", ", names[i]);
	conf_err(x, n, "%s is not %s", ct_show(s, n->len).s, choices);
	return false;
}

bool ct_bool(struct ctree *x, const struct cnode *n, bool *out)
{
	const char *s = ct_scalar(x, n, "a boolean");

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
	conf_err(x, n, "%s is not a boolean (true, false, yes or no)", ct_show(s, n->len).s);
	return false;
}

/* A non-empty string without control characters, at most max bytes; *out is replaced. */
bool ct_str(struct ctree *x, const struct cnode *n, size_t max, char **out)
{
	const char *s = ct_scalar(x, n, "a string");
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
	*out = ct_strdup(x, s);
	return *out != NULL;
}

/* s made absolute against the config file's directory (relative paths are relative to it). */
char *ct_resolve(const struct ctree *x, const char *s)
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

bool ct_path(struct ctree *x, const struct cnode *n, char **out)
{
	char *s = NULL;

	if (!ct_str(x, n, CONF_MAX_STR, &s))
		return false;
	free(*out);
	*out = ct_resolve(x, s);
	free(s);
	if (*out == NULL)
		conf_oom(x);
	return *out != NULL;
}

/* A file to read: like get_path, and "$CREDENTIALS_DIRECTORY/NAME" names a file passed by systemd's
 * LoadCredential= (the variable then must be set). */
bool ct_file(struct ctree *x, const struct cnode *n, char **out)
{
	const char *dir;
	char *s = NULL;
	size_t pl = strlen(CRED_PREFIX), dl;
	int rc;

	if (n->type != CN_SCALAR || strncmp(n->val, CRED_PREFIX, pl) != 0)
		return ct_path(x, n, out);
	if (!ct_str(x, n, CONF_MAX_STR, &s))
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

/* ---- mappings ---- */

/* Collects the values of a mapping's known keys into val[] (NULL when absent); reports unknown and
 * repeated keys. names[] is NULL-terminated. Returns false when n is not a mapping. */
bool ct_fields(struct ctree *x, const struct cnode *n, const char *const *names,
	       const struct cnode **val)
{
	const struct cnode *k, *v;
	size_t i;

	for (i = 0; names[i]; i++)
		val[i] = NULL;
	if (n == NULL || ct_is_null(n))
		return true;
	if (!ct_want(x, n, CN_MAP))
		return false;
	for (k = ct_kid(x, n); k && (v = ct_sib(x, k)); k = ct_sib(x, v)) {
		if (k->type != CN_SCALAR) {
			conf_err(x, k, "keys must be plain words, found %s", ct_type_name(k->type));
			continue;
		}
		for (i = 0; names[i] && strcmp(names[i], k->val) != 0; i++)
			;
		if (names[i] == NULL) {
			char allowed[512] = "";

			for (i = 0; names[i]; i++)
				snprintf(allowed + strlen(allowed), sizeof(allowed) - strlen(allowed), "%s%s",
					 i ? ", " : "", names[i]);
			conf_err(x, k, "unknown key %s (allowed: %s)", ct_show(k->val, k->len).s, allowed);
		} else if (val[i] != NULL) {
			conf_err(x, k, "%s given twice (first at line %d)", names[i], val[i]->line);
		} else {
			val[i] = v;
		}
	}
	return true;
}
