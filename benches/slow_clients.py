#!/usr/bin/env python3
"""Front-door load test (docs/BENCHMARKS.md): N connections that send half a request head and
stall, while a normal client keeps asking; reports the normal client's latency during the
attack and how long the gateway took to close the stalled connections.

    python3 benches/slow_clients.py [N]        # N = 10000 by default

Starts `target/debug/flowgate serve` (build it first: cargo build) on 127.0.0.1:18080 with
client_header_timeout_ms = 5000 and connections_max = N + 100, and a SQLite ledger in a
temporary folder. Loopback only; bounded in count and time (about 30 s)."""

import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
PORT = 18080
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# Both ends of every connection live on this machine: this process and the gateway (which
# inherits the limit) each need N descriptors.
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, N + 2000), hard))

CONFIG = f"""
[server]
listen = "127.0.0.1:{PORT}"
client_header_timeout_ms = 5000
connections_max = {N + 100}
[store]
url = "sqlite://{{dir}}/ledger.db"
[identity]
mode = "api_key"
[log]
level = "warn"
"""


async def normal_client(samples, stop):
    while not stop.is_set():
        t = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", PORT)
        w.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await w.drain()
        answer = await r.read()
        w.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        samples.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.02)


async def main():
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "gw.toml")
        open(cfg, "w").write(CONFIG.replace("{dir}", d))
        gw = subprocess.Popen(["target/debug/flowgate", "serve", "--config", cfg])
        try:
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", PORT)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            base, stop = [], asyncio.Event()
            task = asyncio.create_task(normal_client(base, stop))
            await asyncio.sleep(2)
            stop.set(); await task

            opened = time.perf_counter()
            attackers = []
            for i in range(N):
                r, w = await asyncio.open_connection("127.0.0.1", PORT)
                w.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
                attackers.append((r, w))
            open_s = time.perf_counter() - opened
            during, stop = [], asyncio.Event()
            task = asyncio.create_task(normal_client(during, stop))
            await asyncio.sleep(3)
            stop.set(); await task

            async def closed(r):
                # Closed: end of stream (or a reset) within 15 s; anything read first is the
                # gateway's answer before closing.
                try:
                    await asyncio.wait_for(r.read(), 15)
                    return True
                except (ConnectionError, OSError):
                    return True
                except asyncio.TimeoutError:
                    return False
            t = time.perf_counter()
            results = await asyncio.gather(*(closed(r) for r, _ in attackers))
            close_s = time.perf_counter() - t
            for _, w in attackers:
                w.close()

            def pct(xs, p):
                return sorted(xs)[int(len(xs) * p) - 1] if xs else float("nan")
            print(f"stalled connections: {N} opened in {open_s:.1f} s; {sum(results)} closed by the gateway "
                  f"within {close_s:.1f} s of the attack's end of opening (header timeout 5 s)")
            print(f"normal client before: {len(base)} requests, p50 {statistics.median(base):.2f} ms, p99 {pct(base, 0.99):.2f} ms")
            print(f"normal client during: {len(during)} requests, p50 {statistics.median(during):.2f} ms, p99 {pct(during, 0.99):.2f} ms")
            print(f"gateway alive: {gw.poll() is None}")
        finally:
            gw.terminate()
            gw.wait(10)


asyncio.run(main())
