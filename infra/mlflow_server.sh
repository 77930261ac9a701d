#!/usr/bin/env bash
# A local MLflow tracking server for several concurrent writers (SQLite breaks under many; see
# docs/stack.md). Binds to 127.0.0.1 by default: expose it deliberately with MLFLOW_HOST=0.0.0.0 behind
# your cluster's network policy. On a real cluster use a Postgres backend and an object store:
#   MLFLOW_BACKEND=postgresql://user@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow infra/mlflow_server.sh
set -euo pipefail
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND:-sqlite:///$(pwd)/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-$(pwd)/mlruns}"
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers 1
