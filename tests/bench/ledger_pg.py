#!/usr/bin/env python3
"""The shared ledger under load, against a real PostgreSQL (Debian `postgresql`, initdb'd on a
loopback port) and the real agent (release build):

1. Shipping lag: concurrent embedding requests (one record each) for a while; each record's
   delay from the end of its request to its row in PostgreSQL (`shipped_at`), the agent's
   `flatmesh_ledger_ship_lag_seconds` and `flatmesh_ledger_unshipped_records` sampled four
   times a second, and the time until every record is in PostgreSQL once the load stops.
2. Invoices over many records: synthetic records of this month inserted straight into the
   shared table (another origin), then `/admin/invoice` and `/admin/usage` timed (they sum in
   PostgreSQL, plus this node's records not shipped yet).
3. Shipping lag at a steady record rate (`--ship-rate`, default 1,000 records/s, for
   `--seconds`): more than the agent serves on two cores, so the ledger and its shipper run
   without the serve path (`mesh/examples/ledger_ship_bench.rs`, the agent's own code): each
   record's lag from durable locally to its row in PostgreSQL.

    python3 tests/bench/ledger_pg.py                       # builds target/release/flatmesh
    python3 tests/bench/ledger_pg.py --seconds 30 --workers 8 --records 1000000,10000000
    python3 tests/bench/ledger_pg.py --bin target/release/flatmesh   # no build
    python3 tests/bench/ledger_pg.py --ship-rate 1000 --records 0   # the steady-rate shipping lag only
"""
import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import EMBED, ROOT, Agent, Postgres  # noqa: E402
import conftest  # noqa: E402
from test_tenancy import ADMIN, CONFIG, key_for  # noqa: E402


def metric(agent, name) -> float:
    for line in httpx.get(agent.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def shipping(agent, pg, key, seconds, workers):
    stop, done, failed = threading.Event(), [0], [0]
    lock = threading.Lock()

    def load():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{agent.url}/v1/embeddings", headers={"authorization": f"Bearer {key}"},
                           json={"model": EMBED, "input": "ledger load"})
                with lock:
                    if r.status_code == 200:
                        done[0] += 1
                    else:
                        failed[0] += 1

    threads = [threading.Thread(target=load) for _ in range(workers)]
    lags, backlog = [], []
    start = time.time()
    for t in threads:
        t.start()
    while time.time() - start < seconds:
        lags.append(metric(agent, "flatmesh_ledger_ship_lag_seconds"))
        backlog.append(metric(agent, "flatmesh_ledger_unshipped_records"))
        time.sleep(0.25)
    stop.set()
    for t in threads:
        t.join()
    stopped = time.time()
    elapsed = stopped - start
    while True:
        in_pg = int(pg.sql("SELECT count(*) FROM flatmesh_ledger_records WHERE origin <> 999999")[0][0])
        if in_pg >= done[0] + failed[0] or time.time() - stopped > 60:
            break
        time.sleep(0.05)
    drained = time.time() - stopped
    # Each record's own delay: from its end to its arrival in PostgreSQL.
    delays = pg.sql("""SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY d), max(d)
                       FROM (SELECT extract(epoch FROM shipped_at) * 1000 - finished_ms AS d
                             FROM flatmesh_ledger_records WHERE origin <> 999999) x""")[0]
    (p50, p99), worst = delays[0].strip("{}").split(","), delays[1]
    print(f"shipping: {workers} workers for {elapsed:.0f} s: {done[0]} requests ({done[0] / elapsed:.0f}/s), "
          f"{failed[0]} failed; {in_pg} records in PostgreSQL")
    print(f"  per record, end of request to row in PostgreSQL (ms): p50 {float(p50):.0f}  p99 {float(p99):.0f}  "
          f"max {float(worst):.0f}")
    print(f"  flatmesh_ledger_ship_lag_seconds: p50 {pct(lags, 50):.2f}  p99 {pct(lags, 99):.2f}  "
          f"max {max(lags):.2f}; records waiting: p50 {pct(backlog, 50):.0f}  max {max(backlog):.0f}")
    print(f"  all in PostgreSQL {drained:.2f} s after the load stopped")


def invoices(agent, pg, total):
    have = int(pg.sql("SELECT count(*) FROM flatmesh_ledger_records WHERE origin = 999999")[0][0])
    if total > have:
        now_ms = int(time.time() * 1000)
        t0 = time.time()
        # This month's records (the last ~17 minutes), two tenants, another origin; a million
        # rows per statement.
        for lo in range(have + 1, total + 1, 1_000_000):
            hi = min(total, lo + 999_999)
            pg.sql(f"""INSERT INTO flatmesh_ledger_records (id, node, origin, seq, tenant, tier, model,
                   endpoint, input_tokens, output_tokens, device_seconds, cache_hit, started_ms, finished_ms)
                   SELECT 'bench-' || g, 'bench', 999999, g,
                          CASE WHEN g % 2 = 0 THEN 'city-a' ELSE 'city-b' END,
                          CASE WHEN g % 2 = 0 THEN 'gold' ELSE 'basic' END,
                          '{EMBED}', 'embeddings', 5, 0, 0.001, false,
                          {now_ms} - (g % 1000000) - 1, {now_ms} - (g % 1000000)
                   FROM generate_series({lo}, {hi}) AS g""")
        pg.sql("ANALYZE flatmesh_ledger_records")
        print(f"  inserted {total - have} synthetic records in {time.time() - t0:.1f} s")
    for path in ("/admin/invoice", "/admin/usage"):
        times = []
        for _ in range(3):
            t0 = time.time()
            r = httpx.get(agent.url + path, headers=ADMIN, timeout=600)
            times.append(time.time() - t0)
            assert r.status_code == 200, r.text
        print(f"  {path} over {total:,} records: {statistics.median(times) * 1000:.0f} ms "
              f"(median of 3; {min(times) * 1000:.0f}–{max(times) * 1000:.0f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--records", default="1000000", help="comma-separated totals of synthetic records")
    ap.add_argument("--bin", help="this flatmesh binary, as it is (no build)")
    ap.add_argument("--ship-rate", type=int, default=1000, help="records/s of the steady-rate run (0: skip it)")
    args = ap.parse_args()
    if args.bin:
        conftest.BIN = Path(args.bin)
    else:
        subprocess.run(["cargo", "build", "--release", "-p", "flatmesh", "--bin", "flatmesh",
                        "--example", "ledger_ship_bench"], cwd=ROOT, check=True)
        conftest.BIN = ROOT / "target" / "release" / "flatmesh"
    if args.ship_rate:
        steady = Postgres()
        try:
            print(f"shipping at a steady {args.ship_rate} records/s (ledger and shipper alone):")
            subprocess.run([str(ROOT / "target" / "release" / "examples" / "ledger_ship_bench"), steady.url,
                            str(args.ship_rate), str(int(args.seconds))], check=True)
        finally:
            steady.close()
    pg = Postgres()
    agent = None
    try:
        agent = Agent(config=CONFIG + f'\n[ledger]\npostgres = "{pg.url}"\n')
        key = key_for(agent, "city-a")
        shipping(agent, pg, key, args.seconds, args.workers)
        print("invoices from the shared ledger:")
        for total in (int(x) for x in args.records.split(",") if int(x) > 0):
            invoices(agent, pg, total)
    finally:
        if agent:
            agent.stop()
        pg.close()


if __name__ == "__main__":
    main()
