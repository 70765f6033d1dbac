# syntax=docker/dockerfile:1
# The imds-guard daemon image. Built by `cargo xtask image` (docker or
# podman), which passes VERSION and REVISION.

# Build: Debian bookworm, so the binary links against the glibc the runtime
# image has.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The project's own setup of the build toolchain: the nightly pinned in
# enforcer-ebpf/nightly.toml (which aya-build runs; the rust image carries
# none) with its rust-src, checked against the pin, and bpf-linker built
# against that nightly's LLVM. Only that part: a build container can
# neither mount bpffs nor needs the test tools.
RUN cargo --locked xtask setup-toolchain
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p enforcer-user --bin imds-guard \
    && install -D -m 0755 target/release/imds-guard /out/imds-guard

# Runtime: glibc and libgcc_s (what `ldd imds-guard` lists), no shell, no
# package manager. The default user is root: the DaemonSet runs it
# as uid 0 with every capability dropped but BPF and NET_ADMIN.
FROM gcr.io/distroless/cc-debian12
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="imds-guard" \
      org.opencontainers.image.description="Keeps Kubernetes pods away from the cloud instance metadata API (eBPF, cgroup v2)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=build /out/imds-guard /usr/local/bin/imds-guard
ENTRYPOINT ["/usr/local/bin/imds-guard"]
