"""Policy-only capacity of the download's URL policy and politeness (issue #19): what the old
central proxy (bench/old_polite_proxy.py) and the per-worker policy opener
(laionbuild/web/policy_opener.py) cost per request, side by side with direct urllib fetches, in one
run. A loopback server (its own process) serves one `--body` KB image; client processes of
`--threads` threads each fetch `--requests` URLs:

- direct: urllib's default opener;
- opener: the policy opener installed (URL policy with DNS cache, per-host slots across
  processes, pause check), max_per_host high enough not to throttle;
- old proxy: the default opener through the old proxy, a thread of this process: its CPU
  (this process's) per request is the proxy's cost, a single process for all workers.

Prints client CPU per request (the policy's cost = opener - direct, goal <= 0.15 ms), the old
proxy's CPU per request, and requests/s with 1 and 2 client processes for each.

    .venv/bin/python bench/bench_policy.py [--requests 2000] [--threads 16] [--body 100]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def serve(port_queue, body_kb: int) -> None:
    body = os.urandom(body_kb * 1024)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    httpd = Server(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def client(args) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, failures) of fetching `n` URLs with `threads` threads."""
    mode, base, n, threads, state_dir, proxy = args
    if mode == "opener":
        from laionbuild.web.policy_opener import Policy, install

        install(Policy(allow_private=True, max_per_host=threads * 4, timeout=10, state_dir=state_dir))
    elif mode == "proxy":
        os.environ.update(http_proxy=proxy, no_proxy="")
        urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy})))
    from concurrent.futures import ThreadPoolExecutor

    def fetch(i):
        try:
            with urllib.request.urlopen(f"{base}/{i}.jpg", timeout=10) as r:
                r.read()
            return 0
        except Exception:  # noqa: BLE001 - counted
            return 1

    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        failures = sum(pool.map(fetch, range(n)))
    return time.process_time() - cpu, time.perf_counter() - wall, failures


def run(pool, mode, base, n, threads, processes, state_dir, proxy=None):
    per = n // processes
    results = pool.map(client, [(mode, base, per, threads, state_dir, proxy)] * processes)
    cpu = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    failures = sum(r[2] for r in results)
    return cpu / (per * processes), per * processes / wall, failures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--body", type=int, default=100, help="KB per response")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=serve, args=(ports, args.body), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{ports.get(timeout=30)}"
    from old_polite_proxy import PoliteProxy

    rows = {}
    with tempfile.TemporaryDirectory() as state_dir, ctx.Pool(2) as pool:
        pool.map(client, [("direct", base, 20, 2, state_dir, None)] * 2)  # warm the workers' imports
        proxy = PoliteProxy(max_per_host=args.threads * 4, allow_private=True, timeout=10)
        with proxy as proxy_url:
            sequential = {}
            for _ in range(args.repeat):  # one thread: CPU per request without GIL contention
                for mode in ("direct", "opener", "proxy"):
                    own = time.process_time()
                    cpu, _, _ = run(pool, mode, base, args.requests // 2, 1, 1, state_dir, proxy_url)
                    own = (time.process_time() - own) / (args.requests // 2)
                    best = sequential.get(mode)
                    sequential[mode] = (cpu, own) if best is None or cpu < best[0] else best
            for _ in range(args.repeat):  # alternated, best of --repeat
                for mode in ("direct", "opener", "proxy"):
                    for processes in (1, 2):
                        own = time.process_time()
                        cpu, rate, failures = run(pool, mode, base, args.requests, args.threads, processes,
                                                  state_dir, proxy_url)
                        own = (time.process_time() - own) / args.requests
                        best = rows.get((mode, processes))
                        if best is None or rate > best[1]:
                            rows[(mode, processes)] = (cpu, rate, failures, own)
    server.terminate()
    print(f"policy-only capacity: {args.requests} requests of {args.body} KB over loopback, "
          f"{args.threads} threads per client process, best of {args.repeat}")
    print(f"  {'':10} {'client CPU/req':>15} {'proxy CPU/req':>14} {'req/s 1 proc':>13} {'req/s 2 procs':>14}")
    for mode in ("direct", "opener", "proxy"):
        one, two = rows[(mode, 1)], rows[(mode, 2)]
        proxy_cpu = f"{one[3] * 1e3:11.3f} ms" if mode == "proxy" else f"{'':>14}"
        print(f"  {mode:10} {one[0] * 1e3:12.3f} ms {proxy_cpu} {one[1]:13.0f} {two[1]:14.0f}"
              + (f"   ({one[2] + two[2]} failed)" if one[2] + two[2] else ""))
    print(f"  one client thread, sequential requests: CPU per request direct {sequential['direct'][0] * 1e3:.3f} ms, "
          f"opener {sequential['opener'][0] * 1e3:.3f} ms (policy cost "
          f"{(sequential['opener'][0] - sequential['direct'][0]) * 1e3:.3f} ms, goal <= 0.15), old proxy "
          f"{sequential['proxy'][1] * 1e3:.3f} ms in the proxy's process (+{sequential['proxy'][0] * 1e3:.3f} ms client)")
    direct, opener = rows[("direct", 1)][0], rows[("opener", 1)][0]
    print(f"  {args.threads} threads: policy opener cost: {(opener - direct) * 1e3:.3f} ms CPU per request "
          "in each worker (goal <= 0.15), "
          f"no shared process; old proxy: {rows[('proxy', 1)][3] * 1e3:.3f} ms per request in one process "
          f"(ceiling ~{1 / max(rows[('proxy', 1)][3], 1e-9):.0f} req/s per core)")
    for mode in ("direct", "opener", "proxy"):
        print(f"  {mode}: 2 processes / 1 process = {rows[(mode, 2)][1] / rows[(mode, 1)][1]:.2f}")


if __name__ == "__main__":
    main()
