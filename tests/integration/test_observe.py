"""Observe (RFC 7641): the gateway observes resources that simulated sensor nodes serve on the DTLS
sessions they opened (coap2mqtt-sim --serve), and publishes every fresh notification."""
import json
import os
import signal
import time

import pytest

from conftest import sensor_payload, user_prop, wait_mqtt_connected, wait_until

IDENT = "sensor-01"


def rules(*paths, qos=1, retain=False):
    return [{"devices": "sensor-*", "path": p, "topic": "devices/{identity}/obs/{path}",
             "qos": qos, "retain": retain} for p in paths]


def topic(path, ident=IDENT):
    return f"devices/{ident}/obs/{path}"


@pytest.fixture
def setup(broker_factory, subscriber_factory, gateway_factory):
    """setup(observe rules, **gateway kw) -> (broker, subscriber, gateway), MQTT connected."""
    def make(observe, **kw):
        b = broker_factory()
        s = subscriber_factory(b)
        g = gateway_factory(b, extra={"observe": observe, **kw.pop("extra", {})}, **kw)
        wait_mqtt_connected(g)
        return b, s, g
    return make


def expected(lines):
    return [sensor_payload(IDENT, e["path"], e["value"], e["seq"]) for e in lines]


def contains_run(seq, run):
    """Whether `run` occurs in `seq` as consecutive items."""
    return any(seq[i:i + len(run)] == run for i in range(len(seq) - len(run) + 1))


def seq_of(m):
    return json.loads(m.payload)["seq"]


def test_two_resources_observed_at_once_each_on_its_own_topic(setup, serving_sims):
    _, sub, g = setup(rules("temperature", "humidity"))
    sim = serving_sims(g, "--notify-interval", 100)
    temps = sim.wait_events(6, "notify", path="temperature")[:6]
    hums = sim.wait_events(6, "notify", path="humidity")[:6]
    tokens = {e["path"]: e["token"] for e in sim.events("observe")}
    assert sorted(tokens) == ["humidity", "temperature"], sim.text()
    assert tokens["temperature"] != tokens["humidity"]
    assert all(len(bytes.fromhex(t)) >= 4 for t in tokens.values()), tokens
    for path, lines in (("temperature", temps), ("humidity", hums)):
        assert all(e["token"] == tokens[path] for e in lines), sim.text()
        assert lines[0].get("first") == "1" and lines[0]["seq"] == "1"
        msgs = sub.wait_for(6, 20, match=topic(path))[:6]
        assert [m.payload for m in msgs] == expected(lines), sim.text()
        for m in msgs:
            assert m.content_type == "application/json"
            assert user_prop(m, "identity") == IDENT
    # nothing crossed over: every message on a resource's topic is that resource's reading
    for m in sub.messages():
        assert m.topic.rsplit("/", 1)[1] in json.loads(m.payload), (m.topic, m.payload)


@pytest.mark.parametrize("ntype", ["con", "non", "non-always"])
def test_100_notifications_published_in_order(setup, serving_sims, ntype):
    _, sub, g = setup(rules("temperature"))
    sim = serving_sims(g, "--notify-interval", 20, "--notify-type", ntype)
    lines = sim.wait_events(101, "notify", path="temperature", timeout=60)[:101]
    assert [int(e["seq"]) for e in lines] == list(range(1, 102)), sim.text()
    types = {e["type"] for e in lines[1:]}
    assert types == {"con": {"con"}, "non": {"con", "non"}, "non-always": {"non"}}[ntype], types
    msgs = sub.wait_for(101, 60, match=topic("temperature"))[:101]
    assert [m.payload for m in msgs] == expected(lines)
    assert not sim.events("observe-cancel") and not sim.events("rst"), sim.text()


@pytest.mark.parametrize("ntype", ["con", "non-always"])
def test_stale_notification_is_dropped(setup, serving_sims, ntype):
    _, sub, g = setup(rules("temperature"), log_level="debug")
    sim = serving_sims(g, "--notify-interval", 50, "--stale-every", 4, "--notify-type", ntype)
    stale = sim.wait_events(5, "notify", path="temperature", stale=1)
    lines = sim.events("notify", path="temperature")
    # each stale one carries an Observe number below the notification just before it
    for prev, cur in zip(lines, lines[1:]):
        if cur.get("stale") == "1":
            assert int(cur["observe"]) < int(prev["observe"]) and cur["token"] == prev["token"]
    fresh = [e for e in lines if e.get("stale") != "1"]
    last = int(fresh[-1]["seq"])
    wait_until(lambda: any(seq_of(m) >= last for m in sub.messages(topic("temperature"))), 30,
               f"the notification with seq {last} on MQTT")
    got = [m for m in sub.messages(topic("temperature")) if seq_of(m) <= last]
    stale_seqs = {int(e["seq"]) for e in stale}
    assert not stale_seqs & {seq_of(m) for m in got}, "a stale notification was published"
    assert [m.payload for m in got] == expected(fresh)
    # the stale ones were accepted (ACKed when CON), not reset: the observation lives on
    assert not sim.events("observe-cancel") and not sim.events("rst"), sim.text()
    assert g.log_text().count("notification=dropped reason=stale") >= 5


def test_notification_with_unknown_token_gets_rst(setup, serving_sims):
    _, sub, g = setup(rules("temperature"))
    sim = serving_sims(g, "--notify-interval", 100, "--unknown-every", 3)
    rsts = sim.wait_events(3, "rst", unknown=1)
    sent = [e["token"] for e in sim.events("notify", unknown=1)]
    assert [e["token"] for e in rsts] == sent[:len(rsts)], sim.text()
    [obs] = sim.events("observe")
    assert obs["token"] not in sent
    # the real observation is untouched and goes on; nothing unknown reaches MQTT
    n = len(sim.events("notify", path="temperature", token=obs["token"]))
    sim.wait_events(n + 3, "notify", path="temperature", token=obs["token"])
    sub.wait_for(n + 2, 20, match=topic("temperature"))
    assert not [m for m in sub.messages() if b"unknown" in m.payload]
    assert not sim.events("observe-cancel") and not sim.events("rst", token=obs["token"])


def test_reregistered_after_the_device_reconnects(setup, serving_sims):
    _, sub, g = setup(rules("temperature", "humidity"))
    first = serving_sims(g, "--notify-interval", 100)
    old = {e["path"]: e["token"] for e in first.wait_events(2, "observe")}
    sub.wait_for(3, 20, match=topic("temperature"))
    t0 = time.monotonic()
    first.proc.kill()       # no DTLS close: the gateway learns of it from the new session
    first.proc.wait(10)
    second = serving_sims(g, "--notify-interval", 100)
    new = {e["path"]: e["token"] for e in second.wait_events(2, "observe", timeout=30)}
    assert sorted(new) == ["humidity", "temperature"]
    assert not set(new.values()) & set(old.values()), (old, new)
    g.wait_for_log(r"identity=sensor-01 session=replaced")
    for path in ("temperature", "humidity"):
        want = expected(second.wait_events(4, "notify", path=path)[:4])
        wait_until(lambda: contains_run([m.payload for m in sub.messages(topic(path))
                                         if m.time > t0], want), 20,
                   f"the new session's {path} notifications on MQTT")


def test_reregistered_after_the_gateway_restarts(setup, serving_sims):
    _, sub, g = setup(rules("temperature"))
    sim = serving_sims(g, "--notify-interval", 100)
    [old] = sim.wait_events(1, "observe")
    sub.wait_for(2, 20, match=topic("temperature"))
    g.restart()
    wait_mqtt_connected(g)
    t0 = time.monotonic()
    obs = sim.wait_events(2, "observe", timeout=45)
    assert obs[1]["token"] != old["token"]
    lines = sim.wait_events(1, "notify", token=obs[1]["token"], first=1)
    sub.wait_for(1, 20, match=lambda m: m.time > t0 and m.payload == expected(lines)[0])


def test_discovery_observes_what_well_known_core_marks_obs(setup, serving_sims):
    _, sub, g = setup([{"devices": "*", "discover": True, "topic": "devices/{identity}/d/{path+}",
                        "qos": 1}])
    sim = serving_sims(g, "--notify-interval", 200)
    obs = sim.wait_events(3, "observe")
    assert sorted(e["path"] for e in obs) == ["config", "humidity", "temperature"], sim.text()
    for path in ("temperature", "humidity", "config"):
        sub.wait_for(2, 20, match=f"devices/{IDENT}/d/{path}")
    g.wait_for_log(r"identity=sensor-01 discovery=ok observing=3")
    assert not sim.events("observe", path="led")     # led is not marked ;obs


def test_observations_cancelled_on_reload_and_shutdown(setup, serving_sims):
    _, sub, g = setup(rules("temperature", "humidity"))
    sim = serving_sims(g, "--notify-interval", 100)
    sim.wait_events(2, "observe")
    sub.wait_for(2, 20, match=topic("humidity"))
    # reload without the humidity rule: that observation is cancelled (GET with Observe 1)
    g.config["observe"] = rules("temperature")
    g.write_config()
    os.kill(g.proc.pid, signal.SIGHUP)
    g.wait_for_log(r"reload: ok")
    sim.wait_events(1, "observe-cancel", path="humidity", reason="cancel", timeout=15)
    time.sleep(0.5)
    n_hum = len(sub.messages(topic("humidity")))
    n_temp = len(sub.messages(topic("temperature")))
    sub.wait_for(n_temp + 3, 20, match=topic("temperature"))
    assert len(sub.messages(topic("humidity"))) == n_hum, "humidity still published"
    # a clean stop cancels what is left (the reload may have renewed temperature's already)
    before = len(sim.events("observe-cancel", path="temperature", reason="cancel"))
    rc, _ = g.terminate()
    assert rc == 0
    sim.wait_events(before + 1, "observe-cancel", path="temperature", reason="cancel", timeout=15)
