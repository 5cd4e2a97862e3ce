#!/usr/bin/env bash
# A team MLflow tracking server: runs and the model registry in PostgreSQL, artifacts in one
# shared store that the server proxies (clients need no bucket credentials of their own).
#
#   KD_OPS_MLFLOW_DB       postgresql+psycopg2://mlflow@db.internal:5432/mlflow
#                          (the password from PGPASSWORD or ~/.pgpass, never in the URI: the URI
#                          shows in `ps`)
#   KD_OPS_ARTIFACTS       s3://team-bucket/mlflow, gs://team-bucket/mlflow, or a shared path
#   KD_OPS_MLFLOW_HOST     127.0.0.1 by default: put a TLS proxy with authentication in front
#                          before you bind anything else
#   KD_OPS_MLFLOW_PORT     5000
#   KD_OPS_MLFLOW_WORKERS  4
#   MLFLOW                 the mlflow executable (default: the one on PATH)
#
# The first start creates the schema; after an MLflow upgrade run `mlflow db upgrade "$KD_OPS_MLFLOW_DB"`
# once, with the server stopped. Clients: `--tracking-uri http://HOST:PORT` or MLFLOW_TRACKING_URI.
set -euo pipefail
: "${KD_OPS_MLFLOW_DB:?set KD_OPS_MLFLOW_DB to the PostgreSQL URL, e.g. postgresql+psycopg2://mlflow@db:5432/mlflow}"
: "${KD_OPS_ARTIFACTS:?set KD_OPS_ARTIFACTS to the shared artifact store, e.g. s3://team-bucket/mlflow}"
exec "${MLFLOW:-mlflow}" server \
  --backend-store-uri "$KD_OPS_MLFLOW_DB" \
  --artifacts-destination "$KD_OPS_ARTIFACTS" \
  --serve-artifacts \
  --host "${KD_OPS_MLFLOW_HOST:-127.0.0.1}" \
  --port "${KD_OPS_MLFLOW_PORT:-5000}" \
  --workers "${KD_OPS_MLFLOW_WORKERS:-4}"
