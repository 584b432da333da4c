"""Presence: each device's retained online/offline state (with the reason it went offline), and
the gateway's own status topic (retained "online" after connect, "offline" as its Last Will)."""
import os
import socket
import time

import pytest

from conftest import (REPO, SimBackground, end_process, free_port, spawn, tail, unique,
                      user_prop, wait_mqtt_connected, wait_until)
from test_metrics import scrape, val

IDENT = "sensor-01"
STATUS = f"devices/{IDENT}/status"


@pytest.fixture
def setup(broker_factory, subscriber_factory, gateway_factory):
    def make(**kw):
        b = broker_factory()
        s = subscriber_factory(b)
        extra = {"presence_topic": "devices/{identity}/status", **kw.pop("extra", {})}
        g = gateway_factory(b, extra=extra, **kw)
        wait_mqtt_connected(g)
        return b, s, g
    return make


def retained(subscriber_factory, broker, topic, payload, timeout=10):
    """A new subscriber gets `payload` as the retained message on `topic`; returns it."""
    s = subscriber_factory(broker, topic=topic)
    [m] = s.wait_for(1, timeout)
    assert m.retain and m.payload == payload, (m.topic, m.payload, m.retain)
    return m


def states(sub, topic=STATUS):
    return [(m.payload, user_prop(m, "reason")) for m in sub.messages(topic)]


def test_online_then_offline_closed_when_the_device_stops(setup, serving_sims,
                                                          subscriber_factory):
    b, sub, g = setup()
    dev = serving_sims(g)
    [m] = sub.wait_for(1, 20, match=STATUS)
    assert m.payload == b"online" and m.qos == 1 and user_prop(m, "reason") is None
    assert user_prop(m, "identity") == IDENT
    retained(subscriber_factory, b, STATUS, b"online")
    dev.stop()                       # SIGTERM: the simulator closes its DTLS session
    sub.wait_for(2, 20, match=STATUS)
    assert states(sub) == [(b"online", None), (b"offline", "closed")]
    m = retained(subscriber_factory, b, STATUS, b"offline")
    assert user_prop(m, "reason") == "closed"


def test_offline_idle_timeout_when_the_device_vanishes(setup, serving_sims, subscriber_factory):
    b, sub, g = setup(coap={"idle_timeout": 2})
    dev = serving_sims(g)
    sub.wait_for(1, 20, match=STATUS)
    dev.proc.kill()                  # no DTLS close: only silence
    t0 = time.monotonic()
    sub.wait_for(2, 15, match=STATUS)
    assert states(sub) == [(b"online", None), (b"offline", "idle timeout")]
    assert time.monotonic() - t0 >= 1
    retained(subscriber_factory, b, STATUS, b"offline")


def test_a_new_session_replaces_the_old_one_and_stays_online(setup, serving_sims):
    b, sub, g = setup(coap={"idle_timeout": 3}, extra={"observe": [
        {"devices": "*", "path": "temperature", "topic": "devices/{identity}/t"}]})
    first = serving_sims(g, "--notify-interval", 300)
    sub.wait_for(1, 20, match=STATUS)
    first.proc.kill()
    first.proc.wait(10)
    serving_sims(g, "--notify-interval", 300)     # its notifications keep the new session busy
    g.wait_for_log(r"identity=sensor-01 session=replaced")
    sub.wait_for(2, 20, match=STATUS)
    time.sleep(5)                    # the old session's idle timeout passes meanwhile
    assert states(sub) == [(b"online", None), (b"online", None)], states(sub)


def test_devices_offline_when_the_gateway_stops(setup, serving_sims, subscriber_factory):
    b, sub, g = setup()
    serving_sims(g)
    sub.wait_for(1, 20, match=STATUS)
    rc, _ = g.terminate()
    assert rc == 0
    sub.wait_for(2, 20, match=STATUS)
    assert states(sub)[-1] == (b"offline", "gateway stopped")
    retained(subscriber_factory, b, STATUS, b"offline")


def test_gateway_status_online_after_connect_offline_as_last_will(broker_factory,
                                                                  subscriber_factory,
                                                                  gateway_factory):
    b = broker_factory()
    topic = f"gw/{unique('st')}/status"
    watch = subscriber_factory(b, topic=topic)
    g = gateway_factory(b, mqtt_extra={"status_topic": topic})
    wait_mqtt_connected(g)
    [m] = watch.wait_for(1, 20)
    assert m.payload == b"online" and m.qos == 1
    retained(subscriber_factory, b, topic, b"online")
    g.kill9()                        # the broker publishes the Last Will
    watch.wait_for(2, 20)
    assert [m.payload for m in watch.messages()] == [b"online", b"offline"]
    retained(subscriber_factory, b, topic, b"offline")
    g.start()
    wait_mqtt_connected(g)
    watch.wait_for(3, 20)
    assert watch.messages()[-1].payload == b"online"


LOADGEN_BIN = (os.environ.get("COAP2MQTT_LOADGEN") or
               str(REPO / "build" / "tests" / "coap2mqtt-loadgen"))


def test_a_silent_fleet_is_released_a_slice_at_a_time_while_a_device_talks(setup, tmp_path):
    """400 devices fall silent after their handshake (no DTLS close) while one keeps sending
    every 200 ms. The gateway looks at a tenth of its established sessions on each 100 ms tick
    (libcoap patch 0037), not at all of them at once: still every silent one is released within
    about a second of its idle timeout, each with its presence "offline" (idle timeout), and the
    talking one is never released."""
    n, idle = 400, 6
    keys = tmp_path / "fleet.keys"
    keys.write_text("".join(f"fleet-{i:05d} fleet-key-{i:05d}\n" for i in range(n)))
    os.chmod(keys, 0o600)
    mport = free_port(socket.SOCK_STREAM)
    b, sub, g = setup(coap={"idle_timeout": idle, "max_sessions": n + 10},
                      extra={"devices_file": str(keys),
                             "metrics": {"listen": f"127.0.0.1:{mport}"}})
    g.wait_for_log(rf"metrics: listening listen=127\.0\.0\.1:{mport} ")
    talker = SimBackground(g, "--count", 120, "--interval", 200, "--timeout", 0,
                           "--path", "sensors/steady", "--payload", "{seq}")
    # each of its sessions from an address of its own in 127.1.0.0/16; --hold: after the
    # handshakes it sends nothing until SIGUSR1, which never comes
    fleet = spawn([LOADGEN_BIN, "--port", g.port, "--keys", keys, "--sessions", n,
                   "--handshakes", 50, "--readings", 1, "--hold", "--timeout", 90],
                  stdout=open(tmp_path / "fleet.out", "w"), stderr=open(tmp_path / "fleet.err", "w"))
    try:
        wait_until(lambda: val(scrape(mport), "sessions") == n + 1, 60,
                   f"{n} silent sessions and the talking one", interval=0.1)
        up = time.monotonic()  # the fleet's last datagram came before this
        # the first handshakes ended a second or two before (ASan: three): none is idle yet
        time.sleep(1)
        assert val(scrape(mport), "sessions") == n + 1, tail(g.log_text(), 20)
        wait_until(lambda: val(scrape(mport), "sessions") == 1, idle + 15,
                   "the silent sessions released", interval=0.1)
        gone = time.monotonic() - up
        # each looked at once a second: the last of them a second or so after its idle timeout
        # (1.0 here, 1.6 under ASan; a slice that shrank as sessions went took 4 s)
        assert gone <= idle + 3, f"released {gone:.1f} s after they fell silent"
        off = sub.wait_for(n, 20, match=lambda m: m.topic.startswith("devices/fleet-") and
                           m.payload == b"offline")
        assert len({m.topic for m in off}) == n
        assert {user_prop(m, "reason") for m in off} == {"idle timeout"}
        assert fleet.poll() is None, "the load generator gave up early"
        r = talker.wait(60)
    finally:
        end_process(fleet)
        if talker.proc.poll() is None:
            talker.stop()
    assert r.rc == 0 and r.codes() == ["2.04"] * 120, f"{r}\n{tail(g.log_text(), 20)}"
    assert [p for p, _ in states(sub)] == [b"online", b"offline"], states(sub)
    print(f"{n} silent sessions released {gone:.1f} s after they fell silent (idle_timeout "
          f"{idle} s)")


def test_gateway_status_default_topic(broker_factory, subscriber_factory, gateway_factory):
    b = broker_factory()
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    topic = f"coap2mqtt/{g.config['mqtt']['client_id']}/status"
    retained(subscriber_factory, b, topic, b"online", timeout=20)


def test_gateway_status_offline_after_a_clean_stop(broker_factory, subscriber_factory,
                                                   gateway_factory):
    b = broker_factory()
    topic = f"gw/{unique('st')}/status"
    g = gateway_factory(b, mqtt_extra={"status_topic": topic})
    wait_mqtt_connected(g)
    retained(subscriber_factory, b, topic, b"online", timeout=20)
    rc, _ = g.terminate()
    assert rc == 0
    retained(subscriber_factory, b, topic, b"offline")
