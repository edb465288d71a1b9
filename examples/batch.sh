#!/usr/bin/env bash
# Submit a batch of digit images to Spool with curl, and collect the results with jq.
#
#   SPOOL_URL=http://127.0.0.1:8080 SPOOL_TOKEN=<api token> examples/batch.sh [count] > results.jsonl
#
# Prints one line per image, in submission order: {"custom_id", "status", "label"}.
set -euo pipefail
URL="${SPOOL_URL:-http://127.0.0.1:8080}"
AUTH="Authorization: Bearer $SPOOL_TOKEN"
COUNT="${1:-100}"

# One {"input", "custom_id"} per line: 8x8 images, pixel values 0..16 (synthetic here).
lines="$(jq -nc --argjson n "$COUNT" \
  'range($n) as $i | {custom_id: "img-\($i)", input: {pixels: [range(64) as $p | ($i + $p) % 17]}}')"

# --fail-with-body: on a 4xx the RFC 9457 problem (code, detail, errors) is printed.
batch="$(curl -sS --fail-with-body -X POST "$URL/v1/batches?model=digits-cnn" -H "$AUTH" \
  -H 'Content-Type: application/x-ndjson' -H "Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)" \
  --data-binary "$lines")" || { echo "refused: $batch" >&2; exit 1; }
id="$(jq -r .id <<<"$batch")"

until [ "$(curl -sS --fail-with-body "$URL/v1/batches/$id" -H "$AUTH" | jq -r .completed_at)" != null ]; do
  sleep 0.5
done
curl -sS --fail-with-body "$URL/v1/batches/$id/results" -H "$AUTH" | jq -c '{custom_id, status, label: .output.label}'
curl -sS "$URL/v1/batches/$id" -H "$AUTH" | jq -c .counts >&2
