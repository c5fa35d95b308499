"""Plug-in parameter counts for the LLaVA-1.5-7B and 13B configs, beside the paper's (built on the meta device).

    python benchmarks/plugin_params.py
"""

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration


CLIP_L_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=336, patch_size=14, projection_dim=768)
MODELS = {  # name: (Llama hidden, layers, heads, intermediate, pruning layers, repair layers, paper M params)
    "LLaVA-1.5-7B": (4096, 32, 32, 11008, [2, 14, 26], [23, 30], (16.56, 20.15)),
    "LLaVA-1.5-13B": (5120, 40, 40, 13824, [2, 16, 28], [24, 36], (19.70, 24.87)),
}


def main():
    print("| model | pruners (ours) | pruners (paper) | adapters (ours) | adapters (paper) | backbone |")
    print("|---|---|---|---|---|---|")
    for name, (hidden, layers, heads, inter, pruning, repair, paper) in MODELS.items():
        text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, vocab_size=32064)
        config = RcpLlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**CLIP_L_336).to_dict(),
                                pruning_layers=pruning, repair_layers=repair)
        with torch.device("meta"):
            model = RcpLlavaForConditionalGeneration(config)
        plugins = model.model.rcp_plugins
        pruners = sum(p.numel() for p in plugins.pruners.parameters())
        adapters = sum(p.numel() for p in plugins.repair_adapters.parameters())
        backbone = sum(p.numel() for p in model.parameters()) - pruners - adapters
        print(f"| {name} | {pruners / 1e6:.2f}M | {paper[0]:.2f}M | {adapters / 1e6:.2f}M | {paper[1]:.2f}M | "
              f"{backbone / 1e9:.2f}B |")


if __name__ == "__main__":
    main()
