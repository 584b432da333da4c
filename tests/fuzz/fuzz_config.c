/* fuzz_config.c: libFuzzer target for the configuration loader: the input is the YAML file given
 * to conf_load(), next to the files a configuration may name (keys, password, certificates). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "config.h"
#include "fuzz_files.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static FILE *errs;	/* /dev/null; stderr with C2M_FUZZ_VERBOSE=1 (to read a reproducer's errors) */

/* Files that conf/coap2mqtt.yaml and the unit-test configs name by relative path, so that seeds get
 * past the file checks into the rest of the loader. */
static void make_side_files(void)
{
	static const char keys[] = "window-livingroom s3cr3t-window-key\n"
				   "door-front hex:8f1e2d3c4b5a69788796a5b4c3d2e1f0\n";
	static const char full_keys[] = "dev-b bbbbbbbbbb\ndev-c\thex:0102030405060708\n";
	static const char pem[] = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
	char path[PATH_MAX];

	fuzz_files_write("devices.keys", keys, sizeof(keys) - 1, 0600, path, sizeof(path));
	fuzz_files_write("full.keys", full_keys, sizeof(full_keys) - 1, 0600, path, sizeof(path));
	fuzz_files_write("ca.pem", pem, sizeof(pem) - 1, 0644, path, sizeof(path));
	fuzz_files_write("client.crt", pem, sizeof(pem) - 1, 0644, path, sizeof(path));
	fuzz_files_write("client.key", pem, sizeof(pem) - 1, 0600, path, sizeof(path));
	fuzz_files_mkdir("secret");
	fuzz_files_write("secret/mqtt.password", "pw\n", 3, 0600, path, sizeof(path));
	/* "$CREDENTIALS_DIRECTORY/devices.keys" then names the same keys file */
	setenv("CREDENTIALS_DIRECTORY", fuzz_files_dir(), 1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	errs = getenv("C2M_FUZZ_VERBOSE") ? stderr : fopen("/dev/null", "w");
	if (errs == NULL)
		fuzz_fail("/dev/null");
	make_side_files();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[PATH_MAX];
	struct config *c;

	fuzz_files_write("coap2mqtt.yaml", data, size, 0600, path, sizeof(path));
	c = conf_load(path, errs);
	conf_free(c);
	return 0;
}
