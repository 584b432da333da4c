/* syncshim.c: LD_PRELOAD library for the journal's power-cut and I/O-error tests. For files named
 * *.jnl only:
 *   C2M_SHIM_LOG=FILE  after every successful fsync/fdatasync, appends "PATH SIZE\n" to FILE: the
 *                      length that is durable (the gateway has one writer thread per journal)
 *   C2M_SHIM_CTL=FILE  while FILE starts with "eio", fsync/fdatasync fail with EIO; while it
 *                      starts with "erofs", write() and creating a file fail with EROFS (a
 *                      filesystem gone read-only; remounting one is refused while the gateway
 *                      holds a segment open for writing)
 * Everything else goes to the C library unchanged. */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int is_journal(int fd, char *path, size_t len)
{
	char link[64];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, path, len - 1);
	if (n <= 4)
		return 0;
	path[n] = '\0';
	return strcmp(path + n - 4, ".jnl") == 0;
}

static int failing(const char *what)
{
	const char *ctl = getenv("C2M_SHIM_CTL");
	char buf[4] = "";
	int fd;

	if (!ctl || (fd = open(ctl, O_RDONLY | O_CLOEXEC)) < 0)
		return 0;
	if (read(fd, buf, 3) != 3)
		buf[0] = '\0';
	close(fd);
	return memcmp(buf, what, 3) == 0;
}

static void note_synced(int fd, const char *path)
{
	const char *log = getenv("C2M_SHIM_LOG");
	struct stat st;
	char line[4200];
	int lfd, n;

	if (!log || fstat(fd, &st) < 0)
		return;
	n = snprintf(line, sizeof(line), "%s %lld\n", path, (long long)st.st_size);
	lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (lfd < 0)
		return;
	if (write(lfd, line, (size_t)n) != n)
		n = 0;
	close(lfd);
}

static int sync_common(int fd, const char *name)
{
	int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
	char path[4096];
	int journal = is_journal(fd, path, sizeof(path)), rc;

	if (journal && failing("eio")) {
		errno = EIO;
		return -1;
	}
	rc = real(fd);
	if (rc == 0 && journal)
		note_synced(fd, path);
	return rc;
}

int fsync(int fd)
{
	return sync_common(fd, "fsync");
}

int fdatasync(int fd)
{
	return sync_common(fd, "fdatasync");
}

ssize_t write(int fd, const void *buf, size_t len)
{
	static ssize_t (*real)(int, const void *, size_t);
	char path[4096];

	if (!real)
		real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
	if (getenv("C2M_SHIM_CTL") && is_journal(fd, path, sizeof(path)) && failing("ero")) {
		errno = EROFS;
		return -1;
	}
	return real(fd, buf, len);
}

static int open_common(const char *name, int dirfd, const char *path, int flags, mode_t mode)
{
	int (*real)(int, const char *, int, ...) =
		(int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, name);
	size_t n = strlen(path);

	if ((flags & O_CREAT) && n > 4 && strcmp(path + n - 4, ".jnl") == 0 && failing("ero")) {
		errno = EROFS;
		return -1;
	}
	return real(dirfd, path, flags, mode);
}

/* built with _FILE_OFFSET_BITS=64 like the gateway: this is its openat64 */
int openat(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = (mode_t)va_arg(ap, int);
	va_end(ap);
	return open_common("openat64", dirfd, path, flags, mode);
}
