"""`pipeline inspect`: what a cache holds and what it costs, from the small index files only;
`pipeline inspect --rejects`: the samples the dump refused, with their reasons (from rejects.parquet)."""

from __future__ import annotations

import numpy as np

from schemas import HEAD_FILE, SHARDS_DIR, array_specs, layer_array_names
from pipeline.store.backend import open_storage
from pipeline.store.layout import load_index, read_cache_manifest


def cache_summary(cache_dir) -> dict:
    """Counts, sizes and settings as one JSON-ready dict (`cache_dir`: a folder, a URL or an open Storage)."""
    root = open_storage(cache_dir)
    manifest = read_cache_manifest(root)
    indexes = [load_index(root, name, manifest) for name in root.committed_shards()]
    tokens = sum(ix.total_tokens for ix in indexes)
    qtokens = sum(ix.total_question_tokens for ix in indexes)
    rows = {"samples+1": sum(len(ix.sample_ids) + 1 for ix in indexes), "tokens": tokens, "question_tokens": qtokens}
    arrays = {}
    for name, spec in array_specs(manifest).items():
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
    layers = {}
    for layer in manifest.layers:  # each intermediate layer costs its features (+ scales) per stored position
        present = [arrays[n] for n in layer_array_names(layer) if n in arrays]
        stored = sum(a["stored_bytes"] for a in present)
        layers[str(layer)] = {"stored_bytes": stored, "stored_bytes_per_token": stored / tokens if tokens else None}
    return {
        "cache": root.location,
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
        "layers": layers,
        "total_bytes": root.tree_bytes(),
        "shard_bytes": root.tree_bytes(SHARDS_DIR),
        "head_bytes": root.file_size(HEAD_FILE) or 0,
        "temporary_folders": root.uncommitted_shards(),
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
        f"features   {feature_precision(f)}",
        f"top-k      k={k['k']} ({k['logprob_dtype']}), question-feature fraction "
        f"{m['positions']['question_features_fraction']}",
        f"layers     {_layers_line(m, s['layers'])}",
        f"samples    {s['samples']} stored, {s['rejected']} rejected"
        + (" (list them: pipeline inspect CACHE --rejects)" if s["rejected"] else "")
        + f", in {_count(s['shards'], 'shard')} from {_count(s['writers'], 'writer')}",
        f"tokens     {s['tokens']} stored positions"
        + (f" ({s['tokens'] / s['samples']:.1f} per sample)" if s["samples"] else "")
        + f"; {s['question_tokens']} question positions in {s['samples_with_question_features']} samples",
        f"size       {_human(s['total_bytes'])} on disk:",
        f"  shards   {_human(s['shard_bytes'])} (the arrays below, sample tables, indexes)",
        f"  head     {_human(s['head_bytes'])} teacher head ({HEAD_FILE}: vocab {t['vocab_size']} x d {t['hidden_size']})",
        f"  other    {_human(s['total_bytes'] - s['shard_bytes'] - s['head_bytes'])} "
        "(teacher config and tokenizer, images of in-memory data, response logs)",
        "",
        f"{'array':<26}{'dtype':<9}{'raw':>11}{'stored':>11}{'ratio':>7}{'B/token':>10}",
    ]
    for name, a in s["arrays"].items():
        ratio = f"{a['ratio']:.2f}" if a["ratio"] else "-"
        per = f"{a['stored_bytes_per_token']:.1f}" if a["stored_bytes_per_token"] else "-"
        suffix = " (per question token)" if a["per"] == "question token" else ""
        lines.append(
            f"{name:<26}{a['dtype']:<9}{_human(a['raw_bytes']):>11}{_human(a['stored_bytes']):>11}{ratio:>7}{per:>10}{suffix}"
        )
    if s["temporary_folders"]:
        lines.append(f"\n{len(s['temporary_folders'])} temporary folder(s) in shards/ (ignored by readers)")
    return "\n".join(lines)


def _layers_line(m: dict, layers: dict) -> str:
    """The intermediate layers stored, with their bytes per stored position (each and together)."""
    count = m["teacher"].get("num_hidden_layers")
    of = f" of {count}" if count else ""
    if not m.get("layers"):
        why = "written before format 2" if m["format_version"] < 2 else "dumped without --layers"
        return f"none beyond the final layer{of} ({why})"
    per = [(name, a["stored_bytes_per_token"]) for name, a in layers.items()]
    each = ", ".join(f"{name}: {bpt:.1f}" if bpt is not None else f"{name}: -" for name, bpt in per)
    total = sum(b for _, b in per if b is not None)
    return (f"{len(per)} intermediate{of} ({','.join(name for name, _ in per)}), stored B/token per layer: {each}; "
            f"{total:.1f} B/token together")


def feature_precision(f: dict) -> str:
    """What is exact relative to what: the stored bits against what the reader returns, and against the teacher."""
    source = f["source_dtype"]
    if f["encoding"] == "bf16":
        relative = (
            f"bit-exact to the {source} teacher" if f["lossless"]
            else f"relative to the {source} teacher it rounds (cosine >= {f['min_cosine']})"
        )
        return f"bf16: the reader returns the stored bf16 values bit for bit; {relative}"
    return f"{f['encoding']}: lossy relative to the {source} teacher (cosine >= {f['min_cosine']}, checked at dump time)"


def list_rejects(cache_dir) -> list[dict]:
    """Every rejected sample of the committed shards: {"sample_id", "source", "stage", "reason"}, in shard order."""
    from pipeline.store.reader import CacheReader

    return CacheReader(cache_dir).rejects_table().to_pylist()


def format_rejects(rows: list[dict]) -> str:
    """Counts per stage, then one line per rejected sample (id, stage, reason, where it came from)."""
    if not rows:
        return "no rejected samples"
    stages: dict[str, int] = {}
    for row in rows:
        stages[row["stage"]] = stages.get(row["stage"], 0) + 1
    lines = [f"{_count(len(rows), 'rejected sample')}: " + ", ".join(f"{k} {n}" for k, n in sorted(stages.items())), ""]
    width = max(len(row["sample_id"]) for row in rows)
    lines += [f"{row['sample_id']:<{width}}  {row['stage']:<9} {row['reason']}" + (f"  [{row['source']}]" if row["source"] else "")
              for row in rows]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
