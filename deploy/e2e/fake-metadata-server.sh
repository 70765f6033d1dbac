#!/usr/bin/env bash
# A fake instance metadata server for the end-to-end harnesses (cargo xtask
# kind-e2e, vagrant-e2e). It runs INSIDE a kind node container or the Vagrant
# VM, never on a developer's host: it puts 169.254.169.254 on that machine's
# own loopback, so what its pods and processes send there is answered there
# and never leaves for a real metadata service.
#
#   fake-metadata-server.sh serve BODY    answer every HTTP request with BODY
#   fake-metadata-server.sh respond BODY  one connection (socat runs this)
#
# BODY is one word: socat splits its EXEC command line on spaces.
set -euo pipefail

readonly ADDRESS=169.254.169.254

case "${1:-}" in
serve)
  body="${2:?usage: $0 serve BODY}"
  ip address replace "$ADDRESS/32" dev lo
  exec socat "TCP-LISTEN:80,bind=$ADDRESS,reuseaddr,fork" "EXEC:bash $0 respond $body"
  ;;
respond)
  # Read the request head up to its empty line first: closing a socket with
  # unread data resets the connection, which the client could see before
  # the answer.
  while IFS= read -r line && [[ -n "${line%$'\r'}" ]]; do :; done
  printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n%s\n' "${2:?}"
  ;;
*)
  echo "usage: $0 serve BODY" >&2
  exit 2
  ;;
esac
