#!/usr/bin/env python3
"""`make bench-feed`: bulk feeds on the stack `make up` runs (scripts/stack.py, durable broker).

usage: feedbench.py [--lines 1000000] [--photos 10000] [--runs 1] [--s3-photos 1000] [--s3-only]
                    [--s3-server s3s|moto]

1. Ingest alone: a --lines plain-text feed (distinct URLs) uploaded as a stream, with the
   classifier and the sink stopped (SIGSTOP) so that ingest and the broker have the machine: lines
   read per second until the 201, and ingest's peak RSS (VmHWM).
2. End to end: a CSV feed of --photos rows (url and three metadata columns) against the same number
   of photos submitted through POST /v1/classify (1,000 a request), each on a stack of its own,
   images/s until the sink has written the last row. The result cache is off (the bench photos
   repeat under many URLs), as in `make bench`. Then, on a third stack with the cache on, the
   survey again once its photos are known: what re-running a survey costs.
3. Object storage: --s3-photos of the bench photos in a bucket of a real S3 API on loopback, each
   request's signature checked: the bench's own on the s3s library (Rust, on hyper and tokio as the
   bench's photo server is on axum; its objects in memory, as the photo server's photos are, and
   TCP_NODELAY; scripts/s3s/build.sh builds it once per user) or, with --s3-server moto, the tests' moto
   server (Python). Classified as a feed from the bucket's prefix, against the same photos as a CSV
   feed of http URLs from the bench photo server, each on a stack of its own: images/s, S3 / HTTP,
   and the S3 server's CPU an image.
"""
import argparse
import glob
import json
import os
import signal
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CACHE, ROOT, Stack, cpu_seconds, say, serve_photos, stop_photo_servers  # noqa: E402


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


def bench_files():
    return sorted(p for folder in ("photos", "bench-photos")
                  for p in glob.glob(os.path.join(CACHE, folder, "**", "*"), recursive=True) if os.path.isfile(p))


def start_s3(count, kind):
    """An S3 server with `count` objects, the bench photos in turn, under s3://bench-photos/survey/
    (keys 00000.jpg, ...): the bench's s3s server (Rust) over a folder of them, or moto (Python); the server's
    process and the settings that name it to ingest and the classifier."""
    import secrets
    import shutil
    import subprocess
    import tempfile
    files = bench_files()
    if kind == "s3s":
        binary = subprocess.run([os.path.join(ROOT, "scripts", "s3s", "build.sh")], check=True,
                                stdout=subprocess.PIPE, text=True).stdout.strip()
        folder = tempfile.mkdtemp(prefix="reefline-s3s-")
        survey, warm = (os.path.join(folder, "bench-photos", prefix) for prefix in ("survey", "warm"))
        os.makedirs(survey)
        os.makedirs(warm)
        for i in range(count):
            shutil.copyfile(files[i % len(files)], os.path.join(survey, f"{i:05}.jpg"))
        for i in range(16):
            shutil.copyfile(files[(count + i) % len(files)], os.path.join(warm, f"{i:05}.jpg"))
        key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_hex(20)
        server = subprocess.Popen([binary, key, secret, folder], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        endpoint = None
        for line in server.stdout:
            if "server is running at " in line:
                endpoint = line.split("server is running at ", 1)[1].strip()
                break
        if not endpoint:
            sys.exit("feedbench: the S3 server did not start")
        # Its log is read and dropped, so that it never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
        server.cleanup = lambda: shutil.rmtree(folder, ignore_errors=True)
        env = {"S3_BUCKETS": "bench-photos", "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        return server, env
    server = subprocess.Popen([os.path.join(CACHE, "venv-moto", "bin", "python"), os.path.join(ROOT, "tests", "s3_server.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    plan = {"generated": [{"bucket": "bench-photos", "prefix": "survey/", "count": count, "files": files},
                          {"bucket": "bench-photos", "prefix": "warm/", "count": 16, "files": files[count % len(files):]}]}
    server.stdin.write(json.dumps(plan) + "\n")
    server.stdin.flush()
    ready = json.loads(server.stdout.readline())
    env = {"S3_BUCKETS": "bench-photos", "AWS_ENDPOINT_URL": ready["endpoint"], "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": ready["access_key_id"], "AWS_SECRET_ACCESS_KEY": ready["secret_access_key"]}
    return server, env


def stage_means(stack):
    """The classifier's mean seconds a request in each stage (and a fetch), in ms, from its metrics:
    where the time of the two paths goes."""
    from bench import http
    _, _, body = http("GET", f"http://127.0.0.1:{stack.ports['classifier']}/metrics")
    sums, counts = {}, {}
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        for metric, label in [("classifier_stage_seconds", 'stage="'), ("classifier_fetch_seconds", None)]:
            for suffix, into in [("_sum", sums), ("_count", counts)]:
                if not name.startswith(metric + suffix):
                    continue
                key = "fetch" if label is None else name.split(label, 1)[1].split('"', 1)[0]
                into[key] = into.get(key, 0.0) + float(value)
    return {k: round(1000 * sums[k] / counts[k], 1) for k in sums if counts.get(k)}


def in_background(call):
    """Starts `call` on a thread; the function returned waits for its answer and when it came
    (seconds after the start)."""
    import threading
    started, out = time.monotonic(), {}
    thread = threading.Thread(target=lambda: out.update(answer=call(), at=time.monotonic() - started))
    thread.start()

    def answer():
        thread.join()
        return out["answer"], out["at"]
    return answer


def wait_with_milestones(stack, count, started):
    """Waits for the feed's `count` rows (after the 16 of the warm-up); returns when the last came
    and the seconds from `started` to its first, 10 %, 50 % and 90 %: where a slower path loses."""
    marks, times = [1, count // 10, count // 2, count * 9 // 10], []
    for mark in marks:
        times.append(round(stack.wait_rows(16 + mark) - started, 2))
    return stack.wait_rows(16 + count), times


def cpu_ms_an_image(stack, before, count):
    """Each process's CPU ms an image since `before` (a `stack.cpu()`): where the two paths differ."""
    after = stack.cpu()
    return {name: round(1000 * (after[name] - before[name]) / count, 2) for name in after}


def reefline_ms(cpu):
    """Of `cpu_ms_an_image`, what the stack took (the services and Postgres), not the photo or S3
    server, which share the cores here but are someone else's in a deployment."""
    return sum(ms for name, ms in cpu.items() if name != "bench")


def from_s3(photos_url, count, kind):
    """Images/s of `count` photos fed from an S3 prefix, and the S3 server's CPU ms an image."""
    server, env = start_s3(count, kind)
    try:
        with Stack(env=env) as stack:
            # Warmed through the path measured (the store's client and connections), as the HTTP
            # stack is through its photo server's: 16 objects outside the feed's prefix.
            stack.submit([f"s3://bench-photos/warm/{i:05}.jpg" for i in range(16)])
            stack.wait_rows(16)
            started, stack_before = time.monotonic(), stack.cpu()
            body = json.dumps({"source": "s3://bench-photos/survey/", "match": "*.jpg"}).encode()
            cpu_before = cpu_seconds(server.pid)
            posting = in_background(lambda: post_feed(stack.ingest, body, "application/json"))
            ended, milestones = wait_with_milestones(stack, count, started)
            (answer, _), listed = posting()
            if answer.get("accepted") != count:
                sys.exit(f"feedbench: the prefix feed answered {answer}")
            rate = count / (ended - started)
            say(f"  S3: listed and answered at {listed:.2f} s; first, 10, 50, 90 % at {milestones} s")
            # The S3 server shares the cores: what it took is the S3 path's cost here.
            store_ms = (cpu_seconds(server.pid) - cpu_before) * 1000 / count
            say(f"  S3 stages (ms): {stage_means(stack)}")
            cpu = cpu_ms_an_image(stack, stack_before, count)
            say(f"  S3 CPU an image (ms): {cpu}")
            stack.check_all_ok()
    finally:
        if kind == "s3s":
            server.terminate()
            server.wait(timeout=30)
            server.cleanup()
        else:
            server.stdin.close()
            server.wait(timeout=30)
    return rate, store_ms, reefline_ms(cpu)


def over_http(photos_url, count, run):
    """Images/s of the same number of photos as a CSV feed of http URLs."""
    base = 5_000_000 * (run + 1)
    with Stack() as stack:
        warm(stack, photos_url)
        started, before = time.monotonic(), stack.cpu()
        feed = csv_feed(photos_url, base, count)
        posting = in_background(lambda: post_feed(stack.ingest, feed, "text/csv"))
        ended, milestones = wait_with_milestones(stack, count, started)
        _, answered = posting()
        rate = count / (ended - started)
        say(f"  HTTP: answered at {answered:.2f} s; first, 10, 50, 90 % at {milestones} s")
        say(f"  HTTP stages (ms): {stage_means(stack)}")
        cpu = cpu_ms_an_image(stack, before, count)
        say(f"  HTTP CPU an image (ms): {cpu}")
        stack.check_all_ok()
    return rate, reefline_ms(cpu)


def s3_against_http(photos_url, count, run, kind):
    # Each goes first in every other run, so that neither is always the warmer machine's.
    if run % 2 == 0:
        s3, store_ms, s3_ms = from_s3(photos_url, count, kind)
        http, http_ms = over_http(photos_url, count, run)
    else:
        http, http_ms = over_http(photos_url, count, run)
        s3, store_ms, s3_ms = from_s3(photos_url, count, kind)
    # The S3 server's CPU (listing included) is taken from the pipeline's two cores here; the
    # stack's own CPU an image compares the two paths as a deployment, whose store is elsewhere, sees them.
    return {"s3": s3, "http": http, "ratio": s3 / http, "store_ms": store_ms,
            "stack_ms_s3": s3_ms, "stack_ms_http": http_ms, "cpu_ratio": http_ms / s3_ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--s3-photos", type=int, default=1_000, help="photos of the S3 step (0: skip it)")
    parser.add_argument("--s3-only", action="store_true", help="only the S3 step")
    parser.add_argument("--s3-server", choices=["s3s", "moto"], default="s3s",
                        help="the S3 server: the bench's own on the s3s library (Rust, objects in memory, built once "
                             "into the tools cache) or moto (Python, the tests' own)")
    args = parser.parse_args()
    if not args.s3_only:
        say(f"feedbench: a {args.lines:,}-line feed through ingest alone")
        rate, rss = ingest_alone(args.lines)
        print(f"ingest alone, {args.lines:,}-line plain-text feed: {rate:,.0f} lines/s, ingest peak RSS {rss:.0f} MiB")
    photos_url, _ = serve_photos()
    try:
        s3_runs = []
        for run in range(args.runs if args.s3_photos else 0):
            say(f"feedbench: run {run + 1}/{args.runs}: {args.s3_photos:,} photos from an S3 prefix, then over HTTP")
            s3_runs.append(s3_against_http(photos_url, args.s3_photos, run, args.s3_server))
            say(f"  {s3_runs[-1]}")
        runs = []
        for run in range(0 if args.s3_only else args.runs):
            say(f"feedbench: run {run + 1}/{args.runs}: {args.photos:,} photos as a CSV feed, then through /v1/classify")
            runs.append(end_to_end(photos_url, args.photos, run))
            say(f"  {runs[-1]}")
    finally:
        stop_photo_servers()
    if s3_runs:
        s3 = statistics.median(r["s3"] for r in s3_runs)
        http = statistics.median(r["http"] for r in s3_runs)
        ratio = statistics.median(r["ratio"] for r in s3_runs)
        print(f"end to end, {args.s3_photos:,} photos as a feed from an S3 prefix ({args.s3_server}): {s3:.1f} images/s; "
              f"the same as a CSV feed of http URLs: {http:.1f} images/s (S3 / HTTP, the median of the runs' "
              f"ratios: {ratio:.3f}); "
              f"the S3 server took {statistics.median(r['store_ms'] for r in s3_runs):.2f} ms of CPU an image, "
              f"listing included, on the same cores. The stack's own CPU an image: "
              f"{statistics.median(r['stack_ms_s3'] for r in s3_runs):.2f} ms from S3, "
              f"{statistics.median(r['stack_ms_http'] for r in s3_runs):.2f} ms over HTTP "
              f"(S3 / HTTP in images a CPU-second of the stack: {statistics.median(r['cpu_ratio'] for r in s3_runs):.3f})")
    if not runs:
        return
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"end to end, {args.photos:,}-photo CSV feed: {median['feed']:.1f} images/s "
          f"(read and on the broker in {median['read_s']:.1f} s)")
    print(f"end to end, the same photos through POST /v1/classify: {median['classify']:.1f} images/s "
          f"(feed / classify: {median['feed'] / median['classify']:.3f})")
    print(f"the same survey again with the result cache on (every photo known): {median['cached']:.1f} images/s")


if __name__ == "__main__":
    main()
