#!/usr/bin/python3
"""Connection ID benchmark: COUNT DTLS 1.2 sessions with a Connection ID (RFC 9146) all change
their source port at once, as when a NAT or a cellular network rebinds a whole fleet; every
session must go on without a new handshake. Real gateway, real mosquitto with TLS, a wolfSSL
client per session (tests/bench/cid_fleet.c).

Rounds, each one reading per session, answered before the next session sends:
  stay  from the port the session already uses
  move  every session first takes a new port: its reading is a record with a known CID from an
        unknown address, which moves the session once it authenticates
The gateway's CPU per reading (all its threads, from /proc/PID/task/*/schedstat) is printed
side by side, and the extra CPU of a moved record is the difference.

    tests/bench/cid_move.py [--count 1000] [--rounds 3]

Needs a build (build/coap2mqtt, build/tests/coap2mqtt-cid-fleet; or COAP2MQTT_BIN and
COAP2MQTT_CID_FLEET). Bounded: every wait has a deadline, and all processes are stopped at the end.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
os.environ.setdefault("COAP2MQTT_BIN", str(TOP / "build" / "coap2mqtt"))
FLEET = os.environ.get("COAP2MQTT_CID_FLEET") or str(TOP / "build" / "tests" /
                                                     "coap2mqtt-cid-fleet")
sys.path.insert(0, str(TOP / "tests" / "integration"))
import conftest as h  # noqa: E402  (the integration tests' broker/gateway/PKI helpers)


def cpu_ns(pid):
    """CPU time of all threads of a live process, ns (scheduler accounting, not ticks)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def line(proc, pattern, timeout):
    """The fleet's next output line, which must match pattern (bounded by the caller's kill)."""
    out = proc.stdout.readline()
    m = re.match(pattern, out)
    if not m:
        raise SystemExit(f"cid_move.py: unexpected fleet output {out!r} "
                         f"(stderr: {proc.stderr.read() if proc.poll() is not None else ''})")
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="sessions (1..20000)")
    ap.add_argument("--rounds", type=int, default=3, help="stay/move pairs")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="c2m-cid-bench-") as tmp:
        tmp = Path(tmp)
        pki = h.PKI(tmp)
        broker = h.Broker(tmp / "broker", pki)
        broker.start()
        keys = tmp / "devices.keys"
        keys.write_text("".join(f"cid-{i:05d} cid-bench-key-{i:05d}\n" for i in range(a.count)))
        os.chmod(keys, 0o600)
        gw = h.Gateway(tmp / "gw", pki, broker.url, devices={},
                       coap={"max_sessions": a.count + 100, "idle_timeout": 900,
                             "max_handshakes_per_ip": 100000},
                       routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                                "qos": 0}],
                       extra={"devices_file": str(keys)})
        gw.start()
        fleet = None
        try:
            h.wait_mqtt_connected(gw, 30)
            fleet = subprocess.Popen([FLEET, "127.0.0.1", str(gw.port), str(keys),
                                      str(a.count)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            timer = __import__("threading").Timer(600, fleet.kill)
            timer.start()
            hs = line(fleet, r"handshakes=(\d+) cid=(\d+) seconds=([\d.]+)", 600)
            print(f"cid_move: {hs.group(1)} sessions, {hs.group(2)} with a CID, handshakes in "
                  f"{float(hs.group(3)):.1f} s", file=sys.stderr, flush=True)
            for r in range(a.rounds):
                for kind in ("stay", "move"):
                    moved0 = len(re.findall(r"session=moved", gw.log_text()))
                    c0 = cpu_ns(gw.proc.pid)
                    fleet.stdin.write(kind + "\n")
                    fleet.stdin.flush()
                    m = line(fleet, rf"round={kind} answered=(\d+) seconds=([\d.]+)", 120)
                    c1 = cpu_ns(gw.proc.pid)
                    answered = int(m.group(1))

                    def moves():
                        return len(re.findall(r"session=moved", gw.log_text())) - moved0
                    if kind == "move":  # the log is written as the gateway goes: let it catch up
                        try:
                            h.wait_until(lambda: moves() >= answered, 10, "the moves logged")
                        except AssertionError:
                            pass
                    moved = moves()
                    rows.append({"round": r + 1, "kind": kind, "answered": answered,
                                 "us": (c1 - c0) / 1e3 / max(1, answered), "moved": moved,
                                 "seconds": float(m.group(2))})
            fleet.stdin.write("quit\n")
            fleet.stdin.flush()
            fleet.wait(timeout=30)
            timer.cancel()
            handshakes = len(re.findall(r"handshake=ok", gw.log_text()))
        finally:
            if fleet and fleet.poll() is None:
                fleet.kill()
                fleet.wait()
            gw.terminate()
            broker.stop()
    print(f"{'round':>5} {'kind':>5} {'answered':>9} {'moves logged':>12} {'wall s':>7} "
          f"{'gw cpu/reading':>15}")
    for r in rows:
        print(f"{r['round']:>5} {r['kind']:>5} {r['answered']:>5}/{a.count:<4} {r['moved']:>12} "
              f"{r['seconds']:>7.2f} {r['us']:>12.1f} us")
    stay = [r["us"] for r in rows if r["kind"] == "stay"]
    move = [r["us"] for r in rows if r["kind"] == "move"]
    print(f"mean: stay {sum(stay) / len(stay):.1f} us/reading, move {sum(move) / len(move):.1f} "
          f"us/reading: a moved record costs {sum(move) / len(move) - sum(stay) / len(stay):+.1f} "
          f"us more; handshakes logged: {handshakes} (one per session: nobody handshook again)")


if __name__ == "__main__":
    main()
