"""vLLM contract check: what our vLLM backend sends, built with the real vLLM classes; no GPU needed.

    .venv/bin/pipeline build-tiny qwen2-vl-tiny --out /tmp/qwen2-vl-tiny          # with the project's venv
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install "vllm>=0.19.1" "transformers>=5.0"
    /tmp/vllm-venv/bin/python bench/vllm_contract_check.py --model /tmp/qwen2-vl-tiny [--out results.md]

The tests replace vLLM with stand-ins (a GPU and CUDA wheels are needed for the real thing); this script is the
other half: it runs our own code (pipeline.vlm.generation, from this checkout) against the installed package.
It is too heavy for CI (vLLM pulls ~5 GB of CUDA wheels). One line per check; exit 1 when any fails:

  sampling params    VLLMGenerator.params() through vllm.SamplingParams, greedy and sampled, from a copy of the
                     model whose generation_config.json sets a repetition penalty, top-k/p and min-p: every
                     effective value (stop ids included) arrives, none is dropped or renamed
  engine arguments   every key VLLMGenerator passes to vllm.LLM is a parameter of LLM or a field of EngineArgs,
                     and vLLM builds its engine config from them (dtype, max_model_len as sent)
  generate call      vllm.LLM.generate takes (prompts, sampling_params, use_tqdm=...)
  prompt dicts       vllm_request() gives vllm.inputs.TextPrompt keys with the types vLLM reads
  multimodal input   vLLM's InputProcessor (run by LLM.generate on every request) accepts our request with its
                     SamplingParams, expands the image to as many tokens as our --max-length pre-filter counts,
                     and refuses two images over limit_mm_per_prompt and a prompt over max_model_len (either
                     fails a whole generate call: why the dump pre-filters both)
Without a GPU, vLLM's CPU platform class stands in for the missing CUDA platform so that the engine config
builds (`cpu_engine_config`); nothing runs a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RESULTS = []  # (name, ok, detail)


def check(name: str):
    def run(fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            RESULTS.append((name, True, f"{detail} ({time.perf_counter() - t0:.1f} s)"))
        except Exception as err:  # noqa: BLE001 - every failure is reported, the other checks still run
            tb = traceback.format_exc(limit=-3).strip().splitlines()
            RESULTS.append((name, False, f"{type(err).__name__}: {err} | {' / '.join(tb[-4:])}"))
        return fn

    return run


def penalised_copy(model: Path, workdir: Path) -> Path:
    """A copy of the model whose generation_config.json sets every sampling value both backends read."""
    folder = workdir / "model"
    shutil.copytree(model, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update(repetition_penalty=1.3, temperature=0.6, top_p=0.7, top_k=11, min_p=0.05, do_sample=True)
    path.write_text(json.dumps(config))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="A stock HF VLM folder (pipeline build-tiny qwen2-vl-tiny).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the report (markdown) here.")
    args = parser.parse_args()

    platform = use_cpu_platform_without_gpu()
    import vllm
    from PIL import Image

    from pipeline.vlm.generation import GenerationSettings, VLLMGenerator, model_sampling, vllm_request

    workdir = Path(tempfile.mkdtemp(prefix="vllm-contract-"))
    folder = penalised_copy(args.model, workdir)
    greedy_settings = GenerationSettings(max_new_tokens=7, seed=3)
    sampled_settings = GenerationSettings(max_new_tokens=7, temperature=0.8, seed=3)

    class NoEngine:  # vllm.LLM itself needs a GPU; everything around it is real
        def generate(self, *a, **k):
            raise AssertionError("not called")

    def generator(settings, **kw):
        return VLLMGenerator(str(folder), settings, engine=NoEngine(), make_params=vllm.SamplingParams, **kw)

    @check("sampling params")
    def _():
        lines = []
        for settings in (greedy_settings, sampled_settings):
            gen = generator(settings)
            params, want = gen.params(), gen.sampling
            got = {"max_new_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                   "top_k": params.top_k, "min_p": params.min_p, "repetition_penalty": params.repetition_penalty,
                   "seed": params.seed, "stop_token_ids": sorted(params.stop_token_ids)}
            # vLLM spells "top-k off" as -1 in some versions and 0 in others: both mean all tokens
            if want["top_k"] == 0 and got["top_k"] in (-1, 0):
                got["top_k"] = 0
            diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
            assert not diff, f"vLLM holds other values than we sent (ours, vLLM's): {diff}"
            assert want["repetition_penalty"] == 1.3, want  # read from generation_config.json
            lines.append(f"T={settings.temperature}: {want}")
        return "equal to effective_sampling; " + "; ".join(lines)

    engine_args = generator(greedy_settings, max_images=2, dtype="auto", max_model_len=512).engine_args

    @check("engine arguments")
    def _():
        llm_params = set(inspect.signature(vllm.LLM.__init__).parameters)
        fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        unknown = sorted(k for k in engine_args if k not in llm_params | fields)
        assert not unknown, f"vllm.LLM does not take {unknown}"
        kwargs = {k: v for k, v in engine_args.items()}
        config = cpu_engine_config(vllm, kwargs)
        model = config.model_config
        assert (str(model.dtype), model.max_model_len) == ("torch.bfloat16", 512), (model.dtype, model.max_model_len)
        return (f"{sorted(engine_args)} all accepted (LLM params: {sorted(k for k in engine_args if k in llm_params)}, "
                f"EngineArgs fields: the rest); engine config built: dtype {model.dtype}, max_model_len "
                f"{model.max_model_len}, image limit {model.multimodal_config.get_limit_per_prompt('image')}")

    @check("generate call")
    def _():
        signature = inspect.signature(vllm.LLM.generate)
        names = list(signature.parameters)
        assert names[1:3] == ["prompts", "sampling_params"] and "use_tqdm" in names, names
        return f"LLM.generate{signature}"[:200]

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape?<|im_end|>\n<|im_start|>assistant\n"
    two = prompt.replace("<|vision_start|>", "<|vision_start|><|image_pad|><|vision_end|><|vision_start|>", 1)

    @check("prompt dicts")
    def _():
        from vllm.inputs import TextPrompt

        keys = set(TextPrompt.__annotations__)
        for request in (vllm_request(prompt, [image]), vllm_request(two, [image, image]), vllm_request("text only", [])):
            assert set(request) <= keys, (set(request) - keys, keys)
            assert isinstance(request["prompt"], str)
        one, both = vllm_request(prompt, [image])["multi_modal_data"]["image"], vllm_request(two, [image, image])["multi_modal_data"]["image"]
        assert isinstance(one, Image.Image) and isinstance(both, list) and len(both) == 2
        return f"keys within TextPrompt {sorted(keys)}; one image as a PIL image, two as a list"

    @check("multimodal input")
    def _():
        return multimodal_check(vllm, folder, engine_args, prompt, two, image)

    report = format_report(vllm.__version__, args.model, platform)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


def use_cpu_platform_without_gpu() -> str:
    """On a machine without a GPU the CUDA wheel finds no platform (its engine config then fails with "Device
    string must not be empty"), so vLLM's own CPU platform class is installed first, before any vLLM module
    binds `current_platform`: the config and input checks are vLLM's code, only the device differs."""
    import torch
    import vllm.platforms

    if torch.cuda.is_available():
        return "cuda"
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    return "cpu (vLLM's CpuPlatform, no GPU here)"


def cpu_engine_config(vllm, engine_args: dict):
    """vLLM's full engine config (VllmConfig) for `engine_args`, as LLM(**engine_args) builds it."""
    return vllm.EngineArgs(**engine_args).create_engine_config()


def multimodal_check(vllm, folder: Path, engine_args: dict, prompt: str, two: str, image) -> str:
    """vLLM's InputProcessor (what LLM.generate runs on every request before the engine sees it) on our prompt
    dicts and SamplingParams: multimodal processing, the image limit and the prompt-length check."""
    from vllm.v1.engine.input_processor import InputProcessor

    from pipeline.response_log import prompt_length
    from pipeline.vlm.generation import GenerationSettings, VLLMGenerator, vllm_request
    from pipeline.vlm.processors import load_processor

    def processor_for(limit: int):
        config = cpu_engine_config(vllm, {**engine_args, "limit_mm_per_prompt": {"image": limit}})
        return InputProcessor(config)

    gen = VLLMGenerator(str(folder), GenerationSettings(max_new_tokens=7), engine=object(), make_params=vllm.SamplingParams)
    one_limit = processor_for(1)
    request = one_limit.process_inputs("r1", vllm_request(prompt, [image]), gen.params(), supported_tasks=("generate",))
    ours = prompt_length(load_processor(str(folder)), prompt, [image])
    n = len(request.prompt_token_ids)
    assert n == ours, f"vLLM expands the prompt to {n} tokens, our --max-length pre-filter counts {ours}"
    stops = sorted(request.sampling_params.stop_token_ids)
    assert stops == gen.sampling["stop_token_ids"], (stops, gen.sampling["stop_token_ids"])
    both = processor_for(2).process_inputs("r2", vllm_request(two, [image, image]), gen.params(), supported_tasks=("generate",))
    refusals = {}
    for name, bad in (("2 images, limit 1", vllm_request(two, [image, image])),
                      ("prompt over max_model_len", vllm_request(prompt + "word " * engine_args["max_model_len"], [image]))):
        try:
            one_limit.process_inputs(f"bad-{name}", bad, gen.params(), supported_tasks=("generate",))
        except Exception as err:  # noqa: BLE001 - vLLM's error class differs between versions
            refusals[name] = f"{type(err).__name__}: {str(err)[:110]}"
    assert len(refusals) == 2, f"vLLM accepted {set(['2 images, limit 1', 'prompt over max_model_len']) - set(refusals)}"
    return (f"1 image: {n} prompt tokens in vLLM = {ours} counted by our pre-filter (prompt_length); stop ids "
            f"{stops} kept; 2 images within a limit of 2: {len(both.prompt_token_ids)} tokens; refused, each failing "
            f"a whole generate call unless pre-filtered: " + "; ".join(f"{k} ({v})" for k, v in refusals.items()))


def format_report(version: str, model: Path, platform: str) -> str:
    lines = [f"vLLM {version}, platform {platform}, model {model.name} (a copy whose generation_config.json sets "
             "sampling values)", "",
             "| check | result | detail |", "|---|---|---|"]
    for name, ok, detail in RESULTS:
        lines.append(f"| {name} | {'ok' if ok else 'FAIL'} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
