#!/usr/bin/env bash
# Provisions the Vagrant VM (Vagrantfile): a container engine to build the
# image, the fake metadata server's tools, and k3s.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# docker.io builds the image; socat and curl are the fake metadata server and
# the node-side client of the checks.
apt-get install -y -q docker.io socat curl

# Kubernetes 1.34 (the admission policy needs 1.31 or newer); no ingress
# controller, which nothing here uses.
if ! command -v k3s >/dev/null; then
  curl -sfL https://get.k3s.io |
    INSTALL_K3S_CHANNEL=v1.34 INSTALL_K3S_EXEC="--disable=traefik" sh -
fi
until k3s kubectl get nodes 2>/dev/null | grep -q ' Ready'; do sleep 2; done

# imds-guard pins into the host's bpffs; systemd mounts it on Debian, and
# the daemon would say so if it did not.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
