/* conftree.h: the generic half of reading the configuration file. The file becomes a tree of nodes
 * that know their line and column; typed getters check a node and report what is wrong with it as
 * "FILE:LINE:COL: KEY: message"; the messages come out sorted by position. config.c holds the
 * schema. Only libyaml and libc below; never logs. */
#ifndef C2M_CONFTREE_H
#define C2M_CONFTREE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONF_MAX_FILE (4 * 1024 * 1024)	/* bytes */
#define CONF_MAX_DEPTH 16			/* nested lists / mappings */
#define CONF_MAX_ERRORS 200			/* messages kept and printed; the rest are counted */
#define CONF_MAX_STR 4096			/* bytes in a string value */
#define CONF_NONE SIZE_MAX

enum cn_type { CN_SCALAR, CN_SEQ, CN_MAP, CN_BAD };

/* One YAML node. Children form a list by index (first/next) inside ctree.node; a mapping's
 * children alternate key, value. key names the mapping key this node belongs to, for messages. */
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

/* A file being read. The caller sets file, dir, errs and max_items; the rest starts zeroed. */
struct ctree {
	const char *file;
	char *dir;		/* directory of file, NULL when relative paths need no prefix */
	FILE *errs;		/* where messages go; NULL: only counted */
	size_t max_items;	/* entries in one list (twice that in a mapping) */
	int nerr;		/* errors found */
	int nprinted;		/* errors ct_file_err printed at once, not kept */
	struct cmsg msg[CONF_MAX_ERRORS];
	size_t nmsg;
	struct cnode *node;	/* node 0 is the root when nnode > 0 */
	size_t nnode, capnode;
};

/* A value from the file, quoted, shortened and with control bytes replaced, for messages. */
struct shown {
	char s[64];
};

/* ---- messages: each one counts as an error ---- */

/* At n, prefixed with the key n belongs to. */
void conf_err(struct ctree *x, const struct cnode *n, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* At n, prefixed with key. */
void conf_errk(struct ctree *x, const struct cnode *n, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void conf_at(struct ctree *x, int line, int col, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));
/* Out of memory: an error, so that no half-built configuration is ever returned. */
void conf_oom(struct ctree *x);
/* Prints the kept messages in file order (and how many more there were) and frees them. */
void conf_flush(struct ctree *x);
/* Keeps text (malloc'd, the whole line; freed here) at line:col without counting an error: for
 * messages of a parser that counts its own. */
void ct_keep(struct ctree *x, int line, int col, char *text);
/* About the whole file ("FILE: message"), printed at once. */
void ct_file_err(struct ctree *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
struct shown ct_show(const char *s, size_t len);
char *ct_strdup(struct ctree *x, const char *s);
void *ct_calloc(struct ctree *x, size_t n, size_t size);

/* ---- the tree ---- */

/* Reads x->file (a regular file of at most CONF_MAX_FILE bytes) into *buf; -1 after reporting. */
int ct_read(struct ctree *x, unsigned char **buf, size_t *len);
/* Parses buf into x->node (one document, no aliases, at most CONF_MAX_DEPTH levels and
 * x->max_items entries per list); -1 after a reported error. */
int ct_parse(struct ctree *x, const unsigned char *buf, size_t len);
/* Frees the nodes (scalars are wiped first: they may hold keys). */
void ct_free(struct ctree *x);
/* First child and next sibling, NULL at the end. */
const struct cnode *ct_kid(const struct ctree *x, const struct cnode *n);
const struct cnode *ct_sib(const struct ctree *x, const struct cnode *n);

/* ---- typed values: true with *out set, or false after reporting at the node ---- */

const char *ct_type_name(enum cn_type t);
/* 0 with *out set; -1 when s is not a decimal integer; 1 when it overflows. */
int ct_parse_ll(const char *s, long long *out);
/* An empty value, ~ or null. */
bool ct_is_null(const struct cnode *n);
/* n has type t (an empty value counts as an empty list or mapping). */
bool ct_want(struct ctree *x, const struct cnode *n, enum cn_type t);
/* The scalar text of n (what names the expected value for the message), or NULL. */
const char *ct_scalar(struct ctree *x, const struct cnode *n, const char *what);
bool ct_int(struct ctree *x, const struct cnode *n, long long min, long long max, long long *out);
/* An integer that must be one of allowed[0..nallowed); choices spells them out for the message. */
bool ct_choice(struct ctree *x, const struct cnode *n, const int *allowed, size_t nallowed,
	       const char *choices, int *out);
/* One of names[0..count) (ignoring case when fold); *out is its index. what names the expected
 * value for the message when n is not a single value. */
bool ct_enum(struct ctree *x, const struct cnode *n, const char *what, const char *const *names,
	     size_t count, bool fold, int *out);
bool ct_bool(struct ctree *x, const struct cnode *n, bool *out);
/* A non-empty string without control characters, at most max bytes; *out is replaced. */
bool ct_str(struct ctree *x, const struct cnode *n, size_t max, char **out);
/* s made absolute against the file's directory (relative paths are relative to it); NULL: no
 * memory. */
char *ct_resolve(const struct ctree *x, const char *s);
/* A path, made absolute like ct_resolve. */
bool ct_path(struct ctree *x, const struct cnode *n, char **out);
/* A file to read: like ct_path, and "$CREDENTIALS_DIRECTORY/NAME" names a file passed by
 * systemd's LoadCredential= (the variable then must be set). */
bool ct_file(struct ctree *x, const struct cnode *n, char **out);
/* Collects the values of a mapping's known keys into val[] (NULL when absent); reports unknown
 * and repeated keys. names[] is NULL-terminated. false when n is not a mapping. */
bool ct_fields(struct ctree *x, const struct cnode *n, const char *const *names,
	       const struct cnode **val);

#endif
