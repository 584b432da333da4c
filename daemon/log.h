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

#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)

#endif
