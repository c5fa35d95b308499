"""Plug-in parameter counts for the LLaVA-1.5-7B and 13B configs at the default (the authors') widths, beside the
paper's (built on the meta device).

    python benchmarks/plugin_params.py

The paper's counts (16.56M + 20.15M on 7B) also include parameters the authors' code allocates but never uses in
the final method (authors-code-facts.md): each pruner's attention value and output projections (its cross-attention
returns only the probabilities), and each repair adapter's own mask encoder and pruned-token projection (the shared
context encoder replaces them). This project does not allocate parameters without a gradient; `paper_count` adds
them back to show that the widths match exactly.
"""

import argparse

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration, RcpRepairContext


CLIP_L_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=336, patch_size=14, projection_dim=768)
MODELS = {  # name: (Llama hidden, layers, heads, intermediate, paper M params (pruners, adapters))
    "LLaVA-1.5-7B": (4096, 32, 32, 11008, (16.56, 20.15)),
    "LLaVA-1.5-13B": (5120, 40, 40, 13824, (19.70, 24.87)),
}


def unused_in_authors_code(config):
    """(pruner extras, adapter extras): parameters the authors' modules hold but their final method never uses."""
    p, b, d = config.pruner_hidden_size, config.repair_bottleneck_size, config.text_config.hidden_size
    n, pos = config.num_visual_tokens, RcpRepairContext.position_dim
    per_pruner = 2 * (p * p + p)  # value and output projections of the cross-attention
    per_adapter = (n * pos + pos + pos * b + b) + (d * b + b)  # own mask encoder + own pruned-token projection
    return per_pruner * len(config.pruning_layers), per_adapter * len(config.repair_layers)


def counts(name):
    hidden, layers, heads, inter, _ = MODELS[name]
    text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=inter, vocab_size=32064)
    config = RcpLlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**CLIP_L_336).to_dict())
    with torch.device("meta"):
        model = RcpLlavaForConditionalGeneration(config)
    plugins = model.model.rcp_plugins
    pruners = sum(p.numel() for p in plugins.pruners.parameters())
    adapters = sum(p.numel() for p in plugins.repair_adapters.parameters()) + sum(
        p.numel() for p in plugins.repair_context.parameters())
    extra_pruners, extra_adapters = unused_in_authors_code(config)
    return {"pruning_layers": config.pruning_layers, "repair_layers": config.repair_layers, "pruners": pruners,
            "adapters": adapters, "pruners_paper_count": pruners + extra_pruners,
            "adapters_paper_count": adapters + extra_adapters}


def main(argv=None):
    # No options, but a parser all the same: `--help` (or a typo) printed the table instead of the usage.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("| model | placement (0-based) | pruners (ours) | + unused in authors' code | paper | adapters + context "
          "(ours) | + unused in authors' code | paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in MODELS.items():
        c, paper = counts(name), spec[-1]
        print(f"| {name} | {c['pruning_layers']} / {c['repair_layers']} | {c['pruners'] / 1e6:.3f}M | "
              f"{c['pruners_paper_count'] / 1e6:.3f}M | {paper[0]:.2f}M | {c['adapters'] / 1e6:.3f}M | "
              f"{c['adapters_paper_count'] / 1e6:.3f}M | {paper[1]:.2f}M |")


if __name__ == "__main__":
    main()
