/* exchange.c: (device key, message ID) → first answer, for EXCH_LIFETIME_S. One hash table over
 * all devices (keyed by a 64-bit hash of the key and the MID), one FIFO in arrival order for
 * expiry, a count per device for its window: every operation is O(1). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "exchange.h"
#include "hmap.h"

struct exch_dev {
	size_t n;			/* exchanges of this device in the table */
	char key[];
};

struct exch {
	uint64_t kh;			/* hash of the device key */
	uint64_t th;			/* hash of the token */
	uint16_t mid;
	uint8_t code;
	time_t t;
	void *ctx;
	struct exch_dev *dev;
	struct exch *hnext, *fnext;
};

static struct {
	struct exch **buckets;
	size_t mask, n;
	struct exch *fhead, *ftail;	/* oldest first */
	struct exch *free;
	struct hmap *devs;		/* key → struct exch_dev */
} X;

static time_t now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec;
}

static uint64_t hash_bytes(const void *buf, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (const unsigned char *p = buf; len--; p++)
		h = (h ^ *p) * 0x100000001b3ull;
	return h;
}

static uint64_t key_hash(const char *key)
{
	return hash_bytes(key, strlen(key));
}

static size_t bucket(uint64_t kh, uint16_t mid)
{
	uint64_t h = (kh ^ mid) * 0x9e3779b97f4a7c15ull;

	return (size_t)(h >> 32) & X.mask;
}

int exch_init(void)
{
	X.mask = (1u << 16) - 1;
	X.buckets = calloc(X.mask + 1, sizeof(*X.buckets));
	X.devs = hmap_new();
	return X.buckets && X.devs ? 0 : -1;
}

static void grow(void)
{
	size_t nmask = X.mask * 2 + 1;
	struct exch **nb = calloc(nmask + 1, sizeof(*nb));

	if (!nb)
		return;
	for (size_t i = 0; i <= X.mask; i++)
		for (struct exch *e = X.buckets[i], *next; e; e = next) {
			size_t b = (size_t)(((e->kh ^ e->mid) * 0x9e3779b97f4a7c15ull) >> 32) & nmask;

			next = e->hnext;
			e->hnext = nb[b];
			nb[b] = e;
		}
	free(X.buckets);
	X.buckets = nb;
	X.mask = nmask;
}

static void unhash(struct exch *e)
{
	struct exch **pp = &X.buckets[bucket(e->kh, e->mid)];

	while (*pp && *pp != e)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = e->hnext;
}

/* Newest last: the expiry order. */
static void fifo_append(struct exch *e)
{
	e->fnext = NULL;
	if (X.ftail)
		X.ftail->fnext = e;
	else
		X.fhead = e;
	X.ftail = e;
}

static void dev_put(struct exch_dev *d)
{
	if (--d->n == 0) {
		hmap_del(X.devs, d->key, strlen(d->key));
		free(d);
	}
}

/* Forgets exchanges older than the lifetime; a pending one is kept (moved to the back). */
static void expire(time_t now)
{
	for (int guard = 0; X.fhead && X.fhead->t + EXCH_LIFETIME_S <= now && guard < 64; guard++) {
		struct exch *e = X.fhead;

		X.fhead = e->fnext;
		if (!X.fhead)
			X.ftail = NULL;
		e->fnext = NULL;
		if (e->ctx) {
			e->t = now;
			fifo_append(e);
			continue;
		}
		unhash(e);
		dev_put(e->dev);
		X.n--;
		e->hnext = X.free;
		X.free = e;
	}
}

struct exch *exch_find(const char *key, uint16_t mid, const uint8_t *tok, size_t tok_len)
{
	uint64_t kh = key_hash(key), th = hash_bytes(tok, tok_len);
	time_t now = now_s();

	if (!X.buckets)
		return NULL;
	expire(now);
	for (struct exch *e = X.buckets[bucket(kh, mid)]; e; e = e->hnext)
		if (e->kh == kh && e->mid == mid && e->th == th && e->t + EXCH_LIFETIME_S > now)
			return e;
	return NULL;
}

struct exch *exch_add(const char *key, uint16_t mid, const uint8_t *tok, size_t tok_len)
{
	size_t klen = strlen(key);
	struct exch_dev *d;
	struct exch *e;
	size_t b;

	if (!X.buckets || X.n >= EXCH_MAX)
		return NULL;
	d = hmap_get(X.devs, key, klen);
	if (d && d->n >= EXCH_PER_DEVICE)
		return NULL;
	if (!d) {
		d = calloc(1, sizeof(*d) + klen + 1);
		if (!d)
			return NULL;
		memcpy(d->key, key, klen + 1);
		if (hmap_put(X.devs, key, klen, d) < 0) {
			free(d);
			return NULL;
		}
	}
	e = X.free;
	if (e)
		X.free = e->hnext;
	else if ((e = malloc(sizeof(*e))) == NULL) {
		if (d->n == 0) {
			hmap_del(X.devs, key, klen);
			free(d);
		}
		return NULL;
	}
	*e = (struct exch){ .kh = key_hash(key), .th = hash_bytes(tok, tok_len), .mid = mid,
			    .t = now_s(), .dev = d };
	d->n++;
	if (++X.n > 2 * (X.mask + 1))
		grow();
	b = bucket(e->kh, mid);
	e->hnext = X.buckets[b];
	X.buckets[b] = e;
	fifo_append(e);
	return e;
}

uint8_t exch_code(const struct exch *e)
{
	return e->code;
}

void exch_set_code(struct exch *e, uint8_t code)
{
	e->code = code;
	e->ctx = NULL;
}

void *exch_ctx(const struct exch *e)
{
	return e->ctx;
}

void exch_set_ctx(struct exch *e, void *ctx)
{
	e->ctx = ctx;
}

size_t exch_count(void)
{
	return X.n;
}

static void free_dev(void *val, void *arg)
{
	(void)arg;
	free(val);
}

void exch_shutdown(void)
{
	while (X.fhead) {
		struct exch *e = X.fhead;

		X.fhead = e->fnext;
		free(e);
	}
	while (X.free) {
		struct exch *e = X.free;

		X.free = e->hnext;
		free(e);
	}
	if (X.devs) {
		hmap_each(X.devs, free_dev, NULL);
		hmap_free(X.devs);
	}
	free(X.buckets);
	memset(&X, 0, sizeof(X));
}
