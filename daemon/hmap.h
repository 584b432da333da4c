/* hmap.h: a small hash map from byte strings (≤ 255 bytes, copied) to pointers. */
#ifndef C2M_HMAP_H
#define C2M_HMAP_H

#include <stddef.h>

#define HMAP_MAX_KEY 255

struct hmap;

struct hmap *hmap_new(void);
/* Frees the map, not the values. */
void hmap_free(struct hmap *m);
/* Adds or replaces; returns 0, or -1 (out of memory or key too long). */
int hmap_put(struct hmap *m, const void *key, size_t len, void *val);
void *hmap_get(const struct hmap *m, const void *key, size_t len);
/* Removes and returns the value, NULL when absent. */
void *hmap_del(struct hmap *m, const void *key, size_t len);
size_t hmap_count(const struct hmap *m);
/* Calls fn for every value; fn may delete the current key (and no other). */
void hmap_each(struct hmap *m, void (*fn)(void *val, void *arg), void *arg);

#endif
