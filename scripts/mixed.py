#!/usr/bin/env python3
"""`make bench-mixed`: interactive answers and fair shares while bulk feeds run, on the make-up stack.

usage: mixed.py [--photos 20000] [--second 5000] [--probes-every 0.5] [--without-lanes-too] [--storage memory://mixed/]

On the stack `make up` runs (scripts/stack.py: durable broker, default settings, result cache
off as in every benchmark), with keys for three tenants:
1. idle: 40 single photos through `POST /classify` one after another, each waiting for its answer;
2. alone: tenant reef's feed of --photos photos is uploaded; its rate over 10 s once under way;
3. mixed: one single photo every --probes-every s (tenant field) beside it for 20 s: the feed's rate
   against alone, and each answer's time;
4. shared: tenant kelp's feed of --second photos starts (the probes go on): the time to its first
   result, then each feed's share of the results while both run (30 s, or until kelp's is done);
then both feeds to their end, every result checked. With --without-lanes-too, the same again on
a stack with the lanes off (INTERACTIVE_LANE=false: every submission on the bulk topic;
FEED_WINDOW_IMAGES=0: feeds put on the broker as fast as it takes them), for the ratios. With
--storage memory://mixed/, on the broker built with in-memory storage (nothing durable; a
comparison only, to tell the local broker's part of the latency from the pipeline's).
Prints the figures and the classifier's time per stage and lane (classifier_stage_seconds).
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Stack, say, serve_photos, stop_photo_servers, wait_until  # noqa: E402

KEYS = {"reef": "bench-reef-key", "kelp": "bench-kelp-key", "field": "bench-field-key"}
STAGES = ["broker", "admit", "prepare", "batch", "infer", "produce"]


def request(method, url, key, body=None, content_type="application/json", timeout=120):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": content_type, "authorization": f"Bearer {key}"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def single(stack, url):
    """One photo through /classify, waiting for its answer: (status, seconds)."""
    started = time.monotonic()
    status, _ = request("POST", f"{stack.ingest}/classify", KEYS["field"], {"image_url": url, "wait": 30}, timeout=60)
    return status, time.monotonic() - started


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def stage_means(stack):
    """Mean seconds per stage and lane, from the classifier's classifier_stage_seconds."""
    _, body = request("GET", f"http://127.0.0.1:{stack.ports['classifier']}/metrics", "")
    sums, counts = {}, {}
    for line in body.decode().splitlines():
        if line.startswith("classifier_stage_seconds_sum") or line.startswith("classifier_stage_seconds_count"):
            name, value = line.rsplit(" ", 1)
            labels = dict(part.split("=") for part in name[name.index("{") + 1:-1].split(","))
            key = (labels["stage"].strip('"'), labels["lane"].strip('"'))
            (sums if "_sum" in name else counts)[key] = float(value)
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def feed_text(photos_url, base, n):
    return "".join(f"{photos_url}/{base + i}\n" for i in range(n)).encode()


def scenario(photos_url, args, lanes, base):
    keys = "".join(f"{tenant} submit {hashlib.sha256(key.encode()).hexdigest()}\n" for tenant, key in KEYS.items())
    env = {} if lanes else {"INTERACTIVE_LANE": "false", "FEED_WINDOW_IMAGES": "0"}
    stack = Stack(storage=args.storage, env=env)
    keys_path = os.path.join(stack.run, "bench-keys")
    with open(keys_path, "w") as f:
        f.write(keys)
    stack.env["API_KEYS_FILE"] = keys_path
    with stack:
        count = lambda feed: int(stack.sql(f"SELECT count(*) FROM results WHERE feed_id = '{feed}'") or 0)  # noqa: E731
        feed_of = lambda key: stack.sql(f"SELECT feed_id FROM feeds WHERE idempotency_key = '{key}'")  # noqa: E731

        # 1. idle
        warm = [single(stack, f"{photos_url}/{base + i}") for i in range(8)]
        idle = [single(stack, f"{photos_url}/{base + 10 + i}") for i in range(40)]
        assert all(s == 200 for s, _ in warm + idle), sorted({s for s, _ in idle})
        idle = [t for _, t in idle]

        # 2. alone
        uploads = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        reef_upload = uploads.submit(_upload, stack, "reef", f"reef-{base}", feed_text(photos_url, base + 1000, args.photos))
        reef = wait_until("reef's feed", lambda: feed_of(f"reef-{base}"), timeout=120)
        wait_until("reef's feed under way", lambda: count(reef) >= 100, timeout=300)
        n0, t0, cpu0 = count(reef), time.monotonic(), stack.cpu()
        time.sleep(10)
        done, cpu1 = count(reef) - n0, stack.cpu()
        alone = done / (time.monotonic() - t0)
        cpu = {name: (cpu1[name] - cpu0[name]) * 1000 / max(1, done) for name in cpu1}

        # 3. mixed
        probes, stop = [], threading.Event()

        def probe():
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)
            i = 0
            while not stop.is_set():
                probes.append(pool.submit(single, stack, f"{photos_url}/{base + 500_000 + i}"))
                i += 1
                stop.wait(args.probes_every)
            pool.shutdown()

        prober = threading.Thread(target=probe)
        prober.start()
        n0, t0 = count(reef), time.monotonic()
        time.sleep(20)
        mixed = (count(reef) - n0) / (time.monotonic() - t0)

        # 4. shared
        started = time.monotonic()
        kelp_upload = uploads.submit(_upload, stack, "kelp", f"kelp-{base}",
                                     feed_text(photos_url, base + 2_000_000, args.second))
        kelp = wait_until("kelp's feed", lambda: feed_of(f"kelp-{base}"), timeout=120, every=0.01)
        wait_until("kelp's first result", lambda: count(kelp) > 0, timeout=3600, every=0.01)
        first_result = time.monotonic() - started
        r0, k0, t0 = count(reef), count(kelp), time.monotonic()
        while time.monotonic() - t0 < 30 and count(kelp) < args.second:
            time.sleep(0.5)
        reef_n, kelp_n = count(reef) - r0, count(kelp) - k0
        stop.set()
        prober.join()
        answers = [p.result() for p in probes]
        for name, future in [("reef", reef_upload), ("kelp", kelp_upload)]:
            status, body = future.result()
            if status != 201:
                sys.exit(f"bench: {name}'s upload answered {status}: {body[:300]!r}")
        total = args.photos + args.second
        wait_until("both feeds done", lambda: count(reef) + count(kelp) >= total, timeout=3600, every=0.5)
        bad = stack.sql(f"SELECT count(*) FROM results WHERE feed_id IN ('{reef}', '{kelp}') AND status <> 'ok'")
        if int(bad) != 0:
            sys.exit(f"bench: {bad} feed results were not ok")
        return {
            "idle_p50": statistics.median(idle), "idle_p90": percentile(idle, 0.9),
            "alone": alone, "mixed": mixed,
            "probes": len(answers), "probe_timeouts": sum(s != 200 for s, _ in answers),
            "p50": percentile([t for _, t in answers], 0.5), "p99": percentile([t for _, t in answers], 0.99),
            "max": max(t for _, t in answers),
            "first_result": first_result,
            "reef_share": reef_n / max(1, reef_n + kelp_n), "kelp_share": kelp_n / max(1, reef_n + kelp_n),
            "stages": stage_means(stack),
            "cpu": cpu,
        }


def _upload(stack, tenant, key, text):
    headers = {"content-type": "text/plain", "authorization": f"Bearer {KEYS[tenant]}", "idempotency-key": key}
    req = urllib.request.Request(f"{stack.ingest}/v1/feeds", data=text, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def report(name, r):
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    print(f"{name}:")
    print(f"  idle single photo:            p50 {ms(r['idle_p50'])}, p90 {ms(r['idle_p90'])}")
    print(f"  beside a feed: {r['probes']} probes, p50 {ms(r['p50'])}, p99 {ms(r['p99'])}, max {ms(r['max'])}, "
          f"{r['probe_timeouts']} not answered in 30 s")
    print(f"  feed alone {r['alone']:.1f} images/s, beside the probes {r['mixed']:.1f} ({r['mixed'] / r['alone']:.2f})")
    print(f"  second tenant's feed: first result after {r['first_result']:.2f} s; shares while both run: "
          f"first {r['reef_share']:.2f}, second {r['kelp_share']:.2f}")
    print("  CPU per image of the feed alone: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["cpu"].items()))
    stages = r["stages"]
    for lane in ["interactive", "bulk"]:
        parts = [f"{s} {ms(stages[(s, lane)])}" for s in STAGES if (s, lane) in stages]
        if parts:
            print(f"  classifier, {lane}: " + ", ".join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--second", type=int, default=5_000)
    parser.add_argument("--probes-every", type=float, default=0.5)
    parser.add_argument("--without-lanes-too", action="store_true")
    parser.add_argument("--storage", default=None,
                        help="the broker's storage instead of the stack's durable sqlite (memory://mixed/: a "
                             "comparison only, nothing durable, to tell the local broker's part of the latency)")
    args = parser.parse_args()
    photos_url, _ = serve_photos()
    try:
        say(f"mixed: lanes on: a {args.photos:,}-photo feed, probes every {args.probes_every} s, "
            f"then a second tenant's {args.second:,}" + (f", broker storage {args.storage}" if args.storage else ""))
        on = scenario(photos_url, args, True, 0)
        off = None
        if args.without_lanes_too:
            say("mixed: the same with the lanes off")
            off = scenario(photos_url, args, False, 10_000_000)
    finally:
        stop_photo_servers()
    print()
    report("lanes on (the defaults)", on)
    if off:
        report("lanes off (INTERACTIVE_LANE=false, FEED_WINDOW_IMAGES=0)", off)
        print(f"ratios, on/off: probe p50 {on['p50'] / off['p50']:.3f}, p99 {on['p99'] / off['p99']:.3f}; "
              f"feed beside the probes {on['mixed'] / off['mixed']:.2f}; "
              f"second feed's first result {on['first_result'] / off['first_result']:.3f}")


if __name__ == "__main__":
    main()
