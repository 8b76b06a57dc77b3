"""Intermediate teacher layers in the cache (format 2): `dump-teacher --layers` stores transformers' hidden states
of those layers at the rows of `features`, in their encoding; version-1 caches still read; a method that needs
layers a cache lacks gets an error that says what to do."""

import json
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (shared-memory tensor reductions, as DataLoader workers use)
from click.testing import CliRunner

from pipeline.cli import main as pipeline_cli
from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig, EveryLayers, LayerChoiceError, parse_layers, resolve_layers
from pipeline.feature_pass import stored_positions
from pipeline.store.encoding import min_cosine, to_bf16_bits
from pipeline.store.reader import CacheReader
from pipeline.store.verify import verify_cache
from pipeline.store.writer import CacheWriter
from pipeline.vlm.models import load_vlm
from pipeline.vlm.parts import body_forward_with_layers, vlm_parts
from pipeline.vlm.prompting import collate, encode_sample
from schemas import (
    FORMAT_VERSION,
    CacheFormatError,
    CacheManifest,
    CacheMismatchError,
    expected_arrays,
    layer_array_names,
    require_layers,
)
from tests.conftest import write_cache
from tests.synthetic import synthetic_manifest
from tests.test_dump import _load, assert_bf16_close

LAYERS = (1, 2, 3)  # the tiny teachers have 4 decoder layers: 1..3 are intermediate, 4 is the final one


def dump(model_dir, out, **kw):
    cfg = DumpConfig(model=str(model_dir), data=kw.pop("data", "easy-vqa:train"), out=str(out), **kw)
    return dump_teacher(cfg, progress=False)


def direct_hidden_states(vlm, reader, sid):
    """The sample's own inputs (prompt + the cached answer) through the whole model with output_hidden_states=True:
    (hidden_states tuple, stored rows)."""
    meta = reader.sample_meta(sid)
    images = [_load(ref) for ref in meta["images"]]
    encoded = encode_sample(vlm.processor, sid, meta["messages"], images, meta["answer"], set(vlm.end_of_turn))
    inputs = collate([encoded], vlm.pad_id)
    with torch.no_grad():
        states = vlm.model(**inputs, output_hidden_states=True).hidden_states
    return states, stored_positions(encoded.prompt_len, len(encoded.answer_ids)), encoded


# -- the forward ---------------------------------------------------------------------------------------------------
# Qwen3-VL adds its deepstack visual features between blocks, Gemma 3 mixes sliding and global layers: the index
# convention holds there too (checked once on every family of pipeline/vlm/tiny.py FAMILIES: all 11 equal).
@pytest.mark.parametrize("family, tokenizer", [("qwen2-vl-tiny", "qwen2"), ("llava-onevision-tiny", "tiny-bpe"),
                                               ("qwen3-vl-tiny", "tiny-bpe"), ("gemma3-tiny", "tiny-bpe")])
def test_hooked_layers_are_output_hidden_states_of_the_same_index(tiny_vlm, tiny_image, family, tokenizer):
    from tests.tiny_fixtures import tiny_inputs

    vlm = tiny_vlm(family, tokenizer)
    inputs = tiny_inputs(vlm, tiny_image, "What shape is it?", "circle")
    with torch.no_grad():
        states = vlm.model(**inputs, output_hidden_states=True).hidden_states
        final, mid = body_forward_with_layers(vlm.model, LAYERS, **inputs)
    count = len(vlm_parts(vlm.model).layers)
    assert len(states) == count + 1 and list(mid) == list(LAYERS)
    assert torch.equal(final, states[count])  # the final layer (after the norm) is `features`
    for layer in LAYERS:
        assert torch.equal(mid[layer], states[layer]), layer
    assert not any(torch.equal(mid[a], mid[b]) for a in LAYERS for b in LAYERS if a < b)
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        body_forward_with_layers(vlm.model, (count,), **inputs)


# -- the cache against a direct forward ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory, tiny_vlm_dir):
    """A bf16 cache of an fp32 teacher, one sample per forward (no padding: the same shapes as a direct forward)."""
    model_dir = tiny_vlm_dir("qwen2-vl-tiny", "qwen2")
    out = tmp_path_factory.mktemp("layer-cache")
    stats = dump(model_dir, out, limit=6, top_k=8, layers=LAYERS, max_batch_tokens=1, question_features_fraction=0.5)
    assert stats.written == 6
    return model_dir, out


def test_the_layer_features_in_the_cache_equal_a_direct_forwards_hidden_states(layer_cache):
    model_dir, out = layer_cache
    reader = CacheReader(out)
    assert reader.manifest.layers == LAYERS and reader.manifest.teacher.num_hidden_layers == 4
    assert reader.manifest.format_version == FORMAT_VERSION == 2
    assert verify_cache(out).ok
    vlm = load_vlm(model_dir, dtype="float32", device="cpu")
    for sid in reader.sample_ids:
        random, block = reader.get(sid), reader.get_from_block(sid)
        states, rows, encoded = direct_hidden_states(vlm, reader, sid)
        assert random.target_ids.tolist() == encoded.answer_ids
        # fp32 teacher, bf16 storage: the stored bits are the direct forward's values rounded to bf16, exactly
        assert np.array_equal(random.features, to_bf16_bits(states[-1][0, rows]))
        assert set(random.layer_features) == set(LAYERS) and random.layer_feature_scales is None
        for layer in LAYERS:
            expected = to_bf16_bits(states[layer][0, rows])
            assert random.layer_features[layer].dtype == np.uint16
            assert np.array_equal(random.layer_features[layer], expected), (sid, layer)
            assert np.array_equal(block.layer_features[layer], expected), (sid, layer)  # block reads fill them too
            np.testing.assert_array_equal(random.layer_features_float32(layer),
                                          states[layer][0, rows].to(torch.bfloat16).float().numpy())
        assert not np.array_equal(random.layer_features[1], random.layer_features[2])
    with pytest.raises(KeyError, match="no layer 4"):
        random.layer_features_float32(4)


def test_batched_and_lossy_layers_match_the_direct_forward(tmp_path, tiny_vlm_dir):
    """Padded batches (as the final-feature test: within one bf16 step of batching noise), and fp8 with its scales
    (within the manifest's stated cosine bound)."""
    model_dir = tiny_vlm_dir("qwen2-vl-tiny", "qwen2")
    dump(model_dir, tmp_path / "bf16", limit=6, top_k=4, layers=(2,), max_batch_tokens=4000)
    dump(model_dir, tmp_path / "fp8", limit=6, top_k=4, layers=(1, 3), feature_encoding="fp8_e4m3")
    vlm = load_vlm(model_dir, dtype="float32", device="cpu")
    batched, lossy = CacheReader(tmp_path / "bf16"), CacheReader(tmp_path / "fp8")
    assert verify_cache(tmp_path / "fp8").ok and "layer_feature_scales_3" in expected_arrays(lossy.manifest)
    for sid in batched.sample_ids:
        states, rows, _ = direct_hidden_states(vlm, batched, sid)
        assert_bf16_close(batched.get(sid).layer_features_float32(2), states[2][0, rows])
        sample = lossy.get(sid)
        assert set(sample.layer_feature_scales) == {1, 3} and sample.layer_features[1].dtype == np.uint8
        for layer in (1, 3):
            assert min_cosine(states[layer][0, rows], sample.layer_features_float32(layer)) >= lossy.manifest.features.min_cosine


# -- manifest, identity, versions ----------------------------------------------------------------------------------
def test_a_resumed_dump_with_other_layers_is_refused(layer_cache, tmp_path):
    model_dir, _ = layer_cache
    dump(model_dir, tmp_path / "c", limit=2, top_k=4, layers=(1,))
    with pytest.raises(CacheMismatchError) as err:
        dump(model_dir, tmp_path / "c", limit=3, top_k=4, layers=(1, 2))
    assert "layers: cache has [1], this run has [1, 2]" in str(err.value)
    with pytest.raises(CacheMismatchError, match="layers: cache has"):
        dump(model_dir, tmp_path / "c", limit=3, top_k=4)  # nor without them
    again = dump(model_dir, tmp_path / "c", limit=3, top_k=4, layers=(1,))  # the same layers resume
    assert (again.written, again.skipped) == (1, 2)


def test_manifest_layers_round_trip_and_are_checked():
    manifest = synthetic_manifest(layers=(1, 2), encoding="int8")
    assert CacheManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.teacher.num_hidden_layers == 3
    data = manifest.to_dict()
    for bad, message in (([2, 1], "ascending"), ([0], "positive"), ([1, 3], r"1\.\.2 \(3 is the final layer")):
        with pytest.raises(CacheFormatError, match=message):
            CacheManifest.from_dict({**data, "layers": bad}, "m.json")
    with pytest.raises(CacheFormatError, match=r"format_version 1 cannot hold field\(s\) \['layers'"):
        CacheManifest.from_dict({**data, "format_version": 1}, "m.json")
    names = set(expected_arrays(manifest))
    assert {"layer_features_1", "layer_feature_scales_1", "layer_features_2", "layer_feature_scales_2"} <= names
    assert "layer_feature_scales_1" not in expected_arrays(synthetic_manifest(layers=(1,)))  # bf16: no scales


def as_version_1(root):
    """What the version-1 tool wrote (checked once against a cache written by the code before format 2): no
    `layers`, no `teacher.num_hidden_layers`, format_version 1 in the manifest and in every shard index."""
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest.pop("layers") == [] and manifest["teacher"].pop("num_hidden_layers") is None
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}, indent=2) + "\n")
    for index in (root / "shards").glob("*/index.json"):
        index.write_text(json.dumps({**json.loads(index.read_text()), "format_version": 1}, indent=1))


@pytest.fixture
def v1_cache(tmp_path, teacher):
    root = tmp_path / "v1"
    samples = write_cache(root, teacher, [f"s{i:02d}" for i in range(12)])
    as_version_1(root)
    return root, samples


def test_a_version_1_cache_still_reads_and_names_its_missing_layers(v1_cache, teacher):
    root, samples = v1_cache
    reader = CacheReader(root)
    assert reader.manifest.format_version == 1 and reader.manifest.layers == () and reader.layers == ()
    assert verify_cache(root).ok
    for sample in samples:
        for cached in (reader.get(sample.sample_id), reader.get_from_block(sample.sample_id)):
            assert np.array_equal(cached.features, to_bf16_bits(sample.features))
            assert cached.layer_features is None and cached.layer_feature_scales is None
    summary = CliRunner().invoke(pipeline_cli, ["inspect", str(root)]).output
    assert "v1" in summary and "none beyond the final layer (written before format 2)" in summary
    for wanted in (None, (8, 16)):
        with pytest.raises(ValueError) as err:
            require_layers(reader.manifest, wanted, str(root))
        text = str(err.value)
        assert str(root) in text and "none: written before format 2 or without --layers" in text
        assert "pipeline dump-teacher --model synthetic --data synthetic" in text and "--out NEW_CACHE" in text
    assert "--layers 8,16" in text
    # a run that needs no layers resumes the cache in its own version; one with layers is refused
    with CacheWriter(root, synthetic_manifest(), "w1") as writer:
        writer.add(teacher.sample("new", 4, 8))
    assert json.loads((root / "manifest.json").read_text())["format_version"] == 1
    assert {json.loads(p.read_text())["format_version"] for p in (root / "shards").glob("*/index.json")} == {1}
    assert len(CacheReader(root)) == 13 and verify_cache(root).ok
    with pytest.raises(CacheMismatchError, match=r"layers: cache has \[\], this run has \[1, 2\]"):
        CacheWriter(root, synthetic_manifest(layers=(1, 2)), "w2")


def test_require_layers_returns_what_is_asked_and_names_what_is_missing(tmp_path, teacher):
    root = tmp_path / "c"
    write_cache(root, teacher, ["a", "b"], layers=(1, 2))
    manifest = CacheReader(root).manifest
    assert require_layers(manifest, None, "c") == (1, 2)
    assert require_layers(manifest, (2,), "c") == (2,)
    with pytest.raises(ValueError, match=r"c: this method needs teacher layers 2,5, but the cache has layers 1,2\."):
        require_layers(manifest, (2, 5), "c")
    write_cache(tmp_path / "none", teacher, ["a"])
    with pytest.raises(ValueError, match="none: written before format 2 or without --layers"):
        CacheReader(tmp_path / "none").require_layers()


def test_the_writer_wants_exactly_the_manifest_layers(tmp_path, teacher):
    manifest = synthetic_manifest(layers=(1, 2))
    with CacheWriter(tmp_path / "c", manifest, "w0") as writer:
        with pytest.raises(ValueError, match=r"stores layers \[1, 2\]; this sample brings layer features for \[\]"):
            writer.add(teacher.sample("a", 4, 8))
        with pytest.raises(ValueError, match=r"for \[1\]"):
            writer.add(teacher.sample("b", 4, 8, layers=(1,)))
        sample = teacher.sample("c", 4, 8, layers=(1, 2))
        sample.layer_features[2] = sample.layer_features[2][:3]
        with pytest.raises(ValueError, match=r"layer_features_2 has shape \(3, 64\), expected \(4, 64\)"):
            writer.add(sample)


# -- inspect and verify --------------------------------------------------------------------------------------------
def test_inspect_shows_bytes_per_token_per_layer(tmp_path, teacher):
    root = tmp_path / "c"
    samples = write_cache(root, teacher, [f"s{i:02d}" for i in range(10)], layers=(1, 2), encoding="fp8_e4m3")
    result = CliRunner().invoke(pipeline_cli, ["inspect", str(root)])
    assert result.exit_code == 0, result.output
    summary = json.loads(CliRunner().invoke(pipeline_cli, ["inspect", str(root), "--json"]).output)
    tokens = sum(len(s.target_ids) for s in samples)
    for layer in ("1", "2"):
        stored = sum(summary["arrays"][name]["stored_bytes"] for name in layer_array_names(int(layer)))
        assert summary["layers"][layer]["stored_bytes"] == stored
        assert summary["layers"][layer]["stored_bytes_per_token"] == pytest.approx(stored / tokens)
        assert f"layer_features_{layer}" in result.output and f"layer_feature_scales_{layer}" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("layers"))
    each = ", ".join(f"{l}: {summary['layers'][l]['stored_bytes_per_token']:.1f}" for l in ("1", "2"))
    assert line.startswith("layers     2 intermediate of 3 (1,2), stored B/token per layer: " + each), line


def test_verify_catches_a_damaged_layer_array(tmp_path, teacher):
    root = tmp_path / "c"
    write_cache(root, teacher, [f"s{i:02d}" for i in range(10)], layers=(1, 2))
    assert verify_cache(root).ok
    shard = sorted(p for p in (root / "shards").iterdir())[0]
    (chunk,) = [p for p in (shard / "arrays" / "layer_features_2").rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(pipeline_cli, ["verify", str(root), "--no-progress"])
    assert result.exit_code == 1
    problems = verify_cache(root).problems[shard.name]
    assert any("arrays/layer_features_2" in p and "sha256 differs" in p for p in problems), problems
    assert any(p.startswith("array layer_features_2:") for p in problems), problems
    # an index that lost a layer array breaks the contract the manifest sets
    other = sorted(p for p in (root / "shards").iterdir())[1]
    index = json.loads((other / "index.json").read_text())
    del index["arrays"]["layer_features_1"]
    (other / "index.json").write_text(json.dumps(index))
    assert any("arrays.layer_features_1' is missing" in p for p in verify_cache(root).problems[other.name])


def test_a_reader_without_layers_never_reads_the_layer_arrays(tmp_path, teacher):
    """read_layers=False (every method but VLsI): with the layer arrays' chunks made unreadable, the rest still
    reads the same, by sample and by whole shard; a reader that reads them fails."""
    root = tmp_path / "c"
    ids = [f"s{i:02d}" for i in range(10)]
    write_cache(root, teacher, ids, layers=(1, 2))
    full = CacheReader(root)
    before = {sid: full.get(sid) for sid in ids}
    for chunk in [p for p in (root / "shards").rglob("*") if p.is_file() and p.name != "zarr.json"
                  and "layer_features_" in str(p)]:
        chunk.write_bytes(b"not a compressed chunk")
    lean = CacheReader(root, read_layers=False)
    assert lean.layers == (1, 2)  # the manifest's, still
    for sid in ids:
        for sample in (lean.get(sid), lean.get_from_block(sid)):
            assert sample.layer_features is None
            assert np.array_equal(sample.features, before[sid].features)
            assert np.array_equal(sample.target_ids, before[sid].target_ids)
    with pytest.raises(Exception):  # the codec's own error: the chunks really are unreadable
        CacheReader(root).get_from_block(ids[0])
    from student.batches import CacheStudentData

    with pytest.raises(ValueError, match="read_layers=False"):
        CacheStudentData(lean, None, (), 0, layers=True)


# -- the command line ----------------------------------------------------------------------------------------------
def test_layer_options_parse_and_resolve():
    assert parse_layers("8,16,24") == (8, 16, 24) and parse_layers("every:2") == EveryLayers(2)
    assert parse_layers(" 3, 1 ") == (3, 1) and parse_layers("") == () and parse_layers(()) == ()
    assert resolve_layers(EveryLayers(2), 8) == (2, 4, 6) and resolve_layers(EveryLayers(3), 7) == (3, 6)
    assert resolve_layers((3, 1), 4) == (1, 3)
    for text in ("every:0", "every:x", "a,b", "1;2"):
        with pytest.raises(LayerChoiceError, match="--layers takes layer indices"):
            parse_layers(text)
    with pytest.raises(LayerChoiceError, match=r"4 out of range; valid layers for this teacher \(4 decoder layers\) are 1\.\.3"):
        resolve_layers((2, 4), 4)
    with pytest.raises(LayerChoiceError, match="every:5 selects no layer"):
        resolve_layers(EveryLayers(5), 4)
    assert DumpConfig(model="m", data="d", out="o", layers=(3, 1)).layers == (1, 3)
    for bad in ((0,), (2, 2), (-1,)):
        with pytest.raises(ValueError, match="distinct layer indices >= 1"):
            DumpConfig(model="m", data="d", out="o", layers=bad)


def cli_dump(model_dir, out, *extra):
    return CliRunner().invoke(pipeline_cli, ["dump-teacher", "--model", str(model_dir), "--data", "easy-vqa:train",
                                             "--out", str(out), "--top-k", "4", "--limit", "2", "--no-progress", *extra])


def test_cli_layers_every_k_and_bad_values(tmp_path, layer_cache):
    model_dir, _ = layer_cache
    result = cli_dump(model_dir, tmp_path / "every", "--layers", "every:2")
    assert result.exit_code == 0, result.output
    assert CacheReader(tmp_path / "every").manifest.layers == (2,)  # 4 layers: 2 (4 is the final one)
    assert "LIST|every:K" in CliRunner().invoke(pipeline_cli, ["dump-teacher", "--help"]).output
    for value, message in (("4", "valid layers for this teacher (4 decoder layers) are 1..3"),
                           ("every:9", "every:9 selects no layer"),
                           ("x", "--layers takes layer indices (8,16,24) or every:K"),
                           ("0", "distinct layer indices >= 1")):
        result = cli_dump(model_dir, tmp_path / value.replace(":", "-"), "--layers", value)
        assert result.exit_code == 2 and message in result.output, (value, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / value.replace(":", "-")).exists()  # nothing written for a bad choice


# -- the student side ----------------------------------------------------------------------------------------------
def test_student_items_carry_the_layers_and_pickle(layer_cache, pair_student, tmp_path, teacher):
    from student.batches import CacheStudentData, StudentBatch

    _, out = layer_cache
    args = (pair_student.processor, pair_student.end_of_turn, pair_student.pad_id)
    data = CacheStudentData(out, *args, layers=True)
    plain = CacheStudentData(out, *args)
    reader = CacheReader(out)
    items = [data[i] for i in range(len(data))]
    for item in items:
        cached = reader.get(item.sample_id)
        assert sorted(item.teacher_layers) == list(LAYERS)
        for layer, tensor in item.teacher_layers.items():
            assert tensor.dtype == torch.float32 and tensor.shape == item.teacher_features.shape
            assert torch.equal(tensor, torch.from_numpy(cached.layer_features_float32(layer)))
    assert plain[0].teacher_layers is None
    batch = data.collate(items)
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert isinstance(back, StudentBatch)
    for a, b in zip(batch.items, back.items):
        assert sorted(b.teacher_layers) == list(LAYERS)
        assert all(torch.equal(a.teacher_layers[l], b.teacher_layers[l]) for l in LAYERS)
        assert torch.equal(a.teacher_features, b.teacher_features)
    v1 = tmp_path / "v1"
    write_cache(v1, teacher, ["a"])
    as_version_1(v1)
    with pytest.raises(ValueError, match="none: written before format 2 or without --layers"):
        CacheStudentData(v1, *args, layers=True)


def test_bad_layers_fail_before_the_vllm_phase(tmp_path, layer_cache, monkeypatch):
    """vLLM answers every sample before the teacher loads: --layers is checked first, from the config alone."""
    import pipeline.dump

    model_dir, _ = layer_cache
    monkeypatch.setattr(pipeline.dump, "resolve_backend", lambda name: "vllm")
    monkeypatch.setattr(pipeline.dump, "generate_with_vllm", lambda *a, **k: pytest.fail("generation ran"))
    with pytest.raises(LayerChoiceError, match=r"are 1\.\.3"):
        dump(model_dir, tmp_path / "c", limit=2, responses="generate", backend="vllm", layers=(2, 5))
    assert not (tmp_path / "c").exists()
