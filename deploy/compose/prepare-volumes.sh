#!/bin/sh
# The one-shot `prepare-volumes` service of deploy/docker-compose.yml, run as root before
# anything else: the images run as uid 10001, which can read neither `make certs`' files
# (a 0700 folder of 0600 keys owned by the host user) nor write to a volume created
# root-owned.
#
#   prepare-volumes.sh CERTS_DIR TLS_DIR ARTIFACT_ROOT UID
#
# Copies what the servers need from CERTS_DIR (never the CA key) into TLS_DIR, owned by
# UID and readable by it alone (0440 in a 0550 folder), and gives ARTIFACT_ROOT to UID.
# Safe to run again: `make certs` then `docker compose up` picks up new certificates.
set -eu

if [ "$#" -ne 4 ]; then
    echo "usage: prepare-volumes.sh CERTS_DIR TLS_DIR ARTIFACT_ROOT UID" >&2
    exit 2
fi
certs=$1 tls=$2 artifacts=$3 uid=$4

for name in ca.crt server.crt server.key policy.toml; do
    if [ ! -f "$certs/$name" ]; then
        echo "prepare-volumes: $certs/$name is missing: run \`make certs\` first" >&2
        exit 1
    fi
done

mkdir -p "$tls"
chmod 0750 "$tls"
for name in ca.crt server.crt server.key policy.toml; do
    cp "$certs/$name" "$tls/.$name.new"
    chown "$uid:$uid" "$tls/.$name.new"
    chmod 0440 "$tls/.$name.new"
    mv -f "$tls/.$name.new" "$tls/$name"
done
rm -f "$tls/ca.key"
chown "$uid:$uid" "$tls"
chmod 0550 "$tls"

mkdir -p "$artifacts"
chown "$uid:$uid" "$artifacts"
chmod 0750 "$artifacts"
echo "prepare-volumes: certificates in $tls and $artifacts owned by uid $uid"
