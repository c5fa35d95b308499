"""Quickstart: prune visual tokens inside a (tiny, random) LLaVA and see what it saves.

    python examples/quickstart.py

Builds a small random LLaVA in code (no download) and a word-level processor for it, asks two questions through
the chat template (a left-padded batch), runs `generate` with the stock model and with RCP pruning at three
decoder layers, and prints the kept visual tokens per pruning layer and the KV-cache size of each layer, full vs
pruned. With a real checkpoint the same code reads:

    model = RcpLlavaForConditionalGeneration.from_pretrained(
        "llava-hf/llava-1.5-7b-hf", pruning_layers=[1, 13, 25], pruning_keep_counts=[96, 26, 8])
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
"""

import argparse

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration
from rcp_llava.demo import build_demo_processor


def main(argv=None):
    # No options; a parser still, so that --help (or a typo) prints the usage instead of running the demo.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    image_token = 127
    config = RcpLlavaConfig(
        text_config=LlamaConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                intermediate_size=688, vocab_size=128, pad_token_id=0).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=512, image_size=96, patch_size=8).to_dict(),
        image_token_index=image_token,
        image_seq_length=144,
        # The paper's 64-token keep counts (Table VI: 16.7% / 4.6% / 1.4% of the tokens) at three layers spread over
        # the 8 (an illustration, not the paper's placement: `RcpLlavaConfig.paper_placement(8)` gives 1 / 3 / 6).
        pruning_layers=[1, 4, 7],
        repair_layers=[6],
        pruning_keep_counts=[24, 7, 2],
        pruner_hidden_size=64,
        repair_bottleneck_size=32,
    )
    model = RcpLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    n = config.num_visual_tokens
    # The processor expands each <image> into the 144 visual tokens; the chat template puts the question after
    # the image and ends on "ASSISTANT:" (a prompt must not end on its image: a pruner could drop its last token).
    processor = build_demo_processor(config)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    questions = ["what is in the image", "is there a red circle in the picture"]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in questions]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in questions]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    lengths = inputs["attention_mask"].sum(1).tolist()  # `width` is the padded batch's, the longest prompt's
    print(f"prompt 0: {prompts[0]!r}\n  -> {lengths[0]} tokens after the processor ({n} visual); left-padded batch "
          f"of 2, {lengths} tokens, width {width}")

    def run():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True)
        cache = out.past_key_values
        sizes = [layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers]
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        return out.sequences[:, width:], sizes, lengths

    with torch.no_grad(), model.plugins_disabled():
        full_tokens, full_sizes, full_lengths = run()
    with torch.no_grad():
        pruned_tokens, pruned_sizes, pruned_lengths = run()
    info = model.last_pruning_info

    print(f"visual tokens per image: {n}; pruning layers {config.pruning_layers}, keep counts "
          f"{config.pruning_keep_counts}")
    for p, layer in enumerate(config.pruning_layers):
        kept = info.kept_indices[p][0].tolist()
        print(f"  after layer {layer}: kept {info.kept_counts[:, p].tolist()} tokens per prompt; "
              f"prompt 0 keeps raster indices {kept[:12]}{' ...' if len(kept) > 12 else ''}")
    print("\nKV cache per layer (batch of 2, prompt + 7 cached generated tokens):")
    print(f"{'layer':>5} {'full len':>8} {'pruned len':>10} {'full KiB':>9} {'pruned KiB':>10}")
    for i, (fl, pl, fs, ps) in enumerate(zip(full_lengths, pruned_lengths, full_sizes, pruned_sizes)):
        print(f"{i:>5} {fl:>8} {pl:>10} {fs / 1024:>9.1f} {ps / 1024:>10.1f}")
    print(f"{'total':>5} {'':>8} {'':>10} {sum(full_sizes) / 1024:>9.1f} {sum(pruned_sizes) / 1024:>10.1f}"
          f"   ({sum(pruned_sizes) / sum(full_sizes):.1%} of full)")
    print(f"\ngenerated (full):   {full_tokens.tolist()}\ngenerated (pruned): {pruned_tokens.tolist()}")
    print("(random weights: the tokens mean nothing; `python train_rcp.py` trains and evaluates on a real testbed)")


if __name__ == "__main__":
    main()
