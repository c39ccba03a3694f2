#!/usr/bin/env bash
# Egress benchmark: a guest (the fixture Debian image: curl) downloads a file
# over HTTPS from an origin on the host's 127.0.0.1, (a) through the plain
# NAT network (QEMU user-mode, guest trusts the origin's test CA directly) and
# (b) through the sealed network with TLS interception (fake-IP DNS, nftables
# redirect, cella's proxy terminating and re-originating TLS), in the same
# run. Prints both throughputs, the ratio, and connection set-up latency
# (curl's time to TLS established, median of 5 small requests).
# Usage: bench/egress_bench.sh [BUILD_DIR] [MB]
set -euo pipefail
build=$(cd "${1:-build}" && pwd)
mb=${2:-200}
src=$(cd "$(dirname "$0")/.." && pwd)
cella="$build/cella"
work=$(mktemp -d)
export CELLA_SANDBOX_HOME="$work/sandboxes"
mkdir -p "$CELLA_SANDBOX_HOME"
cleanup() {
  for id in $("$cella" ps -a --json 2>/dev/null | python3 -c 'import json,sys; [print(s["id"]) for s in json.load(sys.stdin)]'); do
    "$cella" rm -f "$id" >/dev/null 2>&1 || true
  done
  [ -n "${origin_pid:-}" ] && kill "$origin_pid" 2>/dev/null || true
  "$src/tests/fixtures/registry.sh" stop "$work/registry" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$src/tests/fixtures/registry.sh" start "$work/registry" >/dev/null
registry=$(sed -n 's/^PLAIN_REGISTRY=//p' "$work/registry/env")
image="$registry/test/debian"
"$src/tests/fixtures/egress_certs.sh" "$work/certs"
# The origin lives while its stdin is open: a fifo this script holds.
mkfifo "$work/origin.stdin"
python3 "$src/tests/fixtures/egress_origin.py" --certs "$work/certs" --ready "$work/origin" \
  < "$work/origin.stdin" > /dev/null 2>&1 &
origin_pid=$!
exec 9> "$work/origin.stdin"
for _ in $(seq 100); do [ -f "$work/origin" ] && break; sleep 0.1; done
. "$work/origin"
bytes=$((mb * 1024 * 1024))

# curl's numbers for one download: bytes/s and seconds to TLS established.
fetch='curl -s -o /dev/null -w "%{speed_download} %{time_appconnect}\n"'
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

nat=$("$cella" run -d --image "$image" --insecure-registry "$registry" -- sleep 100000)
"$cella" cp "$work/certs/ca.crt" "$nat:/tmp/origin-ca.crt"
nat_url="https://api.test:$HTTPS_PORT"
nat_curl="$fetch --cacert /tmp/origin-ca.crt --resolve api.test:$HTTPS_PORT:10.0.2.2"
proxy=$("$cella" run -d --image "$image" --insecure-registry "$registry" --allow-host api.test \
  --network-intercept --resolve "api.test:443:127.0.0.1:$HTTPS_PORT" \
  --upstream-ca "$work/certs/ca.crt" -- sleep 100000)
proxy_url="https://api.test"

for mode in nat proxy; do
  id=${!mode}; url_var=${mode}_url; url=${!url_var}
  # Both sides trust one CA file: curl parsing the guest's full system
  # bundle costs ~0.45 s per connection under TCG by itself, which would
  # hide what the network path costs.
  cmd="$fetch --cacert /etc/ssl/certs/cella-egress-ca.pem"; [ "$mode" = nat ] && cmd=$nat_curl
  : > "$work/$mode.setup"
  for _ in 1 2 3 4 5; do
    "$cella" exec "$id" -- sh -c "$cmd '$url/echo'" | awk '{print $2 * 1000}' >> "$work/$mode.setup"
  done
  "$cella" exec "$id" -- sh -c "$cmd '$url/bytes?n=$bytes'" > "$work/$mode.bulk"
done

nat_speed=$(awk '{printf "%.1f", $1 / 1048576}' "$work/nat.bulk")
proxy_speed=$(awk '{printf "%.1f", $1 / 1048576}' "$work/proxy.bulk")
echo "net: ${mb} MB over HTTPS from the host's loopback into the guest"
echo "  plain NAT (QEMU user-mode):           ${nat_speed} MB/s"
echo "  sealed + TLS interception (proxy):    ${proxy_speed} MB/s"
awk -v a="$proxy_speed" -v b="$nat_speed" 'BEGIN {printf "  ratio interception/NAT: %.2fx (aim >= 0.5x)\n", a / b}'
echo "  connection set-up to TLS established, median of 5:"
echo "    NAT $(median < "$work/nat.setup") ms, interception $(median < "$work/proxy.setup") ms"
