#!/usr/bin/env bash
# Builds the bench's S3 server (scripts/s3s/server: the s3s project's S3 protocol over a folder's
# objects held in memory, Rust on hyper and tokio, served with TCP_NODELAY) into the per-user tools
# cache shared by every checkout, and prints the binary's path. `make bench-feed` serves its S3
# photos with it: a server as cheap as the bench's photo server, so the S3 path's figure measures
# Reefline's reads rather than a slow test server (moto, Python; s3s-fs, which hashes every object
# it serves, walks the folder for every listing and leaves Nagle's algorithm on). Built once per user and per version of the server's sources (about 2 minutes on 2
# cores); its lock file pins every crate by sha256, which cargo checks.
#
# usage: build.sh
set -euo pipefail

here=$(cd "$(dirname "$0")/server" && pwd)
TOOLS=${REEFLINE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/reefline}
version=$(cat "$here/Cargo.toml" "$here/Cargo.lock" "$here/src/main.rs" | sha256sum | cut -c1-12)
dest="$TOOLS/s3s-server-$version"

say() { printf 's3s-server: %s\n' "$*" >&2; }

if [ -x "$dest/reefline-s3s-server" ]; then
    echo "$dest/reefline-s3s-server"
    exit 0
fi
say "building the bench's S3 server ($version) into $dest; this happens once per user"
target="$TOOLS/s3s-server-target"
cargo build --quiet --release --locked --manifest-path "$here/Cargo.toml" --target-dir "$target"
rm -rf "$dest.part"
mkdir -p "$dest.part"
cp "$target/release/reefline-s3s-server" "$dest.part/"
rm -rf "$dest" "$target"
mv "$dest.part" "$dest"
echo "$dest/reefline-s3s-server"
