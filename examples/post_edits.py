"""Post edits from a JSONL file to a running CrispEdit service, wait for them, and report the results.

    python examples/post_edits.py EDITS.jsonl --url http://127.0.0.1:8000 --key $KEY [--model smollm2]

Uses only httpx and the official openai client: each edit's job status, the version it produced, and the
answer of the old and the new version to the edit's prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("edits", help="JSONL: one {prompt, target, ...} per line")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an editor or admin API key")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    with open(args.edits) as f:
        edits = [json.loads(line) for line in f if line.strip()]
    api = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=60)
    before = api.get(f"/v1/registry/{args.model}/versions").json()["aliases"]["latest"]
    jobs = []
    for edit in edits:  # one request per edit: the service coalesces the ones that queue up
        r = api.post("/v1/edits", json={"model": args.model, "edits": [edit]})
        if r.status_code != 202:
            sys.exit(f"edit {edit!r} refused: {r.status_code} {r.json()['detail']}")
        jobs.append(r.json()["id"])
    results = {}
    while len(results) < len(jobs):
        for job_id in jobs:
            if job_id not in results:
                job = api.get(f"/v1/edits/{job_id}").json()
                if job["status"] in ("succeeded", "rejected", "failed", "cancelled"):
                    results[job_id] = job
        time.sleep(1)
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.key)
    for edit, job_id in zip(edits, jobs, strict=True):
        job = results[job_id]
        line = f"{job['status']:>9} {job.get('version') or '-':>4}  {edit['prompt']!r} -> {edit['target']!r}"
        if job["status"] == "succeeded":
            answers = [
                client.completions.create(model=f"{args.model}@{v}", prompt=edit["prompt"], max_tokens=12,
                                          temperature=0).choices[0].text.strip()
                for v in (before, job["version"])
            ]
            line += f"\n           {before}: {answers[0]!r}\n           {job['version']}: {answers[1]!r}"
        else:
            line += f"  ({job.get('error')})"
        print(line)


if __name__ == "__main__":
    main()
