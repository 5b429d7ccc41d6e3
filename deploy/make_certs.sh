#!/usr/bin/env bash
# Certificates and SuperNode keys for a FedMetaNAS deployment.
#
#   deploy/make_certs.sh OUT_DIR [NUM_SUPERNODES=3]
#
# Writes into OUT_DIR:
#   ca.key, ca.crt                 self-signed certificate authority (give ca.crt to every device
#                                  and to the `flwr` CLI as `root-certificates`; keep ca.key secret)
#   server.key, server.pem         SuperLink TLS key and certificate, signed by the CA, valid for
#                                  localhost, 127.0.0.1, ::1 and every name in $SERVER_SANS
#   supernodes/node_<i>            SuperNode i's ECDSA P-384 private key (OpenSSH format, what
#   supernodes/node_<i>.pub        `flower-supernode --auth-supernode-private-key` reads) and its
#                                  public key (what `flwr supernode register` reads), i = 0..N-1
#
# Environment:
#   SERVER_SANS   extra subjectAltName entries for the SuperLink certificate, comma separated,
#                 e.g. "DNS:superlink.example.org,IP:10.0.0.5" (devices connect to that name/IP)
#   CERT_DAYS     certificate validity in days (default 365)
#
# PRODUCTION NOTE: this is a self-signed CA for a lab or a test. In production use your
# organisation's CA (or a public one) for the SuperLink certificate, keep ca.key offline, set
# SERVER_SANS to the SuperLink's real DNS name, and generate each SuperNode key ON its device
# (`ssh-keygen -t ecdsa -b 384 -N "" -f node_key`) so that private keys never travel: only the
# .pub file is sent to the SuperLink operator for `flwr supernode register`.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
OUT_DIR=$1
NUM_SUPERNODES=${2:-3}
DAYS=${CERT_DAYS:-365}
if ! [[ "$NUM_SUPERNODES" =~ ^[0-9]+$ ]]; then
    echo "make_certs.sh: NUM_SUPERNODES must be a non-negative integer, got '$NUM_SUPERNODES'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is required" >&2; exit 1; }

mkdir -p "$OUT_DIR/supernodes"
cd "$OUT_DIR"
umask 077  # private keys readable by the owner only

SANS="DNS:localhost,IP:127.0.0.1,IP:::1${SERVER_SANS:+,$SERVER_SANS}"

# 1. Certificate authority (EC P-384: fast to generate, accepted by gRPC/OpenSSL)
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout ca.key -out ca.crt -days "$DAYS" -sha384 \
    -subj "/CN=FedMetaNAS test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2. SuperLink server certificate signed by the CA
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SANS
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.pem -days "$DAYS" -sha384 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem

# 3. One ECDSA P-384 key pair per SuperNode (OpenSSH format, as Flower 1.42 expects)
for ((i = 0; i < NUM_SUPERNODES; i++)); do
    key="supernodes/node_$i"
    rm -f "$key" "$key.pub"
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$key"
    else  # same format through the `cryptography` package Flower already depends on
        python - "$key" <<'PY'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path = Path(sys.argv[1])
key = ec.generate_private_key(ec.SECP384R1())
path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
path.chmod(0o600)
Path(f"{path}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH) + b"\n")
PY
    fi
    chmod 644 "$key.pub"
done

echo "wrote CA, SuperLink certificate (SAN $SANS) and $NUM_SUPERNODES SuperNode key pair(s) to $(pwd)"
