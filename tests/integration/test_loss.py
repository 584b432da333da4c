"""Devices on a lossy link: 1,000 devices behind a relay that drops 10 % of the datagrams each
way (a radio link; this kernel has no netem). Every handshake completes on its first session,
every CON reading is answered 2.04 and published exactly once, within a stated time. A DTLS
handshake on such a link takes several retransmissions (RFC 6347 §4.2.4: timers from 1 s,
doubling), so nothing on the gateway's side may give up on it early or call it a wrong key.

The relay draws its losses from a seeded generator: LOSS_SEED=N replays a run."""
import os
import socket
import time
import types

from conftest import (Relay, SimBackground, free_port, parse_kv, tail, user_prop,
                      wait_mqtt_connected)
from test_metrics import scrape

DEVICES = 1000
READINGS = 5            # per device, one a second
LOSS = 0.10             # each way
SEED = int(os.environ.get("LOSS_SEED", "7"))
# What the fleet is given to finish: handshakes 100 at a time, each a few seconds with the
# retransmissions a 10 % loss costs, then five readings a second apart (about 60 s in all, the
# test prints it). An attempt of a reading fails when its request or its answer is lost:
# 1 - 0.9 x 0.9 = 0.19. One that failed k times in a row is answered at the (k+1)th attempt,
# sent 1 to 1.5 x (2^k - 1) s after the first (ACK_TIMEOUT 1 s, doubling, RFC 7252's random
# factor). Among 5,000 readings, k >= 7 (up to 191 s) comes in 1 run of 22 (5,000 x 0.19^7), k >= 8
# (up to 383 s) in 1 of 118, k >= 9 (up to 767 s) in 1 of 620, k >= 10 in 1 of 3,300. The devices
# try 10 times (MAX_RETRANSMIT 9) and the deadline covers the 10th attempt of a reading sent last
# (767 s + 60 s): only k >= 10, all ten attempts lost, fails. A run takes this long only when
# some reading needs its 9th or 10th attempt.
MAX_RETRANSMIT = 9
DEADLINE_S = 900


def test_a_fleet_behind_a_lossy_link_loses_nothing(broker_factory, subscriber_factory,
                                                   gateway_factory, tmp_path, capsys):
    b = broker_factory()
    sub = subscriber_factory(b)
    keys = tmp_path / "fleet.keys"
    fleet = {f"lossy-{i:04d}": f"lossy-key-{i:04d}" for i in range(DEVICES)}
    keys.write_text("".join(f"{k} {v}\n" for k, v in fleet.items()))
    os.chmod(keys, 0o600)
    mport = free_port(socket.SOCK_STREAM)
    gw = gateway_factory(b, devices={}, coap={"max_handshakes_per_ip": DEVICES},
                         extra={"devices_file": str(keys),
                                "metrics": {"listen": f"127.0.0.1:{mport}"}})
    wait_mqtt_connected(gw)
    relay = Relay(gw.port, loss=LOSS, seed=SEED)
    relay.start()
    far = types.SimpleNamespace(uri=f"coaps://127.0.0.1:{relay.port}", devices={})
    t0 = time.monotonic()
    try:
        # the device side of a lossy link: CON retransmitted up to MAX_RETRANSMIT times from
        # 1 s (RFC 7252's ACK_TIMEOUT and MAX_RETRANSMIT are a device's own settings; with 4
        # from 2 s, one reading in 4,000 would run out of attempts at this loss), and the
        # handshake given as long as the whole run
        fleet_sim = SimBackground(far, "--keys", keys, "--devices", DEVICES, "--count", READINGS,
                                  "--interval", 1000, "--type", "con", "--path", "sensors/lossy",
                                  "--payload", "{seq}", "--max-retransmit", MAX_RETRANSMIT,
                                  "--ack-timeout", 1,
                                  "--handshake-timeout", DEADLINE_S, "--max-handshakes", 100,
                                  "--timeout", DEADLINE_S, identity=None)
        rc = fleet_sim.proc.wait(DEADLINE_S + 30)
        took = time.monotonic() - t0
        fleet_sim.t_out.join(10)
    finally:
        relay.stop()
    lines = [parse_kv(line) for _, line in fleet_sim.out]
    summary = [x for x in lines if "sent" in x and "answered" in x]
    failed = [x for x in lines if x.get("event") in ("dtls-failed", "timeout", "failed")]
    codes = [x["code"] for x in lines if "code" in x]
    rtts = sorted(float(x.get("rtt_ms", 0)) for x in lines if "code" in x)
    last = max((t for t, _ in fleet_sim.out), default=t0) - t0
    log = gw.log_text()
    m = {n[len("coap2mqtt_"):] + "".join(f"{{{v}}}" for _, v in lab): x
         for (n, lab), x in scrape(mport).items()}
    front = {k: int(v) for k, v in m.items() if v and k.startswith(
        ("evictions", "handshakes_refused", "handshake_failures", "stranger", "duplicates",
         "cookies_refused", "reconnects"))}
    sessions = log.count("handshake=ok")
    line = (f"loss: {DEVICES} devices x {READINGS} readings, {LOSS:.0%} loss each way (seed "
            f"{SEED}): {relay.dropped} of {relay.passed + relay.dropped} datagrams dropped; "
            f"{sessions} sessions, {codes.count('2.04')} x 2.04, "
            f"{len(failed)} failures, done in {took:.0f} s (deadline {DEADLINE_S} s); "
            f"request to 2.04 p50 {rtts[len(rtts) // 2] if rtts else 0:.0f} ms, max "
            f"{rtts[-1] if rtts else 0:.0f} ms; last answer at {last:.0f} s; gateway: {front}")
    with capsys.disabled():
        print(line, flush=True)
    assert rc == 0 and not failed, f"{line}\n{failed[:5]}\n{summary}\n{fleet_sim.err[-2000:]!r}"
    def reading(m):
        return m.topic.startswith("devices/lossy-") and m.topic.endswith("/lossy")
    sub.wait_for(DEVICES * READINGS, 60, match=reading)
    time.sleep(2)  # anything published twice arrives now
    msgs = sub.messages(reading)
    ids = [user_prop(m, "msg-id") for m in msgs]
    readings = {(m.topic.split("/")[1], m.payload) for m in msgs}
    # one session per device: no handshake was given up and started again
    assert sessions == DEVICES, line
    assert codes == ["2.04"] * (DEVICES * READINGS), line
    # exactly once: every reading, none twice (a lost ACK makes the device send it again)
    assert len(msgs) == DEVICES * READINGS and len(set(ids)) == len(ids), line
    assert len(readings) == DEVICES * READINGS, line
    # a handshake that took long was slow, not a wrong key
    assert "handshake=failed" not in log, tail(log, 30)
    assert took < DEADLINE_S, line
