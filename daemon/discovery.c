/* discovery.c: multicast discovery (RFC 7252 8 and 12.8, RFC 6690). A libcoap context of its
 * own on the plain-CoAP port: it joins FF02::FD, FF05::FD and 224.0.1.187 on the configured
 * interfaces and has one resource, /.well-known/core, whose links name the gateway's coaps://
 * endpoints and the paths its routes accept. libcoap drops every error response to a request
 * sent to a group (RFC 7252 8.1) and delays the answers by a random Leisure (8.2); what is not
 * /.well-known/core gets nothing from a group and 4.04 from unicast. Answers are capped per
 * second, so that spoofed requests cannot make the gateway a traffic amplifier. */
#include "discovery.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <coap3/coap.h>

#include "config.h"
#include "log.h"

#define DISC_MAX_BODY 1024	/* one datagram: a group answer cannot be block-wise */
#define DISC_EPOLL_BATCH 16
#define DISC_RT_GATEWAY "coap2mqtt"
#define DISC_RT_ROUTE "coap2mqtt.route"

static const char *const groups[] = { "FF02::FD", "FF05::FD", "224.0.1.187" };

static struct {
	coap_context_t *coap;
	struct event *ev;
	const struct config *conf;
	time_t window;		/* the second the counts are of */
	unsigned answered, refused;
	struct log_budget log;	/* lines that requests cause */
} D;

/* ---- the links ---- */

struct body {
	char s[DISC_MAX_BODY + 1];
	size_t len;
	unsigned links;
};

/* A filter from the query (RFC 6690 4.1): one name=value, a trailing '*' matches a prefix. */
struct filter {
	char name[16];
	char value[128];
	size_t vlen;
	int prefix;
	int bad;
};

static void filter_parse(const coap_string_t *q, struct filter *f)
{
	const char *eq;
	size_t nlen, vlen;

	memset(f, 0, sizeof(*f));
	if (q == NULL || q->length == 0)
		return;
	eq = memchr(q->s, '=', q->length);
	nlen = eq ? (size_t)(eq - (const char *)q->s) : q->length;
	vlen = eq ? q->length - nlen - 1 : 0;
	/* one parameter only (RFC 6690: "a single query parameter") */
	if (!eq || nlen == 0 || nlen >= sizeof(f->name) || vlen >= sizeof(f->value) ||
	    memchr(q->s, '&', q->length)) {
		f->bad = 1;
		return;
	}
	memcpy(f->name, q->s, nlen);
	memcpy(f->value, eq + 1, vlen);
	f->vlen = vlen;
	if (vlen && f->value[vlen - 1] == '*') {
		f->prefix = 1;
		f->vlen--;
	}
}

static int value_matches(const struct filter *f, const char *v)
{
	size_t len = strlen(v);

	return f->prefix ? len >= f->vlen && memcmp(v, f->value, f->vlen) == 0 :
			   len == f->vlen && memcmp(v, f->value, f->vlen) == 0;
}

static int link_matches(const struct filter *f, const char *href, const char *rt,
			const char *title)
{
	if (f->bad)
		return 0;
	if (f->name[0] == '\0')
		return 1;
	if (strcmp(f->name, "href") == 0)
		return value_matches(f, href);
	if (strcmp(f->name, "rt") == 0)
		return value_matches(f, rt);
	if (strcmp(f->name, "title") == 0)
		return title && value_matches(f, title);
	return 0;
}

/* Appends one link when it matches and fits whole. */
static void add_link(struct body *b, const struct filter *f, const char *href, const char *rt,
		     const char *title)
{
	char line[512];
	int n;

	if (!link_matches(f, href, rt, title))
		return;
	n = title ? snprintf(line, sizeof(line), "%s<%s>;rt=\"%s\";title=\"%s\"",
			     b->links ? "," : "", href, rt, title) :
		    snprintf(line, sizeof(line), "%s<%s>;rt=\"%s\"", b->links ? "," : "", href, rt);
	if (n < 0 || (size_t)n >= sizeof(line) || b->len + (size_t)n > DISC_MAX_BODY)
		return;
	memcpy(b->s + b->len, line, (size_t)n);
	b->len += (size_t)n;
	b->s[b->len] = '\0';
	b->links++;
}

/* out = s percent-encoded as a URI path (RFC 3986 pchar and '/'); 0, or -1 when too long. */
static int path_encode(const char *s, size_t len, char *out, size_t cap)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t o = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		int plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			    (c >= '0' && c <= '9') || strchr("-._~!$&'()*+,;=:@/", c);

		if (c == 0 || o + 4 > cap)
			return -1;
		if (plain) {
			out[o++] = (char)c;
		} else {
			out[o++] = '%';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o] = '\0';
	return 0;
}

/* A route pattern's literal beginning, the segments before its first variable. */
static size_t literal_prefix(const char *pattern)
{
	const char *brace = strchr(pattern, '{');
	size_t len = brace ? (size_t)(brace - pattern) : strlen(pattern);

	while (len > 0 && pattern[len - 1] == '/')
		len--;
	return len;
}

/* title="...": the pattern as written, quotes and backslashes escaped. */
static void quoted(const char *s, char *out, size_t cap)
{
	size_t o = 0;

	for (; *s && o + 3 < cap; s++) {
		if (*s == '"' || *s == '\\')
			out[o++] = '\\';
		out[o++] = *s;
	}
	out[o] = '\0';
}

static void add_base(struct body *b, const struct filter *f, const char *base)
{
	char href[400], path[256], title[256];

	add_link(b, f, base, DISC_RT_GATEWAY, NULL);
	for (size_t i = 0; i < D.conf->n_routes; i++) {
		const struct conf_route *r = &D.conf->routes[i];
		size_t len = literal_prefix(r->path);

		if (path_encode(r->path, len, path, sizeof(path)) < 0)
			continue;
		snprintf(href, sizeof(href), "%s/%s", base, path);
		quoted(r->path, title, sizeof(title));
		add_link(b, f, href, DISC_RT_ROUTE, title);
	}
}

/* The address this host would use to reach the requester (the kernel's own source address
 * selection, RFC 6724: an address of the interface the request came in on, in its family and
 * scope), as a URI host into out, and its family. No netlink, no /proc: the service's sandbox
 * allows neither. 0, or -1. */
static int reach_host(const coap_session_t *s, char *out, size_t cap, int *family)
{
	const coap_address_t *r = coap_session_get_addr_remote(s);
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char text[INET6_ADDRSTRLEN];
	int fd, ok;

	if (r == NULL)
		return -1;
	fd = socket(r->addr.sa.sa_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	/* a UDP connect sends nothing: it only picks the route and the source */
	ok = connect(fd, &r->addr.sa, r->size) == 0 &&
	     getsockname(fd, (struct sockaddr *)&ss, &len) == 0;
	close(fd);
	if (!ok)
		return -1;
	if (ss.ss_family == AF_INET) {
		inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, text, sizeof(text));
		*family = AF_INET;
		snprintf(out, cap, "%s", text);
		return 0;
	}
	const struct in6_addr *v6 = &((struct sockaddr_in6 *)&ss)->sin6_addr;

	if (IN6_IS_ADDR_V4MAPPED(v6)) {
		inet_ntop(AF_INET, &v6->s6_addr[12], text, sizeof(text));
		*family = AF_INET;
		snprintf(out, cap, "%s", text);
		return 0;
	}
	inet_ntop(AF_INET6, v6, text, sizeof(text));
	*family = AF_INET6;
	snprintf(out, cap, "[%s]", text);
	return 0;
}

/* The links for a request of s. */
static void build(struct body *b, const struct filter *f, const coap_session_t *s)
{
	char base[320], host[300], local[INET6_ADDRSTRLEN + 2];
	int family = 0, have = 0;

	if (D.conf->discovery.n_advertise) {
		for (size_t i = 0; i < D.conf->discovery.n_advertise; i++)
			add_base(b, f, D.conf->discovery.advertise[i]);
		return;
	}
	for (size_t i = 0; i < D.conf->coap.n_listen; i++) {
		const char *u = D.conf->coap.listen[i], *hp, *colon;
		size_t hlen;

		if (strncmp(u, "coaps://", 8) != 0)
			continue;
		hp = u + 8;
		hlen = strcspn(hp, "?");
		colon = hp + hlen;
		while (colon > hp && *colon != ':')
			colon--;
		if (colon == hp || (size_t)(colon - hp) >= sizeof(host))
			continue;
		memcpy(host, hp, (size_t)(colon - hp));
		host[colon - hp] = '\0';
		/* a listener on every address is named by the address the requester reaches */
		if (strcmp(host, "[::]") == 0 || strcmp(host, "0.0.0.0") == 0) {
			if (!have)
				have = reach_host(s, local, sizeof(local), &family) == 0 ? 1 : -1;
			if (have < 0 || (strcmp(host, "0.0.0.0") == 0 && family != AF_INET))
				continue;
			snprintf(host, sizeof(host), "%s", local);
		}
		snprintf(base, sizeof(base), "coaps://%s%.*s", host, (int)(hp + hlen - colon), colon);
		add_base(b, f, base);
	}
}

/* ---- the resource ---- */

static int may_answer(void)
{
	time_t now = time(NULL);

	if (now != D.window) {
		if (D.refused > 1)
			log_src(&D.log, LOG_LVL_INFO, "discovery: not_answered=%u in_one_second=yes "
				"reason=\"over discovery.max_answers\"", D.refused);
		D.window = now;
		D.answered = D.refused = 0;
	}
	if (D.answered >= D.conf->discovery.max_answers) {
		if (D.refused++ == 0)
			log_src(&D.log, LOG_LVL_INFO, "discovery: answers=%u max_answers=reached "
				"reason=\"the rest of this second gets no answer\"", D.answered);
		return 0;
	}
	D.answered++;
	return 1;
}

static void on_wellknown(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req,
			 const coap_string_t *query, coap_pdu_t *resp)
{
	const coap_address_t *local = coap_session_get_addr_local(s);
	int group = local && coap_is_mcast(local);
	uint8_t buf[4];
	struct filter f;
	struct body b = { .len = 0 };

	(void)r;
	(void)req;
	coap_pdu_set_code(resp, COAP_EMPTY_CODE);	/* nothing is sent for a group */
	if (!may_answer())
		return;
	filter_parse(query, &f);
	build(&b, &f, s);
	log_debug("discovery: peer=%s group=%s links=%u", coap_session_str(s), group ? "yes" : "no",
		  b.links);
	if (group && b.links == 0)
		return;		/* RFC 6690 4.1: no empty answer to a group */
	coap_session_set_default_leisure(s, (coap_fixed_point_t){ D.conf->discovery.leisure, 0 });
	coap_pdu_set_code(resp, COAP_RESPONSE_CODE(205));
	coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT,
			coap_encode_var_safe(buf, sizeof(buf), COAP_MEDIATYPE_APPLICATION_LINK_FORMAT),
			buf);
	coap_add_data(resp, b.len, (const uint8_t *)b.s);
}

/* ---- the loop ---- */

static void on_fd(evutil_socket_t fd, short what, void *arg)
{
	struct epoll_event events[DISC_EPOLL_BATCH];
	coap_tick_t now;
	int n;

	(void)what;
	(void)arg;
	n = epoll_wait(fd, events, DISC_EPOLL_BATCH, 0);
	if (n > 0)
		coap_io_do_epoll(D.coap, events, (size_t)n);
	else if (n < 0 && errno != EINTR)
		log_error("discovery: epoll_wait: %s", strerror(errno));
	/* delayed answers (Leisure) and timeouts, and libcoap's timer re-armed */
	coap_ticks(&now);
	coap_io_prepare_epoll(D.coap, now);
}

static int join(const struct conf_discovery *d)
{
	int joined = 0;

	for (size_t i = 0; i < d->n_interfaces; i++)
		for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++) {
			if (coap_join_mcast_group_intf(D.coap, groups[g], d->interfaces[i]) == 0) {
				joined++;
				continue;
			}
			log_warn("discovery: group=%s interface=%s joined=no (see the libcoap line "
				 "before; no such interface, or no address of that family on it?)",
				 groups[g], d->interfaces[i]);
		}
	return joined;
}

int discovery_init(struct event_base *base, const struct config *c)
{
	const struct conf_discovery *d = &c->discovery;
	coap_address_t addr;
	coap_resource_t *r;
	int fd;

	D.conf = c;
	snprintf(D.log.label, sizeof(D.log.label), "identity=- source=\"discovery requests\"");
	if (!d->multicast)
		return 0;
	D.coap = coap_new_context(NULL);
	if (!D.coap)
		return -1;
	/* every address, both families: the IPv4 group is joined on this socket too */
	coap_address_init(&addr);
	addr.addr.sin6.sin6_family = AF_INET6;
	addr.addr.sin6.sin6_addr = in6addr_any;
	addr.addr.sin6.sin6_port = htons((uint16_t)d->port);
	addr.size = sizeof(addr.addr.sin6);
	if (!coap_new_endpoint(D.coap, &addr, COAP_PROTO_UDP)) {
		log_error("discovery: cannot bind udp port %u (in use by another CoAP server?)",
			  d->port);
		return -1;
	}
	r = coap_resource_init(coap_make_str_const(".well-known/core"), 0);
	if (!r)
		return -1;
	coap_register_handler(r, COAP_REQUEST_GET, on_wellknown);
	coap_add_resource(D.coap, r);
	if (join(d) == 0) {
		log_error("discovery: no All-CoAP-Nodes group could be joined on %zu interface(s)",
			  d->n_interfaces);
		return -1;
	}
	fd = coap_context_get_coap_fd(D.coap);
	D.ev = fd < 0 ? NULL : event_new(base, fd, EV_READ | EV_PERSIST, on_fd, NULL);
	if (!D.ev || event_add(D.ev, NULL) < 0) {
		log_error("discovery: cannot register its events");
		return -1;
	}
	log_info("discovery: multicast=on port=%u interfaces=%zu groups=FF02::FD,FF05::FD,"
		 "224.0.1.187", d->port, d->n_interfaces);
	return 0;
}

void discovery_set_config(const struct config *c)
{
	D.conf = c;
}

void discovery_shutdown(void)
{
	if (D.ev)
		event_free(D.ev);
	if (D.coap)
		coap_free_context(D.coap);
	log_budget_forget(&D.log);
	memset(&D, 0, sizeof(D));
}
