/* journal.c: readings kept on disk until the broker has them. Segment files of checksummed frames
 * (reading, retirement); one writer thread writes and fdatasyncs each batch (group commit) and
 * hands completions back to the loop through an eventfd, so the loop never waits on the disk.
 * Unretired records stay in memory (bounded by mqtt.max_buffered / max_buffered_bytes) and are
 * published from here, again after every reconnect, until a PUBACK retires them. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "journal.h"
#include "log.h"
#include "stats.h"
#include "wake.h"

#define J_MAGIC "C2MJNL1\n"		/* first 8 bytes of every segment file */
#define J_MAGIC_LEN 8
#define J_HDR 8				/* frame: u32 body length, u32 CRC32C of the body */
#define J_READING 1
#define J_RETIRE 2
#define J_READING_FIXED 28		/* reading body before its strings */
#define J_MAX_BODY ((1u << 20) + (256u << 10))	/* a 1 MiB payload, topic, identity, id */
#define J_RETIRE_MAX 512		/* retirements per frame */
#define J_SEG_MIN (64u << 10)
#define J_SEG_MAX (64u << 20)
#define J_FLOOR_MAX (64ull << 20)	/* free space kept: min(64 MiB, 5 % of the filesystem) */
#define J_FLOOR_PCT 5
#define J_TICK_MS 1000			/* retirements written, free space checked, retries */
#define J_COOL_S 1			/* after a store error, refuse for this long */
#define J_LOG_EVERY_S 60		/* store errors and refusals: one log line per minute */
#define J_LAT_N 1024			/* fsync latencies kept for p50/p99 */

enum jstate { J_WRITING, J_QUEUED, J_SENT };

struct jseg {
	uint64_t no;
	uint64_t bytes;			/* file size */
	size_t live;			/* committed unretired records in it */
	int closed;			/* never written again (rotated, failed, or from a past run) */
	int busy;			/* write jobs in flight for it */
	struct jseg *next;
};

struct jrec {
	uint64_t seq;
	struct jseg *seg;
	enum jstate state;
	uint8_t gen;			/* publish attempt, to ignore late failures of earlier ones */
	journal_fn fn;
	void *arg;
	struct jrec *qprev, *qnext;	/* send queue (QUEUED) or batch list (WRITING, qnext only) */
	struct mqtt_msg msg;		/* points into frame */
	uint32_t frame_len;
	uint8_t frame[];
};

struct jjob {
	enum { JOB_WRITE, JOB_UNLINK, JOB_STAT } kind;
	struct jseg *seg;		/* loop's; the writer reads only no */
	uint64_t seg_no;
	int open_new, sync;
	uint8_t *buf;
	size_t len, cap;
	struct jrec *recs, *recs_tail;	/* data records in this batch (loop only) */
	size_t n_recs;
	/* results, written by the writer */
	int err, removed;
	const char *op;
	uint64_t file_size, sync_us, fs_free, fs_size;
	struct jjob *next;
};

static struct {
	char dir[4096];
	int dirfd;
	struct event_base *evb;
	struct wake wake;		/* the writer → the loop */
	struct event *flush_ev, *tick_ev;
	struct journal_limits lim;
	uint64_t seg_max, floor;
	char instance[20];		/* msg-id prefix of records made by this run */
	/* records by seq in a ring: base ≤ seq < next_seq */
	struct jrec **ring;
	uint64_t ring_mask, base, next_seq;
	size_t n_records;
	struct jrec *qhead, *qtail;	/* send queue */
	int n_sent, connected, stopping, closing;	/* stopping: no more publishing */
	struct jseg *segs, *segs_tail, *cur;
	uint64_t last_seg_no, disk_bytes, fs_free, fs_size;
	int space_short;		/* a reading was refused for space since the last look */
	struct jjob *open;		/* batch being filled */
	int writing;			/* a write job is in flight */
	size_t jobs_inflight;
	uint64_t *retired;		/* retirements not yet written */
	size_t n_retired, cap_retired;
	time_t cool_until, last_err_log, last_full_log;
	char refusal[160];
	struct journal_stats st;
	uint32_t lat[J_LAT_N];
	size_t n_lat;
	/* writer thread */
	pthread_t thread;
	int thread_up;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct jjob *jobs, *jobs_tail;	/* to the writer (under mu) */
	struct jjob *done, *done_tail;	/* back to the loop (under mu) */
	int stop;			/* under mu */
	int wfd;			/* writer thread only */
} J = { .dirfd = -1, .wake = WAKE_INIT, .wfd = -1, .mu = PTHREAD_MUTEX_INITIALIZER,
	.cv = PTHREAD_COND_INITIALIZER };

/* ---- CRC32C (Castagnoli), table driven ---- */

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
		crc_table[i] = c;
	}
}

uint32_t journal_crc32c(uint32_t crc, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	if (crc_table[1] == 0)
		crc_init();
	crc = ~crc;
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* ---- framing ---- */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v); put16(p + 2, (uint16_t)(v >> 16)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v); put32(p + 4, (uint32_t)(v >> 32)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

/* A body's own consistency: its type and the lengths it declares. */
static int body_ok(const uint8_t *b, uint32_t len)
{
	if (b[0] == J_READING) {
		uint64_t need;

		if (len < J_READING_FIXED || b[1] < 1 || b[1] > 2 || b[2] > 1)
			return 0;
		need = (uint64_t)J_READING_FIXED + get16(b + 16) + get16(b + 18) + get16(b + 20) +
		       get32(b + 24);
		return need == len && get16(b + 16) > 0;
	}
	if (b[0] == J_RETIRE)
		return len >= 8 && get32(b + 4) <= J_RETIRE_MAX && (uint64_t)8 + 8ull * get32(b + 4) == len;
	return 0;
}

size_t journal_frame_check(const uint8_t *buf, size_t len)
{
	uint32_t blen;

	if (len < J_HDR)
		return 0;
	blen = get32(buf);
	if (blen == 0 || blen > J_MAX_BODY || blen > len - J_HDR)
		return 0;
	if (journal_crc32c(0, buf + J_HDR, blen) != get32(buf + 4) || !body_ok(buf + J_HDR, blen))
		return 0;
	return J_HDR + (size_t)blen;
}

/* Points m into a checked reading frame. */
static void reading_view(const uint8_t *f, struct mqtt_msg *m, uint64_t *seq)
{
	const uint8_t *b = f + J_HDR;
	size_t tl = get16(b + 16), il = get16(b + 18), ml = get16(b + 20);
	const char *s = (const char *)b + J_READING_FIXED;

	/* the strings were written with a NUL each, counted in their lengths */
	*m = (struct mqtt_msg){ .qos = b[1], .retain = b[2], .content_format = (int32_t)get32(b + 4),
				.topic = s, .identity = il > 1 ? s + tl : NULL,
				.msg_id = ml > 1 ? s + tl + il : NULL,
				.payload = b + J_READING_FIXED + tl + il + ml, .len = get32(b + 24) };
	*seq = get64(b + 8);
}

/* strings as stored: with their NUL, so they can be used in place */
static size_t slen(const char *s)
{
	return s ? strlen(s) + 1 : 0;
}

static struct jrec *reading_new(const struct mqtt_msg *m, uint64_t seq, const char *msg_id)
{
	size_t tl = slen(m->topic), il = slen(m->identity), ml = slen(msg_id);
	size_t blen = J_READING_FIXED + tl + il + ml + m->len;
	struct jrec *r;
	uint8_t *b;
	uint64_t dummy;

	if (tl > 65535 || il > 65535 || ml > 65535 || blen > J_MAX_BODY)
		return NULL;
	r = malloc(sizeof(*r) + J_HDR + blen);
	if (!r)
		return NULL;
	memset(r, 0, sizeof(*r));
	r->frame_len = (uint32_t)(J_HDR + blen);
	b = r->frame + J_HDR;
	memset(b, 0, J_READING_FIXED);
	b[0] = J_READING;
	b[1] = (uint8_t)m->qos;
	b[2] = m->retain ? 1 : 0;
	put32(b + 4, (uint32_t)m->content_format);
	put64(b + 8, seq);
	put16(b + 16, (uint16_t)tl);
	put16(b + 18, (uint16_t)il);
	put16(b + 20, (uint16_t)ml);
	put32(b + 24, (uint32_t)m->len);
	memcpy(b + J_READING_FIXED, m->topic, tl);
	if (il)
		memcpy(b + J_READING_FIXED + tl, m->identity, il);
	if (ml)
		memcpy(b + J_READING_FIXED + tl + il, msg_id, ml);
	if (m->len)
		memcpy(b + J_READING_FIXED + tl + il + ml, m->payload, m->len);
	put32(r->frame, (uint32_t)blen);
	put32(r->frame + 4, journal_crc32c(0, b, blen));
	reading_view(r->frame, &r->msg, &dummy);
	r->seq = seq;
	return r;
}

/* ---- records by seq ---- */

static struct jrec *rec_get(uint64_t seq)
{
	struct jrec *r;

	if (!J.ring || seq < J.base || seq >= J.next_seq)
		return NULL;
	r = J.ring[seq & J.ring_mask];
	return r && r->seq == seq ? r : NULL;
}

/* Room for seq in the ring: grows it (at most to cover 4 × max_records + 1024 seqs). */
static int ring_room(uint64_t seq)
{
	uint64_t cap = J.ring ? J.ring_mask + 1 : 0, ncap = cap ? cap : 1024;
	uint64_t limit = 4 * (uint64_t)J.lim.max_records + 1024;
	struct jrec **n;

	if (J.ring && seq - J.base < cap)
		return 0;
	while (seq - J.base >= ncap)
		ncap *= 2;
	if (ncap > 2 * limit)
		return -1;
	n = calloc(ncap, sizeof(*n));
	if (!n)
		return -1;
	for (uint64_t s = J.base; J.ring && s < J.next_seq; s++)
		if (J.ring[s & J.ring_mask] && J.ring[s & J.ring_mask]->seq == s)
			n[s & (ncap - 1)] = J.ring[s & J.ring_mask];
	free(J.ring);
	J.ring = n;
	J.ring_mask = ncap - 1;
	return 0;
}

static void ring_put(struct jrec *r)
{
	J.ring[r->seq & J.ring_mask] = r;
	if (r->seq >= J.next_seq)
		J.next_seq = r->seq + 1;
	J.n_records++;
}

static void ring_drop(struct jrec *r)
{
	J.ring[r->seq & J.ring_mask] = NULL;
	J.n_records--;
	while (J.base < J.next_seq && !J.ring[J.base & J.ring_mask])
		J.base++;
}

/* ---- send queue ---- */

static void q_unlink(struct jrec *r)
{
	if (r->qprev)
		r->qprev->qnext = r->qnext;
	else
		J.qhead = r->qnext;
	if (r->qnext)
		r->qnext->qprev = r->qprev;
	else
		J.qtail = r->qprev;
	r->qprev = r->qnext = NULL;
}

static void q_push(struct jrec *r, int front)
{
	r->state = J_QUEUED;
	if (front) {
		r->qprev = NULL;
		r->qnext = J.qhead;
		if (J.qhead)
			J.qhead->qprev = r;
		else
			J.qtail = r;
		J.qhead = r;
	} else {
		r->qnext = NULL;
		r->qprev = J.qtail;
		if (J.qtail)
			J.qtail->qnext = r;
		else
			J.qhead = r;
		J.qtail = r;
	}
}

/* ---- writer thread ---- */

static void seg_name(char *buf, size_t len, uint64_t no)
{
	snprintf(buf, len, "%016" PRIx64 ".jnl", no);
}

static int write_all(int fd, const uint8_t *p, size_t len)
{
	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno;
		if (n == 0)
			return EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int open_segment(struct jjob *j)
{
	char name[32];

	if (J.wfd >= 0)
		close(J.wfd);
	seg_name(name, sizeof(name), j->seg_no);
	J.wfd = openat(J.dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0640);
	if (J.wfd < 0) {
		j->op = "create";
		return errno;
	}
	if (write_all(J.wfd, (const uint8_t *)J_MAGIC, J_MAGIC_LEN) != 0) {
		j->op = "write";
		return errno ? errno : EIO;
	}
	/* the new name must survive a power cut like the data in it */
	if (fsync(J.dirfd) < 0) {
		j->op = "fsync directory";
		return errno;
	}
	return 0;
}

static void fs_space(struct jjob *j)
{
	struct statvfs vs;

	if (fstatvfs(J.dirfd, &vs) == 0) {
		j->fs_free = (uint64_t)vs.f_bavail * vs.f_frsize;
		j->fs_size = (uint64_t)vs.f_blocks * vs.f_frsize;
	}
}

static void do_write(struct jjob *j)
{
	char name[32];
	struct stat st;
	int err = 0;

	j->op = "write";
	if (j->open_new)
		err = open_segment(j);
	else if (J.wfd < 0)
		err = EBADF;
	if (!err && j->len)
		err = write_all(J.wfd, j->buf, j->len);
	if (!err && j->sync) {
		uint64_t t0 = now_us();

		/* a failed fdatasync is never retried on this file: the loop moves on to a new one */
		if (fdatasync(J.wfd) < 0) {
			err = errno;
			j->op = "fdatasync";
		}
		j->sync_us = now_us() - t0;
	}
	j->err = err;
	if (J.wfd >= 0 && fstat(J.wfd, &st) == 0)
		j->file_size = (uint64_t)st.st_size;
	if (err && J.wfd >= 0) {
		close(J.wfd);
		J.wfd = -1;
	}
	if (err && j->open_new) {
		/* nothing of this new segment was taken: do not leave it behind */
		seg_name(name, sizeof(name), j->seg_no);
		j->removed = unlinkat(J.dirfd, name, 0) == 0 || errno == ENOENT;
	}
	fs_space(j);
}

static void do_unlink(struct jjob *j)
{
	char name[32];

	seg_name(name, sizeof(name), j->seg_no);
	if (unlinkat(J.dirfd, name, 0) < 0 && errno != ENOENT) {
		j->err = errno;
		j->op = "unlink";
	} else if (fsync(J.dirfd) < 0) {
		j->err = errno;
		j->op = "fsync directory";
	}
	fs_space(j);	/* the space freed: a figure from before would refuse readings for nothing */
}

/* Appends j to a job list (the caller holds J.mu). */
static void job_append(struct jjob **head, struct jjob **tail, struct jjob *j)
{
	j->next = NULL;
	if (*tail)
		(*tail)->next = j;
	else
		*head = j;
	*tail = j;
}

static void *writer_main(void *unused)
{
	(void)unused;
	pthread_mutex_lock(&J.mu);
	for (;;) {
		struct jjob *j;

		while (!J.jobs && !J.stop)
			pthread_cond_wait(&J.cv, &J.mu);
		if (!J.jobs)
			break;
		j = J.jobs;
		J.jobs = j->next;
		if (!J.jobs)
			J.jobs_tail = NULL;
		pthread_mutex_unlock(&J.mu);
		if (j->kind == JOB_WRITE)
			do_write(j);
		else if (j->kind == JOB_STAT)
			fs_space(j);
		else
			do_unlink(j);
		pthread_mutex_lock(&J.mu);
		job_append(&J.done, &J.done_tail, j);
		if (wake_signal(&J.wake) < 0)
			log_error("journal: eventfd write failed: %s", strerror(errno));
	}
	pthread_mutex_unlock(&J.mu);
	if (J.wfd >= 0)
		close(J.wfd);
	J.wfd = -1;
	return NULL;
}

static void job_submit(struct jjob *j)
{
	pthread_mutex_lock(&J.mu);
	job_append(&J.jobs, &J.jobs_tail, j);
	pthread_cond_signal(&J.cv);
	pthread_mutex_unlock(&J.mu);
	J.jobs_inflight++;
}

/* ---- loop side: batches ---- */

static int buf_add(struct jjob *j, const void *p, size_t len)
{
	if (j->len + len > j->cap) {
		size_t cap = j->cap ? j->cap : 4096;
		uint8_t *n;

		while (cap < j->len + len)
			cap *= 2;
		n = realloc(j->buf, cap);
		if (!n)
			return -1;
		j->buf = n;
		j->cap = cap;
	}
	memcpy(j->buf + j->len, p, len);
	j->len += len;
	return 0;
}

static struct jjob *open_batch(void)
{
	if (!J.open)
		J.open = calloc(1, sizeof(*J.open));
	return J.open;
}

/* Pending retirements as frames at the end of j (best effort: a lost one is a duplicate later). */
static void add_retirements(struct jjob *j)
{
	size_t done = 0;

	while (done < J.n_retired) {
		size_t n = J.n_retired - done < J_RETIRE_MAX ? J.n_retired - done : J_RETIRE_MAX;
		uint32_t blen = (uint32_t)(8 + 8 * n);
		uint8_t hdr[J_HDR + 8], *body;

		body = malloc(blen);
		if (!body)
			break;
		memset(body, 0, 8);
		body[0] = J_RETIRE;
		put32(body + 4, (uint32_t)n);
		for (size_t i = 0; i < n; i++)
			put64(body + 8 + 8 * i, J.retired[done + i]);
		put32(hdr, blen);
		put32(hdr + 4, journal_crc32c(0, body, blen));
		if (buf_add(j, hdr, J_HDR) < 0 || buf_add(j, body, blen) < 0) {
			free(body);
			break;
		}
		free(body);
		done += n;
	}
	if (done && done < J.n_retired)
		memmove(J.retired, J.retired + done, (J.n_retired - done) * sizeof(*J.retired));
	J.n_retired -= done;
}

static struct jseg *seg_new(void)
{
	struct jseg *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->no = ++J.last_seg_no;
	if (J.segs_tail)
		J.segs_tail->next = s;
	else
		J.segs = s;
	J.segs_tail = s;
	J.st.segments++;
	return s;
}

static void seg_remove(struct jseg *s)
{
	struct jseg **pp = &J.segs, *prev = NULL;

	while (*pp && *pp != s) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	if (!*pp)
		return;
	*pp = s->next;
	if (J.segs_tail == s)
		J.segs_tail = prev;
	if (J.cur == s)
		J.cur = NULL;
	J.disk_bytes -= s->bytes;
	J.st.segments--;
	free(s);
}

/* Sends the open batch (with pending retirements) to the writer when none is in flight; with
 * probe, also an empty one (the writer reports the free space after every job). */
static void submit_job(int probe)
{
	struct jjob *j;

	if (J.writing || (!J.open && !J.n_retired && !probe))
		return;
	if (!open_batch())
		return;
	j = J.open;
	add_retirements(j);
	if (j->len == 0 && j->n_recs == 0) {
		if (!probe)
			return;
		/* nothing to write: only the free space is measured */
		J.open = NULL;
		j->kind = JOB_STAT;
		J.writing = 1;
		job_submit(j);
		return;
	}
	if (!J.cur || J.cur->closed || J.cur->bytes >= J.seg_max) {
		if (J.cur)
			J.cur->closed = 1;
		J.cur = seg_new();
		if (!J.cur)
			return;
		j->open_new = 1;
	}
	J.open = NULL;
	j->kind = JOB_WRITE;
	j->seg = J.cur;
	j->seg_no = J.cur->no;
	j->sync = j->n_recs > 0;
	J.cur->busy++;
	J.writing = 1;
	job_submit(j);
}

static void submit(void)
{
	submit_job(0);
}

static void schedule_submit(void)
{
	if (!J.writing && J.flush_ev)
		event_active(J.flush_ev, EV_TIMEOUT, 0);
}

/* Oldest segments without live records are deleted, in order (a segment's retirements refer only
 * to records in it or before it); the current one is rotated once drained and big enough. */
static void delete_drained(void)
{
	if (J.cur && !J.cur->closed && J.cur->live == 0 && !J.cur->busy &&
	    (!J.open || !J.open->n_recs) && J.cur->bytes >= J.seg_max / 4)
		J.cur->closed = 1;
	while (J.segs && J.segs->closed && J.segs->live == 0 && !J.segs->busy && !J.closing) {
		struct jjob *j = calloc(1, sizeof(*j));

		if (!j)
			return;
		j->kind = JOB_UNLINK;
		j->seg_no = J.segs->no;
		job_submit(j);
		seg_remove(J.segs);
	}
}

static void log_store_error(const struct jjob *j)
{
	time_t now = time(NULL);

	J.st.store_errors++;
	if (now - J.last_err_log < J_LOG_EVERY_S)
		return;
	J.last_err_log = now;
	log_error("journal: dir=%s segment=%016" PRIx64 " %s failed: %s; %zu readings refused with "
		  "5.03, a new segment is used next", J.dir, j->seg_no, j->op, strerror(j->err),
		  j->n_recs);
}

static void pump(void);

/* The free space the writer measured after a job. */
static void take_space(const struct jjob *j)
{
	if (!j->fs_size)
		return;
	J.fs_free = j->fs_free;
	J.fs_size = j->fs_size;
	J.space_short = 0;
}

static void write_done(struct jjob *j)
{
	struct jseg *s = j->seg;
	struct jrec *r, *next;

	J.writing = 0;
	s->busy--;
	take_space(j);
	if (j->err) {
		s->closed = 1;
		J.cool_until = time(NULL) + J_COOL_S;
		snprintf(J.refusal, sizeof(J.refusal), "store error (%s: %s)", j->op, strerror(j->err));
		log_store_error(j);
	}
	if (j->err && j->removed) {
		s->bytes = 0;
		seg_remove(s);
	} else if (j->file_size >= s->bytes) {
		J.disk_bytes += j->file_size - s->bytes;
		s->bytes = j->file_size;
	}
	if (!j->err) {
		J.st.commits++;
		J.st.fsyncs += (uint64_t)j->sync;
		J.st.committed_records += j->n_recs;
		if (j->sync)
			J.lat[J.n_lat++ % J_LAT_N] = (uint32_t)(j->sync_us > UINT32_MAX ? UINT32_MAX :
								 j->sync_us);
	}
	for (r = j->recs; r; r = next) {
		next = r->qnext;
		r->qnext = NULL;
		if (j->err) {
			ring_drop(r);
			if (r->fn)
				r->fn(r->arg, JOURNAL_NOT_STORED);
			free(r);
			continue;
		}
		r->seg = s;
		s->live++;
		q_push(r, 0);
		if (r->fn)
			r->fn(r->arg, JOURNAL_STORED);
	}
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
	struct jjob *list;

	(void)what;
	(void)arg;
	if (wake_drain(fd) < 0)
		log_error("journal: eventfd read failed: %s", strerror(errno));
	pthread_mutex_lock(&J.mu);
	list = J.done;
	J.done = J.done_tail = NULL;
	pthread_mutex_unlock(&J.mu);
	while (list) {
		struct jjob *j = list;

		list = j->next;
		J.jobs_inflight--;
		if (j->kind == JOB_WRITE) {
			write_done(j);
		} else if (j->kind == JOB_STAT) {
			J.writing = 0;
			take_space(j);
		} else {
			if (j->err)
				log_warn("journal: dir=%s segment=%016" PRIx64 " %s failed: %s", J.dir,
					 j->seg_no, j->op, strerror(j->err));
			take_space(j);
		}
		free(j->buf);
		free(j);
	}
	submit();
	delete_drained();
	pump();
}

static void on_flush(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	submit();
}

/* ---- publishing ---- */

static void retire(struct jrec *r)
{
	if (r->state == J_SENT)
		J.n_sent--;
	else if (r->state == J_QUEUED)
		q_unlink(r);
	if (r->fn)
		r->fn(r->arg, JOURNAL_DELIVERED);
	r->seg->live--;
	ring_drop(r);
	if (J.n_retired == J.cap_retired) {
		size_t cap = J.cap_retired ? J.cap_retired * 2 : 1024;
		uint64_t *n = realloc(J.retired, cap * sizeof(*n));

		if (n) {
			J.retired = n;
			J.cap_retired = cap;
		}
	}
	/* without room the retirement is not written: a duplicate after a restart, never a loss */
	if (J.n_retired < J.cap_retired)
		J.retired[J.n_retired++] = r->seq;
	free(r);
}

static void on_published(void *arg, enum mqtt_status st)
{
	uint64_t tag = (uint64_t)(uintptr_t)arg;
	struct jrec *r = rec_get(tag >> 8);

	if (!r || r->state == J_WRITING)
		return;
	switch (st) {
	case MQTT_DELIVERED:
		retire(r);	/* whichever attempt it was: the broker has it */
		break;
	case MQTT_REFUSED:
		stats_inc(STAT_PUBLISH_FAILED);
		log_error("journal: identity=%s topic=%s msg-id=%s outcome=dropped reason=\"refused by "
			  "the broker (reason code >= 0x80)\"", r->msg.identity ? r->msg.identity : "-",
			  r->msg.topic, r->msg.msg_id ? r->msg.msg_id : "-");
		retire(r);
		break;
	case MQTT_FAILED:
		if (r->state == J_SENT && r->gen == (uint8_t)tag) {
			J.n_sent--;
			q_push(r, 1);	/* tried again: after a reconnect or from the tick */
		}
		break;
	case MQTT_ABORTED:
		break;		/* shutdown: stays in the journal */
	}
	delete_drained();
	if (st != MQTT_FAILED)
		pump();
}

static void pump(void)
{
	while (J.connected && !J.stopping && J.qhead && (size_t)J.n_sent < mqtt_window()) {
		struct jrec *r = J.qhead;
		uintptr_t tag;

		q_unlink(r);
		r->gen++;
		if (r->gen > 1)
			J.st.replays++;
		tag = (uintptr_t)(r->seq << 8 | r->gen);
		if (mqtt_publish(&r->msg, on_published, (void *)tag) != MQTT_SEND_OK) {
			q_push(r, 1);
			return;		/* the tick tries again */
		}
		r->state = J_SENT;
		J.n_sent++;
	}
}

void journal_mqtt_state(int connected)
{
	J.connected = connected;
	if (connected) {
		pump();
		return;
	}
	/* what was in flight may be lost with the broker's session: all of it goes again, in the
	 * order it was taken (the broker drops nothing it has twice: same msg-id) */
	J.qhead = J.qtail = NULL;
	J.n_sent = 0;
	for (uint64_t s = J.base; s < J.next_seq; s++) {
		struct jrec *r = rec_get(s);

		if (r && r->state != J_WRITING) {
			r->qprev = r->qnext = NULL;
			q_push(r, 0);
		}
	}
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	/* retirements, and a fresh look at the free space while readings are refused for it (a
	 * large reading may be refused with more than the margin below still free) */
	submit_job(J.space_short ||
		   (J.fs_size && J.fs_free < J.floor + (J.open ? J.open->len : 0) + 4096));
	delete_drained();
	pump();
}

/* ---- taking readings ---- */

const char *journal_refusal(void)
{
	return J.refusal;
}

static int refuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int refuse(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(J.refusal, sizeof(J.refusal), fmt, ap);
	va_end(ap);
	return 1;
}

static int over_limit(size_t add)
{
	uint64_t pending = J.open ? J.open->len : 0;

	if (time(NULL) < J.cool_until)
		return 1;	/* J.refusal says which error */
	if (J.n_records >= J.lim.max_records)
		return refuse("journal full: %zu readings waiting (mqtt.max_buffered)", J.n_records);
	if (J.disk_bytes + pending + add > J.lim.max_bytes)
		return refuse("journal full: %" PRIu64 " bytes (mqtt.max_buffered_bytes)",
			      J.disk_bytes + pending);
	if (J.fs_size && J.fs_free < J.floor + pending + add) {
		J.space_short = 1;
		return refuse("disk nearly full: %" PRIu64 " bytes free in %s, keeping %" PRIu64,
			      J.fs_free, J.dir, J.floor);
	}
	return 0;
}

enum journal_take journal_append(const struct mqtt_msg *m, journal_fn fn, void *arg,
				 uint64_t *seq)
{
	char msg_id[48];
	struct jrec *r;
	struct jjob *j;

	if (J.closing || over_limit(m->len + 256) || !open_batch())
		return JOURNAL_FULL;
	if (ring_room(J.next_seq) < 0) {
		refuse("journal full: the oldest unacknowledged reading is %" PRIu64 " readings back",
		       J.next_seq - J.base);
		return JOURNAL_FULL;
	}
	snprintf(msg_id, sizeof(msg_id), "%s-%" PRIu64, J.instance, J.next_seq);
	r = reading_new(m, J.next_seq, msg_id);
	j = J.open;
	if (!r || buf_add(j, r->frame, r->frame_len) < 0) {
		free(r);
		refuse("out of memory");
		return JOURNAL_FULL;
	}
	r->fn = fn;
	r->arg = arg;
	r->state = J_WRITING;
	if (j->recs_tail)
		j->recs_tail->qnext = r;
	else
		j->recs = r;
	j->recs_tail = r;
	j->n_recs++;
	ring_put(r);
	*seq = r->seq;
	schedule_submit();
	return JOURNAL_TAKEN;
}

void journal_detach(uint64_t seq)
{
	struct jrec *r = rec_get(seq);

	if (r) {
		r->fn = NULL;
		r->arg = NULL;
	}
}

/* ---- start-up: load what an earlier run left ---- */

struct loaded {
	struct jrec **v;
	size_t n, cap;
};

static struct jrec *loaded_find(struct loaded *l, uint64_t seq)
{
	size_t lo = 0, hi = l->n;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (l->v[mid]->seq < seq)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < l->n && l->v[lo]->seq == seq ? l->v[lo] : NULL;
}

static int load_frame(struct loaded *l, struct jseg *s, const uint8_t *f, size_t flen,
		      uint64_t *max_seq)
{
	const uint8_t *b = f + J_HDR;

	if (b[0] == J_RETIRE) {
		for (uint32_t i = 0; i < get32(b + 4); i++) {
			struct jrec *r = loaded_find(l, get64(b + 8 + 8 * i));

			if (r && r->seg) {
				r->seg->live--;
				r->seg = NULL;	/* retired: freed below */
			}
		}
		return 0;
	}
	{
		struct jrec *r = malloc(sizeof(*r) + flen);
		uint64_t seq;

		if (!r)
			return -1;
		memset(r, 0, sizeof(*r));
		memcpy(r->frame, f, flen);
		r->frame_len = (uint32_t)flen;
		reading_view(r->frame, &r->msg, &seq);
		if ((l->n && seq <= l->v[l->n - 1]->seq) || seq == 0) {
			free(r);	/* out of order: not written by us; skip it */
			return 0;
		}
		r->seq = seq;
		r->seg = s;
		s->live++;
		if (seq > *max_seq)
			*max_seq = seq;
		if (l->n == l->cap) {
			size_t cap = l->cap ? l->cap * 2 : 1024;
			struct jrec **n = realloc(l->v, cap * sizeof(*n));

			if (!n) {
				free(r);
				return -1;
			}
			l->v = n;
			l->cap = cap;
		}
		l->v[l->n++] = r;
	}
	return 0;
}

/* Reads one segment; a torn or corrupt tail is cut off (logged with its size). */
static int load_segment(struct loaded *l, struct jseg *s, uint64_t *max_seq)
{
	char name[32];
	uint8_t hdr[J_HDR], magic[J_MAGIC_LEN], *body = NULL;
	uint64_t off = J_MAGIC_LEN, size;
	struct stat st;
	int fd, rc = 0;

	seg_name(name, sizeof(name), s->no);
	fd = openat(J.dirfd, name, O_RDWR | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		log_error("journal: cannot open %s/%s: %s", J.dir, name, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	size = (uint64_t)st.st_size;
	if (pread(fd, magic, J_MAGIC_LEN, 0) != J_MAGIC_LEN || memcmp(magic, J_MAGIC, J_MAGIC_LEN)) {
		log_warn("journal: %s/%s has no journal header (%" PRIu64 " bytes): emptied", J.dir,
			 name, size);
		off = 0;
	}
	body = malloc(J_HDR + J_MAX_BODY);
	while (body && off && off + J_HDR <= size) {
		uint32_t blen;

		if (pread(fd, hdr, J_HDR, (off_t)off) != J_HDR)
			break;
		blen = get32(hdr);
		if (blen == 0 || blen > J_MAX_BODY || off + J_HDR + blen > size)
			break;
		memcpy(body, hdr, J_HDR);
		if (pread(fd, body + J_HDR, blen, (off_t)(off + J_HDR)) != (ssize_t)blen)
			break;
		if (journal_frame_check(body, J_HDR + blen) != J_HDR + blen)
			break;
		if (load_frame(l, s, body, J_HDR + blen, max_seq) < 0) {
			rc = -1;
			break;
		}
		off += J_HDR + blen;
	}
	if (!body)
		rc = -1;
	free(body);
	if (rc == 0 && off < size) {
		J.st.cut_bytes += size - off;
		log_warn("journal: %s/%s: torn or corrupt tail of %" PRIu64 " bytes at offset %" PRIu64
			 " cut off", J.dir, name, size - off, off);
		if (ftruncate(fd, (off_t)off) < 0 || fsync(fd) < 0)
			log_error("journal: cannot cut %s/%s: %s", J.dir, name, strerror(errno));
		size = off;
	}
	close(fd);
	s->bytes = size;
	s->closed = 1;
	J.disk_bytes += size;
	return rc;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Segment numbers in the directory, sorted. */
static int list_segments(uint64_t **out, size_t *n)
{
	DIR *d = fdopendir(dup(J.dirfd));
	struct dirent *e;
	size_t cap = 0;

	*out = NULL;
	*n = 0;
	if (!d)
		return -1;
	rewinddir(d);	/* the duplicate shares the directory's offset */
	while ((e = readdir(d)) != NULL) {
		char *end;
		uint64_t no;

		if (strlen(e->d_name) != 20 || strcmp(e->d_name + 16, ".jnl") != 0)
			continue;
		no = strtoull(e->d_name, &end, 16);
		if (end != e->d_name + 16)
			continue;
		if (*n == cap) {
			uint64_t *v = realloc(*out, (cap = cap ? cap * 2 : 64) * sizeof(*v));

			if (!v) {
				closedir(d);
				return -1;
			}
			*out = v;
		}
		(*out)[(*n)++] = no;
	}
	closedir(d);
	if (*n > 1)
		qsort(*out, *n, sizeof(**out), cmp_u64);
	return 0;
}

static int load_all(void)
{
	struct loaded l = { 0 };
	uint64_t *nos, max_seq = 0;
	size_t n_nos, kept = 0;
	int rc = 0;

	if (list_segments(&nos, &n_nos) < 0)
		return -1;
	for (size_t i = 0; i < n_nos && rc == 0; i++) {
		struct jseg *s;

		J.last_seg_no = nos[i] - 1;
		s = seg_new();
		rc = s ? load_segment(&l, s, &max_seq) : -1;
	}
	free(nos);
	J.base = J.next_seq = max_seq + 1;
	for (size_t i = 0; i < l.n; i++) {
		struct jrec *r = l.v[i];

		if (rc < 0 || !r->seg) {
			free(r);
			continue;
		}
		if (kept == 0)
			J.base = r->seq;
		if (ring_room(r->seq) < 0) {
			log_error("journal: %zu readings to load are more than 4 x mqtt.max_buffered "
				  "apart; raise mqtt.max_buffered", l.n);
			rc = -1;
			free(r);
			continue;
		}
		ring_put(r);
		q_push(r, 0);
		kept++;
	}
	J.next_seq = max_seq + 1;
	free(l.v);
	if (rc == 0 && (kept || n_nos))
		log_info("journal: dir=%s segments=%zu readings=%zu bytes=%" PRIu64 " to deliver",
			 J.dir, n_nos, kept, J.disk_bytes);
	return rc;
}

/* ---- open / close ---- */

static void legacy_store_note(void)
{
	DIR *d = fdopendir(dup(J.dirfd));
	struct dirent *e;

	if (!d)
		return;
	rewinddir(d);
	while ((e = readdir(d)) != NULL)
		if (e->d_type == DT_DIR && e->d_name[0] != '.' && strstr(e->d_name, "-ssl") != NULL)
			log_warn("journal: %s/%s is a message store of coap2mqtt 0.1.0; its messages "
				 "are not read by this version", J.dir, e->d_name);
	closedir(d);
}

int journal_open(struct event_base *base, const char *dir, const struct journal_limits *lim)
{
	struct timeval tick = { J_TICK_MS / 1000, (J_TICK_MS % 1000) * 1000 };
	struct statvfs vs;
	uint64_t rnd = 0;

	snprintf(J.dir, sizeof(J.dir), "%s", dir);
	J.evb = base;
	J.lim = *lim;
	if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
		log_error("journal: cannot create persistence_dir %s: %s", dir, strerror(errno));
		return -1;
	}
	J.dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (J.dirfd < 0 || faccessat(J.dirfd, ".", W_OK, AT_EACCESS) < 0) {
		log_error("journal: persistence_dir %s is not a writable directory: %s", dir,
			  strerror(errno));
		return -1;
	}
	if (fstatvfs(J.dirfd, &vs) == 0) {
		J.fs_free = (uint64_t)vs.f_bavail * vs.f_frsize;
		J.fs_size = (uint64_t)vs.f_blocks * vs.f_frsize;
	}
	J.floor = J.fs_size / 100 * J_FLOOR_PCT;
	if (J.floor > J_FLOOR_MAX)
		J.floor = J_FLOOR_MAX;
	/* segments: 1/16 of the byte limit or of the filesystem, within 64 KiB .. 64 MiB */
	J.seg_max = J.lim.max_bytes / 16;
	if (J.fs_size && J.fs_size / 16 < J.seg_max)
		J.seg_max = J.fs_size / 16;
	J.seg_max = J.seg_max < J_SEG_MIN ? J_SEG_MIN : J.seg_max > J_SEG_MAX ? J_SEG_MAX : J.seg_max;
	if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != sizeof(rnd))
		rnd = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	snprintf(J.instance, sizeof(J.instance), "%016" PRIx64, rnd);
	legacy_store_note();
	if (load_all() < 0)
		return -1;
	if (wake_open(&J.wake, base, on_wake, NULL) < 0) {
		log_error("journal: eventfd: %s", strerror(errno));
		return -1;
	}
	J.flush_ev = event_new(base, -1, 0, on_flush, NULL);
	J.tick_ev = event_new(base, -1, EV_PERSIST, on_tick, NULL);
	if (!J.flush_ev || !J.tick_ev || event_add(J.tick_ev, &tick) < 0) {
		log_error("journal: cannot create loop events");
		return -1;
	}
	if (pthread_create(&J.thread, NULL, writer_main, NULL) != 0) {
		log_error("journal: cannot start the writer thread");
		return -1;
	}
	J.thread_up = 1;
	pthread_setname_np(J.thread, "c2m-journal");	/* as top -H and perf show it */
	delete_drained();
	return 0;
}

/* Waits (blocking: shutdown only) until the writer has finished every job. */
static void wait_writer(void)
{
	while (J.jobs_inflight) {
		struct pollfd p = { .fd = J.wake.fd, .events = POLLIN };

		if (poll(&p, 1, 1000) > 0)
			on_wake(J.wake.fd, EV_READ, NULL);
	}
}

void journal_flush(void)
{
	if (!J.thread_up)
		return;
	submit();
	wait_writer();
	if (J.open && J.open->n_recs) {
		submit();
		wait_writer();
	}
	J.stopping = 1;		/* the MQTT client goes next: what is unsent stays for the next start */
}

void journal_close(void)
{
	if (J.thread_up) {
		J.closing = 1;
		submit();	/* the last retirements */
		wait_writer();
		pthread_mutex_lock(&J.mu);
		J.stop = 1;
		pthread_cond_signal(&J.cv);
		pthread_mutex_unlock(&J.mu);
		pthread_join(J.thread, NULL);
		J.thread_up = 0;
	}
	for (uint64_t s = J.base; J.ring && s < J.next_seq; s++)
		free(rec_get(s));
	free(J.ring);
	J.ring = NULL;
	if (J.open) {
		for (struct jrec *r = J.open->recs, *n; r; r = n) {
			n = r->qnext;
			if (r->fn)
				r->fn(r->arg, JOURNAL_NOT_STORED);
			free(r);
		}
		free(J.open->buf);
		free(J.open);
		J.open = NULL;
	}
	while (J.segs)
		seg_remove(J.segs);
	free(J.retired);
	J.retired = NULL;
	wake_close(&J.wake);
	if (J.flush_ev)
		event_free(J.flush_ev);
	if (J.tick_ev)
		event_free(J.tick_ev);
	J.flush_ev = J.tick_ev = NULL;
	if (J.dirfd >= 0)
		close(J.dirfd);
	/* as before journal_open (no thread runs now) */
	memset(&J, 0, sizeof(J));
	J.dirfd = J.wake.fd = J.wfd = -1;
	pthread_mutex_init(&J.mu, NULL);
	pthread_cond_init(&J.cv, NULL);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

void journal_get_stats(struct journal_stats *s)
{
	size_t n = J.n_lat < J_LAT_N ? J.n_lat : J_LAT_N;
	uint32_t v[J_LAT_N];

	*s = J.st;
	s->records = J.n_records;
	s->bytes = J.disk_bytes;
	s->in_flight = (size_t)J.n_sent;
	s->fsync_p50_ms = s->fsync_p99_ms = 0;
	if (n) {
		memcpy(v, J.lat, n * sizeof(*v));
		qsort(v, n, sizeof(*v), cmp_u32);
		s->fsync_p50_ms = v[n / 2] / 1000.0;
		s->fsync_p99_ms = v[n * 99 / 100] / 1000.0;
	}
}
