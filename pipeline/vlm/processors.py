"""Processors for any VLM family, with or without torchvision.

Every video processor needs torchvision, so `AutoProcessor.from_pretrained` fails for many families
when it is missing (Qwen2-VL, InternVL, LLaVA-OneVision, Gemma 4, ...). `load_processor` then builds the
family's processor part by part from the folder: the tokenizer(s), the image processor (PIL backend), any
feature extractor (audio: numpy only) from its config, and `None` for every part that cannot be built and
that images do not need (video processors). `save_processor` writes such a processor so that the stock
loaders read it back.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

# Parts a processor may lack when it only serves images and text (their modality name appears in the
# attribute name, as transformers' ProcessorMixin.get_attributes matches them).
NOT_NEEDED_FOR_IMAGES = ("video_processor", "feature_extractor", "audio_processor")


class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded as asked (bad name, missing folder, not cached offline...)."""


def _optional(attribute: str) -> bool:
    return any(kind in attribute for kind in NOT_NEEDED_FOR_IMAGES)


@functools.cache
def parts_optional(cls: type) -> type:
    """`cls` with `None` accepted for the parts images do not need (the stock argument check rejects None)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and _optional(argument_name):
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    attrs = {"check_argument_for_proper_class": check_argument_for_proper_class, "_parts_optional": True}
    return type(cls.__name__, (cls,), {"__module__": __name__, **attrs})


video_optional = parts_optional  # the name the tiny builders use for processors built with video_processor=None


def _torchvision_failure(exc: Exception) -> bool:
    from transformers.utils import is_torchvision_available

    text = str(exc).lower()
    return not is_torchvision_available() or "video" in text or "torchvision" in text


def _processor_class(path: str, hub: dict, trust_remote_code: bool):
    """The processor class a folder declares (processor_config.json, tokenizer_config.json, else config.json)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

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
    return (getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None), cls_name


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None,
                   local_files_only: bool = False):
    """`AutoProcessor.from_pretrained`; when that fails for want of torchvision, the family's processor built
    part by part (`build_parts`), with `None` for the parts images do not need. A processor that cannot be
    built here at all is a ModelLoadError naming it and what it lacks."""
    path, hub = str(path), dict(revision=revision, local_files_only=local_files_only)
    cls, cls_name = _processor_class(path, hub, trust_remote_code)
    try:
        return _load(cls, cls_name, path, hub, trust_remote_code)
    except ImportError as err:  # transformers' stand-in classes for a missing backend raise this, at first use
        raise ModelLoadError(
            f"{path}: its processor {cls_name} cannot be built here: {' '.join(str(err).split())[:300]} (it needs "
            "a package this environment lacks and has no fallback without it: install the package named above, "
            "built for your torch, or use another family)") from None


def _load(cls, cls_name, path: str, hub: dict, trust_remote_code: bool):
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    has_optional = cls is not None and any(_optional(a) for a in cls.get_attributes())
    first_error = None
    if not has_optional or is_torchvision_available():  # otherwise AutoProcessor may fail on a video part
        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
        except Exception as exc:  # noqa: BLE001 - decide below whether building part by part applies
            if not (has_optional and _torchvision_failure(exc)):
                raise
            first_error = exc
    return build_parts(cls, cls_name, path, hub, trust_remote_code, first_error)


def _load_part(attribute: str, path: str, hub: dict, trust_remote_code: bool):
    """One sub-processor from the folder: tokenizers, image processors, feature extractors; None for a part
    images do not need that cannot be built here (a video processor without torchvision)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    if "tokenizer" in attribute:
        sub = {} if attribute == "tokenizer" else {"subfolder": attribute}  # extra tokenizers live in subfolders
        return AutoTokenizer.from_pretrained(path, **hub, **sub, trust_remote_code=trust_remote_code)
    if "image_processor" in attribute:
        return AutoImageProcessor.from_pretrained(path, **hub)
    if "feature_extractor" in attribute or "audio_processor" in attribute:
        try:
            return AutoFeatureExtractor.from_pretrained(path, **hub)
        except (OSError, ValueError, ImportError):
            return None  # a folder without the audio config: the model is used for images and text only
    if "video_processor" in attribute:
        return None
    raise KeyError(attribute)


def build_parts(cls, cls_name, path: str, hub: dict, trust_remote_code: bool = False, first_error=None):
    """The processor `cls` built from its parts in folder `path` (see `_load_part`), with its own settings."""
    if cls is None:
        raise first_error or ModelLoadError(f"{path}: no processor class found ({cls_name!r})")
    parts = {}
    for attribute in cls.get_attributes():
        try:
            parts[attribute] = _load_part(attribute, path, hub, trust_remote_code)
        except KeyError:
            raise first_error or ModelLoadError(
                f"{path}: cannot build {cls_name} without torchvision: its part {attribute!r} is neither a "
                "tokenizer, an image processor, a feature extractor nor a video processor") from None
    processor_dict, _ = cls.get_processor_dict(path, **hub)
    if not processor_dict.get("chat_template") and getattr(parts.get("tokenizer"), "chat_template", None):
        processor_dict["chat_template"] = parts["tokenizer"].chat_template
    accepted = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in processor_dict.items() if k in accepted and k not in parts}
    return parts_optional(cls)(**parts, **settings)


def save_processor(processor, folder: str | os.PathLike) -> None:
    """Save a processor so `load_processor(folder)` round-trips, for stock processors and those built without
    some parts alike: the tokenizer files, the image processor's preprocessor_config.json (what loaders
    before the unified processor config read), the chat template, and processor_config.json with every part
    that exists (a missing part is left out, so a loader with torchvision builds its default)."""
    folder = Path(folder)
    attributes = type(processor).get_attributes()
    missing = [a for a in attributes if getattr(processor, a, None) is None]
    if not missing:
        processor.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for attribute in attributes:
        part = getattr(processor, attribute, None)
        if "tokenizer" in attribute and part is not None:
            part.save_pretrained(folder if attribute == "tokenizer" else folder / attribute)
    if getattr(processor, "image_processor", None) is not None:
        processor.image_processor.save_pretrained(folder)
    _save_chat_template(processor.chat_template, folder)
    config = {k: v for k, v in processor.to_dict().items() if not (k in missing and v is None)}
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_chat_template(template, folder: Path) -> None:
    """chat_template.jinja (and chat_templates/<name>.jinja for named extra templates), as save_pretrained does."""
    if isinstance(template, dict):
        (folder / "chat_templates").mkdir(exist_ok=True)
        for key, text in template.items():
            target = folder / "chat_template.jinja" if key == "default" else folder / "chat_templates" / f"{key}.jinja"
            target.write_text(text, encoding="utf-8")
    elif template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
