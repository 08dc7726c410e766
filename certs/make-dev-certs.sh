#!/usr/bin/env bash
# Makes a throw-away CA and a server certificate for localhost/127.0.0.1,
# for trying pgferry's [tls] and [backend_tls] settings by hand.
# Tests and `pgferry sandbox` generate their own certificates at run time;
# no private key is committed to this repository.
set -euo pipefail
out="${1:-$(dirname "$0")/dev}"
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=pgferry dev CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile san.ext -out server.crt 2>/dev/null
chmod 600 ca.key server.key
rm -f server.csr san.ext ca.srl
echo "wrote $(pwd)/{ca.crt,server.crt,server.key}"
echo "use: [tls] cert = \"$(pwd)/server.crt\", key = \"$(pwd)/server.key\""
