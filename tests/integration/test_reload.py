"""Live reload (SIGHUP): a valid file is swapped in without dropping the sessions that stay valid;
an invalid one is refused with its errors and the running configuration keeps working; removed
devices and changed keys lose their sessions."""
import re
import signal
import time

import pytest

from conftest import SimBackground, default_routes, sim, tail, wait_mqtt_connected, wait_until

NEW_KEY = "sensor-01-Fresh-K3y!"


def reload(gw, expect=r"reload: ok\b"):
    """SIGHUP the gateway; the log line that answers it (searched after this point only)."""
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    rx = re.compile(expect)
    return wait_until(lambda: rx.search(gw.log_text()[mark:]) or
                      (not gw.alive() and pytest.fail(f"gateway died on SIGHUP:\n"
                                                      f"{tail(gw.log_text())}")),
                      20, f"/{expect}/ after SIGHUP")


def codes_since(bg, t):
    return [r["code"] for ts, r in bg.responses() if ts > t]


def wait_answers(bg, n, since=0.0, timeout=20):
    """At least n more 2.04 answers to a background device after `since` (monotonic time)."""
    return wait_until(lambda: codes_since(bg, since).count("2.04") >= n, timeout,
                      f"{n} answers 2.04 to {bg.args[bg.args.index('--identity') + 1]}")


def handshakes(gw, identity):
    return len(re.findall(rf"identity={re.escape(identity)} handshake=ok", gw.log_text()))


def sending(gw, identity, path):
    """A device sending a reading every 200 ms on one long-lived session, until stopped."""
    return SimBackground(gw, "--count", 0, "--interval", 200, "--timeout", 0,
                         "--path", path, "--payload", "{seq}", identity=identity)


def revoke(gw, identity, change):
    """Removes the identity ("removed") or gives it NEW_KEY ("key changed"), then reloads; the
    reason the gateway gives when it closes the identity's sessions."""
    if change == "removed":
        gw.config["devices"] = [d for d in gw.config["devices"] if d["identity"] != identity]
    else:
        for d in gw.config["devices"]:
            if d["identity"] == identity:
                d["key"] = NEW_KEY
    gw.write_config()
    reload(gw)
    return "device removed" if change == "removed" else "key changed"


@pytest.fixture
def live(world):
    """sensor-01 sending a reading every 200 ms on one long-lived session."""
    bg = sending(world.gw, "sensor-01", "sensors/live")
    wait_answers(bg, 3)
    yield world, bg
    bg.stop()


def test_session_survives_reload_adding_route_and_device(live):
    world, bg = live
    gw = world.gw
    assert handshakes(gw, "sensor-01") == 1
    gw.config["devices"].append({"identity": "sensor-03", "key": "sensor-03-Third-K3y!"})
    gw.devices["sensor-03"] = "sensor-03-Third-K3y!"
    gw.config["routes"] = default_routes() + [
        {"path": "new/{name}", "topic": "devices/{identity}/new/{name}", "qos": 1}]
    gw.write_config()
    t = time.monotonic()
    reload(gw, r"reload: ok devices=3 routes=7\b")

    # the new route and the new device work at once
    r = sim(gw, "--count", 1, "--path", "new/thing", "--payload", "n1", identity="sensor-03")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    r = sim(gw, "--count", 1, "--path", "new/thing", "--payload", "n2")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    got = {(m.topic, m.payload) for m in world.sub.wait_for(
        2, 20, match=lambda m: "/new/" in m.topic)}
    assert got == {("devices/sensor-03/new/thing", b"n1"), ("devices/sensor-01/new/thing", b"n2")}

    # the long-lived session kept going on the same DTLS session: no new handshake, no failure
    wait_answers(bg, 10, since=t)
    assert set(codes_since(bg, t)) == {"2.04"}, codes_since(bg, t)
    assert bg.proc.poll() is None, "the background device stopped"
    # one for the long-lived session, one for the sim run above: none was renegotiated
    sessions = re.findall(r"peer=(\S+) identity=sensor-01 handshake=ok", gw.log_text())
    assert len(sessions) == 2, sessions
    assert "session=closing" not in gw.log_text()
    assert f"peer={sessions[0]} identity=sensor-01 presence=offline" not in gw.log_text()
    # every reading answered so far reaches the subscriber (the last ones may still be on their
    # way through the broker), in order
    answered = [r["code"] for _, r in bg.responses()].count("2.04")
    assert answered >= 13, answered

    def live():
        return [int(m.payload) for m in world.sub.messages("devices/sensor-01/live")]
    wait_until(lambda: len(live()) >= answered, 10, f"{answered} readings of sensor-01 delivered")
    seqs = live()
    assert seqs == sorted(seqs), seqs


@pytest.mark.parametrize("broken,where", [
    ("routes:\n  - path: \"sensors/{name}\n    topic: x\n", "unterminated quote"),
    ("routes:\n  - path: \"sensors/{name}\"\n    topic: \"t/{identity}/{name}\"\n"
     "    qos: 7\n", "qos out of range"),
], ids=["syntax", "meaning"])
def test_invalid_file_is_refused_and_old_config_kept(live, broken, where):
    world, bg = live
    gw = world.gw
    good = gw.config_path.read_text()
    # an otherwise valid file: a syntax or meaning error at the end, after the routes
    gw.config_path.write_text(good.split("\nroutes:")[0] + "\n" + broken)
    t = time.monotonic()
    mark = len(gw.log_text())
    reload(gw, r"reload: \S+ is invalid")
    errors = gw.log_text()[mark:]
    assert re.search(rf"{re.escape(str(gw.config_path))}:\d+:\d+: ", errors), (where, errors)
    assert "reload: ok" not in errors

    # the running configuration still routes, the live session still works
    r = sim(gw, "--count", 1, "--path", "sensors/after", "--payload", "a", identity="sensor-02")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    world.sub.wait_for(1, 20, match="devices/sensor-02/after")
    wait_answers(bg, 5, since=t)
    assert set(codes_since(bg, t)) == {"2.04"}
    assert handshakes(gw, "sensor-01") == 1

    # and a good file is taken again afterwards
    gw.config_path.write_text(good)
    reload(gw)


@pytest.mark.parametrize("change", ["removed", "key changed"])
def test_removed_device_or_changed_key_loses_its_session(live, change):
    world, bg1 = live
    gw = world.gw
    bg2 = sending(gw, "sensor-02", "sensors/other")
    try:
        wait_answers(bg2, 3)
        why = revoke(gw, "sensor-01", change)
        gw.wait_for_log(rf'identity=sensor-01 session=closing reason="{why}"')
        assert "identity=sensor-02 session=closing" not in gw.log_text()

        # whatever sensor-01 had in flight settles; after that nothing of it gets through
        time.sleep(1.0)
        t = time.monotonic()
        n_mqtt = len(world.sub.messages("devices/sensor-01/live"))
        wait_answers(bg2, 8, since=t)
        assert "2.04" not in codes_since(bg1, t), codes_since(bg1, t)
        assert len(world.sub.messages("devices/sensor-01/live")) == n_mqtt
        # sensor-02 kept its session the whole time
        assert set(codes_since(bg2, 0)) == {"2.04"}
        assert handshakes(gw, "sensor-02") == 1

        if change == "key changed":
            r = sim(gw, "--count", 1, "--path", "sensors/rekeyed", "--payload", "k",
                    key=NEW_KEY)
            assert r.rc == 0 and r.codes() == ["2.04"], r
        else:
            r = sim(gw, "--count", 1, "--path", "sensors/gone", "--payload", "g",
                    "--handshake-timeout", 3, "--max-retransmit", 1)
            assert r.rc != 0 and not r.codes(), r
            gw.wait_for_log(r'identity="sensor-01" handshake=refused reason="unknown identity"')
    finally:
        bg2.stop()


@pytest.mark.parametrize("change", ["removed", "key changed"])
def test_revocation_closes_every_session_of_the_identity(live, change):
    """Two sessions of one identity, the second from another port (as after a NAT rebinding:
    the first is no longer the device's current one, but it is still open and still publishes).
    A reload that revokes the identity closes both; nothing more is published under it."""
    world, bg1 = live
    gw = world.gw
    bg2 = sending(gw, "sensor-01", "sensors/rebound")
    try:
        wait_answers(bg2, 3)
        gw.wait_for_log(r"identity=sensor-01 session=replaced by=")
        t = time.monotonic()
        wait_answers(bg1, 3, since=t)  # the older session still gets its readings through
        why = revoke(gw, "sensor-01", change)
        closing = rf'identity=sensor-01 session=closing reason="{why}"'
        wait_until(lambda: len(re.findall(closing, gw.log_text())) == 2, 10,
                   "both sessions of sensor-01 closed")

        time.sleep(1.0)  # what was in flight settles
        t = time.monotonic()
        topics = ("devices/sensor-01/live", "devices/sensor-01/rebound")
        n_mqtt = [len(world.sub.messages(topic)) for topic in topics]
        time.sleep(3.0)  # 15 more readings per device were due
        for bg in (bg1, bg2):
            assert "2.04" not in codes_since(bg, t), codes_since(bg, t)
        assert [len(world.sub.messages(topic)) for topic in topics] == n_mqtt
        assert len(re.findall(closing, gw.log_text())) == 2
    finally:
        bg2.stop()


def test_reload_applies_the_coap_limits_and_names_what_needs_a_restart(broker_factory,
                                                                      gateway_factory):
    """coap.max_payload and coap.idle_timeout take effect on SIGHUP (a body between the old and
    the new limit is refused, then accepted; an idle session is closed at the new timeout); a
    setting that only a restart applies is named in the log."""
    b = broker_factory()
    g = gateway_factory(b, coap={"max_payload": 100})
    wait_mqtt_connected(g)
    body = "x" * 200  # block-wise (64-byte blocks): libcoap reassembles it, within its limit
    r = sim(g, "--count", 1, "--path", "sensors/big", "--payload", body, "--block-size", 64)
    assert r.codes() == ["4.13"], r
    g.config["coap"].update(max_payload=300, idle_timeout=2, psk_hint="gw-hint")
    g.write_config()
    line = reload(g, r"reload: ok devices=\d+ routes=\d+ restart_needed=\d+")
    assert line.group(0).endswith("restart_needed=1"), line.group(0)
    g.wait_for_log(r"reload: coap\.psk_hint changed; it applies after a restart", 5)
    r = sim(g, "--count", 1, "--path", "sensors/big", "--payload", body, "--block-size", 64)
    assert r.codes() == ["2.04"], r
    held = SimBackground(g, "--count", 2, "--interval", 600000, "--timeout", 0,
                         "--path", "sensors/idle", "--payload", "once", identity="sensor-02")
    try:
        wait_until(lambda: held.responses(), 20, "sensor-02's first answer")
        g.wait_for_log(r'identity=sensor-02 presence=offline reason="idle timeout"', 15)
    finally:
        held.stop()
