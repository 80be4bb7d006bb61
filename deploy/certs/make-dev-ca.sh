#!/usr/bin/env bash
# Development CA and certificates for the store broker, the shelf agents and the back-office subscribers.
#
# For labs, demos and tests only: the CA key sits in the output folder next to everything it signed.
# In production, use your organisation's PKI; the broker only needs the same file names (see deploy/README.md).
#
# Usage: make-dev-ca.sh [-o OUT_DIR] [-H BROKER_HOSTNAME]... [-c CLIENT_NAME]... [-d DAYS]
#   -o  output folder (default: ./dev-certs). An existing ca.crt/ca.key there is reused, so clients can be
#       added later without re-issuing everything; leaf certificates are always re-issued.
#   -H  extra DNS name or IP address of the broker (repeatable). localhost and 127.0.0.1 are always in the
#       certificate; the default extra name is $BROKER_HOSTNAME or mqtt.store.local.
#   -c  client certificate to issue (repeatable), e.g. one per camera and one per subscriber.
#       Default: "agent" and "shelf-alerts". Names: letters, digits, '.', '_', '-'.
#   -d  validity of the leaf certificates in days (default 825; the CA gets 3650).
# Output: ca.crt ca.key broker.crt broker.key <client>.crt <client>.key (keys mode 600).
set -euo pipefail

out_dir=./dev-certs
days=825
hosts=()
clients=()

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while getopts "o:H:c:d:h" opt; do
  case "$opt" in
    o) out_dir=$OPTARG ;;
    H) hosts+=("$OPTARG") ;;
    c) clients+=("$OPTARG") ;;
    d) days=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 >&2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { echo "make-dev-ca.sh: unexpected argument '$1' (see -h)" >&2; exit 2; }
[ ${#hosts[@]} -gt 0 ] || hosts=("${BROKER_HOSTNAME:-mqtt.store.local}")
[ ${#clients[@]} -gt 0 ] || clients=(agent shelf-alerts)
[[ "$days" =~ ^[0-9]+$ ]] || { echo "make-dev-ca.sh: -d needs a number of days, got '$days'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-dev-ca.sh: openssl is not installed" >&2; exit 1; }

for name in "${clients[@]}"; do
  # The name becomes a file name and a certificate subject: keep it boring.
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "make-dev-ca.sh: bad client name '$name'" >&2; exit 2; }
  [[ "$name" != ca && "$name" != broker ]] || { echo "make-dev-ca.sh: '$name' is reserved" >&2; exit 2; }
done

mkdir -p "$out_dir"   # readable folder (the broker container runs as uid 1883), private keys below
cd "$out_dir"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ECDSA P-256: small, fast to generate, supported by mosquitto, paho and OpenSSL 1.1 on older Jetsons.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ -s ca.key ] && [ -s ca.crt ]; then
  echo "reusing CA $(pwd)/ca.crt"
else
  new_key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/O=ShelfSight dev/CN=ShelfSight dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out ca.crt
  echo "created CA $(pwd)/ca.crt"
fi

# sign NAME CN EXTENSIONS: key + CSR + certificate signed by the CA.
sign() {
  local name=$1 cn=$2 extensions=$3
  new_key "$name.key"
  openssl req -new -key "$name.key" -subj "/O=ShelfSight dev/CN=$cn" -out "$work/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyAgreement" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" "$extensions" > "$work/$name.ext"
  openssl x509 -req -in "$work/$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial "$work/ca.srl" \
    -sha256 -days "$days" -extfile "$work/$name.ext" -out "$name.crt" 2>/dev/null
  chmod 644 "$name.crt"
  echo "issued $(pwd)/$name.crt ($cn)"
}

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "${hosts[@]}"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done
sign broker "${hosts[0]}" "extendedKeyUsage=serverAuth
subjectAltName=$san"

for name in "${clients[@]}"; do
  sign "$name" "$name" "extendedKeyUsage=clientAuth"
done
chmod 644 ca.crt
