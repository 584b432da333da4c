"""Metrics: Prometheus text on GET /metrics (evhttp) and the periodic JSON snapshot on MQTT, with
the numbers a known sequence of readings, refusals and failed handshakes must produce."""
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import (SimBackground, free_port, sim, tail, unique, wait_mqtt_connected,
                      wait_until)
from test_flood import uses_asan

WRONG_KEY = "Not-The-Right-Key-42"

# name{label="value",...} value   (exposition format 0.0.4; our values are integers)
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*",?)*)\})?'
                       r' (-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\]*)"')


def http(port, path="/metrics", method="GET"):
    """(status, content type, body) of one request to the metrics listener."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode(errors="replace")


def parse(text):
    """Checks every line of an exposition; returns {(name, ((label, value), ...)): number}."""
    samples, helped, typed = {}, set(), {}
    assert text.endswith("\n"), "the exposition must end with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            typed[name] = kind
            continue
        assert not line.startswith("#"), f"unexpected comment: {line!r}"
        m = SAMPLE_RE.match(line)
        assert m, f"not `name{{labels}} value`: {line!r}"
        name, labels, v = m.groups()
        assert name in typed and name in helped, f"{name} has no # HELP / # TYPE before it"
        assert name.startswith("coap2mqtt_"), name
        assert (typed[name] == "counter") == name.endswith("_total"), \
            f"{name}: counters and only counters end in _total"
        key = (name, tuple(sorted(LABEL_RE.findall(labels or ""))))
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(v)
    return samples


def scrape(port):
    status, ctype, body = http(port)
    assert status == 200, (status, body)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    return parse(body)


def val(samples, name, **labels):
    return samples[("coap2mqtt_" + name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_world(broker_factory, subscriber_factory, gateway_factory):
    b = broker_factory()
    topic = f"coap2mqtt/{unique('gw')}/metrics"
    msub = subscriber_factory(b, topic=topic)
    sub = subscriber_factory(b)
    port = free_port(socket.SOCK_STREAM)
    gw = gateway_factory(b, extra={"metrics": {"listen": f"127.0.0.1:{port}", "topic": topic,
                                               "interval": 1}})
    wait_mqtt_connected(gw)
    gw.wait_for_log(rf"metrics: listening listen=127\.0\.0\.1:{port} ")
    return b, sub, msub, gw, port, topic


def test_counters_gauges_and_json_snapshot(metrics_world):
    _, sub, msub, gw, port, topic = metrics_world
    # sensor-02 keeps its session: one reading now, the next only after the test
    bg = SimBackground(gw, "--count", 2, "--interval", 600000, "--timeout", 0,
                       "--path", "fast/keepalive", "--payload", "bg", identity="sensor-02")
    try:
        wait_until(lambda: bg.responses(), 30, "the background device's first answer")
        assert [r["code"] for _, r in bg.responses()] == ["2.04"]

        r = sim(gw, "--count", 3, "--interval", 50, "--path", "sensors/temperature")
        assert r.rc == 0 and r.codes() == ["2.04"] * 3, r
        r = sim(gw, "--count", 1, "--path", "nowhere/at/all")
        assert r.codes() == ["4.04"], r
        r = sim(gw, "--count", 1, "--path", "put-only/x")  # POST on a PUT-only route
        assert r.codes() == ["4.05"], r
        r = sim(gw, "--count", 1, "--path", "sensors/x", "--handshake-timeout", 3,
                "--max-retransmit", 1, key=WRONG_KEY)
        assert r.rc != 0 and not r.codes(), r
        r = sim(gw, "--count", 1, "--path", "sensors/x", "--handshake-timeout", 3,
                "--max-retransmit", 1, identity="intruder-9", key=WRONG_KEY)
        assert r.rc != 0 and not r.codes(), r
        sub.wait_for(4, 20)

        # the wrong key shows only when the gateway's handshake deadline (10 s) expires;
        # the finished devices' sessions close
        def settled():
            s = scrape(port)
            return s if (val(s, "handshake_failures_total", reason="wrong_key") == 1 and
                         val(s, "sessions") == 1 and val(s, "buffered") == 0) else None
        try:
            s = wait_until(settled, 40, "wrong_key=1, sessions=1, buffered=0", interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{http(port)[2]}\n{tail(gw.log_text())}") from None

        expect = {
            ("sessions", ()): 1, ("devices_online", ()): 1,
            ("oscore_devices", ()): 0, ("oscore_held_total", ()): 0,
            ("handshakes_total", ()): 4,  # background + three sims with the right key
            ("handshake_failures_total", (("reason", "wrong_key"),)): 1,
            ("handshake_failures_total", (("reason", "unknown_identity"),)): 1,
            ("handshake_failures_total", (("reason", "bad_certificate"),)): 0,
            ("handshake_failures_total", (("reason", "dtls_error"),)): 0,
            # each of the six clients (the four above, the wrong key, the unknown identity)
            # first got a HelloVerifyRequest, then echoed its cookie
            ("hello_verify_total", ()): 6, ("cookies_verified_total", ()): 6,
            ("cookies_refused_total", ()): 0,
            ("stranger_datagrams_dropped_total", ()): 0, ("reconnects_total", ()): 0,
            ("evictions_total", (("reason", "max_sessions"),)): 0,
            ("evictions_total", (("reason", "max_handshakes"),)): 0,
            ("evictions_total", (("reason", "stalled"),)): 0,
            ("handshakes_refused_total", (("reason", "per_ip"),)): 0,
            ("handshakes_refused_total", (("reason", "full"),)): 0,
            ("requests_total", (("code", "2.04"),)): 4,
            ("requests_total", (("code", "4.00"),)): 0,
            ("requests_total", (("code", "4.01"),)): 0,
            ("requests_total", (("code", "4.04"),)): 1,
            ("requests_total", (("code", "4.05"),)): 1,
            ("requests_total", (("code", "4.13"),)): 0,
            ("requests_total", (("code", "5.03"),)): 0,
            ("uploads_refused_total", (("reason", "no_route"),)): 0,
            ("uploads_refused_total", (("reason", "busy"),)): 0,
            ("duplicates_total", ()): 0, ("readings_total", ()): 4,
            ("publishes_total", (("qos", "1"),)): 3, ("publishes_total", (("qos", "2"),)): 0,
            ("publish_failures_total", ()): 0, ("buffered", ()): 0, ("dropped_total", ()): 0,
            ("broker_acks_pending", ()): 0, ("broker_acks_refused_total", ()): 0,
            ("log_lines_suppressed_total", ()): 0,
            ("observations_active", ()): 0, ("notifications_total", ()): 0,
            ("notifications_stale_total", ()): 0, ("commands_sent_total", ()): 0,
            ("command_errors_total", ()): 0, ("commands_queued", ()): 0,
            ("notify_dropped_total", ()): 0,
            ("broker_connected", ()): 1, ("broker_reconnects_total", ()): 0,
        }
        got = {(n[len("coap2mqtt_"):], l): v for (n, l), v in s.items()}
        qos0 = got.pop(("publishes_total", (("qos", "0"),)))
        # the background device's QoS 0 reading went to the client at the end of a loop turn:
        # the calls took some CPU time (microseconds; a publish call alone takes several)
        handoff = got.pop(("qos0_handoff_cpu_microseconds_total", ()))
        assert handoff >= 1, handoff
        # wolfSSL's share of the heap: the session held, the front door's object, the contexts;
        # the heap in all (not known under a sanitizer's allocator) holds it
        heap = {p: got.pop(("heap_bytes", (("part", p),))) for p in ("all", "dtls")}
        assert heap["dtls"] > 0, heap
        assert uses_asan(gw.proc.pid) or heap["all"] > heap["dtls"], heap
        # the journal: the three QoS 1 readings, each committed with an fdatasync
        jn = {n: got.pop((n, ())) for n, _ in list(got) if n.startswith("journal_")}
        assert jn.pop("journal_records_total") == 3, jn
        fsyncs, commits = jn.pop("journal_fsyncs_total"), jn.pop("journal_commits_total")
        assert 1 <= fsyncs <= 3 and commits >= fsyncs, (fsyncs, commits)  # + retirement writes
        assert jn.pop("journal_bytes") >= 0, jn
        assert jn.pop("journal_fsync_p99_microseconds") >= jn.pop("journal_fsync_p50_microseconds")
        assert jn.pop("journal_segments") in (0, 1), jn
        assert jn == {"journal_replays_total": 0, "journal_store_errors_total": 0,
                      "journal_cut_bytes_total": 0}, jn
        assert qos0 >= 1, "the background reading (QoS 0 route) and the snapshots"
        assert got == expect, {k: (got.get(k), expect.get(k)) for k in set(got) | set(expect)
                               if got.get(k) != expect.get(k)}

        # the JSON snapshot: same numbers, QoS 0, not retained, application/json
        t0 = time.monotonic()
        m = msub.wait_for(1, 10, match=lambda m: m.time > t0)[-1]
        assert (m.topic, m.qos, m.retain, m.content_type) == (topic, 0, False,
                                                               "application/json"), m
        j = json.loads(m.payload)
        assert isinstance(j.pop("time"), int)
        assert j.pop("heap_bytes")["dtls"] > 0
        assert j.pop("publishes")["0"] >= qos0
        assert j.pop("qos0_handoff_cpu_us") >= handoff
        jj = {k: j.pop(k) for k in list(j) if k.startswith("journal_")}
        assert jj["journal_records"] == 3 and jj["journal_fsyncs"] >= 1, jj
        assert (jj["journal_replays"], jj["journal_store_errors"], jj["journal_cut_bytes"]) == \
            (0, 0, 0), jj
        assert j == {
            "sessions": 1, "online": 1, "oscore_devices": 0, "oscore_held": 0,
            "handshakes_ok": 4,
            "handshakes_failed": {"wrong_key": 1, "unknown_identity": 1, "bad_certificate": 0,
                                  "dtls_error": 0},
            "hello_verify": 6, "cookies_verified": 6, "cookies_refused": 0,
            "stranger_dropped": 0,
            "reconnects": 0,
            "evictions": {"max_sessions": 0, "max_handshakes": 0, "stalled": 0},
            "handshakes_refused": {"per_ip": 0, "full": 0},
            "requests": {"2.04": 4, "4.00": 0, "4.01": 0, "4.04": 1, "4.05": 1, "4.13": 0,
                         "5.03": 0},
            "uploads_refused": {"no_route": 0, "busy": 0},
            "duplicates": 0, "readings": 4, "publish_failures": 0, "acks_pending": 0,
            "acks_refused": 0, "buffered": 0, "log_suppressed": 0,
            "dropped": 0, "observations": 0, "notifications": 0, "notifications_stale": 0,
            "commands_sent": 0, "command_errors": 0, "commands_queued": 0,
            "notify_dropped": 0, "broker_connected": 1, "broker_reconnects": 0,
        }, j
    finally:
        bg.stop()


def test_other_dtls_failure_has_its_own_reason(broker_factory, gateway_factory):
    """No common cipher suite: the handshake fails before any identity is sent."""
    b = broker_factory()
    port = free_port(socket.SOCK_STREAM)
    gw = gateway_factory(b, coap={"ciphers": ["TLS_PSK_WITH_AES_128_CCM_8"]},
                         extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
    r = sim(gw, "--count", 1, "--path", "sensors/x", "--handshake-timeout", 3,
            "--max-retransmit", 1, "--cipher", "PSK-AES256-GCM-SHA384")
    assert r.rc != 0 and not r.codes(), r
    s = wait_until(lambda: (lambda s: s if val(s, "handshake_failures_total",
                                               reason="dtls_error") else None)(scrape(port)),
                   15, "a dtls_error handshake failure", interval=0.3)
    assert val(s, "handshake_failures_total", reason="dtls_error") == 1
    assert val(s, "handshake_failures_total", reason="wrong_key") == 0
    assert val(s, "handshake_failures_total", reason="unknown_identity") == 0
    assert val(s, "handshakes_total") == 0


def test_http_paths_and_methods(metrics_world):
    port = metrics_world[4]
    assert http(port, "/other")[0] == 404
    assert http(port, "/")[0] == 404
    assert http(port, "/metrics/x")[0] == 404
    assert http(port, "/metrics", "POST")[0] == 405
    assert http(port, "/metrics", "DELETE")[0] == 405
    status, _, body = http(port, "/metrics?x=1")
    assert status == 200 and parse(body)
    status, _, body = http(port, "/metrics", "HEAD")
    assert status == 200 and body == ""


def test_snapshots_follow_the_interval(metrics_world):
    msub = metrics_world[2]
    t0 = time.monotonic()
    got = msub.wait_for(3, 15, match=lambda m: m.time > t0)
    gaps = [b.time - a.time for a, b in zip(got, got[1:])]
    assert all(0.5 < g < 2.5 for g in gaps), gaps


def test_broker_outage_shows_in_gauges_and_reconnects(metrics_world):
    broker, sub, _, gw, port, _ = metrics_world

    def scraped(pred, what):
        return wait_until(lambda: (lambda s: s if pred(s) else None)(scrape(port)), 30, what,
                          interval=0.3)

    assert val(scrape(port), "broker_connected") == 1
    broker.stop()
    scraped(lambda s: val(s, "broker_connected") == 0, "broker_connected 0")
    r = sim(gw, "--count", 2, "--interval", 50, "--path", "sensors/while-away")
    assert r.codes() == ["2.04"] * 2, r  # ack: stored
    s = scraped(lambda s: val(s, "buffered") == 2, "buffered 2")
    assert val(s, "broker_reconnects_total") == 0
    broker.start()
    s = scraped(lambda s: val(s, "broker_connected") == 1 and val(s, "buffered") == 0,
                "broker_connected 1 and buffered 0")
    assert val(s, "broker_reconnects_total") == 1
    assert val(s, "publish_failures_total") == 0
    sub.wait_for(2, 20, match="devices/sensor-01/while-away")


def test_reload_moves_the_snapshot_topic(broker_factory, subscriber_factory, gateway_factory):
    b = broker_factory()
    base = f"coap2mqtt/{unique('gw')}"
    msub = subscriber_factory(b, topic=f"{base}/#")
    gw = gateway_factory(b, extra={"metrics": {"topic": f"{base}/a", "interval": 1}})
    wait_mqtt_connected(gw)
    msub.wait_for(1, 10, match=f"{base}/a")
    gw.config["metrics"] = {"topic": f"{base}/b", "interval": 1}
    gw.write_config()
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: ok" in gw.log_text()[mark:], 20, "reload: ok")
    t0 = time.monotonic()
    msub.wait_for(2, 10, match=lambda m: m.topic == f"{base}/b" and m.time > t0)
    assert not [m for m in msub.messages(f"{base}/a") if m.time > t0 + 0.5]
    assert "metrics.listen changed" not in gw.log_text()


def test_unbindable_address_is_a_startup_error(broker_factory, gateway_factory):
    b = broker_factory()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        gw = gateway_factory(b, start=False, extra={"metrics": {"listen": addr}})
        gw.start(wait_ready=False)
        rc = gw.wait_exit(20)
    assert rc != 0
    log = gw.log_text()
    assert re.search(rf"metrics: cannot listen on {re.escape(addr)}: \S", log), tail(log)
    assert not re.search(r"\bready\b", log), tail(log)


def test_off_by_default(world):
    assert "metrics:" not in world.gw.log_text()
