# syntax=docker/dockerfile:1
# The WhaleFlux worker image: `whaleflux-worker`, which serves a GGUF model over the OpenAI API
# (the operator passes `serve --config ...`). Build from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t whaleflux-worker:0.1.0 .
#   docker build -f docker/worker.Dockerfile --build-arg VARIANT=cuda -t whaleflux-worker:0.1.0-cuda .
#
# VARIANT=cpu (default): runtime distroless `cc` (glibc, libgcc, CA certificates; no shell).
# VARIANT=cuda: runtime NVIDIA's CUDA base image (Ubuntu 24.04; CUDA_IMAGE picks another), with
#   NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES set so the NVIDIA container runtime mounts
#   the GPUs and the driver's libraries (NVML for the GPU metrics). CARGO_FEATURES passes cargo
#   features to the build; the worker has no `cuda` feature yet (it computes on the CPU), so
#   today the variant differs in its runtime base only.
# Both run as the user nonroot, 65532:65532. The exec-form ENTRYPOINT makes the binary PID 1
# itself, with no shell or init in between.
# Without a Docker daemon, scripts/build-images.sh builds the same image with buildah from binaries
# built on the host (--variant cuda for the CUDA one).

ARG RUST_VERSION=1.95
ARG VARIANT=cpu
ARG CPU_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_IMAGE=docker.io/nvidia/cuda:12.6.3-base-ubuntu24.04

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG CARGO_FEATURES=""
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=whaleflux-target-worker,sharing=locked \
    cargo build --release --locked -p whaleflux-worker ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
 && install -D -m 0755 target/release/whaleflux-worker /out/whaleflux-worker

FROM ${CPU_IMAGE} AS runtime-cpu

# glibc 2.39 here, newer than the builder's 2.36 (Debian 12): the binary runs on it.
FROM ${CUDA_IMAGE} AS runtime-cuda
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home --shell /usr/sbin/nologin nonroot
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-${VARIANT}
ARG VARIANT
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="whaleflux-worker" \
      org.opencontainers.image.description="WhaleFlux worker: serves a GGUF model over the OpenAI API (${VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/whaleflux/whaleflux" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="WhaleFlux" \
      io.whaleflux.variant="${VARIANT}"
COPY --from=build /out/whaleflux-worker /usr/local/bin/whaleflux-worker
USER 65532:65532
WORKDIR /home/nonroot
# The OpenAI API, /metrics, /healthz and /readyz (--port).
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/whaleflux-worker"]
CMD ["serve", "--model", "/models/model.gguf"]
