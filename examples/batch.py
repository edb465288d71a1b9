#!/usr/bin/env python3
"""Submit a batch of digit images to Spool and collect the results, with only `requests`.

Usage:
    SPOOL_URL=http://127.0.0.1:8080 SPOOL_TOKEN=<api token> python3 examples/batch.py [count] > results.jsonl

Prints one line per image, in submission order: {"custom_id", "status", "label"}.
Progress and the final counts go to standard error.
"""
import json
import os
import sys
import time
import uuid

import requests

URL = os.environ.get("SPOOL_URL", "http://127.0.0.1:8080").rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ['SPOOL_TOKEN']}"}


def submit(items):
    # The same Idempotency-Key on every try: a retry after a network error cannot
    # create a second batch.
    headers = {**HEADERS, "Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "digits-cnn", "items": items}
    for attempt in range(5):
        try:
            response = requests.post(f"{URL}/v1/batches", json=body, headers=headers, timeout=120)
        except requests.ConnectionError:
            time.sleep(2**attempt)
            continue
        if response.status_code in (200, 202):
            return response.json()
        problem = response.json()  # an RFC 9457 problem with a stable code
        sys.exit(f"refused ({problem['code']}): {problem['detail']} {problem.get('errors', '')}")
    sys.exit(f"cannot reach {URL}")


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    # 8x8 images, pixel values 0..16 (synthetic here; yours come from a scanner).
    items = [
        {"custom_id": f"img-{i}", "input": {"pixels": [(i + p) % 17 for p in range(64)]}}
        for i in range(count)
    ]
    batch = submit(items)
    while batch["completed_at"] is None:
        time.sleep(0.5)
        batch = requests.get(f"{URL}/v1/batches/{batch['id']}", headers=HEADERS, timeout=30).json()
        print(f"{batch['progress']:.0%} done", file=sys.stderr)
    # Results stream as NDJSON in submission order: read them line by line.
    with requests.get(f"{URL}/v1/batches/{batch['id']}/results", headers=HEADERS, stream=True, timeout=120) as results:
        results.raise_for_status()
        for line in results.iter_lines():
            row = json.loads(line)
            label = (row.get("output") or {}).get("label")
            print(json.dumps({"custom_id": row["custom_id"], "status": row["status"], "label": label}))
    print(json.dumps(batch["counts"]), file=sys.stderr)


if __name__ == "__main__":
    main()
