/* hmap.c: chained hash map with FNV-1a, doubling at load factor 1: O(1) lookups. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hmap.h"

struct hent {
	struct hent *next;
	void *val;
	uint32_t hash;
	uint8_t len;
	unsigned char key[];
};

struct hmap {
	struct hent **b;
	size_t nb, n;
};

static uint32_t fnv1a(const void *key, size_t len)
{
	const unsigned char *p = key;
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

struct hmap *hmap_new(void)
{
	struct hmap *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	m->nb = 16;
	m->b = calloc(m->nb, sizeof(*m->b));
	if (!m->b) {
		free(m);
		return NULL;
	}
	return m;
}

void hmap_free(struct hmap *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->nb; i++) {
		struct hent *e = m->b[i], *next;

		for (; e; e = next) {
			next = e->next;
			free(e);
		}
	}
	free(m->b);
	free(m);
}

static struct hent **find(const struct hmap *m, const void *key, size_t len, uint32_t h)
{
	struct hent **pp = &m->b[h & (m->nb - 1)];

	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->hash == h && (*pp)->len == len && memcmp((*pp)->key, key, len) == 0)
			break;
	return pp;
}

static void grow(struct hmap *m)
{
	size_t nb = m->nb * 2;
	struct hent **b = calloc(nb, sizeof(*b));

	if (!b)
		return;		/* keep working with longer chains */
	for (size_t i = 0; i < m->nb; i++) {
		struct hent *e = m->b[i], *next;

		for (; e; e = next) {
			next = e->next;
			e->next = b[e->hash & (nb - 1)];
			b[e->hash & (nb - 1)] = e;
		}
	}
	free(m->b);
	m->b = b;
	m->nb = nb;
}

int hmap_put(struct hmap *m, const void *key, size_t len, void *val)
{
	uint32_t h = fnv1a(key, len);
	struct hent **pp, *e;

	if (len > HMAP_MAX_KEY)
		return -1;
	pp = find(m, key, len, h);
	if (*pp) {
		(*pp)->val = val;
		return 0;
	}
	e = malloc(sizeof(*e) + len);
	if (!e)
		return -1;
	e->val = val;
	e->hash = h;
	e->len = (uint8_t)len;
	memcpy(e->key, key, len);
	e->next = m->b[h & (m->nb - 1)];
	m->b[h & (m->nb - 1)] = e;
	if (++m->n > m->nb)
		grow(m);
	return 0;
}

void *hmap_get(const struct hmap *m, const void *key, size_t len)
{
	struct hent **pp;

	if (!m || len > HMAP_MAX_KEY)
		return NULL;
	pp = find(m, key, len, fnv1a(key, len));
	return *pp ? (*pp)->val : NULL;
}

void *hmap_del(struct hmap *m, const void *key, size_t len)
{
	struct hent **pp, *e;
	void *val;

	if (!m || len > HMAP_MAX_KEY)
		return NULL;
	pp = find(m, key, len, fnv1a(key, len));
	if (!*pp)
		return NULL;
	e = *pp;
	*pp = e->next;
	val = e->val;
	free(e);
	m->n--;
	return val;
}

size_t hmap_count(const struct hmap *m)
{
	return m ? m->n : 0;
}

void hmap_each(struct hmap *m, void (*fn)(void *val, void *arg), void *arg)
{
	for (size_t i = 0; m && i < m->nb; i++) {
		struct hent *e = m->b[i], *next;

		for (; e; e = next) {
			next = e->next;
			fn(e->val, arg);
		}
	}
}
