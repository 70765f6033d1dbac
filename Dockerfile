# syntax=docker/dockerfile:1
# The imds-guard daemon image. Built by `cargo xtask image` (docker or
# podman), which adds the labels naming its source, revision, version,
# licences, creation time and SBOM (xtask/src/image.rs).

# Build: Debian bookworm, so the binary links against the glibc the runtime
# image has. It runs on the build machine ($BUILDPLATFORM) and compiles for
# the image's platform ($TARGETARCH: amd64 or arm64, `--platform`), with
# Debian's cross gcc as the linker when the two differ; the runtime stage
# is then the platform's distroless image.
ARG RUST_VERSION=1.95
FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
WORKDIR /src
# The Rust target of the image's platform (xtask/src/image.rs's PLATFORMS),
# its standard library, and the cross linker (.cargo/config.toml names
# aarch64-linux-gnu-gcc; x86_64's is given here, for arm64 build machines).
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-gnu ;; \
      arm64) echo aarch64-unknown-linux-gnu ;; \
      *) echo "imds-guard images are built for amd64 and arm64, not $TARGETARCH" >&2; exit 1 ;; \
    esac > /rust-target \
    && rustup target add "$(cat /rust-target)" \
    && case "$TARGETARCH-$(uname -m)" in \
      arm64-x86_64) apt-get update && apt-get install -y --no-install-recommends \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;; \
      amd64-aarch64) apt-get update && apt-get install -y --no-install-recommends \
        gcc-x86-64-linux-gnu libc6-dev-amd64-cross ;; \
    esac
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc
# The SBOM's tool, before the sources so that a change to them does not
# build it again: xtask/src/sbom.rs's pin (its test holds the two equal).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install --locked --version 0.5.9 cargo-cyclonedx
COPY . .
# The project's own setup of the build toolchain: the nightly pinned in
# enforcer-ebpf/nightly.toml (which aya-build runs; the rust image carries
# none) with its rust-src, checked against the pin, and bpf-linker built
# against that nightly's LLVM. Only that part: a build container can
# neither mount bpffs nor needs the test tools.
RUN cargo --locked xtask setup-toolchain
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target "$(cat /rust-target)" -p enforcer-user --bin imds-guard \
    && install -D -m 0755 "target/$(cat /rust-target)/release/imds-guard" /out/imds-guard
# The SBOM of what was just built: the same sources, Cargo.lock, features
# and target, checked against Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo --locked xtask sbom /out/sbom.cdx.json --target "$(cat /rust-target)"

# Runtime: glibc and libgcc_s (what `ldd imds-guard` lists), no shell, no
# package manager. The default user is root: the DaemonSet runs it
# as uid 0 with every capability dropped but BPF and NET_ADMIN.
FROM gcr.io/distroless/cc-debian12
LABEL org.opencontainers.image.title="imds-guard" \
      org.opencontainers.image.description="Keeps Kubernetes pods away from the cloud instance metadata API (eBPF, cgroup v2)"
COPY --from=build /out/imds-guard /usr/local/bin/imds-guard
COPY --from=build /out/sbom.cdx.json /usr/share/doc/imds-guard/sbom.cdx.json
ENTRYPOINT ["/usr/local/bin/imds-guard"]
