"""Benchmark records printed as llama-bench does: one record type, four formats."""

from __future__ import annotations

import csv
import io
import json

COLUMNS = ["family", "quantization", "ssm_path", "context", "threads", "new_tokens", "repeats",
           "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "ms_per_token",
           "prefill_tokens_per_s", "noisy", "estimated", "bundle"]


def format_rows(rows: list[dict], output: str) -> str:
    """One record type, four formats (as llama-bench prints them)."""
    if output == "json":
        return json.dumps(rows, indent=2)
    if output == "jsonl":
        return "\n".join(json.dumps(r) for r in rows)
    if output == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS + ["git_commit", "cpu"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "git_commit": r["provenance"]["git_commit"], "cpu": r["provenance"]["cpu"]})
        return buf.getvalue().rstrip("\n")
    lines = ["| family | quant | ssm path | context | threads | decode tok/s (median, min–max) | ms/token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " (noisy)" if r["noisy"] else ""
        lines.append(f"| {r['family']} | {r['quantization']} | {r['ssm_path'] or '-'} | {r['context']} | "
                     f"{r['threads']} | {r['decode_tokens_per_s']:.0f} ({r['decode_tokens_per_s_min']:.0f}–"
                     f"{r['decode_tokens_per_s_max']:.0f}){flag} | {r['ms_per_token']:.3f} |")
    if rows:
        p = rows[0]["provenance"]
        lines.append(f"\ncommit {p['git_commit']}, {p['cpu']}, onnxruntime {p['versions']['onnxruntime']}")
    return "\n".join(lines)
