"""The journal: a reading answered 2.04 is never lost — kill -9 under load, a power cut (unsynced
data destroyed), a broker that loses its session, a full disk, write and sync errors, a torn tail,
a retransmission over a new DTLS session, and a broker URL changed with a backlog."""
import collections
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (ACK, OPT_MAX_AGE, SimBackground, code_str, coap_post, sim, tail,
                      user_prop, wait_mqtt_connected, wait_until)

SHIM = os.environ.get("COAP2MQTT_SYNCSHIM") or str(
    Path(__file__).resolve().parents[2] / "build" / "tests" / "libsyncshim.so")
KEY = "fleet-Secret-K3y-0042"
FLEET = {f"dev-{i:03d}": KEY for i in range(1, 51)}
ROOT = os.geteuid() == 0


def broker_down(b, g):
    b.stop()
    g.wait_for_log(r"mqtt: broker=\S+ (connection lost|connect failed)", 30)


def answered(result_lines, code="2.04"):
    """(device, seq) of every reading the simulator saw answered with `code`."""
    return {(r["device"], int(r["seq"])) for r in result_lines if r.get("code") == code}


def expect_delivered(sub, keys, timeout=120):
    """Every payload "DEVICE/SEQ" in keys reaches the subscriber; duplicates keep their msg-id."""
    want = {f"{d}/{n}" for d, n in keys}

    def have():
        got = {m.payload.decode() for m in sub.messages()}
        return want <= got
    try:
        wait_until(have, timeout, f"{len(want)} acknowledged readings on MQTT")
    except AssertionError:
        got = {m.payload.decode() for m in sub.messages()}
        missing = sorted(want - got)
        raise AssertionError(f"{len(missing)} of {len(want)} acknowledged readings lost, "
                             f"e.g. {missing[:10]}") from None
    ids = collections.defaultdict(set)
    for m in sub.messages():
        ids[m.payload].add(user_prop(m, "msg-id"))
    again = {p: v for p, v in ids.items() if len(v) > 1}
    assert not again, f"a reading published twice with different msg-ids: {list(again)[:5]}"


def fleet_gateway(gateway_factory, b, **kw):
    return gateway_factory(b, devices=FLEET, **kw)


def fleet_sim(g, count, path="sensors/load", extra=()):
    return SimBackground(g, "--identity", "dev-%03d", "--devices", 50, "--count", count,
                         "--interval", 0, "--path", path, "--payload", "{id}/{seq}",
                         "--ack-timeout", 1, "--max-retransmit", 2, "--timeout", 100, *extra,
                         identity=None, key=KEY)


def ok_lines(bg):
    return [r for _, r in bg.responses()]


# 1 -------------------------------------------------------------------------------------------

def test_kill9_under_load_loses_no_acknowledged_reading(broker_factory, subscriber_factory,
                                                        gateway_factory):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = fleet_gateway(gateway_factory, b)
    wait_mqtt_connected(g)
    bg = fleet_sim(g, 100)
    wait_until(lambda: len(ok_lines(bg)) >= 200, 60, "the first 200 answers")
    time.sleep(random.uniform(0.2, 1.5))
    g.kill9()
    acked_before = answered(ok_lines(bg))
    g.start()
    r = bg.wait(150)
    acked = answered(r.responses)
    assert len(acked_before) >= 200 and acked_before <= acked
    assert len(acked) > 1000, f"only {len(acked)} readings answered:\n{r}"
    expect_delivered(s, acked)
    g.wait_for_log(r"journal: dir=\S+ segments=\d+ readings=\d+", 5)


# 2 -------------------------------------------------------------------------------------------

def power_cut(store, sync_log):
    """What a power cut leaves: each journal file as far as it was synced, then garbage where
    written-but-unsynced data was (a file never synced is garbage throughout)."""
    synced = {}
    if sync_log.exists():
        for line in sync_log.read_text().splitlines():
            path, size = line.rsplit(" ", 1)
            synced[os.path.basename(path)] = int(size)
    destroyed = 0
    for f in sorted(store.glob("*.jnl")):
        size = f.stat().st_size
        keep = min(synced.get(f.name, 0), size)
        with open(f, "r+b") as fh:
            fh.truncate(keep)
            fh.seek(keep)
            fh.write(os.urandom(size - keep + 37))  # and a little past the old end
        destroyed += size - keep
    return synced, destroyed


def test_power_cut_keeps_every_synced_reading(broker_factory, subscriber_factory,
                                              gateway_factory, tmp_path):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = fleet_gateway(gateway_factory, b, start=False)
    sync_log = tmp_path / "synced.log"
    g.env = shim_env(C2M_SHIM_LOG=str(sync_log))
    g.start()
    wait_mqtt_connected(g)
    broker_down(b, g)  # everything stays in the journal
    bg = fleet_sim(g, 40)
    wait_until(lambda: len(ok_lines(bg)) >= 300, 60, "the first 300 answers")
    g.kill9()
    synced, destroyed = power_cut(g.persistence_dir, sync_log)
    assert synced, "the shim saw no fdatasync of a journal file"
    bg.stop()
    acked = answered(ok_lines(bg))
    g.env = None
    g.start()
    b.start()
    expect_delivered(s, acked)
    if destroyed:
        g.wait_for_log(r"torn or corrupt tail of \d+ bytes", 5)


# 3 -------------------------------------------------------------------------------------------

def test_broker_losing_its_session_gets_everything_again(broker_factory, subscriber_factory,
                                                         gateway_factory):
    b = broker_factory(persistence=False)
    g = fleet_gateway(gateway_factory, b)
    wait_mqtt_connected(g)
    b.pause()  # readings pile up in flight (no PUBACK) and in the journal
    try:
        bg = fleet_sim(g, 20)
        r = bg.wait(120)
    finally:
        b.kill()  # the broker dies, stopped, with its session: it acknowledged nothing
    acked = answered(r.responses)
    assert len(acked) == 1000, f"{len(acked)} of 1000 answered:\n{r}"
    # a new broker on the same port, without the gateway's session; the gateway is held back
    # until a subscriber has subscribed there (the new broker has no session for it either)
    os.kill(g.proc.pid, signal.SIGSTOP)
    try:
        b.start()
        s2 = subscriber_factory(b)
    finally:
        os.kill(g.proc.pid, signal.SIGCONT)
    expect_delivered(s2, acked)


# 4 -------------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs the test mounts (root only), unmounted afterwards."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "c2m-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def wait_quiet(d, still, timeout):
    """Until the files in d (names and sizes) have not changed for `still` seconds."""
    def listing():
        out = []
        for e in os.scandir(d):
            try:
                out.append((e.name, e.stat().st_size))
            except FileNotFoundError:
                out.append((e.name, None))  # deleted this moment: a change all the same
        return sorted(out)
    last, since = listing(), time.monotonic()
    end = since + timeout
    while time.monotonic() - since < still:
        assert time.monotonic() < end, f"{d} still changing after {timeout} s: {listing()}"
        time.sleep(0.1)
        now = listing()
        if now != last:
            last, since = now, time.monotonic()


def raw_reading(c, path, payload, mid):
    token = os.urandom(4)
    c.request(coap_post(path, payload, mid, token), token, timeout=20)
    mtype, code, rmid, _, opts, _ = c.last_message(token)
    return mtype, code_str(code), rmid, opts


def max_age(opts):
    return [int.from_bytes(v, "big") for n, v in opts if n == OPT_MAX_AGE]


def test_full_disk_refuses_with_503_and_recovers(broker_factory, subscriber_factory,
                                                 gateway_factory, small_fs):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = fleet_gateway(gateway_factory, b, coap={"max_payload": 16384},
                      mqtt_extra={"persistence_dir": str(small_fs / "store")})
    wait_mqtt_connected(g)
    broker_down(b, g)
    big = "x" * 900
    r = sim(g, "--identity", "dev-%03d", "--devices", 20, "--count", 300, "--interval", 0,
            "--path", "sensors/full", "--payload", "{id}/{seq}:" + big, "--timeout", 110,
            identity=None, key=KEY, timeout=130)
    codes = collections.Counter(r.codes())
    assert set(codes) <= {"2.04", "5.03"} and codes["5.03"] > 0 and codes["2.04"] > 1000, codes
    assert g.alive(), tail(g.log_text())
    g.wait_for_log(r'code=5.03 reason="disk nearly full', 5)
    stored = answered(r.responses)
    b.start()
    want = {f"{d}/{n}:{big}" for d, n in stored}
    wait_until(lambda: want <= {m.payload.decode() for m in s.messages()}, 120,
               f"{len(want)} stored readings delivered")
    # delivered readings leave the journal: space comes back, readings are taken again
    wait_until(lambda: sim(g, "--count", 1, "--path", "sensors/full",
                           "--payload", "again", identity="dev-050", key=KEY).codes() == ["2.04"], 60, "2.04 again")
    s.wait_for(1, 30, match=lambda m: m.payload == b"again")
    # the journal retires "again" and deletes what drained on its 1 s tick; filling the disk
    # while that is still going on would let the gateway see the full disk before it writes
    wait_quiet(small_fs / "store", 2.5, 30)
    # now the disk really fills behind the gateway's back (a file of ours takes every free block):
    # the next write that needs a block fails with ENOSPC, and that is 5.03, never 2.04
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass
    # 8 KiB readings: more than the part of a page the last segment may still have free
    late_file = small_fs.parent / "late.bin"
    late_file.write_bytes(b"late-" + os.urandom(8187))
    rl = sim(g, "--count", 3, "--interval", 0, "--path", "sensors/full",
             "--payload-file", late_file, identity="dev-049", key=KEY)
    assert rl.codes() == ["5.03"] * 3, rl
    g.wait_for_log(r"journal: dir=\S+ segment=\w+ (write|create|fdatasync) failed: No space", 5)
    assert g.alive(), tail(g.log_text())
    filler.unlink()
    wait_until(lambda: sim(g, "--count", 1, "--path", "sensors/full", "--payload", "after",
                           identity="dev-048", key=KEY).codes() == ["2.04"], 60,
               "2.04 after ENOSPC")
    s.wait_for(1, 30, match=lambda m: m.payload == b"after")
    assert not [m for m in s.messages() if m.payload.startswith(b"late-")]


# 5 -------------------------------------------------------------------------------------------

def shim_env(**kw):
    """The gateway's environment with the sync shim preloaded (ASan must not insist on being
    first in the library list for that)."""
    return dict(os.environ, LD_PRELOAD=SHIM, **kw,
                ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0")


def shimmed(broker_factory, subscriber_factory, gateway_factory, dtls_factory, tmp_path):
    """Broker, subscriber, a gateway whose journal I/O the control file steers, and a DTLS device."""
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b, start=False)
    ctl = tmp_path / "shim.ctl"
    ctl.write_text("ok")
    g.env = shim_env(C2M_SHIM_CTL=str(ctl))
    g.start()
    wait_mqtt_connected(g)
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    return b, s, g, c, ctl


def test_fdatasync_eio_gives_503_never_204(broker_factory, subscriber_factory, gateway_factory,
                                          dtls_factory, tmp_path):
    b, s, g, c, ctl = shimmed(broker_factory, subscriber_factory, gateway_factory, dtls_factory,
                              tmp_path)
    assert raw_reading(c, "sensors/eio", b"before", 0x1001)[1] == "2.04"
    ctl.write_text("eio")
    mtype, code, mid, opts = raw_reading(c, "sensors/eio", b"during", 0x1002)
    assert (mtype, code, mid) == (ACK, "5.03", 0x1002) and max_age(opts), (code, opts)
    g.wait_for_log(r"journal: dir=\S+ segment=\w+ fdatasync failed: Input/output error", 5)
    r = sim(g, "--count", 5, "--interval", 0, "--path", "sensors/eio", "--payload", "eio-{seq}")
    assert "2.04" not in r.codes(), r
    ctl.write_text("ok")
    time.sleep(1.2)  # the gateway refuses for a second after a store error
    assert raw_reading(c, "sensors/eio", b"after", 0x1003)[1] == "2.04"
    assert g.alive()
    s.wait_for(2, 30, match=lambda m: m.payload in (b"before", b"after"))
    s.assert_none(match=lambda m: m.payload == b"during" or m.payload.startswith(b"eio-"),
                  window=1)


def test_read_only_filesystem_gives_503(broker_factory, subscriber_factory, gateway_factory,
                                        dtls_factory, tmp_path):
    b, s, g, c, ctl = shimmed(broker_factory, subscriber_factory, gateway_factory, dtls_factory,
                              tmp_path)
    assert raw_reading(c, "sensors/ro", b"rw-1", 0x2001)[1] == "2.04"
    ctl.write_text("erofs")
    for mid in (0x2002, 0x2003):  # a failed write, then a new segment that cannot be made
        mtype, code, rmid, opts = raw_reading(c, "sensors/ro", b"ro-%d" % mid, mid)
        assert (mtype, code, rmid) == (ACK, "5.03", mid) and max_age(opts), (code, opts)
        time.sleep(1.2)
    g.wait_for_log(r"journal: .*(write|create) failed: Read-only file system", 5)
    assert g.alive()
    ctl.write_text("ok")
    assert raw_reading(c, "sensors/ro", b"rw-2", 0x2004)[1] == "2.04"
    s.wait_for(2, 30, match=lambda m: m.payload in (b"rw-1", b"rw-2"))
    s.assert_none(match=lambda m: m.payload.startswith(b"ro-"), window=1)


# 6 -------------------------------------------------------------------------------------------

def frames(path):
    """(offset, length) of every frame of a segment file."""
    data = path.read_bytes()
    assert data[:8] == b"C2MJNL1\n"
    out, off = [], 8
    while off + 8 <= len(data):
        n = int.from_bytes(data[off:off + 4], "little")
        if off + 8 + n > len(data):
            break
        out.append((off, 8 + n))
        off += 8 + n
    return out


def test_torn_tail_is_cut_and_the_rest_delivered(broker_factory, subscriber_factory,
                                                  gateway_factory):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    broker_down(b, g)
    r = sim(g, "--count", 10, "--interval", 0, "--path", "sensors/torn", "--payload", "torn-{seq}")
    assert r.codes() == ["2.04"] * 10, r
    g.kill9()
    [seg] = sorted(g.persistence_dir.glob("*.jnl"))
    off, n = frames(seg)[-1]
    data = bytearray(seg.read_bytes())
    data[off + n - 3] ^= 0x5a  # a torn last record: its checksum no longer matches
    seg.write_bytes(bytes(data[:off + n - 1]))
    g.start()
    g.wait_for_log(rf"{seg.name}: torn or corrupt tail of {n - 1} bytes at offset {off} cut off",
                   5)
    b.start()
    s.wait_for(9, 60)
    assert {m.payload for m in s.messages()} == {f"torn-{i}".encode() for i in range(1, 10)}
    try:
        size = seg.stat().st_size
    except FileNotFoundError:  # drained and deleted meanwhile: as good
        size = None
    assert size in (off, None), (size, off)


# 7 -------------------------------------------------------------------------------------------

def test_retransmission_over_a_new_session_is_published_once(broker_factory, subscriber_factory,
                                                             gateway_factory, dtls_factory):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    token = os.urandom(4)
    dgram = coap_post("sensors/rebind", b"once", 0x7777, token)
    c1 = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c1.handshake()
    c1.request(dgram, token)
    assert code_str(c1.last_message(token)[1]) == "2.04"
    c1.close()
    c2 = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])  # a new port, a new session
    c2.handshake()
    c2.request(dgram, token)
    mtype, code, mid, _, _, _ = c2.last_message(token)
    assert (mtype, code_str(code), mid) == (ACK, "2.04", 0x7777)
    s.wait_for(1, 20)
    s.assert_none(window=2, already=1)


# 8 -------------------------------------------------------------------------------------------

def test_backlog_goes_to_a_new_broker_url(broker_factory, subscriber_factory, gateway_factory):
    b1 = broker_factory("broker-a", persistence=True)
    g = gateway_factory(b1)
    wait_mqtt_connected(g)
    broker_down(b1, g)
    r = sim(g, "--count", 8, "--interval", 0, "--path", "sensors/moved", "--payload", "m-{seq}")
    assert r.codes() == ["2.04"] * 8, r
    rc, _ = g.terminate()
    assert rc == 0
    b2 = broker_factory("broker-b")
    s2 = subscriber_factory(b2)
    g.config["mqtt"]["url"] = b2.url
    g.write_config()
    g.start()
    s2.wait_for(8, 60)
    assert {m.payload for m in s2.messages()} == {f"m-{i}".encode() for i in range(1, 9)}


# ack: broker with a token still pending ------------------------------------------------------

def test_ack_broker_token_reuse_is_not_swallowed(broker_factory, subscriber_factory,
                                                 gateway_factory, dtls_factory):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    token = os.urandom(4)  # both requests carry it
    b.pause()
    try:
        c.retransmit(coap_post("acked/reuse", b"first", 0x3001, token),
                     lambda: c.empty_acks(0x3001), "an empty ACK for the first", timeout=10)
        c.retransmit(coap_post("acked/reuse", b"second", 0x3002, token),
                     lambda: c.empty_acks(0x3002), "an empty ACK for the second", timeout=10)
    finally:
        b.resume()
    wait_until(lambda: len([r for r in c.responses(token) if r[1] == 0x44]) >= 2, 30,
               "a 2.04 for each of the two requests")
    s.wait_for(2, 20)
    assert sorted(m.payload for m in s.messages()) == [b"first", b"second"]


# clean stop ----------------------------------------------------------------------------------

def test_sigterm_with_readings_in_flight_is_quiet_and_loses_nothing(broker_factory,
                                                                    subscriber_factory,
                                                                    gateway_factory):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    b.pause()  # the readings go out to the broker but no PUBACK comes back
    try:
        r = sim(g, "--count", 20, "--interval", 0, "--path", "sensors/stop",
                "--payload", "stop/{seq}")
        assert r.codes() == ["2.04"] * 20, r
        rc, took = g.terminate()
        assert rc == 0 and took < 10, (rc, took)
    finally:
        b.resume()
    log = g.log_text(since_start=True)
    assert "publish failed" not in log and "refused" not in log and "code=5" not in log, tail(log)
    g.start()
    # what the paused broker had received before the stop may come twice, with one msg-id
    expect_delivered(s, {("stop", i) for i in range(1, 21)}, timeout=60)
