/* fuzz_journal.c: libFuzzer target for the journal's start-up check of files on disk: the input
 * becomes a segment file (raw when it starts with 'C', as the header does; else after the header)
 * and journal_open() reads it as the gateway does at start — frames checked, a torn or corrupt
 * tail cut, readings loaded — then journal_close(). Nothing may crash, leak or read out of bounds,
 * and what was loaded must be consistent: the file is cut to exactly the frames that were taken. */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "journal.h"
#include "log.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];
static struct event_base *base;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	log_init("fuzz_journal");
	log_set_level(LOG_LVL_ERROR);
	snprintf(dir, sizeof(dir), "/tmp/fuzz_journal.XXXXXX");
	if (!mkdtemp(dir) || !(base = event_base_new()))
		abort();
	return 0;
}

static void clear_dir(void)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char path[128];

	while (d && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		unlink(path);
	}
	if (d)
		closedir(d);
}

/* The length of the valid frame prefix, computed independently of the loader. */
static size_t valid_prefix(const uint8_t *buf, size_t len)
{
	size_t off = 8, n;

	if (len < 8 || memcmp(buf, "C2MJNL1\n", 8) != 0)
		return 0;
	while ((n = journal_frame_check(buf + off, len - off)) != 0)
		off += n;
	return off;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct journal_limits lim = { .max_records = 1000, .max_bytes = 1 << 20 };
	char path[128];
	uint8_t *file;
	size_t flen, want;
	struct stat st;
	int fd;

	if (size > (1 << 20))
		return 0;
	flen = size + (size && data[0] == 'C' ? 0 : 8);
	file = malloc(flen + 1);
	if (!file)
		return 0;
	if (flen > size) {
		memcpy(file, "C2MJNL1\n", 8);
		memcpy(file + 8, data, size);
	} else {
		memcpy(file, data, size);
	}
	want = valid_prefix(file, flen);
	clear_dir();
	snprintf(path, sizeof(path), "%s/0000000000000001.jnl", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, file, flen) != (ssize_t)flen)
		abort();
	close(fd);
	if (journal_open(base, dir, &lim) == 0) {
		struct journal_stats s;

		journal_get_stats(&s);
		if (s.records > lim.max_records)
			abort();
		/* the segment keeps exactly its valid frames (or is gone when none was live) */
		if (stat(path, &st) == 0 && (size_t)st.st_size != want && want > 8)
			abort();
	}
	journal_close();
	free(file);
	return 0;
}
