#!/usr/bin/env python3
"""Classify the cached real photos through the running local stack and print the results.

Serves $REEFLINE_CACHE/photos over HTTP on a free local port, submits every photo to ingest's
POST /v1/classify, follows GET /v1/batches/{id} on the sink until the batch is done, and prints
one line per image. Expects `stack.py up` to have run (make demo does both).
"""
import functools
import http.server
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("REEFLINE_CACHE", os.path.join(ROOT, ".cache"))
INGEST = os.environ.get("INGEST_LISTEN", "127.0.0.1:8080")
SINK = os.environ.get("SINK_LISTEN", "127.0.0.1:8081")


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    photos_dir = os.path.join(CACHE, "photos")
    handler = functools.partial(Quiet, directory=photos_dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    names = sorted(os.listdir(photos_dir))
    urls = [f"{base}/{name}" for name in names] + [f"{base}/no-such-photo.jpg"]

    body = json.dumps({"images": urls}).encode()
    req = urllib.request.Request(f"http://{INGEST}/v1/classify", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        accepted = json.load(r)
    batch_id = accepted["batch_id"]
    print(f"demo: submitted {len(urls)} images as batch {batch_id}")

    started = time.time()
    batch = None
    while time.time() - started < 300:
        try:
            with urllib.request.urlopen(f"http://{SINK}/v1/batches/{batch_id}", timeout=10) as r:
                batch = json.load(r)
            if batch["done"]:
                break
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        time.sleep(0.25)
    if not batch or not batch["done"]:
        sys.exit("demo: the batch did not finish in 5 minutes; see .cache/run/*.log")

    print(f"demo: {batch['completed']} results in {time.time() - started:.1f} s "
          f"({batch['ok']} ok, {batch['error']} error)\n")
    print(f"{'image':28} {'status':6} {'top-1 (score)':38} {'marine'}")
    for r in batch["results"]:
        name = r["url"].rsplit("/", 1)[-1]
        if r["status"] == "ok":
            top = r["predictions"][0]
            label = f"{top['label']} ({top['score']:.2f})"
            marine = r["marine_group"] or "-"
        else:
            label = f"{r['error']['kind']}: {r['error']['message']}"[:38]
            marine = "-"
        print(f"{name:28} {r['status']:6} {label:38} {marine}")
    print(f"\ndemo: look one up with  curl http://{SINK}/v1/results/{batch['results'][0]['request_id']}")
    print(f"demo: or browse them at  http://{SINK}/#batch={batch['batch_id']}  (the API: http://{SINK}/docs)")


if __name__ == "__main__":
    main()
