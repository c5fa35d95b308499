"""Tokenizer, chat template, processor and model config of the testbed: all stock Hugging Face classes."""

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..data import prompt_messages  # noqa: F401 -- the project's one prompt builder, re-exported for the testbed
from ..word_tokenizer import CHAT_TEMPLATE, word_level_tokenizer
from .presets import TestbedPreset
from .scenes import COLOURS, COUNT_WORDS, PLURALS, QUADRANTS, SHAPES, SIZES


SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT_WORDS = ("USER", "ASSISTANT", ":", "?", "what", "colour", "is", "the", "shape", "size", "object", "objects",
                "is", "there", "a", "are", "how", "many", "where", "yes", "no")


def vocabulary() -> list:
    """The fixed word list (deterministic order): special tokens first, then every word the generator can emit."""
    words = list(SPECIAL_TOKENS)
    for w in (*PROMPT_WORDS, *COLOURS, *SHAPES, *PLURALS.values(), *SIZES, *QUADRANTS, *COUNT_WORDS):
        if w not in words:
            words.append(w)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The testbed's word-level tokenizer over `vocabulary()`."""
    return word_level_tokenizer({w: i for i, w in enumerate(vocabulary())}, CHAT_TEMPLATE)


def build_processor(preset: TestbedPreset) -> LlavaProcessor:
    """`LlavaProcessor` = `CLIPImageProcessor` sized for the preset + the word-level tokenizer + chat template.

    With `num_additional_image_tokens=1` (the CLS token) and the "default" feature strategy (CLS dropped) the
    processor expands `<image>` into exactly `preset.num_visual_tokens` placeholders.
    """
    s = preset.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_resize=True, do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=preset.patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_model_config(preset: TestbedPreset, tokenizer) -> LlavaConfig:
    """Stock `LlavaConfig`: CLIP vision tower, 2-layer GELU projector, Llama decoder."""
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden_size, intermediate_size=preset.vision_intermediate_size,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=preset.image_size, patch_size=preset.patch_size, projection_dim=preset.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden_size,
        intermediate_size=preset.text_intermediate_size, num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads, num_key_value_heads=preset.text_heads,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=preset.num_visual_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config
