#!/usr/bin/env bash
# Builds s3s-fs, the s3s project's S3 server over a folder (Rust, on hyper and tokio), from
# crates.io into the per-user tools cache shared by every checkout, and prints the binary's path.
# `make bench-feed` serves its S3 photos with it: a server as quick as the bench's photo server, so
# the S3 path's figure measures Reefline's reads rather than a slow test server (moto, Python).
# Built once per user (about 2 minutes on 2 cores), with the crate's own lock file.
#
# usage: build.sh
set -euo pipefail

VERSION=0.13.0
# The crate as crates.io serves it (cargo checks it against the index; this pin checks it again).
CRATE_SHA256=63879a5ec0d8d541cdac24f5fd852b57b756c34bd9c225e2ceca2b33acdb34b1
TOOLS=${REEFLINE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/reefline}
dest="$TOOLS/s3s-fs-$VERSION"

say() { printf 's3s-fs: %s\n' "$*" >&2; }

if [ -x "$dest/bin/s3s-fs" ]; then
    echo "$dest/bin/s3s-fs"
    exit 0
fi
say "building s3s-fs $VERSION into $dest; this happens once per user"
# The crate is fetched and checked before anything of it is built.
fetch="$TOOLS/s3s-fetch"
mkdir -p "$fetch"
cat >"$fetch/Cargo.toml" <<TOML
[package]
name = "reefline-s3s-sources"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[dependencies]
s3s-fs = { version = "=$VERSION", default-features = false }
TOML
: >"$fetch/lib.rs"
cargo fetch --quiet --manifest-path "$fetch/Cargo.toml"
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"s3s-fs-$VERSION.crate" | head -1)
actual=$(sha256sum "$crate" | cut -d' ' -f1)
[ "$actual" = "$CRATE_SHA256" ] || { say "$crate: sha256 $actual, expected $CRATE_SHA256"; exit 1; }
rm -rf "$dest.part"
cargo install --quiet --locked --version "=$VERSION" --features binary --root "$dest.part" s3s-fs
rm -rf "$dest"
mv "$dest.part" "$dest"
echo "$dest/bin/s3s-fs"
