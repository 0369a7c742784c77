#!/usr/bin/env bash
# The main job on the embedded default: start the control plane (SQLite + local launcher), submit the tiny
# example, watch it train to the end, then keep serving the dashboard until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDHOUSE_HOME="${ROUNDHOUSE_HOME:-$PWD/.roundhouse-demo}"
GRPC_PORT="${GRPC_PORT:-50051}"
HTTP_PORT="${HTTP_PORT:-8080}"
export ROUNDHOUSE_SERVER="127.0.0.1:$GRPC_PORT"

roundhouse serve --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" > "$ROUNDHOUSE_HOME.server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
python -m orchestrator.process "$ROUNDHOUSE_SERVER" || { cat "$ROUNDHOUSE_HOME.server.log"; exit 1; }
echo "Control plane up: gRPC $ROUNDHOUSE_SERVER, dashboard http://127.0.0.1:$HTTP_PORT/"
name="tiny-gpt-$(date +%Y%m%d-%H%M%S)"
roundhouse submit examples/tiny-gpt.yaml --name "$name" --wait
echo
echo "Job status page: http://127.0.0.1:$HTTP_PORT/jobs/$name"
echo "Dashboard:       http://127.0.0.1:$HTTP_PORT/"
echo "Log in with the admin token in $ROUNDHOUSE_HOME/admin-token"
echo
echo "To use the CLI against this server, in another shell:"
echo "  cd $PWD && . .venv/bin/activate"
echo "  export ROUNDHOUSE_HOME=$ROUNDHOUSE_HOME ROUNDHOUSE_SERVER=$ROUNDHOUSE_SERVER"
echo "  roundhouse get $name"
echo "  roundhouse logs $name --rank 0"
if [ -n "${DEMO_EXIT:-}" ]; then exit 0; fi
echo "Serving until Ctrl-C."
wait $server

