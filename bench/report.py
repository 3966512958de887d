#!/usr/bin/env python3
"""Turns bench/run.sh's oha results into a markdown table; exits 1 if any request failed.

Each (scenario, target) cell is the median over the rounds. Latency percentiles come
from oha (seconds) and are shown in milliseconds.
"""
import argparse
import json
import statistics
import sys
import time

SCENARIOS = [
    ("h1", "HTTP/1.1 keep-alive, 64 B"),
    ("h1-partitioned", "the same, pool_partition = \"principal\""),
    ("h2", "HTTP/2, 64 B"),
    ("newconn", "new TLS connection per request"),
    ("64k", "HTTP/1.1 keep-alive, 64 KiB"),
    ("fixed", "fixed rate (latency), HTTP/1.1"),
    ("refresh", "token endpoint: refresh_token grant"),
    ("password", "token endpoint: password grant"),
]
TARGETS = ["direct", "nginx", "gateway"]


def cell(rows):
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def pct(r, name):
        p = r["oha"].get("latencyPercentiles", {}) or {}
        v = p.get(name)
        return v * 1000 if isinstance(v, (int, float)) else None

    summaries = [r["oha"].get("summary", {}) for r in rows]
    ok, total = 0, 0
    for r in rows:
        codes = r["oha"].get("statusCodeDistribution", {}) or {}
        errors = r["oha"].get("errorDistribution", {}) or {}
        # Requests still in flight when oha's duration ends are cut off by oha itself,
        # not failed by the server.
        errors = {k: n for k, n in errors.items() if k != "aborted due to deadline"}
        ok += sum(n for code, n in codes.items() if str(code).startswith("2"))
        total += sum(codes.values()) + sum(errors.values())
    def cpu_per_request(r, key="cpu_seconds"):
        seconds = r.get(key)
        codes = r["oha"].get("statusCodeDistribution", {}) or {}
        n = sum(codes.values())
        return seconds * 1e6 / n if seconds and n else None

    return {
        "cpu_us": med([cpu_per_request(r) for r in rows]),
        "cpu_user_us": med([cpu_per_request(r, "cpu_user_seconds") for r in rows]),
        "rps": med([s.get("requestsPerSec") for s in summaries]),
        "p50": med([pct(r, "p50") for r in rows]),
        "p99": med([pct(r, "p99") for r in rows]),
        "ok": ok,
        "total": total,
    }


def fmt(v, digits=0):
    return "–" if v is None else f"{v:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--rss-kb", type=int, default=0)
    ap.add_argument("--argon", default="{}")
    ap.add_argument("--rate", default="")
    ap.add_argument("--machine", default="")
    ap.add_argument("--build", default="release")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    cells = {}
    for r in rows:
        cells.setdefault((r["scenario"], r["target"]), []).append(r)
    failed = False

    build = "PGO build (bench/pgo.sh)" if args.build == "pgo" else "release build"
    print(f"covata-gateway benchmark, {time.strftime('%Y-%m-%d')}, {args.machine}, gateway {build}")
    print()
    print("| scenario | target | req/s | p50 ms | p99 ms | success | gateway/nginx | gateway/direct |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, title in SCENARIOS:
        present = {t: cell(cells[(key, t)]) for t in TARGETS if (key, t) in cells}
        for target, c in present.items():
            if c["total"] == 0 or c["ok"] < c["total"]:
                failed = True
            vs_nginx = vs_direct = ""
            if target == "gateway":
                # The partitioned route is measured against the references' plain HTTP/1.1.
                ref_key = "h1" if key == "h1-partitioned" else key
                for ref, name in (("nginx", "vs_nginx"), ("direct", "vs_direct")):
                    r = cell(cells[(ref_key, ref)]) if (ref_key, ref) in cells else None
                    if r and r["rps"] and c["rps"]:
                        if key == "fixed":
                            ratio = f"p99 {c['p99'] / r['p99']:.2f}×" if r["p99"] and c["p99"] else ""
                        else:
                            ratio = f"{c['rps'] / r['rps']:.2f}×"
                        if name == "vs_nginx":
                            vs_nginx = ratio
                        else:
                            vs_direct = ratio
            success = f"{100 * c['ok'] / c['total']:.2f}%" if c["total"] else "no requests"
            print(f"| {title} | {target} | {fmt(c['rps'])} | {fmt(c['p50'], 2)} | {fmt(c['p99'], 2)} | {success} | {vs_nginx} | {vs_direct} |")
    print()
    if ("h1", "gateway") in cells and ("h1-partitioned", "gateway") in cells:
        plain, parted = cell(cells[("h1", "gateway")]), cell(cells[("h1-partitioned", "gateway")])
        if plain["rps"] and parted["rps"]:
            print(f"pool_partition = \"principal\" (one principal): {parted['rps']:,.0f} req/s against "
                  f"{plain['rps']:,.0f} unpartitioned, {parted['rps'] / plain['rps']:.3f}×.")
    try:
        argon = json.loads(args.argon)
        password = cell(cells.get(("password", "gateway"), [])) if ("password", "gateway") in cells else None
        if password and password["rps"] and argon.get("verifies_per_second"):
            share = password["rps"] / argon["verifies_per_second"]
            print(f"Password grant: {password['rps']:.1f} tokens/s against {argon['verifies_per_second']:.1f} raw argon2id verifies/s "
                  f"on the same {argon['threads']} core(s): {100 * share:.0f}% of what argon2 alone allows.")
    except (ValueError, KeyError):
        pass
    if args.rate:
        print(f"Fixed-rate runs: {args.rate} req/s (half the slower system's HTTP/1.1 capacity), with latency correction.")
        cpu = {t: cell(cells[("fixed", t)]) for t in ("nginx", "gateway") if ("fixed", t) in cells}

        def spent(t):
            c = cpu[t]
            user = f", {c['cpu_user_us']:.1f} of it in user space" if c["cpu_user_us"] is not None else ""
            return f"{t} {c['cpu_us']:.1f} µs{user}"

        if cpu.get("gateway", {}).get("cpu_us"):
            line = f"CPU per request at the fixed rate: {spent('gateway')}"
            if cpu.get("nginx", {}).get("cpu_us"):
                ratio = cpu["gateway"]["cpu_us"] / cpu["nginx"]["cpu_us"]
                line += f"; {spent('nginx')} (gateway/nginx {ratio:.2f}×)"
            print(line + ".")
    print(f"Gateway RSS after the run: {args.rss_kb / 1024:.1f} MiB.")
    if failed:
        print("\nSOME REQUESTS FAILED (see the success column).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
