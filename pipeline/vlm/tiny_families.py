"""Configs and processors of the tiny families that pipeline/vlm/tiny.py adds beyond its first four
(kept apart so each file stays readable). Each builder takes the tokenizer, the text config (already
filled from TEXT_DEFAULTS and the overrides), the vision overrides and the image size, and returns
(config, processor). Sizes follow ../shared/OFFLINE-MODELS.md's table.
"""

from __future__ import annotations


def _qwen_rope(text: dict, interleaved: bool = False) -> None:
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    rest = half - half // 4
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [half // 4, rest // 2, rest - rest // 2]}
    if interleaved:
        rope["mrope_interleaved"] = True
    text.setdefault("rope_parameters", rope)


def _qwen_image_processor(T, patch: int, merge: int, image_size):
    side = merge * patch
    low, high = (image_size // side * side,) * 2 if image_size else (2 * side, 4 * side)
    return T.Qwen2VLImageProcessorPil(min_pixels=low ** 2, max_pixels=high ** 2, patch_size=patch, merge_size=merge,
                                      temporal_patch_size=2)


def qwen2_5_vl(T, tok, text, vision, image_size):
    from pipeline.vlm.processors import video_optional

    text["model_type"] = "qwen2_5_vl_text"
    _qwen_rope(text)
    vis = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
               patch_size=14, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1]) | vision
    ids = tok.convert_tokens_to_ids
    config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                                video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    image_processor = _qwen_image_processor(T, 14, 2, image_size)
    return config, video_optional(T.Qwen2_5_VLProcessor)(image_processor, tok, None, chat_template=tok.chat_template)


def qwen3_vl(T, tok, text, vision, image_size):
    from pipeline.vlm.processors import video_optional

    text.update(model_type="qwen3_vl_text", head_dim=32)
    _qwen_rope(text, interleaved=True)
    vis = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
               patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[0, 1], num_position_embeddings=64) | vision
    ids = tok.convert_tokens_to_ids
    config = T.Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                             video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                             vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    image_processor = _qwen_image_processor(T, 16, 2, image_size)
    return config, video_optional(T.Qwen3VLProcessor)(image_processor, tok, None, chat_template=tok.chat_template)


def gemma3(T, tok, text, vision, image_size):
    size = image_size or 64
    text.update(model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                layer_types=(["sliding_attention", "full_attention"] * text["num_hidden_layers"])[: text["num_hidden_layers"]])
    vis = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=8) | vision
    tokens = (size // vis["patch_size"]) ** 2
    mm_tokens = 16 if tokens >= 16 else tokens  # the projector pools patches down to this many
    ids = tok.convert_tokens_to_ids
    config = T.Gemma3Config(text_config=text, vision_config=vis, mm_tokens_per_image=mm_tokens,
                            boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                            image_token_index=ids("<image_soft_token>"))
    image_processor = T.Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False)
    return config, T.Gemma3Processor(image_processor, tok, image_seq_length=mm_tokens, chat_template=tok.chat_template)


def paligemma(T, tok, text, vision, image_size):
    size = image_size or 64
    text.update(model_type="gemma", head_dim=32)
    vis = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=16, projection_dim=text["hidden_size"]) | vision
    seq = (size // vis["patch_size"]) ** 2
    image_processor = T.SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = seq
    processor = T.PaliGemmaProcessor(image_processor, tok, chat_template=tok.chat_template)
    text["vocab_size"] = -(-len(tok) // 64) * 64  # the processor adds its 1,024 location and 128 segment tokens
    config = T.PaliGemmaConfig(text_config=text, vision_config=vis, image_token_index=tok.convert_tokens_to_ids("<image>"),
                               projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])
    return config, processor


def idefics3(T, tok, text, vision, image_size):
    size = image_size or 64
    text["model_type"] = "llama"
    vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=size,
               patch_size=16) | vision
    seq = (size // vis["patch_size"]) ** 2 // 4  # scale_factor 2
    config = T.Idefics3Config(text_config=text, vision_config=vis, image_token_id=tok.convert_tokens_to_ids("<image>"),
                              scale_factor=2, tie_word_embeddings=False)
    image_processor = T.Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": size},
                                                  max_image_size={"longest_edge": size})
    return config, T.Idefics3Processor(image_processor, tok, image_seq_len=seq, chat_template=tok.chat_template)


def llava_next(T, tok, text, vision, image_size):
    size = image_size or 56
    text["model_type"] = "llama"
    vis = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=14, projection_dim=64) | vision
    grid = [[size, size], [size, 2 * size], [2 * size, size]]
    config = T.LlavaNextConfig(text_config=text, vision_config=vis, image_token_index=tok.convert_tokens_to_ids("<image>"),
                               image_grid_pinpoints=grid, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", tie_word_embeddings=False)
    image_processor = T.LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                   image_grid_pinpoints=grid)
    return config, T.LlavaNextProcessor(image_processor, tok, patch_size=vis["patch_size"],
                                        vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                        num_additional_image_tokens=1)


def vipllava(T, tok, text, vision, image_size):
    size = image_size or 56
    text["model_type"] = "llama"
    vis = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=14, projection_dim=64) | vision
    config = T.VipLlavaConfig(text_config=text, vision_config=vis, image_token_index=tok.convert_tokens_to_ids("<image>"),
                              vision_feature_layers=[-2, -1], tie_word_embeddings=False)
    image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return config, T.LlavaProcessor(image_processor, tok, patch_size=vis["patch_size"], chat_template=tok.chat_template,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1)


BUILDERS = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "gemma3": gemma3, "paligemma": paligemma,
            "idefics3": idefics3, "llava_next": llava_next, "vipllava": vipllava}
