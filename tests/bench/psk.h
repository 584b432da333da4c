/* psk.h: the pre-shared key of one client session of the benchmark's wolfSSL clients
 * (loadgen.c, cid_fleet.c): the session's app data points to its struct psk. */
#ifndef C2M_BENCH_PSK_H
#define C2M_BENCH_PSK_H

#include <string.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

struct psk {
	char identity[129];		/* "%128s" */
	char key[65];			/* "%64s": the key as text */
};

/* wolfSSL's PSK client callback: the identity and key of the session's struct psk. */
static inline unsigned int psk_client_cb(WOLFSSL *ssl, const char *hint, char *identity,
					 unsigned int id_max, unsigned char *key,
					 unsigned int key_max)
{
	const struct psk *p = wolfSSL_get_app_data(ssl);
	size_t il = strlen(p->identity), kl = strlen(p->key);

	(void)hint;
	if (il >= id_max || kl > key_max)
		return 0;
	memcpy(identity, p->identity, il + 1);
	memcpy(key, p->key, kl);
	return (unsigned int)kl;
}

#endif
