"""Configs and processors of the tiny families that pipeline/vlm/tiny.py adds beyond its first four
(kept apart so each file stays readable). Each builder takes the tokenizer, the text config (already
filled from TEXT_DEFAULTS and the overrides), the vision overrides and the image size, and returns
(config, processor). Sizes follow ../shared/OFFLINE-MODELS.md's table; Mllama, Qwen3.5 and Gemma 4 (not in
it) say their choices in their docstrings. With tiny-bpe and a 64-wide, 2-layer text config each is under 0.5M
parameters; with TEXT_DEFAULTS about 1.3M.
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


def mllama(T, tok, text, vision, image_size):
    """Llama 3.2 Vision: the image enters through cross-attention layers (text `cross_attention_layers`, by default
    the middle one), attending to the vision tower's tiles; the prompt keeps one <|image|> token per image."""
    size = image_size or 64
    n = text["num_hidden_layers"]
    text["model_type"] = "mllama_text_model"
    text.setdefault("cross_attention_layers", [n // 2])
    vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
               image_size=size, patch_size=16, max_num_tiles=2, intermediate_layers_indices=[0, 1]) | vision
    tiles = vis["max_num_tiles"]  # the (width, height) tilings the image processor may choose, in its order
    vis.setdefault("supported_aspect_ratios", [[w, h] for w in range(1, tiles + 1) for h in range(1, tiles + 1)
                                               if w * h <= tiles])
    vis.setdefault("vision_output_dim", vis["hidden_size"] * (1 + len(vis["intermediate_layers_indices"])))
    config = T.MllamaConfig(text_config=text, vision_config=vis,
                            image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    image_processor = T.MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=tiles)
    return config, T.MllamaProcessor(image_processor, tok, chat_template=tok.chat_template)


def qwen3_5(T, tok, text, vision, image_size):
    """Qwen3.5: gated DeltaNet (linear attention) layers with a full-attention layer every fourth (or last) layer,
    partial rotary (a quarter of head_dim, M-RoPE interleaved), Qwen3-VL's vision tower without deepstack."""
    from pipeline.vlm.processors import video_optional

    n = text["num_hidden_layers"]
    every = min(4, n)
    text.update(model_type="qwen3_5_text", head_dim=32)
    text.setdefault("layer_types", ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)])
    text.update({k: v for k, v in dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=32,
                                       linear_value_head_dim=32, linear_conv_kernel_dim=4).items() if k not in text})
    half = text["head_dim"] // 4 // 2  # rotary dims / 2
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                        "mrope_interleaved": True,
                                        "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]})
    vis = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
               patch_size=16, spatial_merge_size=2, num_position_embeddings=64) | vision
    ids = tok.convert_tokens_to_ids
    config = T.Qwen3_5Config(text_config=text, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                             video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                             vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    image_processor = _qwen_image_processor(T, 16, 2, image_size)
    return config, video_optional(T.Qwen3VLProcessor)(image_processor, tok, None, chat_template=tok.chat_template)


def gemma4(T, tok, text, vision, image_size):
    """Gemma 4 (vision + text; no audio tower): sliding/full layers with a wider head on full layers, proportional
    rope, final logit soft-cap 30, no per-layer inputs; images become ~64 soft tokens (the processor's smallest
    budget, 70) from a padded 630-patch grid."""
    from pipeline.vlm.processors import video_optional

    n = text["num_hidden_layers"]
    text.update(model_type="gemma4_text", head_dim=32, global_head_dim=64, sliding_window=64,
                hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
                layer_types=(["sliding_attention", "full_attention"] * n)[:n])
    text["vocab_size_per_layer_input"] = text["vocab_size"]
    patch = 4 if image_size is None else max(1, image_size // 24)  # a 24 x 24 patch grid for a square image
    vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               head_dim=32, patch_size=patch, pooling_kernel_size=3, position_embedding_size=256) | vision
    ids = tok.convert_tokens_to_ids
    config = T.Gemma4Config(text_config=text, vision_config=vis, audio_config=None, image_token_id=ids("<|image|>"),
                            video_token_id=ids("<|video|>"), boi_token_id=ids("<start_of_image>"),
                            eoi_token_id=ids("<end_of_image>"), audio_token_id=ids("<audio_soft_token>"),
                            boa_token_id=ids("<start_of_audio>"), eoa_token_index=ids("<end_of_audio>"))
    image_processor = T.Gemma4ImageProcessorPil(patch_size=vis["patch_size"], max_soft_tokens=70,
                                                pooling_kernel_size=vis["pooling_kernel_size"])
    extras = list(tok.extra_special_tokens)
    processor = video_optional(T.Gemma4Processor)(T.Gemma4AudioFeatureExtractor(), image_processor, tok, None,
                                                   image_seq_length=70, chat_template=tok.chat_template)
    # the processor adds "<|video|>" as `additional_special_tokens`, which replaces the tokenizer's list of extra
    # special tokens (the turn tokens): list them again (the saved tokenizer keeps them)
    tok.add_special_tokens({"extra_special_tokens": extras + [t for t in tok.extra_special_tokens if t not in extras]})
    return config, processor


BUILDERS = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "gemma3": gemma3, "paligemma": paligemma,
            "idefics3": idefics3, "llava_next": llava_next, "vipllava": vipllava, "mllama": mllama,
            "qwen3_5": qwen3_5, "gemma4": gemma4}
