"""A virtual environment installed from a hash-pinned requirements file (wheels only, every file's
sha256 checked), made again whenever the requirements change."""

import os
import shutil
import subprocess
import sys


def pinned_venv(path, requirements, what, no_deps=None):
    """The venv at `path` holding exactly `requirements` (and `no_deps`, a second hash-pinned file
    installed without its packages' dependencies); `what` names it in the one line printed while it
    is made. Returns the venv's python."""
    python = os.path.join(path, "bin", "python")
    stamp = os.path.join(path, "requirements.txt")
    wanted = ""
    for file in [requirements, *([no_deps] if no_deps else [])]:
        with open(file) as f:
            wanted += f.read()
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == wanted:
                return python
    print(f"creating {what} (hash-pinned, from PyPI)", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--only-binary=:all:", "--require-hashes",
                    "-r", requirements], check=True)
    if no_deps:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--only-binary=:all:", "--require-hashes",
                        "--no-deps", "-r", no_deps], check=True)
    with open(stamp, "w") as f:
        f.write(wanted)
    return python
