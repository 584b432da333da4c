/* log.c: one event per line on stderr, with <N> journal priority prefixes under systemd. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

static enum log_level log_threshold = LOG_LVL_INFO;
static int log_journal;		/* stderr is connected to the journal: use <N> prefixes */
static struct log_budget *over;	/* budgets with lines suppressed since the last flush */
static unsigned long long suppressed_total;

static const struct {
	const char *name;
	enum log_level lvl;
} log_names[] = {
	{ "error", LOG_LVL_ERROR },
	{ "warning", LOG_LVL_WARNING },
	{ "info", LOG_LVL_INFO },
	{ "debug", LOG_LVL_DEBUG },
};

void log_init(const char *progname)
{
	(void)progname;
	/* systemd sets JOURNAL_STREAM when stderr is the journal (systemd.exec(5)) */
	log_journal = getenv("JOURNAL_STREAM") != NULL;
	setvbuf(stderr, NULL, _IOLBF, 0);
}

void log_set_level(enum log_level lvl)
{
	log_threshold = lvl;
}

enum log_level log_get_level(void)
{
	return log_threshold;
}

int log_level_parse(const char *name)
{
	for (size_t i = 0; i < sizeof(log_names) / sizeof(log_names[0]); i++)
		if (strcmp(name, log_names[i].name) == 0)
			return (int)log_names[i].lvl;
	return -1;
}

const char *log_level_name(enum log_level lvl)
{
	for (size_t i = 0; i < sizeof(log_names) / sizeof(log_names[0]); i++)
		if (log_names[i].lvl == lvl)
			return log_names[i].name;
	return "?";
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	int n;

	if (lvl > log_threshold)
		return;
	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	/* one event per line: fold embedded newlines, drop a trailing one; no raw control bytes */
	for (char *p = line; *p; p++) {
		if (*p == '\n' || *p == '\r')
			*p = (p[1] == '\0') ? '\0' : ' ';
		else if ((unsigned char)*p < 0x20 || *p == 0x7f)
			*p = '?';
	}
	if (log_journal)
		fprintf(stderr, "<%d>%s: %s\n", (int)lvl, log_level_name(lvl), line);
	else
		fprintf(stderr, "%s: %s\n", log_level_name(lvl), line);
}

static long minute_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long)(ts.tv_sec / 60);
}

int log_budget_take(struct log_budget *b, enum log_level lvl)
{
	long m;

	if (lvl > log_threshold)
		return 0;
	m = minute_now();
	if (b->minute != m) {
		b->minute = m;
		b->used = 0;
	}
	if (b->used < LOG_BUDGET_PER_MINUTE) {
		b->used++;
		return 1;
	}
	b->suppressed++;
	suppressed_total++;
	if (!b->listed) {
		b->listed = 1;
		b->prev = NULL;
		b->next = over;
		if (over)
			over->prev = b;
		over = b;
	}
	return 0;
}

static void unlist(struct log_budget *b)
{
	if (b->prev)
		b->prev->next = b->next;
	else
		over = b->next;
	if (b->next)
		b->next->prev = b->prev;
	b->prev = b->next = NULL;
	b->listed = 0;
}

static void report(struct log_budget *b)
{
	log_msg(LOG_LVL_WARNING, "%s log=suppressed lines=%u reason=\"more than %d lines a minute\"",
		b->label[0] ? b->label : "source=-", b->suppressed, LOG_BUDGET_PER_MINUTE);
	b->suppressed = 0;
	unlist(b);
}

void log_budget_flush(void)
{
	while (over)
		report(over);
}

void log_budget_tick(void)
{
	static long flushed;
	long m = minute_now();

	if (m != flushed) {
		flushed = m;
		log_budget_flush();
	}
}

void log_budget_forget(struct log_budget *b)
{
	if (b->listed)
		report(b);
}

unsigned long long log_suppressed_total(void)
{
	return suppressed_total;
}
