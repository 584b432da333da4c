/* fuzz_files.h: a private temporary folder for the fuzz targets whose parsers read files; every
 * file written there is removed, with the folder, when the fuzzer exits. */
#ifndef C2M_FUZZ_FILES_H
#define C2M_FUZZ_FILES_H

#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FUZZ_MAX_FILES 16

static struct {
	char dir[PATH_MAX];
	char made[FUZZ_MAX_FILES][PATH_MAX];	/* files and sub-folders, in creation order */
	int nmade;
} fuzz_files;

static inline void fuzz_fail(const char *what)
{
	perror(what);
	exit(2);	/* the environment, not the input: libFuzzer reports it and stops */
}

static inline void fuzz_files_cleanup(void)
{
	while (fuzz_files.nmade > 0) {
		const char *p = fuzz_files.made[--fuzz_files.nmade];

		if (unlink(p) < 0)
			rmdir(p);
	}
	if (fuzz_files.dir[0] != '\0')
		rmdir(fuzz_files.dir);
}

/* Creates the folder under $TMPDIR (or /tmp) once; returns its path. */
static inline const char *fuzz_files_dir(void)
{
	const char *tmp = getenv("TMPDIR");

	if (fuzz_files.dir[0] != '\0')
		return fuzz_files.dir;
	snprintf(fuzz_files.dir, sizeof(fuzz_files.dir), "%s/c2m-fuzz-XXXXXX",
		 tmp && *tmp ? tmp : "/tmp");
	if (mkdtemp(fuzz_files.dir) == NULL)
		fuzz_fail("mkdtemp");
	atexit(fuzz_files_cleanup);
	return fuzz_files.dir;
}

/* Full path of name inside the folder, remembered for removal (once per name). */
static inline const char *fuzz_files_path(const char *name, char *path, size_t len)
{
	int i;

	snprintf(path, len, "%s/%s", fuzz_files_dir(), name);
	for (i = 0; i < fuzz_files.nmade; i++)
		if (strcmp(fuzz_files.made[i], path) == 0)
			return path;
	if (fuzz_files.nmade == FUZZ_MAX_FILES) {
		fprintf(stderr, "fuzz_files: more than %d files\n", FUZZ_MAX_FILES);
		exit(2);
	}
	snprintf(fuzz_files.made[fuzz_files.nmade++], PATH_MAX, "%s", path);
	return path;
}

/* Creates sub-folder name (mode 0700). */
static inline void fuzz_files_mkdir(const char *name)
{
	char path[PATH_MAX];

	fuzz_files_path(name, path, sizeof(path));
	if (mkdir(path, 0700) < 0)
		fuzz_fail(path);
}

/* (Re)writes name with exactly data[0..size) and mode; returns its full path in path. */
static inline const char *fuzz_files_write(const char *name, const void *data, size_t size,
					   mode_t mode, char *path, size_t len)
{
	const uint8_t *p = data;
	int fd;

	fuzz_files_path(name, path, len);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0 || fchmod(fd, mode) < 0)
		fuzz_fail(path);
	while (size > 0) {
		ssize_t n = write(fd, p, size);

		if (n < 0)
			fuzz_fail(path);
		p += n;
		size -= (size_t)n;
	}
	if (close(fd) < 0)
		fuzz_fail(path);
	return path;
}

#endif
