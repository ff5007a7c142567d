#!/usr/bin/env bash
# Builds the local Kafka-protocol broker: nisshi 0.6.0 from crates.io, with the project's patch to
# its storage crate (nisshi-storage-0.6.0.patch beside this script; docs/operating.md says why) and
# the build profile in profile.toml, into a per-user cache shared by every checkout, and prints the
# binary's path. Built once per storage feature, patch and profile: the folder name carries their
# sha256, so a changed patch or profile builds anew.
#
# usage: build.sh [FEATURE]      FEATURE: libsql (default; sqlite:// storage) or dynostore (memory://)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
FEATURE=${1:-libsql}
VERSION=0.6.0
# The two crates the build starts from, as crates.io serves them (cargo checks them against the
# index as it downloads them; these pins check them again).
NISSHI_SHA256=1d35a61c33c221584d68345dd5abefa58bd39fc1676d9a75d76d77a12ba44343
STORAGE_SHA256=e174edf3c1503efdb7189b166572a3ab601c3e5a1542d5b50bdbccda2e41e776

TOOLS=${REEFLINE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/reefline}
PATCH="$HERE/nisshi-storage-$VERSION.patch"
PROFILE="$HERE/profile.toml"
tag=$(cat "$PATCH" "$PROFILE" | sha256sum | cut -c1-12)
dest="$TOOLS/nisshi-$VERSION-$FEATURE-$tag"

say() { printf 'broker: %s\n' "$*" >&2; }

if [ -x "$dest/nisshi" ]; then
    echo "$dest/nisshi"
    exit 0
fi
case "$FEATURE" in libsql | dynostore) ;; *) say "unknown storage feature $FEATURE"; exit 2 ;; esac

# One build at a time per user (two checkouts' setups may start together); the second finds the
# first's binary.
mkdir -p "$TOOLS"
exec 9>"$TOOLS/build.lock"
flock 9
if [ -x "$dest/nisshi" ]; then
    echo "$dest/nisshi"
    exit 0
fi

say "building nisshi $VERSION ($FEATURE storage, patch and profile $tag) into $TOOLS: about 6 minutes on 2 cores, once per user"
work="$TOOLS/build"
mkdir -p "$work/fetch"

# 1. Download the crates with cargo, then check them and unpack fresh copies.
cat >"$work/fetch/Cargo.toml" <<TOML
[package]
name = "reefline-broker-sources"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[dependencies]
nisshi = { version = "=$VERSION", default-features = false }
nisshi-storage = { version = "=$VERSION", default-features = false }
TOML
: >"$work/fetch/lib.rs"
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"

crate_file() {
    local found
    found=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$1-$VERSION.crate" 2>/dev/null | head -1)
    [ -n "$found" ] || { say "cargo fetched no $1-$VERSION.crate"; exit 1; }
    echo "$found"
}
check() {
    local actual
    actual=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$actual" = "$2" ] || { say "$1: sha256 $actual, expected $2"; exit 1; }
}
nisshi_crate=$(crate_file nisshi)
storage_crate=$(crate_file nisshi-storage)
check "$nisshi_crate" "$NISSHI_SHA256"
check "$storage_crate" "$STORAGE_SHA256"

src="$work/src-$tag"
rm -rf "$src"
mkdir -p "$src"
tar -xzf "$nisshi_crate" -C "$src"
tar -xzf "$storage_crate" -C "$src"

# 2. Patch the storage crate, add the profile, and point nisshi's own lock file at the patched copy
#    (the only entry that changes: every other dependency stays at the version nisshi was released
#    with).
patch --quiet -p1 -d "$src/nisshi-storage-$VERSION" <"$PATCH"
cat "$PROFILE" >>"$src/nisshi-$VERSION/Cargo.toml"
cat >>"$src/nisshi-$VERSION/Cargo.toml" <<TOML

[patch.crates-io]
nisshi-storage = { path = "../nisshi-storage-$VERSION" }
TOML
python3 - "$src/nisshi-$VERSION/Cargo.lock" <<'PY'
import re, sys
path = sys.argv[1]
lock = open(path).read()
entry = re.compile(r'(\[\[package\]\]\nname = "nisshi-storage"\nversion = "[^"]+"\n)source = "[^"]+"\nchecksum = "[^"]+"\n')
lock, n = entry.subn(r"\1", lock)
if n != 1:
    sys.exit("broker: nisshi's Cargo.lock has no single nisshi-storage entry to patch")
open(path, "w").write(lock)
PY

# 3. Build. The target folder is kept, so another feature or a new patch rebuilds only what changed.
cargo build --quiet --profile reefline --locked --manifest-path "$src/nisshi-$VERSION/Cargo.toml" \
    --no-default-features --features "$FEATURE" --target-dir "$work/target"
mkdir -p "$dest"
cp "$work/target/reefline/nisshi" "$dest/nisshi.part"
mv "$dest/nisshi.part" "$dest/nisshi"
rm -rf "$src"
say "built $dest/nisshi"
echo "$dest/nisshi"
