"""A tiny random RCP-LLaVA model, processor and image built in code (no download): for the examples and the tests.

    python -m rcp_llava.demo --demo-folder [DIR]      # save a Hub-loadable demo folder, print its path

    from rcp_llava.demo import build_demo_model, build_demo_processor, demo_image
    model = build_demo_model()                         # 4-layer Llama + 2-layer CLIP, 16 visual tokens
    processor = build_demo_processor(model.config)     # a LlavaProcessor that expands <image> into 16 tokens
"""

import tempfile
from pathlib import Path

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration
from rcp_llava.hub import MODEL_CARD_NAME, build_model_card
from rcp_llava.word_tokenizer import CHAT_TEMPLATE, word_level_tokenizer


DEMO_WORDS = (
    "USER", "ASSISTANT", ":", "?", ".", "what", "is", "in", "the", "image", "a", "an", "of", "colour", "color",
    "shape", "how", "many", "are", "there", "yes", "no", "red", "green", "blue", "circle", "square", "triangle",
    "describe", "picture", "this",
)


def demo_config(**overrides) -> RcpLlavaConfig:
    """A tiny RCP config: Llama 4x128 (vocab 1000) + CLIP 2x32 on 16-px images (16 visual tokens), pruners
    before layers 1 and 2 (keep 8, then 4), one repair adapter after layer 3, small plug-ins (~1% of the
    weights). `overrides` are `RcpLlavaConfig` fields."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vocab = 1000
    text = LlamaConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
        projection_dim=32,
    )
    kwargs = dict(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=vocab - 1, image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2, pruning_layers=[1, 2], repair_layers=[3],
        pruning_keep_counts=[8, 4], visual_token_budget=7.0, num_pruning_queries=4, pruner_hidden_size=8,
        repair_bottleneck_size=4,
    )
    kwargs.update(overrides)
    return RcpLlavaConfig(**kwargs)


def build_demo_tokenizer(vocab_size: int, image_token_index: int, pad_token_id=0, bos_token_id=1, eos_token_id=2):
    """A word-level `PreTrainedTokenizerFast` over exactly `vocab_size` ids, with `<image>` at `image_token_index`
    (a special token, so the expanded `<image><image>...` run splits into placeholders)."""
    fixed = {pad_token_id: "<pad>", bos_token_id: "<s>", eos_token_id: "</s>", image_token_index: "<image>"}
    words = iter(("<unk>", *DEMO_WORDS))
    vocab = {}
    for i in range(vocab_size):
        word = fixed.get(i) or next(words, None) or f"w{i}"
        vocab[word] = i
    return word_level_tokenizer(vocab, CHAT_TEMPLATE, model_max_length=512)


def build_demo_processor(config):
    """A `LlavaProcessor` matching an RCP/LLaVA `config`: `CLIPImageProcessor` sized to the vision tower, the demo
    tokenizer with `<image>` at `config.image_token_index`, and the processor settings (`patch_size`,
    `num_additional_image_tokens`, `vision_feature_select_strategy`) that expand `<image>` into exactly
    `config.image_seq_length` placeholders."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision, text = config.vision_config, config.text_config
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_resize=True,
        do_center_crop=True, do_convert_rgb=True,
    )
    tokenizer = build_demo_tokenizer(
        text.vocab_size, config.image_token_index, pad_token_id=text.pad_token_id or 0,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1,
    )


def demo_image(size=16, seed=0):
    """A small random RGB `PIL.Image`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def build_demo_model(seed=0, randomize_plugins=True, **overrides) -> RcpLlavaForConditionalGeneration:
    """A random tiny RCP model (`demo_config(**overrides)`) in eval mode. With `randomize_plugins` the plug-ins get
    non-trivial values, as after training (a fresh model's plug-ins are an exact no-op)."""
    import torch

    torch.manual_seed(seed)
    model = RcpLlavaForConditionalGeneration(demo_config(**overrides)).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    if randomize_plugins:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.plugin_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def save_demo_folder(folder=None, seed=0, randomize_plugins=True, **overrides):
    """Save a tiny random RCP model + its processor (+ a model card) into `folder` (a new temp folder if None), as
    a Hub-loadable folder. Returns `(folder, model, processor)`."""
    folder = Path(folder or tempfile.mkdtemp(prefix="rcp_llava_demo_"))
    model = build_demo_model(seed=seed, randomize_plugins=randomize_plugins, **overrides)
    processor = build_demo_processor(model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    build_model_card(model.config, repo_id=str(folder), base_model=None, license="apache-2.0").save(folder / MODEL_CARD_NAME)
    return folder, model, processor


__all__ = [
    "DEMO_WORDS", "build_demo_model", "build_demo_processor", "build_demo_tokenizer", "demo_config", "demo_image",
    "save_demo_folder",
]


if __name__ == "__main__":  # python -m rcp_llava.demo --demo-folder [DIR]: save a demo folder, print its path
    import argparse

    parser = argparse.ArgumentParser(description="Save a tiny random RCP model + processor as a Hub-loadable folder.")
    parser.add_argument("--demo-folder", nargs="?", const="", required=True, metavar="DIR",
                        help="target folder (default: a new temp folder)")
    folder = save_demo_folder(parser.parse_args().demo_folder or None)[0]
    print(folder)
