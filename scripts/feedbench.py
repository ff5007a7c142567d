#!/usr/bin/env python3
"""`make bench-feed`: bulk feeds on the stack `make up` runs (scripts/stack.py, durable broker).

usage: feedbench.py [--lines 1000000] [--photos 10000] [--runs 1]

1. Ingest alone: a --lines plain-text feed (distinct URLs) uploaded as a stream, with the
   classifier and the sink stopped (SIGSTOP) so that ingest and the broker have the machine: lines
   read per second until the 201, and ingest's peak RSS (VmHWM).
2. End to end: a CSV feed of --photos rows (url and three metadata columns) against the same number
   of photos submitted through POST /v1/classify (1,000 a request), each on a stack of its own,
   images/s until the sink has written the last row. The result cache is off (the bench photos
   repeat under many URLs), as in `make bench`. Then, on a third stack with the cache on, the
   survey again once its photos are known: what re-running a survey costs.
"""
import argparse
import os
import signal
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Stack, say, serve_photos, stop_photo_servers  # noqa: E402


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def post_feed(ingest, chunks, content_type):
    """Streams `chunks` (bytes) to POST /v1/feeds; the answer's JSON and the seconds it took."""
    request = urllib.request.Request(f"{ingest}/v1/feeds", data=chunks, method="POST",
                                     headers={"content-type": content_type})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=3600) as response:
        import json
        answer = json.loads(response.read())
    return answer, time.monotonic() - started


def text_lines(lines):
    for start in range(0, lines, 10_000):
        yield "".join(f"https://survey.example.org/reef/{n:08}.jpg\n"
                      for n in range(start, min(start + 10_000, lines))).encode()


def ingest_alone(lines):
    with Stack() as stack:
        for name in ("classifier", "sink"):
            os.kill(stack.pids[name], signal.SIGSTOP)
        try:
            answer, seconds = post_feed(stack.ingest, text_lines(lines), "text/plain")
            if answer.get("accepted") != lines:
                sys.exit(f"feedbench: the feed answered {answer}")
            return lines / seconds, peak_rss_mib(stack.pids["ingest"])
        finally:
            for name in ("classifier", "sink"):
                os.kill(stack.pids[name], signal.SIGCONT)


def csv_feed(photos_url, base, photos):
    rows = ["url,station,transect,depth_m\n"]
    rows += [f"{photos_url}/{base + i},Reef {i % 7},T{i % 3},{i % 40}.5\n" for i in range(photos)]
    return "".join(rows).encode()


def warm(stack, photos_url):
    stack.submit([f"{photos_url}/{i}" for i in range(16)])
    stack.wait_rows(16)


def end_to_end(photos_url, photos, run):
    base = 1_000_000 * (run + 1)
    with Stack() as stack:
        warm(stack, photos_url)
        started = time.monotonic()
        _, read = post_feed(stack.ingest, csv_feed(photos_url, base, photos), "text/csv")
        feed = photos / (stack.wait_rows(16 + photos) - started)
        stack.check_all_ok()
    with Stack() as stack:
        warm(stack, photos_url)
        started = time.monotonic()
        stack.submit([f"{photos_url}/{base + i}" for i in range(photos)])
        classify = photos / (stack.wait_rows(16 + photos) - started)
        stack.check_all_ok()
    # The survey again with the result cache on, once its photos are known: the model does not run.
    os.environ["RESULT_CACHE"] = "true"
    try:
        with Stack() as stack:
            warm(stack, photos_url)
            post_feed(stack.ingest, csv_feed(photos_url, base, photos), "text/csv")
            stack.wait_rows(16 + photos)
            started = time.monotonic()
            post_feed(stack.ingest, csv_feed(photos_url, base + photos, photos), "text/csv")
            cached = photos / (stack.wait_rows(16 + 2 * photos) - started)
    finally:
        os.environ["RESULT_CACHE"] = "false"
    return {"feed": feed, "classify": classify, "cached": cached, "read_s": read}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    say(f"feedbench: a {args.lines:,}-line feed through ingest alone")
    rate, rss = ingest_alone(args.lines)
    print(f"ingest alone, {args.lines:,}-line plain-text feed: {rate:,.0f} lines/s, ingest peak RSS {rss:.0f} MiB")
    photos_url, _ = serve_photos()
    try:
        runs = []
        for run in range(args.runs):
            say(f"feedbench: run {run + 1}/{args.runs}: {args.photos:,} photos as a CSV feed, then through /v1/classify")
            runs.append(end_to_end(photos_url, args.photos, run))
            say(f"  {runs[-1]}")
    finally:
        stop_photo_servers()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"end to end, {args.photos:,}-photo CSV feed: {median['feed']:.1f} images/s "
          f"(read and on the broker in {median['read_s']:.1f} s)")
    print(f"end to end, the same photos through POST /v1/classify: {median['classify']:.1f} images/s "
          f"(feed / classify: {median['feed'] / median['classify']:.3f})")
    print(f"the same survey again with the result cache on (every photo known): {median['cached']:.1f} images/s")


if __name__ == "__main__":
    main()
