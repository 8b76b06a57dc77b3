"""Every tiny family of pipeline/vlm/tiny.py in both roles.

As teacher: `dump-teacher` (4 easy-VQA samples), `verify`, cached features equal a forward of the whole
conversation through the stock model. As student, against the cache of the next family in MATRIX (another
tokenizer, and a hidden size of 64 against 96 or back): stages 1-3 for one step each, a stock reload of
the stage-3 folder (AutoModelForImageTextToText) with the same logits, and `generate`. Batched greedy
generation (the dump's and `student eval`'s) equals plain batch-1 `generate` for every family, and loading,
encoding, generating and saving print no deprecation warning.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.store.reader import CacheReader
from pipeline.store.verify import verify_cache
from pipeline.vlm.models import load_vlm
from pipeline.vlm.parts import vlm_parts
from pipeline.vlm.processors import load_processor
from student.config import TrainConfig
from student.train import train_stage
from tests.test_dump import _load, assert_bf16_close
from tests.test_generation import easy_vqa_prompts, plain_batch1
from tests.tiny_fixtures import make_tiny_image, tiny_messages

# family, tokenizer: every family of ../shared/OFFLINE-MODELS.md's table that builds here (SmolVLM's processor
# needs num2words, so its row is covered by Idefics3, the same model), three more (PaliGemma, LLaVA-NeXT, VipLLaVA)
# and three architecture kinds beyond them (Mllama, Qwen3.5, Gemma 4)
MATRIX = [("qwen2-vl-tiny", "tiny-bpe"), ("qwen2.5-vl-tiny", "tiny-bpe"), ("qwen3-vl-tiny", "tiny-bpe"),
          ("internvl-tiny", "tiny-bpe"), ("llava-tiny", "mistral"), ("llava-onevision-tiny", "tiny-bpe"),
          ("idefics3-tiny", "tiny-bpe"), ("gemma3-tiny", "tiny-bpe"), ("paligemma-tiny", "tiny-bpe"),
          ("llava-next-tiny", "tiny-bpe"), ("vipllava-tiny", "tiny-bpe"),
          ("mllama-tiny", "tiny-bpe"),  # images through cross-attention layers
          ("qwen3.5-tiny", "tiny-bpe"),  # gated DeltaNet (linear attention) layers beside full attention
          ("gemma4-tiny", "tiny-bpe")]  # a newest release; its processor also holds an audio feature extractor
IDS = [name for name, _ in MATRIX]


def _size(index: int) -> dict:
    """Tiny text configs; neighbours in MATRIX differ in width and BPE vocabulary."""
    return dict(hidden_size=64 if index % 2 == 0 else 96, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=128, bpe_vocab_size=384 if index % 2 == 0 else 512)


@pytest.fixture(scope="module")
def matrix_model(tmp_path_factory):
    """index -> saved folder (built once per module)."""
    from pipeline.vlm.tiny import build_tiny_vlm

    built = {}

    def get(index: int):
        if index not in built:
            name, tokenizer = MATRIX[index]
            folder = tmp_path_factory.mktemp(f"matrix-{name}")
            built[index] = build_tiny_vlm(name, folder, tokenizer=tokenizer, seed=index, **_size(index))
        return built[index]

    return get


@pytest.fixture(scope="module")
def matrix_cache(tmp_path_factory, matrix_model):
    """index -> a 4-sample cache dumped by that family."""
    caches = {}

    def get(index: int):
        if index not in caches:
            out = tmp_path_factory.mktemp(f"cache-{MATRIX[index][0]}")
            cfg = DumpConfig(model=str(matrix_model(index)), data="easy-vqa:train", out=str(out), limit=4, top_k=8,
                             question_features_fraction=0.5)
            stats = dump_teacher(cfg, progress=False)
            assert stats.written == 4 and stats.rejected == 0, stats.reject_reasons
            caches[index] = out
        return caches[index]

    return get


def reference_hidden(vlm, messages, images, answer):
    """(final hidden states of prompt + answer in one stock forward, prompt length). A prefix-LM processor
    (PaliGemma) takes the answer as its `suffix`, the format its model card trains with."""
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_len = vlm.processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    if vlm.family == "paligemma":
        inputs = vlm.processor(text=[prompt], images=images, suffix=[answer], return_tensors="pt")
    else:
        full = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        inputs = vlm.processor(text=[vlm.processor.apply_chat_template(full, tokenize=False)], images=images,
                               return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        return vlm.model(**inputs, output_hidden_states=True).hidden_states[-1][0], prompt_len


@pytest.mark.parametrize("index", range(len(MATRIX)), ids=IDS)
def test_as_teacher(index, matrix_model, matrix_cache):
    cache = matrix_cache(index)
    assert verify_cache(cache).ok
    vlm = load_vlm(matrix_model(index))
    reader = CacheReader(cache)
    assert reader.manifest.teacher.hidden_size == vlm_parts(vlm.model).hidden_size
    for sid in reader.sample_ids[:2]:
        cached, meta = reader.get(sid), reader.sample_meta(sid)
        hidden, prompt_len = reference_hidden(vlm, meta["messages"], [_load(r) for r in meta["images"]], meta["answer"])
        n = len(cached.target_ids)
        assert cached.target_ids[-1] in set(reader.manifest.teacher.end_of_turn_token_ids)
        assert_bf16_close(cached.features_float32(), hidden[prompt_len - 1 : prompt_len + n - 1])


@pytest.mark.parametrize("index", range(len(MATRIX)), ids=IDS)
def test_as_student(index, tmp_path, matrix_model, matrix_cache):
    from transformers import AutoModelForImageTextToText

    teacher = (index + 1) % len(MATRIX)
    student = matrix_model(index)
    for stage in (1, 2, 3):
        cfg = TrainConfig(cache=str(matrix_cache(teacher)), student=str(student), out=str(tmp_path), stage=stage,
                          steps=1, batch_size=2, num_workers=0, lr=1e-3, lr_end=1e-3)
        metrics = train_stage(cfg, progress=False)
        assert len(metrics) == 1 and torch.isfinite(torch.tensor(metrics[0]["total"]))
    folder = tmp_path / "stage3"
    trained = load_vlm(folder)
    stock = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = load_processor(folder)
    text = processor.apply_chat_template(tiny_messages("What color is the shape?"), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[make_tiny_image()], return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, trained.model(**inputs).logits)
        out = stock.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("index", range(len(MATRIX)), ids=IDS)
def test_batched_generation_equals_batch_1(index, matrix_model, tmp_path):
    from pipeline.vlm.evaluate import evaluate
    from pipeline.vlm.generation import GenerationSettings, HFGenerator

    folder = matrix_model(index)
    vlm = load_vlm(folder)
    prompts = easy_vqa_prompts(vlm, 7)
    expected, lengths = plain_batch1(vlm, prompts, max_new_tokens=6)
    assert len(set(lengths)) > 1  # prompts of several lengths share a batch: padding is exercised
    assert HFGenerator(vlm, GenerationSettings(max_new_tokens=6), batch_size=5).generate(prompts) == expected
    answers = []
    for batch_size in (1, 5):  # student eval's batched path over the same questions
        result = evaluate(str(folder), "easy-vqa:test", limit=7, batch_size=batch_size, max_new_tokens=6,
                          out=str(tmp_path / f"eval{batch_size}.json"), progress=False, device="cpu")
        assert result["skipped"] == 0
        answers.append([e["prediction"] for e in result["examples"]])
    assert answers[0] == answers[1] == expected


@pytest.mark.parametrize("index", range(len(MATRIX)), ids=IDS)
def test_processor_round_trip(index, matrix_model, tmp_path):
    """Every part a family's processor declares is built from the folder (feature extractors too) or, for a
    part images do not need that cannot be built here (a video processor without torchvision), left None;
    saved and loaded again it is the same processor and encodes a prompt with an image the same way."""
    import json

    from pipeline.vlm.processors import save_processor

    processor = load_processor(matrix_model(index))
    missing = [a for a in type(processor).get_attributes() if getattr(processor, a) is None]
    assert all("video" in a for a in missing), missing  # tokenizers, image processors, feature extractors exist
    save_processor(processor, tmp_path)
    again = load_processor(tmp_path)
    assert type(again).__name__ == type(processor).__name__
    assert [a for a in type(again).get_attributes() if getattr(again, a) is None] == missing
    assert json.loads(again.to_json_string()) == json.loads(processor.to_json_string())
    assert again.chat_template == processor.chat_template
    text = processor.apply_chat_template(tiny_messages("What shape?"), add_generation_prompt=True, tokenize=False)
    first, second = (p(text=[text], images=[[make_tiny_image()]], return_tensors="pt") for p in (processor, again))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_cross_attention_batch_equals_the_processors_own_and_the_recalibrator_skips_those_layers(matrix_model):
    """Mllama: the collated batch of (prompt, answer) samples equals the processor's own right-padded batch of
    the whole conversations at every real position (the cross-attention mask [B, L, images, tiles] extended
    over the answer, pixel values and aspect ratios as the processor batches them); the Recalibrator copies
    self-attention blocks only."""
    from pipeline.vlm.prompting import collate, encode_sample
    from student.recalibrator import Recalibrator

    vlm = load_vlm(matrix_model(IDS.index("mllama-tiny")))
    talks = [("What shape is it?", "circle"), ("What color is the shape in this image?", "red and blue")]
    images = [make_tiny_image(), make_tiny_image((20, 20, 200))]
    samples = [encode_sample(vlm.processor, f"s{i}", tiny_messages(q), [image], a, set(vlm.end_of_turn))
               for i, ((q, a), image) in enumerate(zip(talks, images))]
    batch = collate(samples, vlm.pad_id)
    assert batch["cross_attention_mask"].dim() == 4 and batch["cross_attention_mask"].shape[1] == max(
        s.total_len for s in samples)
    texts = [vlm.processor.apply_chat_template(tiny_messages(q, a), tokenize=False) for q, a in talks]
    side, vlm.tokenizer.padding_side = vlm.tokenizer.padding_side, "right"
    try:
        reference = vlm.processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")
    finally:
        vlm.tokenizer.padding_side = side
    assert set(reference.keys()) - {"num_tiles"} == set(batch)
    real = reference["attention_mask"].bool()
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    for key in ("input_ids", "cross_attention_mask"):  # padding positions are never attended: not compared
        assert torch.equal(batch[key][real], reference[key][real]), key
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(batch[key], reference[key]), key
    parts = vlm_parts(vlm.model)
    assert "cross_attention" in parts.layer_types
    rec = Recalibrator.from_student(vlm.model, 32, depth=1)
    assert "CrossAttention" not in type(rec.layers[0]).__name__ and rec.layer_types == ["full_attention"]


DEPRECATION_PROBE = """
import sys
from pipeline.vlm.generation import GenerationSettings, HFGenerator
from pipeline.vlm.models import load_vlm
from pipeline.vlm.processors import save_processor
from pipeline.vlm.prompting import encode_sample
from tests.test_generation import easy_vqa_prompts
from tests.tiny_fixtures import make_tiny_image, tiny_messages
for folder, out in zip(sys.argv[1::2], sys.argv[2::2]):
    vlm = load_vlm(folder)
    HFGenerator(vlm, GenerationSettings(max_new_tokens=2), 2).generate(easy_vqa_prompts(vlm, 2))
    encode_sample(vlm.processor, "s", tiny_messages("What shape?"), [make_tiny_image()], "circle", vlm.end_of_turn)
    save_processor(vlm.processor, out)
"""


def test_no_deprecation_warning_from_our_calls(matrix_model, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    args = [arg for index in range(len(MATRIX)) for arg in (str(matrix_model(index)), str(tmp_path / str(index)))]
    done = subprocess.run([sys.executable, "-W", "default", "-c", DEPRECATION_PROBE, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    # transformers 5.23-5.24's PaliGemma processor itself trips numpy's copy-keyword DeprecationWarning on
    # any call (gone in 5.25): not a deprecated call of ours, so it is not counted
    lines = [line for line in output.splitlines() if "deprecat" in line.lower()
             and "__array__ implementation doesn't accept a copy keyword" not in line]
    assert not lines, output[-3000:]


def _lfm2_vl(layer_types):
    """An LFM2-VL model (conv + attention stack; its image processor needs torchvision, so no folder)."""
    import transformers as T

    text = dict(model_type="lfm2", hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=128, vocab_size=128, layer_types=layer_types)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16)
    return T.AutoModelForImageTextToText.from_config(T.Lfm2VlConfig(text_config=text, vision_config=vision,
                                                                    image_token_id=5)).eval()


def test_parts_of_a_conv_stack_and_recalibrator_from_its_attention_layers():
    from student.recalibrator import STUDENT, TEACHER, Recalibrator

    model = _lfm2_vl(["conv", "full_attention", "conv", "full_attention"])
    parts = vlm_parts(model)
    assert parts.norm is model.model.language_model.embedding_norm  # LFM2's final norm has another name
    assert parts.attention_layer_indices == [1, 3]
    assert parts.vision_parameter_names and all(n.startswith("model.vision_tower.") for n in parts.vision_parameter_names)
    assert all("multi_modal_projector" in n for n in parts.projector_parameter_names)
    rec = Recalibrator.from_student(model, 48, depth=2)
    assert [layer is not None and layer.is_attention_layer for layer in rec.layers] == [True, True]
    for ours, theirs in zip(rec.layers, [parts.layers[1], parts.layers[3]]):
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert "2 non-attention blocks skipped" in rec.block_kind
    out = rec([[(torch.randn(5, 64), STUDENT), (torch.randn(3, 48), TEACHER)]])[0]
    assert out.shape == (3, 48) and torch.isfinite(out).all()
    plain = Recalibrator.from_student(_lfm2_vl(["conv", "conv", "full_attention"]), 48, depth=2)
    assert type(plain.layers[0]).__name__ == "LlamaDecoderLayer" and "plain" in plain.block_kind
    assert plain([[(torch.randn(4, 64), STUDENT), (torch.randn(2, 48), TEACHER)]])[0].shape == (2, 48)


def test_sliding_layers_get_the_student_stacks_own_window(matrix_model):
    """Recalibrator blocks copied from Gemma 3 with init copy, fed student features only, equal the
    student's own stack (its masks, its local/global rope) on the same inputs, window 3 < 9 positions."""
    from student.recalibrator import STUDENT, Recalibrator

    model = load_vlm(matrix_model(MATRIX.index(("gemma3-tiny", "tiny-bpe")))).model
    parts = vlm_parts(model)
    parts.text_config.sliding_window = 3
    rec = Recalibrator.from_student(model, 64, depth=2).eval()
    assert rec.layer_types == ["sliding_attention", "full_attention"] and rec.rotary_per_type
    x = torch.randn(1, 9, parts.hidden_size)
    with torch.no_grad():
        expected = parts.decoder(inputs_embeds=x, use_cache=False).last_hidden_state  # after the final norm
        ours = parts.norm(rec._blocks([[(x[0], STUDENT)]])[0])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
