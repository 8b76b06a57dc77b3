"""Processors for any VLM family, with or without torchvision.

Every video processor needs torchvision, so `AutoProcessor.from_pretrained` fails for many families
when it is missing (Qwen2-VL, InternVL, LLaVA-OneVision, ...). `load_processor` then builds the family's
processor from its image processor (PIL backend), tokenizer and chat template with `video_processor=None`;
`save_processor` writes such a processor's parts so that the stock loaders read them back.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path



class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded as asked (bad name, missing folder, not cached offline...)."""


@functools.cache
def video_optional(cls: type) -> type:
    """`cls` with `video_processor=None` accepted (the stock argument check rejects None)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    attrs = {"check_argument_for_proper_class": check_argument_for_proper_class, "_video_optional": True}
    return type(cls.__name__, (cls,), {"__module__": __name__, **attrs})


def _video_failure(exc: Exception) -> bool:
    from transformers.utils import is_torchvision_available

    text = str(exc).lower()
    return not is_torchvision_available() or "video" in text or "torchvision" in text


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None,
                   local_files_only: bool = False):
    """`AutoProcessor.from_pretrained`; when that fails on the video processor (no torchvision), the family's
    processor with the image processor (PIL backend), the tokenizer, `video_processor=None` and the chat template."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file, is_torchvision_available

    path, hub = str(path), dict(revision=revision, local_files_only=local_files_only)
    cls_name = None
    for filename in ("processor_config.json", "tokenizer_config.json"):  # a processor-only folder has no config
        found = cached_file(path, filename, **hub, _raise_exceptions_for_missing_entries=False)
        if found and not cls_name:
            cls_name = json.loads(Path(found).read_text(encoding="utf-8")).get("processor_class")
    if not cls_name:
        try:
            config = AutoConfig.from_pretrained(path, **hub, trust_remote_code=trust_remote_code)
            cls_name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        except (OSError, ValueError):
            pass
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    has_video = cls is not None and "video_processor" in cls.get_attributes()
    first_error = None
    if not has_video or is_torchvision_available():  # otherwise AutoProcessor is known to fail: skip it
        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
        except Exception as exc:  # noqa: BLE001 - decide below whether the fallback applies
            if not (has_video and _video_failure(exc)):
                raise
            first_error = exc
    processor_dict, _ = cls.get_processor_dict(path, **hub)
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(path, **hub),
        "tokenizer": AutoTokenizer.from_pretrained(path, **hub, trust_remote_code=trust_remote_code),
        "video_processor": None,
    }
    unknown = [a for a in cls.get_attributes() if a not in parts]
    if unknown:
        raise first_error or ModelLoadError(f"{path}: cannot build {cls_name} without torchvision (needs {unknown})")
    if not processor_dict.get("chat_template") and getattr(parts["tokenizer"], "chat_template", None):
        processor_dict["chat_template"] = parts["tokenizer"].chat_template
    args = [parts[a] for a in cls.get_attributes()]
    return video_optional(cls).from_args_and_dict(args, processor_dict)


def save_processor(processor, folder: str | os.PathLike) -> None:
    """Save a processor so `load_processor(folder)` round-trips, for stock and video-less processors alike."""
    folder = Path(folder)
    if not getattr(processor, "_video_optional", False) or getattr(processor, "video_processor", None) is not None:
        processor.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    template = processor.chat_template
    if isinstance(template, dict):
        (folder / "chat_templates").mkdir(exist_ok=True)
        for key, text in template.items():
            target = folder / "chat_template.jinja" if key == "default" else folder / "chat_templates" / f"{key}.jinja"
            target.write_text(text, encoding="utf-8")
    elif template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = processor.to_dict()
    config.pop("video_processor", None)
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
