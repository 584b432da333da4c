#!/usr/bin/python3
"""Throughput benchmark: real gateway, real mosquitto (TLS), simulated DTLS devices on loopback.

Prints one table, one row per (sessions, qos): readings/s answered 2.04, the gateway's CPU time
per reading and its peak memory. Rows with more sessions and the same load show whether the cost
of a reading grows with the number of sessions (it should not: see deps-patches/libcoap/0001).

    tests/bench/bench.py [--sessions 100,1000,5000] [--readings 20] [--window 4] [--qos 0,1]

Needs a build (build/coap2mqtt, build/tests/coap2mqtt-sim; or COAP2MQTT_BIN/COAP2MQTT_SIM).
Bounded: every run has a deadline and all processes are stopped at the end.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
os.environ.setdefault("COAP2MQTT_BIN", str(TOP / "build" / "coap2mqtt"))
os.environ.setdefault("COAP2MQTT_SIM", str(TOP / "build" / "tests" / "coap2mqtt-sim"))
sys.path.insert(0, str(TOP / "tests" / "integration"))
import conftest as h  # noqa: E402  (the integration tests' broker/gateway/PKI helpers)


def proc_stat(pid):
    """(cpu seconds, peak RSS MiB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return cpu, hwm


def run(tmp, pki, broker, sessions, readings, window, qos):
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"s{sessions}-q{qos}-"))
    keys = d / "devices.keys"
    keys.write_text("".join(f"bench-{i:05d} bench-key-{i:05d}\n" for i in range(sessions)))
    os.chmod(keys, 0o600)
    gw = h.Gateway(d / "gw", pki, broker.url, devices={},
                   coap={"max_sessions": sessions + 100, "idle_timeout": 600},
                   routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                            "qos": qos}],
                   extra={"devices_file": str(keys)})
    gw.start()
    try:
        h.wait_mqtt_connected(gw, 30)
        cpu0, _ = proc_stat(gw.proc.pid)
        t0 = time.monotonic()
        r = subprocess.run([os.environ["COAP2MQTT_SIM"], "--uri", gw.uri, "--keys", str(keys),
                            "--devices", str(sessions), "--count", str(readings),
                            "--interval", "0", "--window", str(window), "--type", "con",
                            "--path", "sensors/t", "--payload", "{seq}", "--quiet",
                            "--timeout", "240", "--handshake-timeout", "60"],
                           capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - t0
        cpu1, hwm = proc_stat(gw.proc.pid)
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        kv = h.parse_kv(summary)
        ok = int(kv.get("ok", 0))
        return {"sessions": sessions, "qos": qos, "ok": ok, "sent": int(kv.get("sent", 0)),
                "wall": wall, "rate": ok / wall if wall else 0,
                "cpu_us": (cpu1 - cpu0) * 1e6 / ok if ok else 0, "rss": hwm}
    finally:
        gw.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="100,1000,5000")
    ap.add_argument("--readings", type=int, default=20, help="per device")
    ap.add_argument("--window", type=int, default=4, help="CON requests in flight per device")
    ap.add_argument("--qos", default="0,1")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="c2m-bench-") as tmp:
        pki = h.PKI(Path(tmp))
        broker = h.Broker(Path(tmp) / "broker", pki)
        broker.start()
        rows = []
        try:
            for qos in (int(q) for q in a.qos.split(",")):
                for n in (int(s) for s in a.sessions.split(",")):
                    rows.append(run(tmp, pki, broker, n, a.readings, a.window, qos))
                    print(f"bench: sessions={n} qos={qos} done", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(f"{'sessions':>8} {'qos':>3} {'readings':>9} {'2.04/s':>9} {'gw cpu/reading':>15} "
          f"{'gw peak RSS':>12}")
    for r in rows:
        print(f"{r['sessions']:>8} {r['qos']:>3} {r['ok']:>4}/{r['sent']:<4} {r['rate']:>9.0f} "
              f"{r['cpu_us']:>12.1f} us {r['rss']:>9.1f} MiB")
    print("(wall time includes the DTLS handshakes of every session)")


if __name__ == "__main__":
    main()
