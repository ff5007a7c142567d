#!/usr/bin/env python3
"""`make bench-wait`: what 1,000 submissions waiting for their answers (`"wait"`) cost the pipeline.

usage: waiters.py [--waiters 1000] [--images 3000] [--runs 3]

On the stack `make up` runs (scripts/stack.py, durable broker), each run times three passes: --images
photos submitted in bulk; the same number again beside --waiters more each submitted alone and
answered at once (`"wait": 0`); and again beside --waiters single submissions with `"wait": 60`,
held open side by side (each answered 200 once its result is in). The rate of the third pass (all
images, until the sink has written the last row) against the second is the cost of waiting, apart
from that of many small submissions; so are ingest's CPU per image and its RSS with the waiters
held. Medians of the runs.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Stack, cpu_seconds, rss_mib, say, serve_photos, stop_photo_servers  # noqa: E402


def submit_one(ingest, url, wait):
    """POSTs one image with `wait`; (status, seconds to answer)."""
    body = json.dumps({"images": [url], "wait": wait}).encode()
    request = urllib.request.Request(f"{ingest}/v1/classify", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started


def one_run(photos_url, images, waiters, base):
    with Stack() as stack:
        stack.submit([f"{photos_url}/{base + i}" for i in range(16)])
        stack.wait_rows(16)
        ingest = stack.pids["ingest"]

        cpu, started = cpu_seconds(ingest), time.monotonic()
        stack.submit([f"{photos_url}/{base + 16 + i}" for i in range(images)])
        plain_rate = images / (stack.wait_rows(16 + images) - started)
        plain_cpu = (cpu_seconds(ingest) - cpu) * 1000 / images

        def alongside(first, wait):
            """--images in bulk beside --waiters single-image submissions with `wait`: rate, ingest
            CPU ms per image, ingest RSS, the single submissions' answers."""
            cpu, started = cpu_seconds(ingest), time.monotonic()
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=waiters)
            answers = [pool.submit(submit_one, stack.ingest, f"{photos_url}/{first + i}", wait) for i in range(waiters)]
            stack.submit([f"{photos_url}/{first + waiters + i}" for i in range(images)])
            rss = rss_mib(ingest)
            finished = stack.wait_rows(first - base + waiters + images)
            results = [a.result() for a in answers]
            pool.shutdown()
            return ((images + waiters) / (finished - started), (cpu_seconds(ingest) - cpu) * 1000 / (images + waiters),
                    rss, results)

        # The same single submissions, first answered at once, then held until their result is in.
        first = base + 16 + images
        single_rate, single_cpu, single_rss, _ = alongside(first, 0)
        waited_rate, waited_cpu, peak_rss, results = alongside(first + waiters + images, 60)
        stack.check_all_ok()
        statuses = sorted({s for s, _ in results})
        latencies = sorted(t for _, t in results)
        return {"plain": plain_rate, "single": single_rate, "waited": waited_rate, "plain_cpu": plain_cpu,
                "single_cpu": single_cpu, "waited_cpu": waited_cpu, "single_rss": single_rss, "rss": peak_rss, "statuses": statuses, "ok": sum(s == 200 for s, _ in results),
                "p50": latencies[len(latencies) // 2], "p95": latencies[int(len(latencies) * 0.95)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    photos_url, _ = serve_photos()
    try:
        runs = []
        for run in range(args.runs):
            say(f"waiters: run {run + 1}/{args.runs}: {args.images:,} images, then {args.images:,} more "
                f"beside {args.waiters:,} waiting submissions")
            runs.append(one_run(photos_url, args.images, args.waiters, run * 100_000))
            say(f"  {runs[-1]}")
    finally:
        stop_photo_servers()
    keys = ["plain", "single", "waited", "plain_cpu", "single_cpu", "waited_cpu", "single_rss", "rss", "p50", "p95"]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    print()
    print(f"pipeline, bulk only:                                {median['plain']:.1f} images/s")
    print(f"pipeline, bulk + {args.waiters:,} single submissions answered at once: {median['single']:.1f} images/s")
    print(f"pipeline, bulk + the same {args.waiters:,} held until done:     {median['waited']:.1f} images/s "
          f"({median['waited'] / median['single']:.3f} of answered at once)")
    print(f"ingest CPU per image: {median['plain_cpu']:.2f} ms bulk, {median['single_cpu']:.2f} ms with single "
          f"submissions, {median['waited_cpu']:.2f} ms with them waiting; ingest RSS {median['single_rss']:.0f} MiB, "
          f"{median['rss']:.0f} MiB with the waiters held")
    print(f"waiters answered 200: {min(r['ok'] for r in runs)}/{args.waiters} (statuses seen: "
          f"{sorted({s for r in runs for s in r['statuses']})}); time to answer p50 {median['p50']:.1f} s, "
          f"p95 {median['p95']:.1f} s")


if __name__ == "__main__":
    main()
