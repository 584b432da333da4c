/* heap.h: how much heap the process and wolfSSL hold, so that a reader of the metrics (and the
 * benchmark) can say where a session's bytes go. */
#ifndef C2M_HEAP_H
#define C2M_HEAP_H

#include <stddef.h>

/* Counts wolfSSL's allocations from now on; call before wolfSSL (libcoap) starts. */
void heap_init(void);
/* Bytes wolfSSL holds now (DTLS sessions, handshakes, contexts). */
size_t heap_dtls_bytes(void);
/* Bytes the process's allocator has handed out and not had back (0 where it cannot say). */
size_t heap_all_bytes(void);

#endif
