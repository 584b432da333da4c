/* log.h: levelled, printf-checked logging to stderr (journal priorities) — never a key. */
#ifndef C2M_LOG_H
#define C2M_LOG_H

enum log_level { LOG_LVL_ERROR = 3, LOG_LVL_WARNING = 4, LOG_LVL_INFO = 6, LOG_LVL_DEBUG = 7 };

void log_init(const char *progname);
void log_set_level(enum log_level lvl);
enum log_level log_get_level(void);
/* "error" | "warning" | "info" | "debug" → level; returns -1 when unknown */
int log_level_parse(const char *name);
const char *log_level_name(enum log_level lvl);

void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A budget of log lines for one source a peer drives (a device identity; peers without one
 * share a budget): LOG_BUDGET_PER_MINUTE lines in each minute of the monotonic clock, the rest
 * counted. log_budget_flush() logs one line per source that went over since the last flush
 * ("<label> log=suppressed lines=N"); log_budget_tick(), called often, flushes when a new minute
 * began. A budget must be zeroed before use; label names the source ("identity=meter-7"). */
#define LOG_BUDGET_PER_MINUTE 20
struct log_budget {
	long minute;			/* the minute that used counts */
	unsigned used, suppressed;
	char label[160];
	struct log_budget *prev, *next;	/* on the list of budgets with suppressed > 0 */
	int listed;
};

/* 1 when a line at lvl from this source may be logged now (lines the level hides are free). */
int log_budget_take(struct log_budget *b, enum log_level lvl);
void log_budget_flush(void);
void log_budget_tick(void);
/* Before a budget's memory goes: off the flush list (what it suppressed is logged first). */
void log_budget_forget(struct log_budget *b);
/* Lines suppressed by budgets since start. */
unsigned long long log_suppressed_total(void);

#define log_src(b, lvl, ...) \
	do { \
		if (log_budget_take((b), (lvl))) \
			log_msg((lvl), __VA_ARGS__); \
	} while (0)

#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)

#endif
