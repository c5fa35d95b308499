"""The training-free baselines side by side: first-token agreement with the full model and prefill time ratio.

    python benchmarks/baselines_benchmark.py                  # mid CPU config: CLIP 2x128, Llama 8x512, 576 tokens
    python benchmarks/baselines_benchmark.py --samples 48 --repeats 9

A benchmark, not a test. The model has random weights, so accuracy means nothing; "agreement" is the share of
samples whose greedy first answer token equals the full (unpruned) model's. Budgets are 1/3, 2/9 and 1/9 of the
576 visual tokens (192 / 128 / 64). The methods:

  vispruner       before the LLM, keep the budget (important ratio 0.5)
  random          before the LLM, a seeded uniform subset of the budget
  fastv           before layer 2 (of 8), keep the budget, ranked by the last token's attention at layer 1
  attention_topk  before layers 1 / 4 / 7 (three points spread over the 8 layers; not the paper's placement,
                  which `RcpLlavaConfig.paper_placement` makes 1 / 3 / 6 here), at the paper's 64-token counts
                  96 / 26 / 8 scaled by budget / 64

"avg tok/layer" is the average number of visual tokens each decoder layer processes. Prefill times are medians
of `--repeats` runs after warm-up, every configuration interleaved in one process on the same weights, so the
ratios are measured side by side; on a shared CPU they are still noisy (+-10-40%).
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration
from rcp_llava.results import command_line, positive_int, prompt_tokens


IMAGE_TOKEN = 999
FRACTIONS = (("1/3", 1 / 3), ("2/9", 2 / 9), ("1/9", 1 / 9))


def mid_config():
    return RcpLlavaConfig(
        text_config=LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                                vocab_size=1000, pad_token_id=0).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=512, image_size=336, patch_size=14).to_dict(),
        image_token_index=IMAGE_TOKEN, image_seq_length=576, pruning_method="none", pruning_layers=[],
        repair_layers=[],
    )


def method_fields(method, budget):
    base = dict(pruning_method=method, pruning_layers=[], pruning_keep_counts=None, pre_llm_keep_count=None,
                fastv_query="last", vispruner_important_ratio=0.5, pruning_seed=0)
    if method in ("vispruner", "random"):
        return {**base, "pre_llm_keep_count": budget}
    if method == "fastv":
        return {**base, "pruning_layers": [2], "pruning_keep_counts": [budget]}
    if method == "attention_topk":
        counts = [min(576, round(c * budget / 64)) for c in (96, 26, 8)]
        return {**base, "pruning_layers": [1, 4, 7], "pruning_keep_counts": counts}
    return base


def configure(model, fields):
    for name, value in fields.items():
        setattr(model.config, name, value)
    model.config.validate_pruning()


def main(argv=None):
    # Counts are whole numbers >= 1 at parsing: 0 failed deep in torch or statistics (--repeats 0 after the whole run).
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=32)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--text_tokens", type=prompt_tokens, default=40)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    print(f"Command: {command_line(__file__, argv)}", flush=True)  # the printed table is the only record of the run
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = RcpLlavaForConditionalGeneration(mid_config()).eval()
    n, t = model.config.num_visual_tokens, args.text_tokens
    runs = [("full", None, method_fields("none", None))]
    for method in ("vispruner", "random", "fastv", "attention_topk"):
        for label, frac in FRACTIONS:
            runs.append((method, label, method_fields(method, round(n * frac))))

    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, args.samples, args.batch_size):
        bsz = min(args.batch_size, args.samples - start)
        ids = torch.cat([torch.ones(bsz, 1, dtype=torch.long), torch.full((bsz, n), IMAGE_TOKEN),
                         torch.randint(3, 900, (bsz, t - 1), generator=g)], dim=1)
        batches.append(dict(input_ids=ids, pixel_values=torch.randn(bsz, 3, 336, 336, generator=g)))

    answers, avg_tokens = {}, {}
    with torch.no_grad():
        for method, label, fields in runs:
            configure(model, fields)
            avg_tokens[(method, label)] = model.config.pruned_average_tokens() if method != "full" else n
            answers[(method, label)] = torch.cat(
                [model(**b, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1) for b in batches])

        timing_inputs = dict(**{k: v[:1] for k, v in batches[0].items()}, use_cache=True, logits_to_keep=1)
        times = {(m, lab): [] for m, lab, _ in runs}
        for repeat in range(args.repeats + 2):  # two warm-up rounds
            for method, label, fields in runs:
                configure(model, fields)
                start = time.perf_counter()
                model(**timing_inputs)
                if repeat >= 2:
                    times[(method, label)].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    full = answers[("full", None)]

    print(f"mid config: CLIP 2x128 (576 visual tokens) + Llama 8x512, {args.samples} samples, {t} text tokens, "
          f"{args.threads} threads; prefill: batch 1, median of {args.repeats}")
    print(f"full prefill: {med[('full', None)] * 1e3:.1f} ms\n")
    print("| method | budget | kept | avg tok/layer | first-token agreement | prefill time / full |")
    print("|---|---|---|---|---|---|")
    for method, label, fields in runs[1:]:
        kept = fields["pre_llm_keep_count"] or fields["pruning_keep_counts"]
        agree = (answers[(method, label)] == full).float().mean().item()
        print(f"| {method} | {label} | {kept} | {avg_tokens[(method, label)]:.0f} | {agree:.0%} | "
              f"{med[(method, label)] / med[('full', None)]:.3f} |")


if __name__ == "__main__":
    main()
