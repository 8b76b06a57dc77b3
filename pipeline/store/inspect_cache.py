"""`pipeline inspect`: what a cache holds and what it costs, from the small index files only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas import ARRAY_SPECS, read_manifest
from pipeline.store.fsutil import dir_bytes
from pipeline.store.layout import committed_shards, load_index, temporary_shards


def cache_summary(cache_dir: str | Path) -> dict:
    """Counts, sizes and settings as one JSON-ready dict."""
    root = Path(cache_dir)
    manifest = read_manifest(root)
    indexes = [load_index(root, name, manifest) for name in committed_shards(root)]
    tokens = sum(ix.total_tokens for ix in indexes)
    qtokens = sum(ix.total_question_tokens for ix in indexes)
    rows = {"samples+1": sum(len(ix.sample_ids) + 1 for ix in indexes), "tokens": tokens, "question_tokens": qtokens}
    arrays = {}
    for name, spec in ARRAY_SPECS.items():
        records = [ix.arrays[name] for ix in indexes if name in ix.arrays]
        if not records:
            continue
        raw = sum(int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize for r in records)
        stored = sum(r.stored_bytes for r in records)
        per = rows[spec.rows] if spec.rows != "samples+1" else tokens
        arrays[name] = {
            "dtype": records[0].dtype,
            "raw_bytes": raw,
            "stored_bytes": stored,
            "ratio": raw / stored if stored else None,
            "stored_bytes_per_token": stored / per if per else None,
            "per": "question token" if spec.rows == "question_tokens" else "token",
        }
    return {
        "cache": str(root),
        "format": f"{manifest.format} v{manifest.format_version} (written by genrecal {manifest.tool_version})",
        "teacher": manifest.teacher.model,
        "manifest": manifest.to_dict(),
        "shards": len(indexes),
        "writers": len({ix.writer_id for ix in indexes}),
        "samples": sum(len(ix.sample_ids) for ix in indexes),
        "rejected": sum(len(ix.rejected_ids) for ix in indexes),
        "samples_with_question_features": sum(sum(1 for q in ix.num_question_tokens if q) for ix in indexes),
        "tokens": tokens,
        "question_tokens": qtokens,
        "arrays": arrays,
        "total_bytes": dir_bytes(root),
        "temporary_folders": temporary_shards(root),
    }


def format_summary(s: dict) -> str:
    m = s["manifest"]
    t, f, k = m["teacher"], m["features"], m["topk"]
    lines = [
        f"cache      {s['cache']}",
        f"format     {s['format']}",
        f"teacher    {t['model']} ({t['architecture']}, d={t['hidden_size']}, vocab={t['vocab_size']}, "
        f"tokenizer vocab={t['tokenizer_vocab_size']}, {t['dtype']})",
        f"responses  {m['responses']['source']}" + (f" via {m['responses']['backend']}" if m["responses"]["backend"] else ""),
        f"data       {m['data']['source']}",
        f"features   {f['encoding']} ({'lossless' if f['lossless'] else 'lossy'}, min cosine {f['min_cosine']})",
        f"top-k      k={k['k']} ({k['logprob_dtype']}), question-feature fraction "
        f"{m['positions']['question_features_fraction']}",
        f"samples    {s['samples']} stored, {s['rejected']} rejected, in {s['shards']} shards from {s['writers']} writer(s)",
        f"tokens     {s['tokens']} stored positions"
        + (f" ({s['tokens'] / s['samples']:.1f} per sample)" if s["samples"] else "")
        + f"; {s['question_tokens']} question positions in {s['samples_with_question_features']} samples",
        f"size       {_human(s['total_bytes'])} on disk",
        "",
        f"{'array':<24}{'dtype':<9}{'raw':>11}{'stored':>11}{'ratio':>7}{'B/token':>10}",
    ]
    for name, a in s["arrays"].items():
        ratio = f"{a['ratio']:.2f}" if a["ratio"] else "-"
        per = f"{a['stored_bytes_per_token']:.1f}" if a["stored_bytes_per_token"] else "-"
        suffix = " (per question token)" if a["per"] == "question token" else ""
        lines.append(
            f"{name:<24}{a['dtype']:<9}{_human(a['raw_bytes']):>11}{_human(a['stored_bytes']):>11}{ratio:>7}{per:>10}{suffix}"
        )
    if s["temporary_folders"]:
        lines.append(f"\n{len(s['temporary_folders'])} temporary folder(s) in shards/ (ignored by readers)")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
