#!/usr/bin/env bash
# `make base-image`: a Python 3.11 base image made from Debian bookworm with debootstrap + docker
# import, for machines that cannot pull BentoML's default base (python:3.11-slim from Docker Hub).
#
#   deploy/base-image.sh [TAG]        # default bnfold/python:3.11-bookworm
#
# minbase + python3 + python3-venv (a venv brings its own pip) + ca-certificates; apt lists, docs
# man pages and translations removed (C.UTF-8 is built into glibc). The machine's extra CA certificates (/usr/local/share/ca-certificates, e.g.
# a proxy's) are added, so pip inside a build on this machine reaches the package index; on a
# normal machine there are none and nothing is added. Debian's EXTERNALLY-MANAGED marker is
# removed (our Dockerfile installs into a venv anyway; BentoML's own template installs system-wide).
set -euo pipefail
tag=${1:-bnfold/python:3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
command -v debootstrap > /dev/null || { echo "base-image: debootstrap missing: apt-get install -y debootstrap" >&2; exit 2; }
root=$(mktemp -d /tmp/bnfold-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror into $root (~1-2 min)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" > "$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; echo "base-image: debootstrap failed (log $root.log)" >&2; exit 1; }
rm -f "$root.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates > /dev/null 2>&1
fi
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/* "$root"/tmp/*
version=$(chroot "$root" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
tar -C "$root" -c . | "$docker" import \
  --change 'ENV LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase bookworm + python3 $version (deploy/base-image.sh)" - "$tag" > /dev/null
echo "base-image: $tag (python $version, $("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
