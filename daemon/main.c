/* main.c: arguments, --check, start-up in order, signals, the loop, teardown in reverse. */
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <systemd/sd-daemon.h>
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include "command.h"
#include "config.h"
#include "device.h"
#include "discovery.h"
#include "exchange.h"
#include "heap.h"
#include "journal.h"
#include "keys.h"
#include "log.h"
#include "loop.h"
#include "metrics.h"
#include "mqtt.h"
#include "notify.h"
#include "observe.h"
#include "oscore.h"
#include "stats.h"
#include "uplink.h"

#define SHUTDOWN_MQTT_MS 2000	/* of the 5 s a service manager grants */
#define STATUS_PERIOD_US 5000000	/* STATUS= to the service manager */

static struct {
	const char *conf_path;
	struct config *conf;
	struct config *boot;		/* the start-up configuration: mqtt.c keeps pointers into its
					 * mqtt section (mqtt changes need a restart), so it stays */
	struct keys *keys;
	struct event *sig_term, *sig_int, *sig_hup;
	struct event *health;		/* watchdog keep-alive and STATUS= from the loop itself */
	uint64_t last_published;
	uint64_t health_us;
} G;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: coap2mqtt [-c FILE] [--check] [--show-rpk] [--version] [--help]\n"
		"  -c, --config FILE  configuration (default " CONF_DEFAULT_PATH ")\n"
		"  -t, --check        validate the configuration and its files, print every error,\n"
		"                     exit 0 when valid, 1 otherwise\n"
		"      --show-rpk     print the gateway's raw public key (coap.rpk.key_file): its\n"
		"                     fingerprint and PEM, for devices that pin it\n"
		"  -V, --version      print versions of coap2mqtt, libcoap and wolfSSL\n"
		"  -h, --help         this text\n"
		"Signals: SIGTERM/SIGINT stop (readings in flight are persisted), SIGHUP reloads.\n");
}

static void print_version(void)
{
	printf("coap2mqtt %s (%s, wolfSSL %s)\n", C2M_VERSION, coap_package_version(),
	       wolfSSL_lib_version());
}

static void on_stop(evutil_socket_t sig, short what, void *arg)
{
	(void)what;
	(void)arg;
	log_info("signal=%s stopping", sig == SIGTERM ? "TERM" : "INT");
	notify_state("STOPPING=1");
	loop_stop();
}

static void on_reload(evutil_socket_t sig, short what, void *arg)
{
	const char *restart_keys[CONF_RESTART_KEYS];
	size_t restart;

	struct config *c;
	struct keys *k;

	(void)sig;
	(void)what;
	(void)arg;
	notify_state("RELOADING=1");
	c = conf_load(G.conf_path, stderr);
	if (!c) {
		log_error("reload: %s is invalid (errors above); keeping the running configuration",
			  G.conf_path);
		notify_state("READY=1");
		return;
	}
	k = keys_new(c->devices, c->n_devices);
	if (!k) {
		log_error("reload: out of memory; keeping the running configuration");
		conf_free(c);
		notify_state("READY=1");
		return;
	}
	restart = conf_restart_needed(G.conf, c, restart_keys, CONF_RESTART_KEYS);
	for (size_t i = 0; i < restart; i++)
		log_warn("reload: %s changed; it applies after a restart", restart_keys[i]);
	loop_set_config(c, k);
	uplink_set_config(c);
	dev_set_config(c);
	if (oscore_apply(c->devices, c->n_devices) < 0)
		log_error("reload: some OSCORE devices could not be set up (above); they are "
			  "refused until a later reload");
	dev_apply_keys(k);
	observe_set_config(c);
	command_set_config(c);
	metrics_set_config(&c->metrics);
	discovery_set_config(c);
	log_set_level(c->log_level);
	keys_free(G.keys);
	if (G.conf != G.boot)
		conf_free(G.conf);
	G.keys = k;
	G.conf = c;
	log_info("reload: ok devices=%zu routes=%zu restart_needed=%zu", c->n_devices, c->n_routes,
		 restart);
	notify_state("READY=1");
}

/* Runs on the loop: a stuck loop stops the keep-alives and the service manager restarts us. */
static void on_health(evutil_socket_t fd, short what, void *arg)
{
	uint64_t pub = stats_get(STAT_PUBLISHED);
	double rate = (double)(pub - G.last_published) * 1e6 / (double)G.health_us;
	struct journal_stats js;

	(void)fd;
	(void)what;
	(void)arg;
	G.last_published = pub;
	journal_get_stats(&js);
	notify_keepalive("WATCHDOG=1\nSTATUS=sessions=%zu online=%zu readings/s=%.1f broker=%s "
		   "buffered=%zu journal_bytes=%" PRIu64 " observing=%zu commands=%zu", dev_sessions(),
		   dev_online(), rate, mqtt_connected() ? "connected" : "disconnected", js.records,
		   js.bytes, observe_active(), command_queued());
}

static int health_init(struct event_base *base)
{
	uint64_t wd = 0;
	struct timeval tv;

	if (notify_init(base) < 0)
		return -1;
	G.health_us = STATUS_PERIOD_US;
	if (sd_watchdog_enabled(0, &wd) > 0 && wd / 2 < G.health_us)
		G.health_us = wd / 2;
	tv.tv_sec = (time_t)(G.health_us / 1000000);
	tv.tv_usec = (suseconds_t)(G.health_us % 1000000);
	G.health = event_new(base, -1, EV_PERSIST, on_health, NULL);
	return G.health && event_add(G.health, &tv) == 0 ? 0 : -1;
}

static int signals_init(struct event_base *base)
{
	signal(SIGPIPE, SIG_IGN);
	G.sig_term = evsignal_new(base, SIGTERM, on_stop, NULL);
	G.sig_int = evsignal_new(base, SIGINT, on_stop, NULL);
	G.sig_hup = evsignal_new(base, SIGHUP, on_reload, NULL);
	if (!G.sig_term || !G.sig_int || !G.sig_hup || evsignal_add(G.sig_term, NULL) < 0 ||
	    evsignal_add(G.sig_int, NULL) < 0 || evsignal_add(G.sig_hup, NULL) < 0)
		return -1;
	return 0;
}

static void signals_shutdown(void)
{
	if (G.sig_term)
		event_free(G.sig_term);
	if (G.sig_int)
		event_free(G.sig_int);
	if (G.sig_hup)
		event_free(G.sig_hup);
	if (G.health)
		event_free(G.health);
}

enum { OPT_SHOW_RPK = 256 };

/* *mode: 1 --check, 2 --show-rpk */
static int parse_args(int argc, char **argv, int *mode)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check", no_argument, NULL, 't' },
		{ "show-rpk", no_argument, NULL, OPT_SHOW_RPK },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int ch;

	G.conf_path = CONF_DEFAULT_PATH;
	while ((ch = getopt_long(argc, argv, "c:tVh", opts, NULL)) != -1) {
		switch (ch) {
		case 'c': G.conf_path = optarg; break;
		case 't': *mode = 1; break;
		case OPT_SHOW_RPK: *mode = 2; break;
		case 'V': print_version(); exit(0);
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "coap2mqtt: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return -1;
	}
	return 0;
}

static void on_mqtt_state(int connected)
{
	journal_mqtt_state(connected);
	uplink_mqtt_state(connected);
}

static void on_device_up(struct device *d)
{
	observe_device_up(d);
	command_device_up(d);
}

static void on_device_down(struct device *d, const char *reason)
{
	observe_device_down(d, reason);
	command_device_down(d, reason);
}

/* Responses and NACKs to the gateway's own requests: observations first, then commands. */
static int on_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd)
{
	dev_sess_get(s);	/* a device that moved with its Connection ID: peer= follows it */
	return observe_response(s, sent, rcvd) || command_response(s, sent, rcvd);
}

static void on_nack(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason)
{
	if (!observe_nack(s, sent, reason))
		command_nack(s, sent, reason);
}

static int run(void)
{
	static const struct dev_hooks hooks = { on_device_up, on_device_down };
	static const struct loop_handlers handlers = {
		.resource = uplink_resource, .handshake_start = dev_handshake_start,
		.session_event = dev_session_event, .response = on_response, .nack = on_nack,
		.block1_start = uplink_block1_start,
	};
	char listen[256] = "";
	int rc;

	G.keys = keys_new(G.conf->devices, G.conf->n_devices);
	if (!G.keys) {
		log_error("out of memory building the key store");
		return 1;
	}
	if (G.conf->n_devices == 0)
		log_warn("no devices configured: every handshake will be refused");
	struct journal_limits jl = { .max_records = (size_t)G.conf->mqtt.max_buffered,
				     .max_bytes = G.conf->mqtt.max_buffered_bytes };

	if (loop_init(G.conf, G.keys, &handlers) < 0 || signals_init(loop_base()) < 0 ||
	    health_init(loop_base()) < 0 || exch_init() < 0 ||
	    journal_open(loop_base(), G.conf->mqtt.persistence_dir, &jl) < 0 ||
	    oscore_init(loop_base(), loop_coap(), G.conf->mqtt.persistence_dir, G.conf->devices,
			G.conf->n_devices) < 0 ||
	    mqtt_init(loop_base(), &G.conf->mqtt, on_mqtt_state, command_on_message) < 0 ||
	    dev_init(G.conf, &hooks) < 0 || observe_init(G.conf) < 0 || command_init(G.conf) < 0 ||
	    metrics_init(loop_base(), &G.conf->metrics) < 0 ||
	    discovery_init(loop_base(), G.conf) < 0)
		return 1;
	for (size_t i = 0; i < G.conf->coap.n_listen; i++)
		snprintf(listen + strlen(listen), sizeof(listen) - strlen(listen), "%s%s", i ? "," : "",
			 G.conf->coap.listen[i]);
	log_info("ready listen=%s devices=%zu routes=%zu version=%s", listen, G.conf->n_devices,
		 G.conf->n_routes, C2M_VERSION);
	notify_state("READY=1");
	rc = loop_run();
	loop_close_listeners();
	return rc < 0 ? 1 : 0;
}

/* --show-rpk: what a device pins to know it talks to this gateway. */
static int show_rpk(void)
{
	char fp[KEYS_RPK_TEXT];
	int rc = 0;

	if (!G.conf->coap.rpk_key_file) {
		fprintf(stderr, "coap2mqtt: %s: coap.rpk.key_file is not set\n", G.conf_path);
		rc = 1;
	} else {
		keys_format_rpk(G.conf->coap.rpk.fp, fp);
		printf("rpk: %s\nkey_file: %s\n%s", fp, G.conf->coap.rpk_key_file,
		       G.conf->coap.rpk.pub_pem);
	}
	conf_free(G.conf);
	return rc;
}

int main(int argc, char **argv)
{
	int check = 0, rc;

	heap_init();	/* before anything calls into wolfSSL */
	log_init("coap2mqtt");
	if (parse_args(argc, argv, &check) < 0)
		return 2;
	G.conf = conf_load(G.conf_path, stderr);
	if (!G.conf) {
		fprintf(stderr, "coap2mqtt: %s: configuration invalid\n", G.conf_path);
		return 1;
	}
	if (check == 1) {
		printf("%s: configuration OK (%zu devices, %zu routes)\n", G.conf_path,
		       G.conf->n_devices, G.conf->n_routes);
		conf_free(G.conf);
		return 0;
	}
	if (check == 2)
		return show_rpk();
	G.boot = G.conf;
	log_set_level(G.conf->log_level);
	rc = run();
	/* teardown in reverse: metrics, commands and observations answered or cancelled, presence,
	 * broker (persist or finish in-flight), pending answers, CoAP, loop */
	journal_flush();	/* the last batch on disk: its devices get their 2.04 */
	metrics_shutdown();
	discovery_shutdown();
	command_shutdown();
	observe_shutdown();
	dev_shutdown();
	mqtt_shutdown(SHUTDOWN_MQTT_MS);
	uplink_shutdown();
	journal_close();	/* retirements of the last PUBACKs written */
	exch_shutdown();
	signals_shutdown();
	notify_shutdown();
	loop_shutdown();
	oscore_shutdown();	/* after libcoap's contexts: they ask it until then */
	keys_free(G.keys);
	if (G.boot != G.conf)
		conf_free(G.boot);
	conf_free(G.conf);
	log_budget_flush();	/* what sources had suppressed since the last minute */
	log_info("stopped status=%d", rc);
	return rc;
}
