/* heap.c: wolfSSL's allocations go through counting wrappers (wolfSSL_SetAllocators); the
 * allocator in all is read from jemalloc's statistics, or glibc's mallinfo2() when the daemon is
 * built with the system allocator. Sizes are the allocator's usable sizes, so the two figures
 * are in the same units. Only the event loop calls into wolfSSL; the counter is atomic anyway,
 * as a metrics read may come from elsewhere some day. */
#include <malloc.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef C2M_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif
#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/memory.h>

#include "heap.h"

static atomic_size_t dtls_bytes;

static void *counted_malloc(size_t n)
{
	void *p = malloc(n);

	if (p)
		atomic_fetch_add_explicit(&dtls_bytes, malloc_usable_size(p), memory_order_relaxed);
	return p;
}

static void counted_free(void *p)
{
	if (p)
		atomic_fetch_sub_explicit(&dtls_bytes, malloc_usable_size(p), memory_order_relaxed);
	free(p);
}

static void *counted_realloc(void *p, size_t n)
{
	size_t before = p ? malloc_usable_size(p) : 0;
	void *q = realloc(p, n);

	if (!q)
		return NULL;	/* p is untouched */
	atomic_fetch_sub_explicit(&dtls_bytes, before, memory_order_relaxed);
	atomic_fetch_add_explicit(&dtls_bytes, malloc_usable_size(q), memory_order_relaxed);
	return q;
}

void heap_init(void)
{
	wolfSSL_SetAllocators(counted_malloc, counted_free, counted_realloc);
}

size_t heap_dtls_bytes(void)
{
	return atomic_load_explicit(&dtls_bytes, memory_order_relaxed);
}

size_t heap_all_bytes(void)
{
#ifdef C2M_JEMALLOC
	uint64_t epoch = 1;
	size_t all = 0, len = sizeof(epoch);

	/* the statistics are a snapshot taken at each new epoch */
	if (mallctl("epoch", &epoch, &len, &epoch, sizeof(epoch)) != 0)
		return 0;
	len = sizeof(all);
	return mallctl("stats.allocated", &all, &len, NULL, 0) == 0 ? all : 0;
#else
	struct mallinfo2 mi = mallinfo2();

	return mi.uordblks + mi.hblkhd;
#endif
}
