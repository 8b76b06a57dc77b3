"""No traceback for a user: a generation failure on one sample becomes a reject (dump) or a skip (eval) with
its reason; a failure that no sample can pass stops the run at once with a message that fits the case."""

import shutil

import pytest
import torch
from click.testing import CliRunner

import pipeline.vlm.generation as generation
from pipeline.cli import main as pipeline_cli
from pipeline.store.reader import CacheReader
from pipeline.vlm.generation import Failed, GenerationError, GenerationSettings, HFGenerator
from pipeline.vlm.models import load_vlm
from tests.test_dump_cli import dump_command
from tests.test_generation import easy_vqa_prompts


def flat_images(rows):
    """The layout every batched call used before: one flat image list for all prompts."""
    images = [image for row in rows for image in row]
    return {"images": images} if images else {}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from pipeline.vlm.tiny import build_tiny_vlm

    return build_tiny_vlm("gemma3-tiny", tmp_path_factory.mktemp("gemma3"), tokenizer="tiny-bpe", seed=0,
                          hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=128, bpe_vocab_size=384)


def test_a_batched_layout_that_no_batch_can_pass_stops_at_the_first_batch(gemma3_dir, monkeypatch):
    vlm = load_vlm(gemma3_dir)
    prompts = easy_vqa_prompts(vlm, 6)
    monkeypatch.setattr(generation, "batched_images", flat_images)  # Gemma 3 refuses a flat list for 3 prompts
    calls = []
    original = HFGenerator._batch
    monkeypatch.setattr(HFGenerator, "_batch", lambda self, p: calls.append(len(p)) or original(self, p))
    with pytest.raises(GenerationError) as err:
        HFGenerator(vlm, GenerationSettings(max_new_tokens=3), batch_size=3).generate(prompts)
    text = str(err.value)
    assert "'gemma3'" in text and "batch size 3" in text and "--generate-batch-size 1" in text
    assert "works one prompt at a time" in text and "start_of_image" in text  # what failed, from the processor
    assert calls == [3, 1, 1, 1]  # the first batch, its prompts alone, then the stop: the second batch never ran
    # at batch 1 the same layout works: each prompt's images are all its own
    assert all(isinstance(t, str) for t in HFGenerator(vlm, GenerationSettings(max_new_tokens=3), 1).generate(prompts))


def test_one_prompt_that_fails_is_a_failed_answer_and_the_others_go_on(tiny_vlm, monkeypatch):
    vlm = tiny_vlm("qwen2-vl-tiny", "qwen2")
    prompts = easy_vqa_prompts(vlm, 5)
    bad = prompts[2][0]
    marker = vlm.processor(text=[bad], images=prompts[2][1], return_tensors="pt")["input_ids"][0]
    original = vlm.model.generate

    def generate(**inputs):  # a model that cannot answer one prompt (any row equal to it), whatever the batch
        rows = inputs["input_ids"]
        if any(torch.equal(row[row != vlm.pad_id], marker) for row in rows):
            raise RuntimeError("this prompt breaks the model")
        return original(**inputs)

    monkeypatch.setattr(vlm.model, "generate", generate)
    generator = HFGenerator(vlm, GenerationSettings(max_new_tokens=4), batch_size=5)
    got = generator.generate(prompts)
    assert got[2] == Failed("RuntimeError: this prompt breaks the model")
    expected = HFGenerator(vlm, GenerationSettings(max_new_tokens=4), batch_size=1).generate(
        [p for i, p in enumerate(prompts) if i != 2])
    assert [t for i, t in enumerate(got) if i != 2] == expected


def test_every_prompt_failing_alone_too_stops_with_its_reason(tiny_vlm, monkeypatch):
    vlm = tiny_vlm("qwen2-vl-tiny", "qwen2")

    def generate(**inputs):
        raise RuntimeError("weights are broken")

    monkeypatch.setattr(vlm.model, "generate", generate)
    with pytest.raises(GenerationError, match="every prompt of the first batch.*weights are broken"):
        HFGenerator(vlm, GenerationSettings(max_new_tokens=4), batch_size=2).generate(easy_vqa_prompts(vlm, 4))


def test_dump_with_a_broken_batched_layout_exits_1_with_the_advice_and_no_traceback(gemma3_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "batched_images", flat_images)
    result = CliRunner().invoke(pipeline_cli, dump_command(gemma3_dir, tmp_path / "c", "--limit", "6",
                                                           "--generate-batch-size", "3"))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert "--generate-batch-size 1" in result.output and "batch size 3" in result.output


def test_dump_whose_teacher_writes_only_empty_answers_says_so(tiny_vlm_dir, tmp_path):
    """A teacher whose head is zero gives equal logits everywhere: greedy picks id 0, a special token that
    decodes to nothing, so every generated answer is empty."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mute"
    shutil.copytree(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), folder)
    weights = load_file(folder / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head] = torch.zeros_like(weights[head])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(pipeline_cli, dump_command(folder, tmp_path / "c", "--limit", "3"))
    assert result.exit_code == 1, result.output
    assert "empty generated answer" in result.output
    assert "the teacher's own answers are empty" in result.output
    assert "use --responses generate" not in result.output  # the advice for empty answers in the data
    assert {r["stage"] for r in CacheReader(tmp_path / "c").rejects_table().to_pylist()} == {"answer"}


def test_a_processor_that_cannot_be_built_here_is_a_clear_error(tmp_path):
    """PixtralProcessor (Mistral 3) has no torchvision-free version: the error names it and what it lacks."""
    import json

    from pipeline.vlm.models import ModelLoadError
    from pipeline.vlm.processors import load_processor
    from pipeline.vlm.tiny import make_tokenizer

    make_tokenizer("llava-tiny", "tiny-bpe", 384).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    with pytest.raises(ModelLoadError, match="PixtralProcessor cannot be built here.*Torchvision"):
        load_processor(tmp_path)
