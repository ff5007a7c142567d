#!/usr/bin/env python3
"""`make bench` and `make soak`: what users run, measured against what it replaces.

usage: bench.py bench [--runs 3] [--images 1000] [--large-images 300] [--model NAME] [--no-memory] [--no-celery]
       bench.py scale [--classifiers 1 2 4] [--partitions 12] [--runs 1] [--images 1000] [--large] [--model NAME]
       bench.py soak  [--requests 100000] [--window 10000] [--model NAME] [--no-memory]

Every pipeline figure comes from the stack `make up` runs: scripts/stack.py with its defaults
(nisshi on durable sqlite storage, every service on its default settings), started in a folder
and on ports of its own, with photo URLs served over local HTTP and submitted over HTTP. The clock
stops when the sink has written the last row. The photos are the 252 distinct real photos under
the cache (`photos/` and `bench-photos/`), served round-robin.

bench, for each run: the single-process limit (`reefline-bench`: the classifier's own decode,
preprocess and batched inference, no network, no Kafka); the stack end to end, with latency at a
steady half of that rate and CPU per image of each process; the same stack on an in-memory
broker (memory://, a comparison only: nothing durable); and the Celery design it replaces
(bench/celery: FastAPI + Celery prefork, one worker per core, + Redis + onnxruntime + Pillow,
one image per task, same model file and preprocessing). Then the limit, the stack and the Celery
design again on 12-megapixel versions of the photos (survey-camera size: models/camera_photos.py).
Prints medians with their spread, each against the hardware's bound as well (the cores divided by
what an image needs on one core: decode, resize and inference at its cheapest batch on one thread,
from `stage_costs --bound` on the same photos), with the engines and batch size the classifier
ran; then the CPU cost of each stage (decode, resize, inference of every model) from `stage_costs`.

scale: the same stack with 1, 2, 4 classifier instances (CLASSIFIERS; one consumer group, the
requests topic with 12 partitions so that each count shares them evenly), on the bench photos or
their 12-megapixel versions: images/s against one instance, and CPU per image.

soak: --requests through the stack, submitted at once; the rate of every --window of results,
each against the first; then the same on memory:// for the ratio; the idle CPU of every process
(measured over 30 s after 30 s with nothing to do); the broker's disk use; each service's RSS
at the start and the end.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tomllib

from pinned_venv import pinned_venv
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("REEFLINE_CACHE", os.path.join(ROOT, ".cache"))
RELEASE = os.path.join(ROOT, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 2
SERVICES = ["broker", "registry", "sink", "classifier", "ingest"]


def say(*args):
    print("bench:", *args, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_until(what, check, timeout=900, every=0.05):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            sys.exit(f"bench: gave up waiting for {what} after {timeout} s")
        time.sleep(every)
    return value


def wait_count(what, count, target, timeout=900):
    """Waits until count() reaches target; returns when (time.monotonic()). Asks every 250 ms
    while more than 100 are to come, then every 10 ms: a precise end without the polling itself
    taking a share of the cores being measured."""
    deadline = time.monotonic() + timeout
    while (n := count()) < target:
        if time.monotonic() > deadline:
            sys.exit(f"bench: gave up waiting for {target} {what} ({n} so far)")
        time.sleep(0.25 if target - n > 100 else 0.01)
    return time.monotonic()


# --- processes: CPU and memory from /proc --------------------------------------------------------

def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid):
    """CPU of a process and of its children still alive (Celery's prefork workers)."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            total += sum(tree_cpu_seconds(int(c)) for c in f.read().split())
    except OSError:
        pass
    return total


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def postgres_cpu_seconds():
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "postgres":
                    total += cpu_seconds(pid)
        except OSError:
            pass
    return total


# --- the photos ----------------------------------------------------------------------------------

def serve_photos(folder=None):
    """The bench photos (`photos/` and `bench-photos/` in the cache, or `folder` of it) over local
    HTTP, photo n at BASE/n modulo their count, from `reefline-bench --serve`: a lean server, so
    that the benchmark takes little of the cores it measures. Returns (BASE, number of photos); its
    pid is in PHOTO_SERVERS, its CPU counted as the bench's."""
    folders = ["--photos", folder] if folder else []
    server = subprocess.Popen([os.path.join(RELEASE, "reefline-bench"), "--serve", *folders], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(server.stdout.readline())
    except ValueError:
        sys.exit("bench: the photo server did not start (run `make setup`)")
    PHOTO_SERVERS.append(server)
    if started["photos"] < 200:
        sys.exit(f"bench: {started['photos']} photos under {CACHE}; run `make setup`")
    return started["url"], started["photos"]


PHOTO_SERVERS = []


def stop_photo_servers():
    for server in PHOTO_SERVERS:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


# --- the stack `make up` runs --------------------------------------------------------------------

class Stack:
    """scripts/stack.py in a run folder, on ports and a database of its own."""

    def __init__(self, storage=None, classifiers=1, env=None):
        self.storage = storage or "sqlite://broker.db"
        self.run = tempfile.mkdtemp(prefix="reefline-bench-")
        self.database = f"reefline_bench_{uuid.uuid4().hex[:12]}"
        self.ports = {name: free_port() for name in ["broker", "registry", "ingest", "sink", "classifier"]}
        self.services = [*SERVICES, *(f"classifier-{k}" for k in range(2, classifiers + 1))]
        self.env = {**os.environ,
                    "REEFLINE_RUN": self.run,
                    "BROKER_PORT": str(self.ports["broker"]),
                    "REGISTRY_LISTEN": f"127.0.0.1:{self.ports['registry']}",
                    "INGEST_LISTEN": f"127.0.0.1:{self.ports['ingest']}",
                    "SINK_LISTEN": f"127.0.0.1:{self.ports['sink']}",
                    "CLASSIFIER_LISTEN": f"127.0.0.1:{self.ports['classifier']}",
                    "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{self.database}",
                    # The bench photos repeat under many URLs: with the result cache, the model
                    # would run once per distinct photo. The figures are the pipeline's at work
                    # (and the Celery design has no such cache), so it is off unless asked for.
                    "RESULT_CACHE": os.environ.get("RESULT_CACHE", "false"),
                    "CLASSIFIERS": str(classifiers),
                    **{f"CLASSIFIER_LISTEN_{k}": f"127.0.0.1:{free_port()}" for k in range(2, classifiers + 1)},
                    **(env or {})}
        if storage:
            self.env["BROKER_STORAGE"] = storage
            self.env["NISSHI_BIN"] = memory_broker()
        self.ingest = f"http://127.0.0.1:{self.ports['ingest']}"
        self.sink = f"http://127.0.0.1:{self.ports['sink']}"

    def __enter__(self):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/stack.py"), "up"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.pids = {name: int(open(os.path.join(self.run, f"{name}.pid")).read()) for name in self.services}
        return self

    def __exit__(self, *_):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/stack.py"), "down"], env=self.env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
                        f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)"], stdout=subprocess.DEVNULL)
        shutil.rmtree(self.run, ignore_errors=True)

    def submit(self, urls):
        for start in range(0, len(urls), 1000):
            while True:
                status, headers, body = http("POST", f"{self.ingest}/v1/classify", {"images": urls[start:start + 1000]})
                if status == 202:
                    break
                if status in (429, 503):
                    time.sleep(float(headers.get("retry-after", "1")))
                    continue
                sys.exit(f"bench: ingest answered {status}: {body[:300]!r}")

    def rows(self):
        status, _, body = http("GET", f"{self.sink}/metrics")
        for line in body.decode().splitlines():
            if line.startswith("sink_rows_written_total"):
                return int(float(line.split()[-1]))
        return 0

    def wait_rows(self, target):
        return wait_count("rows", self.rows, target)

    def check_all_ok(self):
        """A failed image is fast: a rate is a figure only if every result was a classification."""
        failed = int(self.sql("SELECT count(*) FROM results WHERE status <> 'ok'"))
        if failed:
            sys.exit(f"bench: {failed} results are errors: " + self.sql(
                "SELECT string_agg(DISTINCT error_kind, ', ') FROM results WHERE status <> 'ok'"))

    def sql(self, query):
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", self.database, "-Atc", query],
                             check=True, capture_output=True, text=True).stdout
        return out.strip()

    def cpu(self):
        """CPU seconds so far of each service (every classifier instance together), of Postgres, and
        of this process (photo server, polling)."""
        seconds = {name: 0.0 for name in SERVICES}
        for name, pid in self.pids.items():
            seconds[name.split("-")[0]] += cpu_seconds(pid)
        return {**seconds, "postgres": postgres_cpu_seconds(),
                "bench": cpu_seconds(os.getpid()) + sum(cpu_seconds(server.pid) for server in PHOTO_SERVERS)}

    def rss(self):
        return {name: rss_mib(pid) for name, pid in self.pids.items() if name != "registry"}

    def classifier_settings(self):
        """The engines and batch size the (first) classifier runs the model with, from its metrics."""
        _, _, body = http("GET", f"http://127.0.0.1:{self.ports['classifier']}/metrics")
        found = {}
        for line in body.decode().splitlines():
            for metric, key in [("classifier_engines", "engines"), ("classifier_batch_size_limit", "batch")]:
                if line.startswith(f'{metric}{{model="{MODEL["name"]}"}}'):
                    found[key] = int(float(line.split()[-1]))
        return found

    def broker_disk_mib(self):
        return sum(os.path.getsize(p) for p in glob.glob(os.path.join(self.run, "broker.db*"))) / 2**20


def memory_broker():
    """The broker built with in-memory storage, for comparisons only (built once, like the other)."""
    return subprocess.run([os.path.join(ROOT, "scripts/broker/build.sh"), "dynostore"], check=True,
                          capture_output=True, text=True).stdout.strip()


def pipeline(base, photos_url, images, steady_seconds=10, storage=None, classifiers=1, env=None):
    """One end-to-end run: images/s, latency at half that rate (unless steady_seconds is 0), CPU
    ms per image, RSS."""
    with Stack(storage, classifiers, env) as stack:
        warm = 2 * 8
        stack.submit([f"{photos_url}/{i}" for i in range(warm)])
        stack.wait_rows(warm)
        cpu_before, started = stack.cpu(), time.monotonic()
        stack.submit([f"{photos_url}/{base + i}" for i in range(images)])
        finished = stack.wait_rows(warm + images)
        rate = images / (finished - started)
        stack.check_all_ok()
        cpu = {k: (v - cpu_before[k]) * 1000 / images for k, v in stack.cpu().items()}

        settings = stack.classifier_settings()
        if not steady_seconds:
            return {"rate": rate, "cpu": cpu, "rss": stack.rss(), "settings": settings}
        # Steady load at half the peak, in ticks of 100 ms; latency is submission to row stored.
        steady_from = stack.sql("SELECT now()")
        sent, owed, per_tick = 0, 0.0, max(rate / 2 / 10, 1)
        next_tick = time.monotonic()
        for _ in range(steady_seconds * 10):
            owed += per_tick
            n, owed = int(owed), owed - int(owed)
            if n:
                stack.submit([f"{photos_url}/{base + images + sent + i}" for i in range(n)])
                sent += n
            next_tick += 0.1
            time.sleep(max(0, next_tick - time.monotonic()))
        stack.wait_rows(warm + images + sent)
        latency = [float(v) * 1000 for v in stack.sql(
            "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP "
            "(ORDER BY extract(epoch FROM stored_at - submitted_at)) "
            f"FROM results WHERE submitted_at >= '{steady_from}'").strip("{}").split(",")]
        return {"rate": rate, "latency": latency, "cpu": cpu, "rss": stack.rss(), "settings": settings}


# --- the Celery design ---------------------------------------------------------------------------

def celery_venv():
    venv = os.path.join(CACHE, "venv-celery")
    pinned_venv(venv, os.path.join(ROOT, "bench/celery/requirements.txt"), "the Celery baseline's venv")
    return venv


def celery(photos_url, base, images):
    """Images/s of the Celery design on the same photos, and its CPU ms per image."""
    venv = celery_venv()
    redis_server = shutil.which("redis-server")
    if not redis_server:
        sys.exit("bench: the Celery baseline needs Redis: apt-get install redis-server")
    redis_port, api_port = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "MODEL_PATH": os.path.join(CACHE, MODEL["onnx"]), "IMAGE_SIZE": str(MODEL["image_size"]),
           "LABELS_PATH": os.path.join(CACHE, "models/imagenet_labels.tsv"), "ORT_THREADS": "1"}
    cwd = os.path.join(ROOT, "bench/celery")
    log = open(os.path.join(tempfile.gettempdir(), "reefline-bench-celery.log"), "ab")
    procs = {"redis": subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no"], stdout=log, stderr=log)}
    try:
        procs["celery"] = subprocess.Popen(
            [os.path.join(venv, "bin/celery"), "-A", "app", "worker", "--pool", "prefork",
             "--concurrency", str(CORES), "--loglevel", "warning", "--without-gossip", "--without-mingle"],
            cwd=cwd, env=env, stdout=log, stderr=log)
        procs["fastapi"] = subprocess.Popen(
            [os.path.join(venv, "bin/uvicorn"), "app:api", "--host", "127.0.0.1", "--port", str(api_port),
             "--log-level", "warning"], cwd=cwd, env=env, stdout=log, stderr=log)
        api = f"http://127.0.0.1:{api_port}"

        def up():
            try:
                return http("GET", f"{api}/api/done", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until("the Celery baseline's API", up, timeout=60)

        def submit(urls):
            for start in range(0, len(urls), 1000):
                status, _, body = http("POST", f"{api}/api/infer", {"images": urls[start:start + 1000]})
                if status != 202:
                    sys.exit(f"bench: the Celery baseline answered {status}: {body[:300]!r}")

        def done(target):
            return wait_count("Celery results", lambda: json.loads(http("GET", f"{api}/api/done")[2])["done"], target)

        warm = 4 * CORES
        submit([f"{photos_url}/{i}" for i in range(warm)])
        done(warm)
        cpu_before, started = sum(tree_cpu_seconds(p.pid) for p in procs.values()), time.monotonic()
        submit([f"{photos_url}/{base + i}" for i in range(images)])
        finished = done(warm + images)
        cpu = (sum(tree_cpu_seconds(p.pid) for p in procs.values()) - cpu_before) * 1000 / images
        errors = json.loads(http("GET", f"{api}/api/done")[2])["errors"]
        if errors:
            sys.exit(f"bench: {errors} of the Celery baseline's images failed (see {log.name}): its rate is no figure")
        return {"rate": images / (finished - started), "cpu": cpu}
    finally:
        for p in reversed(list(procs.values())):
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


# --- the single-process limit --------------------------------------------------------------------

MODEL = {}  # the manifest's entry of the model measured (--model), set by main()


def hardware_bound(folder="bench-photos"):
    """What the hardware allows: the cores divided by what an image needs on one core (decode,
    resize, and the model's inference on one thread at its cheapest batch size), from
    `stage_costs --bound` on the same photos."""
    out = subprocess.run([os.path.join(RELEASE, "examples", "stage_costs"), "--bound", MODEL["name"], folder],
                         check=True, capture_output=True, text=True).stdout
    costs = json.loads(out.strip().splitlines()[-1])
    say(f"hardware bound on {folder}: {CORES} cores / ({costs['decode_ms']:.2f} decode + {costs['resize_ms']:.2f} resize "
        f"+ {costs['infer_ms']:.2f} inference at batch {costs['infer_batch']}) ms = "
        f"{CORES * 1000 / costs['ms_per_image']:.1f} images/s (learning the bytes, not counted: {costs['learn_ms']:.2f} ms)")
    return {**costs, "images_s": CORES * 1000 / costs["ms_per_image"]}


def limit(images, folder=None):
    folders = ["--photos", folder] if folder else []
    model = ["--model-file", MODEL["onnx"], "--image-size", str(MODEL["image_size"])]
    out = subprocess.run([os.path.join(RELEASE, "reefline-bench"), "--images", str(images), *folders, *model],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


# --- the two commands ----------------------------------------------------------------------------

def line(name, values, fmt="{:.1f}"):
    """Prints `name`, padded, with the median of `values` and their spread."""
    print(f"{name:35} {spread(values, fmt)[1]}")


def spread(values, fmt="{:.1f}"):
    values = sorted(values)
    middle = statistics.median(values)
    return middle, f"{fmt.format(middle)} (spread {fmt.format(values[0])}..{fmt.format(values[-1])})"


LARGE = "camera-photos-12mp"


def camera_photos():
    """12-megapixel versions of the 252 photos (models/camera_photos.py, in the reference venv),
    made once under the cache: the test photos at the top of LARGE, each bench folder below it."""
    python = os.path.join(CACHE, "venv-reference/bin/python")
    script = os.path.join(ROOT, "models/camera_photos.py")
    out = os.path.join(CACHE, LARGE)
    groups = [(out, sorted(glob.glob(os.path.join(CACHE, "photos/*"))))]
    for folder in sorted(glob.glob(os.path.join(CACHE, "bench-photos/*"))):
        groups.append((os.path.join(out, os.path.basename(folder)), sorted(glob.glob(os.path.join(folder, "*")))))
    missing = sum(not os.path.exists(os.path.join(d, os.path.splitext(os.path.basename(p))[0] + ".jpg"))
                  for d, photos in groups for p in photos)
    if missing:
        say(f"making {missing} 12-megapixel camera versions of the photos (once, under {out})")
    for d, photos in groups:
        subprocess.run([python, script, "12", d, *photos], check=True)


def large_photos(args, runs):
    """The same stack and the Celery design on the 12-megapixel versions, with their limit."""
    camera_photos()
    bound = hardware_bound(LARGE)
    url, photos = serve_photos(LARGE)
    say(f"{args.large_images} images a run over {photos} distinct 12-megapixel photos "
        f"(JPEG_SCALE_MARGIN={args.jpeg_scale_margin})")
    for r, run in enumerate(runs):
        base = 1000 + r * 10 * args.large_images
        run["large_limit"] = limit(args.large_images, LARGE)
        run["large"] = pipeline(base, url, args.large_images, steady_seconds=0)
        say(f"run {r + 1}: 12 MP: limit {run['large_limit']:.1f}, make-up stack {run['large']['rate']:.1f} images/s")
        if args.celery:
            run["large_celery"] = celery(url, base, args.large_images)
            say(f"run {r + 1}: 12 MP: Celery baseline {run['large_celery']['rate']:.1f} images/s")
    print()
    line("12mp single_process_limit_images_s", [r["large_limit"] for r in runs])
    line("12mp end_to_end_images_s (make up)", [r["large"]["rate"] for r in runs])
    line("12mp end_to_end / limit", [r["large"]["rate"] / r["large_limit"] for r in runs], "{:.3f}")
    print(f"{'12mp hardware_bound_images_s':35} {bound['images_s']:.1f} ({bound['ms_per_image']:.2f} ms of one core an image)")
    line("12mp end_to_end / hardware_bound", [r["large"]["rate"] / bound["images_s"] for r in runs], "{:.3f}")
    line("12mp classifier_cpu_ms_per_image", [r["large"]["cpu"]["classifier"] for r in runs], "{:.2f}")
    middle = sorted(runs, key=lambda r: r["large"]["rate"])[len(runs) // 2]["large"]
    total = sum(middle["cpu"].values())
    print(f"12mp cpu_ms_per_image " + ", ".join(f"{name} {ms:.2f}" for name, ms in middle["cpu"].items())
          + f"; total {total:.2f} ({CORES} cores allow {CORES * 1000 / total:.0f} images/s)")
    if args.celery:
        line("12mp celery_baseline_images_s", [r["large_celery"]["rate"] for r in runs])
        ratios = [r["large"]["rate"] / r["large_celery"]["rate"] for r in runs]
        line("12mp end_to_end / celery_baseline", ratios, "{:.2f}")
        line("12mp celery_cpu_ms_per_image", [r["large_celery"]["cpu"] for r in runs], "{:.1f}")


def bench(args):
    runs = [{} for _ in range(args.runs)]
    if not args.large_only:
        small_photos(args, runs)
    if args.large_images:
        large_photos(args, runs)
    stages = os.path.join(RELEASE, "examples", "stage_costs")
    if os.path.exists(stages):
        print("\nCPU per image by stage, one thread (tests/examples/stage_costs.rs):", flush=True)
        subprocess.run([stages], check=True)


def small_photos(args, runs):
    """The limit, the stack (and on memory://) and the Celery design on the bench photos."""
    photos_url, photos = serve_photos()
    say(f"{args.images} images a run over {photos} distinct real photos, {args.runs} run(s), {CORES} cores, "
        f"model {MODEL['name']}")
    bound = hardware_bound()
    for r, run in enumerate(runs):
        base = 1000 + r * 10 * args.images  # each run's URLs are new to the stack
        run["limit"] = limit(args.images)
        say(f"run {r + 1}: single-process limit {run['limit']:.1f} images/s")
        run["stack"] = pipeline(base, photos_url, args.images)
        say(f"run {r + 1}: make-up stack (sqlite) {run['stack']['rate']:.1f} images/s")
        if args.memory:
            run["memory"] = pipeline(base, photos_url, args.images, storage="memory://bench/")
            say(f"run {r + 1}: same on memory:// {run['memory']['rate']:.1f} images/s")
        if args.celery:
            run["celery"] = celery(photos_url, base, args.images)
            say(f"run {r + 1}: Celery baseline {run['celery']['rate']:.1f} images/s")

    print()
    settings = runs[0]["stack"]["settings"]
    print(f"classifier: {settings.get('engines')} engine(s) for the model (ENGINES), batches of at most "
          f"{settings.get('batch')} (MAX_BATCH_SIZE, or as measured at start)")
    print(f"{'hardware_bound_images_s':35} {bound['images_s']:.1f} ({bound['ms_per_image']:.2f} ms of one core an image)")
    line("single_process_limit_images_s", [r["limit"] for r in runs])
    line("end_to_end_images_s (make up)", [r["stack"]["rate"] for r in runs])
    line("end_to_end / hardware_bound", [r["stack"]["rate"] / bound["images_s"] for r in runs], "{:.3f}")
    line("end_to_end / limit", [r["stack"]["rate"] / r["limit"] for r in runs], "{:.3f}")
    line("classifier_cpu / bound's cpu", [r["stack"]["cpu"]["classifier"] / bound["ms_per_image"] for r in runs], "{:.3f}")
    if args.memory:
        line("end_to_end_images_s (memory://)", [r["memory"]["rate"] for r in runs])
        line("make up / memory://", [r["stack"]["rate"] / r["memory"]["rate"] for r in runs], "{:.3f}")
    if args.celery:
        line("celery_baseline_images_s", [r["celery"]["rate"] for r in runs])
        line("end_to_end / celery_baseline", [r["stack"]["rate"] / r["celery"]["rate"] for r in runs], "{:.2f}")
        line("celery_cpu_ms_per_image", [r["celery"]["cpu"] for r in runs], "{:.1f}")
    middle = sorted(runs, key=lambda r: r["stack"]["rate"])[len(runs) // 2]["stack"]
    for i, p in enumerate(["p50", "p95", "p99"]):
        line(f"latency_ms_at_half_peak {p}", [r["stack"]["latency"][i] for r in runs], "{:.0f}")
    total = sum(middle["cpu"].values())
    for name, ms in middle["cpu"].items():
        print(f"cpu_ms_per_image {name:18} {ms:6.2f} ({100 * ms / total:.0f} %)")
    print(f"cpu_ms_per_image total             {total:6.2f} ({CORES} cores allow {CORES * 1000 / total:.0f} images/s)")
    for name, mib in middle["rss"].items():
        print(f"rss_mib {name:27} {mib:.0f}")


def scale(args):
    """The make-up stack with 1, 2, 4... classifier instances in one consumer group, on the same
    photos: images/s against one instance, and CPU per image."""
    folder = LARGE if args.large else None
    if args.large:
        camera_photos()
    url, photos = serve_photos(folder)
    env = {"TOPIC_PARTITIONS": str(args.partitions)}
    say(f"{args.images} images a run over {photos} distinct {'12-megapixel ' if args.large else ''}photos, "
        f"{args.runs} run(s), {CORES} cores, model {MODEL['name']}, {args.partitions} partitions, "
        f"classifiers {', '.join(map(str, args.classifiers))}")
    rates = {n: [] for n in args.classifiers}
    cpu = {}
    for r in range(args.runs):
        for i, n in enumerate(args.classifiers):
            base = 1000 + (r * len(args.classifiers) + i) * 10 * args.images  # new URLs for each stack
            result = pipeline(base, url, args.images, steady_seconds=0, classifiers=n, env=env)
            rates[n].append(result["rate"])
            cpu.setdefault(n, []).append(result["cpu"])
            say(f"run {r + 1}: {n} classifier(s): {result['rate']:.1f} images/s")
    print()
    first = args.classifiers[0]
    for n in args.classifiers:
        line(f"classifiers {n}: end_to_end_images_s", rates[n])
        line(f"classifiers {n}: against {first}", [a / b for a, b in zip(rates[n], rates[first])], "{:.2f}")
        middle = sorted(cpu[n], key=lambda c: c["classifier"])[len(cpu[n]) // 2]
        total = sum(middle.values())
        print(f"classifiers {n}: cpu_ms_per_image classifiers {middle['classifier']:.2f}, broker {middle['broker']:.2f}, "
              f"whole stack {total:.2f} "
              f"({CORES} cores allow {CORES * 1000 / total:.0f} images/s)")


def soak_one(photos_url, requests, window, storage=None):
    with Stack(storage) as stack:
        warm = 16
        stack.submit([f"{photos_url}/{i}" for i in range(warm)])
        stack.wait_rows(warm)
        rss_start = stack.rss()
        started = time.monotonic()
        submitter = threading.Thread(target=stack.submit,
                                     args=([f"{photos_url}/{warm + i}" for i in range(requests)],), daemon=True)
        submitter.start()
        marks, last, rss = [started], started, []
        for k in range(1, requests // window + 1):
            last = stack.wait_rows(warm + k * window)
            marks.append(last)
            rss.append(stack.rss())
            say(f"{'memory://' if storage else 'make up'}: {k * window:>7,} results, "
                f"{window / (marks[-1] - marks[-2]):.1f} images/s in the last {window:,}")
        submitter.join()
        stack.check_all_ok()
        result = {"rates": [window / (b - a) for a, b in zip(marks, marks[1:])],
                  "overall": requests / (last - started), "rss_start": rss_start, "rss": rss,
                  "disk_mib": stack.broker_disk_mib()}
        say("idle: 30 s with nothing to do, then CPU measured over 30 s")
        time.sleep(30)
        before, t0 = stack.cpu(), time.monotonic()
        time.sleep(30)
        after, elapsed = stack.cpu(), time.monotonic() - t0
        result["idle"] = {k: 100 * (after[k] - before[k]) / elapsed for k in SERVICES}
        return result


def soak(args):
    photos_url, _ = serve_photos()
    say(f"soak: {args.requests:,} requests through the make-up stack, windows of {args.window:,}")
    main = soak_one(photos_url, args.requests, args.window)
    memory = soak_one(photos_url, args.requests, args.window, "memory://soak/") if args.memory else None

    print()
    first = main["rates"][0]
    services = list(main["rss_start"])
    print("window           images/s  vs first   RSS MiB at its end: " + ", ".join(services))
    for k, rate in enumerate(main["rates"]):
        print(f"{k * args.window:>7,}-{(k + 1) * args.window:<7,}  {rate:8.1f}  {100 * (rate / first - 1):+6.1f} %   "
              + ", ".join(f"{main['rss'][k][name]:.0f}" for name in services))
    worst = min(main["rates"]) / first - 1
    print(f"worst window vs first: {100 * worst:+.1f} % (floor: -15 %)")
    print(f"whole run, make up:  {main['overall']:.1f} images/s")
    if memory:
        print(f"whole run, memory://: {memory['overall']:.1f} images/s; make up / memory:// = "
              f"{main['overall'] / memory['overall']:.3f} (floor 0.90)")
    print(f"broker disk use after {args.requests:,} requests: {main['disk_mib']:.0f} MiB")
    print("idle CPU, % of one core: " + ", ".join(f"{k} {v:.2f}" for k, v in main["idle"].items()) +
          f"; total {sum(main['idle'].values()):.2f} (ceiling 2)")
    print("RSS MiB, start -> end: " + ", ".join(
        f"{k} {main['rss_start'][k]:.0f} -> {main['rss'][-1][k]:.0f}" for k in services))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--images", type=int, default=1000)
    b.add_argument("--no-memory", dest="memory", action="store_false")
    b.add_argument("--no-celery", dest="celery", action="store_false")
    b.add_argument("--large-images", type=int, default=300, help="12-megapixel images a run (0: none)")
    b.add_argument("--large-only", action="store_true", help="only the 12-megapixel runs")
    b.add_argument("--model", default="efficientnet-lite0", help="the model both designs run (models/manifest.toml)")
    b.add_argument("--jpeg-scale-margin", type=int, choices=range(1, 9),
                   default=int(os.environ.get("JPEG_SCALE_MARGIN", "2")),
                   help="the stack's and the limit's JPEG_SCALE_MARGIN (1: 12 MP photos decoded at 1/8, not 1/4)")
    s = sub.add_parser("soak")
    c = sub.add_parser("scale")
    c.add_argument("--classifiers", type=int, nargs="+", default=[1, 2, 4])
    c.add_argument("--partitions", type=int, default=12, help="of the requests topic (divisible by each count)")
    c.add_argument("--runs", type=int, default=1)
    c.add_argument("--images", type=int, default=1000)
    c.add_argument("--large", action="store_true", help="the 12-megapixel photos")
    c.add_argument("--model", default="efficientnet-lite0", help="the model the stack runs")
    s.add_argument("--requests", type=int, default=100_000)
    s.add_argument("--window", type=int, default=10_000)
    s.add_argument("--no-memory", dest="memory", action="store_false")
    s.add_argument("--model", default="efficientnet-lite0", help="the model the stack runs")
    args = parser.parse_args()
    with open(os.path.join(ROOT, "models/manifest.toml"), "rb") as f:
        models = {m["name"]: m for m in tomllib.load(f)["model"]}
    if args.model not in models:
        sys.exit(f"bench: --model {args.model} is not in models/manifest.toml ({', '.join(models)})")
    MODEL.update(models[args.model])
    # The stack's services read DEFAULT_MODEL from the environment they inherit.
    os.environ["DEFAULT_MODEL"] = args.model
    if args.command == "bench":
        os.environ["JPEG_SCALE_MARGIN"] = str(args.jpeg_scale_margin)
    try:
        {"bench": bench, "scale": scale, "soak": soak}[args.command](args)
    finally:
        stop_photo_servers()


if __name__ == "__main__":
    main()
