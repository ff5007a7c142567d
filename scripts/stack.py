#!/usr/bin/env python3
"""Start, stop and check the local Reefline stack as background processes.

usage: stack.py up | down | status | ready

`up` starts the broker (nisshi, durable sqlite storage), the local Schema Registry, the sink,
the classifier and ingest, each logging to $REEFLINE_CACHE/run/<name>.log, and waits until each
answers; it leaves running ones alone, except one running another binary than it would start
(another build, or one rebuilt since), which it restarts. PROFILE_DIR (default release) picks the
build: `make demo` starts the stack on the quick debug build (PROFILE_DIR=debug), and a later
`make up` moves it to release. `down` stops them in reverse order and waits for each; `ready`
exits 0 when every service answers.
Ports come from the usual variables (INGEST_LISTEN, SINK_LISTEN, CLASSIFIER_LISTEN,
REGISTRY_LISTEN, BROKER_PORT); the services read the rest of their settings from the environment.
CLASSIFIERS (default 1) starts that many classifier instances, one consumer group sharing the
requests topic's partitions (TOPIC_PARTITIONS, 6 by default, bounds how many get work): the first
is "classifier" on CLASSIFIER_LISTEN, instance k is "classifier-k" on CLASSIFIER_LISTEN_k, by
default CLASSIFIER_LISTEN's port + 100 × (k - 1). `down` stops every instance it finds.
REEFLINE_RUN moves the run folder (pid files, logs, broker data); `make bench`, `make bench-scale`
and `make soak` start this same stack in folders of their own. BROKER_STORAGE (default sqlite://broker.db, in the
run folder) and NISSHI_BIN exist for those benchmarks' in-memory comparison.
"""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("REEFLINE_CACHE", os.path.join(ROOT, ".cache"))
RUN = os.environ.get("REEFLINE_RUN", os.path.join(CACHE, "run"))
BIN = os.path.join(ROOT, "target", os.environ.get("PROFILE_DIR", "release"))

BROKER_PORT = os.environ.get("BROKER_PORT", "9092")
BROKER = f"127.0.0.1:{BROKER_PORT}"
REGISTRY = os.environ.get("REGISTRY_LISTEN", "127.0.0.1:8085")
INGEST = os.environ.get("INGEST_LISTEN", "127.0.0.1:8080")
SINK = os.environ.get("SINK_LISTEN", "127.0.0.1:8081")
CLASSIFIER = os.environ.get("CLASSIFIER_LISTEN", "127.0.0.1:8082")


def classifier_instances():
    """(name, listen address) of each classifier instance: CLASSIFIERS of them, and any other
    instance still running from an earlier `up` (so that `down` stops it too)."""
    wanted = int(os.environ.get("CLASSIFIERS", "1"))
    running = [int(name[len("classifier-"):-len(".pid")]) for name in os.listdir(RUN) if
               name.startswith("classifier-") and name.endswith(".pid")] if os.path.isdir(RUN) else []
    host, port = CLASSIFIER.rsplit(":", 1)
    return [("classifier" if k == 1 else f"classifier-{k}",
             CLASSIFIER if k == 1 else os.environ.get(f"CLASSIFIER_LISTEN_{k}", f"{host}:{int(port) + 100 * (k - 1)}"))
            for k in range(1, max([wanted, *running]) + 1)]


def tenant_secret():
    """TENANT_SECRET from the environment, else one made for this stack and kept under .cache/run:
    ingest seals each request's tenant with it and the classifiers and the sink check the seal, so
    API_KEYS_FILE may give keys to several tenants (docs/security.md)."""
    if os.environ.get("TENANT_SECRET"):
        return os.environ["TENANT_SECRET"]
    path = os.path.join(RUN, "tenant-secret")
    if not os.path.exists(path):
        os.makedirs(RUN, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    with open(path) as f:
        return f.read().strip()


def services():
    env = {
        "TENANT_SECRET": tenant_secret(),
        "KAFKA_BROKERS": os.environ.get("KAFKA_BROKERS", BROKER),
        "SCHEMA_REGISTRY_URL": os.environ.get("SCHEMA_REGISTRY_URL", f"http://{REGISTRY}"),
        "MODELS_MANIFEST": os.path.join(ROOT, "models/manifest.toml"),
        "MODELS_DIR": CACHE,
        "ORT_DYLIB_PATH": os.path.join(CACHE, "onnxruntime/libonnxruntime.so.1.31.1"),
        "INGEST_LISTEN": INGEST,
        "SINK_LISTEN": SINK,
        "CLASSIFIER_LISTEN": CLASSIFIER,
    }
    # The classifier may fetch images from loopback (the demo's photo server); nothing else private.
    # Feed sources (SOURCE_ALLOW) and callbacks (CALLBACK_ALLOW) get no loopback: it would open the
    # sink, ingest, the registry and the broker to any source_url or callback_url (an allowlist
    # cannot name ports). Either may still be set in the environment.
    classifier_env = {**env, "FETCH_ALLOW": os.environ.get("FETCH_ALLOW", "127.0.0.1/32")}
    broker_url = f"tcp://{BROKER}"
    nisshi = os.environ.get("NISSHI_BIN", os.path.join(CACHE, "tools/bin/nisshi"))
    # nisshi reads a sqlite path relative to its working directory, RUN.
    storage = os.environ.get("BROKER_STORAGE", "sqlite://broker.db")
    return [
        ("broker", [nisshi, "broker", "--listener-url", broker_url, "--advertised-listener-url", broker_url,
                    "--storage-engine", storage], env, ("tcp", BROKER)),
        ("registry", [os.path.join(BIN, "reefline-registry"), "--listen", REGISTRY, "--file",
                      os.path.join(RUN, "registry.json")], env, ("tcp", REGISTRY)),
        ("sink", [os.path.join(BIN, "reefline-sink")], env, ("http", f"http://{SINK}/readyz")),
        *[(name, [os.path.join(BIN, "reefline-classifier")], {**classifier_env, "CLASSIFIER_LISTEN": listen},
           ("http", f"http://{listen}/readyz")) for name, listen in classifier_instances()],
        ("ingest", [os.path.join(BIN, "reefline-ingest")], env, ("http", f"http://{INGEST}/readyz")),
    ]


def pid_of(name):
    try:
        with open(os.path.join(RUN, f"{name}.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def answers(check):
    kind, target = check
    try:
        if kind == "tcp":
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        with urllib.request.urlopen(target, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def executable(pid):
    """The binary a process runs ("… (deleted)" once a rebuild has replaced it)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def up():
    os.makedirs(RUN, exist_ok=True)
    for name, cmd, env, check in services():
        if not os.path.exists(cmd[0]):
            sys.exit(f"stack: {cmd[0]} is missing; run `make build` first")
        pid = pid_of(name)
        if pid:
            running = executable(pid)
            if running is None or running == os.path.realpath(cmd[0]):
                print(f"stack: {name} already running")
                continue
            # Another build (the demo's quick build, when `make up` wants release) or a binary
            # rebuilt since: the service restarts on the binary asked for.
            print(f"stack: {name} runs {running}; restarting it on {os.path.realpath(cmd[0])}")
            stop(name, pid)
        log = open(os.path.join(RUN, f"{name}.log"), "ab")
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=RUN if name == "broker" else ROOT, start_new_session=True)
        with open(os.path.join(RUN, f"{name}.pid"), "w") as f:
            f.write(str(proc.pid))
        deadline = time.time() + 120
        while not answers(check):
            if proc.poll() is not None:
                sys.exit(f"stack: {name} exited with {proc.returncode}; see {RUN}/{name}.log")
            if time.time() > deadline:
                sys.exit(f"stack: {name} did not become ready in 120 s; see {RUN}/{name}.log")
            time.sleep(0.2)
        print(f"stack: {name} ready (pid {proc.pid})")
    print(f"stack: up. ingest http://{INGEST}  lookup http://{SINK}  classifier metrics http://{CLASSIFIER}/metrics")


def stop(name, pid):
    """SIGTERM, then SIGKILL after 30 s (the services drain in less)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while pid_of(name) and time.time() < deadline:
        time.sleep(0.1)
    if pid_of(name):
        os.kill(pid, signal.SIGKILL)
    os.remove(os.path.join(RUN, f"{name}.pid"))


def down():
    for name, *_ in reversed(services()):
        pid = pid_of(name)
        if pid:
            stop(name, pid)
            print(f"stack: {name} stopped")


def ready():
    """Exit status 0 when every service answers (`make demo` then uses the stack as it runs)."""
    sys.exit(0 if all(pid_of(name) and answers(check) for name, _, _, check in services()) else 1)


def status():
    for name, _, _, check in services():
        pid = pid_of(name)
        state = "ready" if pid and answers(check) else ("starting" if pid else "stopped")
        print(f"{name:10} {state}{f' (pid {pid})' if pid else ''}")


if __name__ == "__main__":
    {"up": up, "down": down, "status": status, "ready": ready}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()
