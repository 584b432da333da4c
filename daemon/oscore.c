/* oscore.c: OSCORE devices (RFC 8613). Each device of the keys file with an oscore: entry gets a
 * security context of its own in libcoap (deps-patches/libcoap/0026), found by the Recipient ID
 * a request names; a request that verified names its device (0027).
 *
 * A Sender Sequence Number of the gateway must never be used twice under one key, also across a
 * crash (Appendix B.1.1). libcoap asks before each use (0028: a refusal holds the message back);
 * the answer comes from memory: a bound per device, above every number in use, is on disk in
 * the journal directory. When use comes within OSCORE_SEQ_RENEW of it, a new bound
 * OSCORE_SEQ_STEP ahead is written by a thread (temporary file, fsync, rename, fsync of the
 * directory) and takes effect once it is on disk; the loop never waits. At start every bound
 * is raised by a step and written before the first message is protected, so a restart skips
 * at most a step of numbers and reuses none.
 *
 * The replay windows are not written: after a start each device's first request is answered
 * 4.01 with an Echo option and its repeat with that Echo sets the window (Appendix B.1.2,
 * RFC 9175), which libcoap does. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* explicit_bzero */
#endif
#include "oscore.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "hmap.h"
#include "keys.h"
#include "log.h"
#include "wake.h"

#define O_FILE_MAX ((size_t)KEYS_MAX_ENTRIES * (2 * KEYS_MAX_IDENTITY + 24))
#define O_RETRY_S 5		/* after a failed write of the bounds */

struct odev {
	char identity[KEYS_MAX_IDENTITY + 1];
	struct key_oscore k;		/* a copy, wiped when freed */
	uint64_t durable;		/* every number below is covered on disk */
	uint64_t asked;			/* the bound last asked to be written */
	uint64_t stored;		/* the bound read from the file at start (0: none) */
	int live;			/* its context is in libcoap */
	struct log_budget log;
};

/* One write of the whole file: its text and, per device, the bound it carries. */
struct job {
	char *text;
	size_t len;
	char (*ids)[KEYS_MAX_IDENTITY + 1];
	uint64_t *bounds;
	size_t n;
	int err;			/* errno of the write, 0 when on disk */
	const char *op;
};

static struct {
	coap_context_t *ctx;
	char *path, *tmp;
	int dirfd;
	struct hmap *by_id;		/* identity → struct odev */
	struct hmap *stored;		/* identity → bound + 1 (uintptr_t) read at start */
	uint64_t held;
	/* the writer thread */
	pthread_t thread;
	int running;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct job *todo, *done;	/* handed over under mu */
	int stop;
	int busy;			/* a job is out (loop thread's view) */
	int again;			/* a bound was asked for while it was */
	struct wake wake;		/* the writer → the loop */
	struct event *retry_ev;
} O = { .dirfd = -1, .wake = WAKE_INIT };

/* ---- the file ---- */

static void job_free(struct job *j)
{
	if (!j)
		return;
	free(j->text);
	free(j->ids);
	free(j->bounds);
	free(j);
}

/* Writes j->text as the file: a temporary file, fsync, rename, fsync of the directory. */
static void job_write(struct job *j)
{
	int fd = open(O.tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	size_t off = 0;

	j->err = 0;
	if (fd < 0) {
		j->err = errno;
		j->op = "create";
		return;
	}
	while (off < j->len) {
		ssize_t w = write(fd, j->text + off, j->len - off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			j->err = w < 0 ? errno : EIO;
			j->op = "write";
			break;
		}
		off += (size_t)w;
	}
	if (!j->err && fsync(fd) < 0) {
		j->err = errno;
		j->op = "fsync";
	}
	if (close(fd) < 0 && !j->err) {
		j->err = errno;
		j->op = "close";
	}
	if (!j->err && rename(O.tmp, O.path) < 0) {
		j->err = errno;
		j->op = "rename";
	}
	if (!j->err && fsync(O.dirfd) < 0) {
		j->err = errno;
		j->op = "fsync directory";
	}
	if (j->err)
		unlink(O.tmp);
}

static void hex_identity(const char *id, char *out)
{
	static const char hex[] = "0123456789abcdef";
	size_t i;

	for (i = 0; id[i]; i++) {
		out[2 * i] = hex[(unsigned char)id[i] >> 4];
		out[2 * i + 1] = hex[(unsigned char)id[i] & 15];
	}
	out[2 * i] = '\0';
}

struct snap {
	struct job *j;
	size_t cap;
	int oom;
};

static void snap_one(void *val, void *arg)
{
	struct odev *d = val;
	struct snap *s = arg;
	struct job *j = s->j;
	char hid[2 * KEYS_MAX_IDENTITY + 1];
	uint64_t b = d->asked > d->durable ? d->asked : d->durable;
	int len;

	if (s->oom)
		return;
	hex_identity(d->identity, hid);
	len = snprintf(j->text + j->len, s->cap - j->len, "%s %" PRIu64 "\n", hid, b);
	if (len < 0 || (size_t)len >= s->cap - j->len) {
		s->oom = 1;
		return;
	}
	j->len += (size_t)len;
	memcpy(j->ids[j->n], d->identity, sizeof(j->ids[0]));
	j->bounds[j->n++] = b;
}

/* The file as it should be now: every device's bound (the one asked for, if higher). */
static struct job *snapshot(void)
{
	size_t n = hmap_count(O.by_id);
	struct snap s = { calloc(1, sizeof(struct job)), 0, 0 };

	if (!s.j)
		return NULL;
	s.cap = n * (2 * KEYS_MAX_IDENTITY + 24) + 64;
	s.j->text = malloc(s.cap);
	s.j->ids = calloc(n ? n : 1, sizeof(s.j->ids[0]));
	s.j->bounds = calloc(n ? n : 1, sizeof(s.j->bounds[0]));
	if (!s.j->text || !s.j->ids || !s.j->bounds) {
		job_free(s.j);
		return NULL;
	}
	s.j->len = (size_t)snprintf(s.j->text, s.cap, "# coap2mqtt OSCORE sender sequence bounds\n");
	hmap_each(O.by_id, snap_one, &s);
	if (s.oom) {
		job_free(s.j);
		return NULL;
	}
	return s.j;
}

/* The bounds of a job on disk: they now cover what is used. */
static void job_done(struct job *j)
{
	for (size_t i = 0; i < j->n; i++) {
		struct odev *d = hmap_get(O.by_id, j->ids[i], strlen(j->ids[i]));

		if (d && j->bounds[i] > d->durable)
			d->durable = j->bounds[i];
	}
}

/* Reads the file left by the last run into O.stored. A line that is not "HEX NUMBER" is
 * skipped and said once; a missing file is a first start. */
static int read_stored(void)
{
	struct stat st;
	char *buf, *line, *save = NULL;
	size_t len, bad = 0, lineno = 0;
	int fd;

	O.stored = hmap_new();
	if (!O.stored)
		return -1;
	if ((fd = open(O.path, O_RDONLY | O_CLOEXEC)) < 0) {
		if (errno == ENOENT)
			return 0;
		log_error("oscore: cannot read %s: %s", O.path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size > O_FILE_MAX) {
		log_error("oscore: %s is not a regular file of at most %zu bytes", O.path, O_FILE_MAX);
		close(fd);
		return -1;
	}
	len = (size_t)st.st_size;
	if ((buf = malloc(len + 1)) == NULL) {
		close(fd);
		return -1;
	}
	for (size_t off = 0; off < len;) {
		ssize_t r = read(fd, buf + off, len - off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			len = off;
			break;
		}
		off += (size_t)r;
	}
	close(fd);
	buf[len] = '\0';
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char id[KEYS_MAX_IDENTITY + 1], *sp = strchr(line, ' '), *end;
		size_t hl;
		uint64_t b;

		lineno++;
		if (line[0] == '#')
			continue;
		hl = sp ? (size_t)(sp - line) : 0;
		errno = 0;
		b = sp ? strtoull(sp + 1, &end, 10) : 0;
		if (!sp || hl == 0 || hl % 2 || hl / 2 > KEYS_MAX_IDENTITY || errno || *end ||
		    sp[1] < '0' || sp[1] > '9') {
			bad++;
			continue;
		}
		line[hl] = '\0';
		if (keys_decode_hex(line, (uint8_t *)id, KEYS_MAX_IDENTITY, NULL) != (int)(hl / 2) ||
		    memchr(id, '\0', hl / 2)) {
			bad++;
			continue;
		}
		id[hl / 2] = '\0';
		/* stored + 1, so that a bound of 0 is not a missing entry */
		if (b < UINT64_MAX && hmap_put(O.stored, id, hl / 2, (void *)(uintptr_t)(b + 1)) < 0) {
			free(buf);
			return -1;
		}
	}
	free(buf);
	if (bad)
		log_warn("oscore: %s: %zu of %zu lines are not \"HEX-IDENTITY BOUND\"; skipped",
			 O.path, bad, lineno);
	return 0;
}

/* ---- the writer thread ---- */

static void *writer_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&O.mu);
	for (;;) {
		struct job *j;

		while (!O.todo && !O.stop)
			pthread_cond_wait(&O.cv, &O.mu);
		if (!O.todo)
			break;
		j = O.todo;
		O.todo = NULL;
		pthread_mutex_unlock(&O.mu);
		job_write(j);
		pthread_mutex_lock(&O.mu);
		O.done = j;
		if (wake_signal(&O.wake) < 0)
			log_error("oscore: eventfd write failed: %s", strerror(errno));
	}
	pthread_mutex_unlock(&O.mu);
	return NULL;
}

static void persist_soon(void);

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
	static struct log_budget fail_log = { .label = "source=\"oscore bounds\"" };
	struct job *j;

	(void)what;
	(void)arg;
	if (wake_drain(fd) < 0)
		log_error("oscore: eventfd read failed: %s", strerror(errno));
	pthread_mutex_lock(&O.mu);
	j = O.done;
	O.done = NULL;
	pthread_mutex_unlock(&O.mu);
	if (!j)
		return;
	O.busy = 0;
	if (j->err) {
		struct timeval tv = { O_RETRY_S, 0 };

		log_src(&fail_log, LOG_LVL_ERROR, "oscore: %s %s failed: %s; OSCORE messages past "
			"the last bound on disk are held back; retrying in %ds", j->op, O.tmp,
			strerror(j->err), O_RETRY_S);
		O.again = 1;
		evtimer_add(O.retry_ev, &tv);
	} else {
		job_done(j);
	}
	job_free(j);
	if (O.again && !evtimer_pending(O.retry_ev, NULL)) {
		O.again = 0;
		persist_soon();
	}
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	if (!O.busy) {
		O.again = 0;
		persist_soon();
	}
}

/* Hands the file as it should be now to the thread, or notes it for after the write out. */
static void persist_soon(void)
{
	struct job *j;

	if (O.busy || !O.running) {
		O.again = 1;
		return;
	}
	if ((j = snapshot()) == NULL) {
		struct timeval tv = { O_RETRY_S, 0 };

		log_error("oscore: out of memory for the bounds file; retrying in %ds", O_RETRY_S);
		O.again = 1;
		evtimer_add(O.retry_ev, &tv);
		return;
	}
	O.busy = 1;
	pthread_mutex_lock(&O.mu);
	O.todo = j;
	pthread_cond_signal(&O.cv);
	pthread_mutex_unlock(&O.mu);
}

/* ---- libcoap's contexts ---- */

/* Asked by libcoap before it uses a Sender Sequence Number: every number below v is to be
 * used (RFC 8613 B.1.1). 1 when covered on disk, else 0: the message is held back. */
static int save_seq(uint64_t v, void *arg)
{
	struct odev *d = arg;

	if (v + OSCORE_SEQ_RENEW > d->asked) {
		d->asked = v + OSCORE_SEQ_STEP;
		persist_soon();
	}
	if (v <= d->durable)
		return 1;
	O.held++;
	log_src(&d->log, LOG_LVL_WARNING, "identity=%s oscore=held reason=\"sender sequence "
		"number %" PRIu64 " not yet covered on disk\" hint=\"a burst faster than the disk, "
		"or the journal directory cannot be written\"", d->identity, v - 1);
	return 0;
}

static void bin_hex(char *out, const uint8_t *b, size_t len)
{
	static const char hex[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++) {
		out[2 * i] = hex[b[i] >> 4];
		out[2 * i + 1] = hex[b[i] & 15];
	}
	out[2 * len] = '\0';
}

/* The device's context into libcoap, its numbers starting at start. 0 or -1 (logged). */
static int context_add(struct odev *d, uint64_t start)
{
	/* libcoap takes a configuration text (coap-oscore-conf(5)); it holds the secret and is
	 * wiped as soon as libcoap has parsed it */
	char conf[1024], secret[2 * KEYS_OSCORE_MAX_SECRET + 1], salt[2 * KEYS_OSCORE_MAX_SALT + 1];
	char sid[2 * KEYS_OSCORE_MAX_ID + 1], rid[2 * KEYS_OSCORE_MAX_ID + 1];
	const struct key_oscore *k = &d->k;
	coap_oscore_conf_t *oc;
	int len;

	bin_hex(secret, k->secret, k->secret_len);
	bin_hex(salt, k->salt, k->salt_len);
	bin_hex(sid, k->sender_id, k->sender_id_len);
	bin_hex(rid, k->recipient_id, k->recipient_id_len);
	/* replay_window 32: RFC 8613's default; ssn_freq 1: libcoap asks before every number;
	 * rfc8613_b_1_2: Echo after a start; rfc8613_b_2: a device that lost its sequence number
	 * agrees fresh keys (a context made for it only once its request verified, one per
	 * device: deps-patches/libcoap/0034) */
	len = snprintf(conf, sizeof(conf),
		       "master_secret,hex,\"%s\"\n%s%s%s"
		       "sender_id,hex,\"%s\"\nrecipient_id,hex,\"%s\"\n"
		       "replay_window,integer,32\nssn_freq,integer,1\n"
		       "aead_alg,integer,%d\nhkdf_alg,integer,-10\n"
		       "rfc8613_b_1_2,bool,true\nrfc8613_b_2,bool,true\n",
		       secret, k->salt_len ? "master_salt,hex,\"" : "", k->salt_len ? salt : "",
		       k->salt_len ? "\"\n" : "", sid, rid, k->alg);
	explicit_bzero(secret, sizeof(secret));
	explicit_bzero(salt, sizeof(salt));
	oc = len > 0 && (size_t)len < sizeof(conf) ?
	     coap_new_oscore_conf((coap_str_const_t){ (size_t)len, (const uint8_t *)conf },
				  save_seq, d, start) : NULL;
	explicit_bzero(conf, sizeof(conf));
	if (!oc || !coap_context_oscore_server(O.ctx, oc)) {
		log_error("identity=%s oscore=failed reason=\"libcoap refused its security context\"",
			  d->identity);
		return -1;
	}
	d->live = 1;
	return 0;
}

static void context_remove(struct odev *d)
{
	coap_bin_const_t rid = { d->k.recipient_id_len, d->k.recipient_id };

	/* its provisioned context, and the one Appendix B.2 may have made */
	while (d->live && O.ctx && coap_delete_oscore_context(O.ctx, &rid))
		;
	d->live = 0;
}

static void odev_free(struct odev *d)
{
	log_budget_forget(&d->log);
	explicit_bzero(&d->k, sizeof(d->k));
	free(d);
}

static struct odev *odev_new(const struct key_entry *e)
{
	struct odev *d = calloc(1, sizeof(*d));
	void *st;

	if (!d)
		return NULL;
	snprintf(d->identity, sizeof(d->identity), "%s", e->identity);
	d->k = *e->oscore;
	snprintf(d->log.label, sizeof(d->log.label), "identity=%s", d->identity);
	st = O.stored ? hmap_get(O.stored, d->identity, strlen(d->identity)) : NULL;
	d->stored = st ? (uint64_t)(uintptr_t)st - 1 : 0;
	/* where its numbers start; a step more goes to disk before the first is used */
	d->durable = d->stored;
	d->asked = d->stored + OSCORE_SEQ_STEP;
	if (hmap_put(O.by_id, d->identity, strlen(d->identity), d) < 0) {
		odev_free(d);
		return NULL;
	}
	return d;
}

/* Writes the file now, on this thread (start, reload: before the new contexts are used). */
static int persist_now(void)
{
	struct job *j = snapshot();
	int rc = -1;

	if (!j) {
		log_error("oscore: out of memory for the bounds file");
		return -1;
	}
	job_write(j);
	if (j->err)
		log_error("oscore: %s %s failed: %s", j->op, O.tmp, strerror(j->err));
	else {
		job_done(j);
		rc = 0;
	}
	job_free(j);
	return rc;
}

/* Brings every OSCORE entry of v that has no context (new, or changed) in; 0 or -1. At the
 * start (sync) their bounds are written first, here; at a reload the thread writes them and
 * their first messages wait for that. */
static int add_new(const struct key_entry *v, size_t n, int sync)
{
	struct odev **fresh = calloc(n ? n : 1, sizeof(*fresh));
	size_t nf = 0;
	int rc = 0;

	if (!fresh)
		return -1;
	for (size_t i = 0; i < n; i++) {
		const struct key_entry *e = &v[i];

		if (!e->oscore || hmap_get(O.by_id, e->identity, strlen(e->identity)))
			continue;
		if ((fresh[nf] = odev_new(e)) == NULL) {
			rc = -1;
			break;
		}
		nf++;
	}
	if (nf && !sync)
		persist_soon();
	else if (nf && persist_now() < 0) {
		/* without a bound on disk nothing may be protected: these stay out */
		for (size_t i = 0; i < nf; i++) {
			hmap_del(O.by_id, fresh[i]->identity, strlen(fresh[i]->identity));
			odev_free(fresh[i]);
		}
		free(fresh);
		return -1;
	}
	for (size_t i = 0; i < nf; i++) {
		if (context_add(fresh[i], fresh[i]->stored) < 0)
			rc = -1;
		else
			log_info("identity=%s oscore=ready sender_seq_from=%" PRIu64, fresh[i]->identity,
				 fresh[i]->stored);
	}
	free(fresh);
	return rc;
}

int oscore_init(struct event_base *base, coap_context_t *ctx, const char *dir,
		const struct key_entry *v, size_t n)
{
	size_t nosc = 0;
	int len;

	for (size_t i = 0; i < n; i++)
		nosc += v[i].oscore != NULL;
	O.ctx = ctx;
	O.by_id = hmap_new();
	if (!O.by_id)
		return -1;
	if (nosc == 0 && access(dir, F_OK) < 0)
		return 0;	/* nothing to keep: the journal makes the directory when it needs it */
	len = snprintf(NULL, 0, "%s/%s", dir, OSCORE_SEQ_FILE);
	if (len < 0 || (O.path = malloc((size_t)len + 1)) == NULL ||
	    (O.tmp = malloc((size_t)len + 5)) == NULL)
		return -1;
	snprintf(O.path, (size_t)len + 1, "%s/%s", dir, OSCORE_SEQ_FILE);
	snprintf(O.tmp, (size_t)len + 5, "%s.tmp", O.path);
	if ((O.dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		log_error("oscore: cannot open %s: %s", dir, strerror(errno));
		return -1;
	}
	if (read_stored() < 0)
		return -1;
	if (wake_open(&O.wake, base, on_wake, NULL) < 0) {
		log_error("oscore: eventfd: %s", strerror(errno));
		return -1;
	}
	O.retry_ev = evtimer_new(base, on_retry, NULL);
	if (!O.retry_ev)
		return -1;
	pthread_mutex_init(&O.mu, NULL);
	pthread_cond_init(&O.cv, NULL);
	if (pthread_create(&O.thread, NULL, writer_main, NULL) != 0) {
		log_error("oscore: cannot start the writer thread");
		return -1;
	}
	O.running = 1;
	if (add_new(v, n, 1) < 0)
		return -1;
	if (nosc)
		log_info("oscore: devices=%zu bounds=%s", hmap_count(O.by_id), O.path);
	return 0;
}

struct apply_ctx {
	const struct key_entry *v;
	size_t n;
	struct keys *k;
};

static void drop_changed(void *val, void *arg)
{
	struct odev *d = val;
	struct apply_ctx *a = arg;
	const struct key_entry *e = keys_find(a->k, d->identity, strlen(d->identity));

	if (e && e->oscore && keys_oscore_equal(e->oscore, &d->k))
		return;
	log_info("identity=%s oscore=removed reason=\"%s\"", d->identity,
		 e && e->oscore ? "its oscore context changed" : "no longer an OSCORE device");
	context_remove(d);
	hmap_del(O.by_id, d->identity, strlen(d->identity));
	odev_free(d);
}

int oscore_apply(const struct key_entry *v, size_t n)
{
	struct apply_ctx a = { v, n, keys_new(v, n) };
	size_t nosc = 0;
	int rc;

	if (!a.k)
		return -1;
	for (size_t i = 0; i < n; i++)
		nosc += v[i].oscore != NULL;
	hmap_each(O.by_id, drop_changed, &a);
	keys_free(a.k);
	if (nosc && !O.running) {
		log_error("oscore: OSCORE devices came with a reload but the gateway started without "
			  "any; they need a restart");
		return -1;
	}
	rc = add_new(v, n, 0);
	return rc;
}

const struct key_entry *oscore_request(const coap_session_t *s, const struct keys *k)
{
	const coap_bin_const_t *rid = coap_session_get_oscore_recipient_id(s);

	return rid ? keys_find_oscore(k, rid->s, rid->length) : NULL;
}

size_t oscore_devices(void)
{
	return O.by_id ? hmap_count(O.by_id) : 0;
}

uint64_t oscore_held(void)
{
	return O.held;
}

static void free_one(void *val, void *arg)
{
	(void)arg;
	odev_free(val);
}

void oscore_shutdown(void)
{
	if (O.running) {
		pthread_mutex_lock(&O.mu);
		O.stop = 1;
		pthread_cond_signal(&O.cv);
		pthread_mutex_unlock(&O.mu);
		pthread_join(O.thread, NULL);
		O.running = 0;
		job_free(O.todo);
		job_free(O.done);
		O.todo = O.done = NULL;
		/* the bounds asked for last: a start reads them (and adds a step anyway) */
		if (O.again || O.busy)
			persist_now();
	}
	if (O.by_id) {
		hmap_each(O.by_id, free_one, NULL);
		hmap_free(O.by_id);
		O.by_id = NULL;
	}
	hmap_free(O.stored);
	O.stored = NULL;
	wake_close(&O.wake);
	if (O.retry_ev)
		event_free(O.retry_ev);
	O.retry_ev = NULL;
	if (O.dirfd >= 0)
		close(O.dirfd);
	O.dirfd = -1;
	free(O.path);
	free(O.tmp);
	O.path = O.tmp = NULL;
	O.ctx = NULL;
}
