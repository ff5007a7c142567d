#!/usr/bin/env python3
"""Checks the deployment files that cannot run here (no Docker engine, no cluster), from a hash-pinned
venv. docker-compose.yml is validated against the compose-spec JSON schema (vendored by
check-jsonschema) and against the rules a reader would check by hand: every port published on
127.0.0.1 only, every service with a restart policy and a health check, Kafka's data on its volume,
API keys required, and every file the stack mounts present in the repository. The Grafana
dashboard's queries must parse. ops/kubernetes/ is validated against the Kubernetes schemas
(kubernetes-validate, strict), and its KEDA ScaledObject against what it must say. Run by
`make test`."""

import json
import os
import re
import subprocess
import sys

from pinned_venv import pinned_venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("REEFLINE_CACHE", os.path.join(ROOT, ".cache"))


def say(message):
    print(f"check-deploy: {message}", flush=True)


def load_yaml_all(python, path):
    """Every document of a YAML file, as JSON values (merge keys resolved), read by ruamel.yaml."""
    code = ("import json, sys\nfrom ruamel.yaml import YAML\n"
            "print(json.dumps([d for d in YAML(typ='safe').load_all(open(sys.argv[1])) if d]))")
    out = subprocess.run([python, "-c", code, path], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def check_dashboard():
    """Every query of the Grafana dashboard parses as PromQL (promtool checks it as a rule)."""
    dashboard = json.load(open(os.path.join(ROOT, "ops/grafana/dashboards/reefline.json")))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{p['id']}", "expr": t["expr"]}
        for p in dashboard["panels"] for t in p["targets"]]}]}
    path = os.path.join(CACHE, "dashboard-rules.json")
    with open(path, "w") as f:
        json.dump(rules, f)
    checked = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
    if checked.returncode != 0:
        return [f"dashboard: {checked.stdout}{checked.stderr}"]
    return []


KUBERNETES_VERSION = "1.33.0"

KUBERNETES_CHECK = '''
import sys, yaml, kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError
failed = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        name = f"{path.rsplit('/', 1)[-1]}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, sys.argv[1], strict=True)
            print(f"check-deploy: {name}: valid (Kubernetes {sys.argv[1]}, strict)")
        except SchemaNotFoundError:
            print(f"check-deploy: {name}: no Kubernetes schema (a custom resource; checked below)")
        except Exception as e:
            failed += 1
            print(f"check-deploy: {name}: {e}")
sys.exit(1 if failed else 0)
'''


def check_kubernetes(python):
    """The manifests against the Kubernetes schemas (strict: no unknown fields), and the KEDA
    ScaledObject (a custom resource, no schema here) against what it must say."""
    folder = os.path.join(ROOT, "ops/kubernetes")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))
    problems = []
    if subprocess.run([python, "-c", KUBERNETES_CHECK, KUBERNETES_VERSION, *files]).returncode != 0:
        problems.append("kubernetes: manifests do not validate (above)")
    docs = [d for f in files for d in load_yaml_all(python, f)]
    deployments = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Deployment"}
    for name, d in deployments.items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"kubernetes: {name}/{c['name']} has no {probe}")
            if "requests" not in c.get("resources", {}) or "limits" not in c.get("resources", {}):
                problems.append(f"kubernetes: {name}/{c['name']} sets no resource requests and limits")
    problems += check_grace_periods(deployments)
    config = next(d for d in docs if d.get("kind") == "ConfigMap")["data"]
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    if len(scaled) != 1 or scaled[0].get("apiVersion") != "keda.sh/v1alpha1":
        problems.append("kubernetes: expected one keda.sh/v1alpha1 ScaledObject")
    else:
        spec = scaled[0]["spec"]
        if spec["scaleTargetRef"]["name"] not in deployments:
            problems.append("keda: scaleTargetRef names no Deployment here")
        trigger = spec["triggers"][0]
        meta = trigger["metadata"]
        if trigger["type"] != "kafka":
            problems.append("keda: the trigger is not KEDA's kafka scaler")
        if meta.get("topic") != config["REQUESTS_TOPIC"] or meta.get("consumerGroup") != config["CLASSIFIER_GROUP"]:
            problems.append("keda: the trigger's topic and group are not the classifiers' (config.yaml)")
        if not str(meta.get("lagThreshold", "")).isdigit():
            problems.append("keda: lagThreshold must be a number, as a string")
        if not 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= 6:
            problems.append("keda: replicas must stay within 1 and the requests topic's 6 partitions")
    return problems


def drain_seconds(path, const):
    """The seconds of `const NAME: Duration = Duration::from_secs(N)` in a Rust source file."""
    match = re.search(rf"const {const}: Duration = Duration::from_secs\((\d+)\)", open(os.path.join(ROOT, path)).read())
    if not match:
        sys.exit(f"check-deploy: {path} has no {const}")
    return int(match.group(1))


# What a stopping service may wait for after its drain, at the most: each producer's flush and each
# consumer's leaving its group take up to 10 s (classifier/src/lib.rs, sink/src/lib.rs).
FLUSH_OR_CLOSE = 10


def check_grace_periods(deployments):
    """Each Deployment gives its pods longer to stop than the service may take on SIGTERM at the
    most (its drains read from the code, then its flushes and consumer closes), with 15 s to spare:
    a pod killed mid-drain redoes its work on another."""
    http = drain_seconds("common/src/http.rs", "DRAIN")
    drains = {
        # The pipeline's drain, two producers' flushes, then both lanes' consumers close together.
        "reefline-classifier": drain_seconds("classifier/src/offsets.rs", "DRAIN_TIMEOUT") + 3 * FLUSH_OR_CLOSE,
        "reefline-ingest": http,
        # The HTTP drain beside the consumers', then its two consumers close one after the other.
        "reefline-sink": http + 2 * FLUSH_OR_CLOSE,
    }
    problems = []
    for name, drain in drains.items():
        if name not in deployments:
            problems.append(f"kubernetes: no Deployment {name}")
            continue
        grace = deployments[name]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < drain + 15:
            problems.append(f"kubernetes: {name} has terminationGracePeriodSeconds {grace}; its drain "
                            f"takes up to {drain} s, so it needs at least {drain + 15}")
    return problems


def main():
    python = pinned_venv(os.path.join(CACHE, "venv-ops"), os.path.join(ROOT, "ops/requirements.txt"),
                         "the deployment checkers' venv")
    env = os.path.dirname(os.path.dirname(python))
    compose = os.path.join(ROOT, "docker-compose.yml")
    schema = subprocess.run(
        [os.path.join(env, "bin", "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose])
    if schema.returncode != 0:
        sys.exit("check-deploy: docker-compose.yml does not follow the compose-spec schema (above)")
    doc = load_yaml_all(python, compose)[0]
    problems = []
    services = doc["services"]
    for name, service in services.items():
        if service.get("restart") not in ("unless-stopped", "always", "on-failure"):
            problems.append(f"{name}: no restart policy")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port} is published beyond 127.0.0.1")
        if "healthcheck" not in service:
            problems.append(f"{name}: no health check")
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./") and not os.path.exists(os.path.join(ROOT, source)):
                problems.append(f"{name}: mounts {source}, which is not in the repository")
    kafka = services["kafka"]
    log_dirs = kafka["environment"].get("KAFKA_LOG_DIRS")
    if not log_dirs or not any(str(v).endswith(":" + log_dirs) for v in kafka.get("volumes", [])):
        problems.append("kafka: KAFKA_LOG_DIRS is not the mounted volume, so the data would not survive")
    for name in ("ingest", "sink"):
        keys = str(services[name]["environment"].get("API_KEYS", ""))
        if ":?" not in keys:
            problems.append(f"{name}: API_KEYS is not required (use ${{VAR:?message}})")
    pg = " ".join(services["postgres"]["healthcheck"]["test"])
    if "-h 127.0.0.1" not in pg:
        problems.append("postgres: the health check does not go over TCP")
    problems += check_dashboard()
    problems += check_kubernetes(python)
    for problem in problems:
        say(problem)
    if problems:
        sys.exit(1)
    say(f"docker-compose.yml: valid compose-spec, {len(services)} services checked; Kubernetes manifests valid")


if __name__ == "__main__":
    main()
