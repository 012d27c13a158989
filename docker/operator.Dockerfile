# syntax=docker/dockerfile:1
# The WhaleFlux operator image: `whaleflux`, whose arguments start with `operator` (the Helm chart
# passes the flags). Build from the repository root:
#
#   docker build -f docker/operator.Dockerfile -t whaleflux-operator:0.1.0 .
#
# Two stages: the Rust toolchain builds the release binary; the runtime is distroless `cc`
# (glibc, libgcc, CA certificates, /etc/passwd with nonroot; no shell, no package manager) as the
# user nonroot, 65532:65532. The exec-form ENTRYPOINT makes the binary PID 1 itself (no shell in
# between); it handles SIGTERM and SIGINT: it stops its controllers and exits 0.
# Without a Docker daemon, scripts/build-images.sh builds the same image with buildah from binaries
# built on the host.

ARG RUST_VERSION=1.95
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=whaleflux-target-operator,sharing=locked \
    cargo build --release --locked -p whaleflux-operator \
 && install -D -m 0755 target/release/whaleflux /out/whaleflux

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="whaleflux-operator" \
      org.opencontainers.image.description="WhaleFlux operator: plans LLM splits over GPU pools and runs the worker groups" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/whaleflux/whaleflux" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="WhaleFlux"
COPY --from=build /out/whaleflux /usr/local/bin/whaleflux
USER 65532:65532
WORKDIR /home/nonroot
# /metrics, /healthz and /readyz (--metrics-addr).
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/whaleflux"]
CMD ["operator"]
