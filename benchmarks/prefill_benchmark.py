"""Prefill time and KV cache, full vs RCP-pruned, beside the analytic FLOPs ratio (a benchmark, not a test).

    python benchmarks/prefill_benchmark.py                 # mid CPU config: CLIP 2x128, Llama 8x512, 576 tokens
    python benchmarks/prefill_benchmark.py --repeats 20 --batch_size 4

The paper's 64-token schedule (Table VI: 96 / 26 / 8 tokens kept after layers 2 / 14 / 26 of 32, counted from 1:
0-based pruners before layers 1 / 13 / 25) is placed by the project's one rule, `paper_placement` (8 layers:
1 / 3 / 6). Before, this script read 2 / 14 / 26 as 0-based and scaled them on its own (8 layers: 1 / 4 / 7).
Every timing is the median of `--repeats` runs after warm-up, full and pruned interleaved in one process so that
the ratio is measured side by side.
"pruner overhead" is the time spent choosing the tokens (attention prior + pruner + top-k), measured
inside the pruned runs.
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from configuration_rcp_llava import RcpLlavaConfig, paper_placement
from modeling_rcp_llava import RcpLlavaForConditionalGeneration
from rcp_llava.flops import kv_cache_bytes, llava_flops, schedule_tokens_per_layer
from rcp_llava.results import command_line, positive_int, prompt_tokens


def scaled_layers(num_layers):
    """The paper's 64-of-576 pruning layers for a decoder of `num_layers` layers (0-based): `paper_placement`'s,
    the rule every model's default placement follows (32 -> 1 / 13 / 25, 8 -> 1 / 3 / 6). The paper prints them
    counted from 1 (2 / 14 / 26), which this script had read as 0-based (32 -> 2 / 14 / 26)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 4:
        # the schedule keeps 96 / 26 / 8 at three points after layer 0; paper_placement gives fewer below 4 layers
        raise ValueError(f"--text_layers {num_layers!r}: the 64-token schedule prunes before three decoder layers "
                         "after layer 0; give --text_layers >= 4.")
    return paper_placement(num_layers, 64 / 576)[0]


def mid_config(pruning_layers, keep_counts, num_layers=8):
    return RcpLlavaConfig(
        text_config=LlamaConfig(hidden_size=512, num_hidden_layers=num_layers, num_attention_heads=8,
                                intermediate_size=1376,
                                vocab_size=1000, pad_token_id=0).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=512, image_size=336, patch_size=14).to_dict(),
        image_token_index=999, image_seq_length=576, pruning_layers=pruning_layers, repair_layers=[num_layers - 2],
        pruning_keep_counts=keep_counts, pruner_hidden_size=56, repair_bottleneck_size=64,
    )


def selection_flops(config, text_tokens, visual_in, visual_out, batch_size=1):
    """Multiply-adds x 2 of choosing the tokens at each pruning point, given the visual tokens entering it and kept
    after it, beyond what the layer computes on the kept tokens -- every matrix product FlopCounterMode counts:
    - the attention prior (Eq. 4): the layer's k_proj over the rows it then drops (it reuses the kept rows' keys,
      which the analytic layer count holds), q_proj over the question rows (the text after the image; the BOS
      before it is none), their scores, and the attention's weighted sum over the question rows;
    - the pruner (Eqs. 1-3): the question projection of the rows' mean, the query map, the visual projection, the
      key map and the token MLP's first layer (P x P) on the visual tokens, the query-key scores, the aggregation
      over the queries and the token MLP's output.
    Elementwise work (norms, softmax, RoPE) is not counted, as FlopCounterMode does not. (It counted k_proj over the
    whole sequence, the pruner as two d x P maps and the BOS as a question row: 37% above the measured overhead;
    then, without the pruner's query-side products and the prior's sum, 0.53% below it.)"""
    tc = config.text_config
    d, heads = tc.hidden_size, tc.num_attention_heads
    hd = d // heads
    kv, p, nq = tc.num_key_value_heads * hd, config.pruner_hidden_size, config.num_pruning_queries
    lq = text_tokens - 1
    total = 0
    for k, kept in zip(visual_in, visual_out):
        seq = text_tokens + k
        prior = 2 * (k - kept) * d * kv + 2 * lq * d * d + 2 * heads * lq * seq * hd + 2 * heads * lq * seq
        pruner = 2 * d * p + 2 * nq * p * p + 2 * k * d * p + 2 * 2 * k * p * p + 2 * nq * k * p + 2 * k * nq + 2 * k * p
        total += prior + pruner
    return total * batch_size


def main(argv=None):
    # Counts are whole numbers >= 1 at parsing: 0 failed deep in torch or statistics (--repeats 0 after the run).
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--text_tokens", type=prompt_tokens, default=40, help="prompt tokens besides the image")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--text_layers", type=int, default=8,
                        help="decoder depth (32 = LLaVA-1.5-7B's; pruning layers: paper_placement's, 0-based "
                             "1 / 13 / 25 at 32)")
    args = parser.parse_args(argv)
    print(f"Command: {command_line(__file__, argv)}", flush=True)  # the printed table is the only record of the run
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layers, counts = scaled_layers(args.text_layers), [96, 26, 8]
    config = mid_config(layers, counts, args.text_layers)
    model = RcpLlavaForConditionalGeneration(config).eval()
    stock = LlavaForConditionalGeneration(config).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if "rcp_plugins" not in k})
    n, bsz, t = config.num_visual_tokens, args.batch_size, args.text_tokens
    ids = torch.cat([torch.ones(bsz, 1, dtype=torch.long), torch.full((bsz, n), 999),
                     torch.randint(3, 900, (bsz, t - 1))], dim=1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(bsz, 3, 336, 336), use_cache=True, logits_to_keep=1)

    selection = []
    original_select = model.model._select_tokens

    def timed_select(*a, **kw):
        start = time.perf_counter()
        out = original_select(*a, **kw)
        selection[-1] += time.perf_counter() - start
        return out

    model.model._select_tokens = timed_select

    def run(kind):
        start = time.perf_counter()
        if kind == "stock":
            out = stock(**inputs)
        elif kind == "full":
            with model.plugins_disabled():
                out = model(**inputs)
        else:
            selection.append(0.0)
            out = model(**inputs)
        return time.perf_counter() - start, out

    kinds = ["stock", "full", "pruned"]
    times = {k: [] for k in kinds}
    caches = {}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for k in kinds:
                run(k)
        selection.clear()
        for _ in range(args.repeats):
            for k in kinds:
                dt, out = run(k)
                times[k].append(dt)
                if k != "stock":  # the KV column compares the RCP model's own two caches
                    caches[k] = out.past_key_values
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = statistics.median(selection)

    pruned_sched = schedule_tokens_per_layer(config.text_config.num_hidden_layers, t, n, layers, counts)
    f_full = llava_flops(config, num_text_tokens=t, batch_size=bsz).total
    f_pruned = llava_flops(config, num_text_tokens=t, decoder_tokens_per_layer=pruned_sched, batch_size=bsz).total
    kv_full, kv_pruned = kv_cache_bytes(caches["full"]), kv_cache_bytes(caches["pruned"])
    f_select = selection_flops(config, t, [n, *counts[:-1]], counts, bsz)

    print(f"mid config: CLIP 2x128 (576 visual tokens) + Llama {args.text_layers}x512, batch {bsz}, {t} text tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"schedule: pruners before layers {layers} keep {counts}; tokens per layer {pruned_sched} "
          f"(full {n + t})\n")
    print(f"| {'run':<22} | {'prefill ms':>10} | {'KV cache':>10} | {'analytic GFLOPs':>15} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    print(f"| {'stock LLaVA':<22} | {med['stock'] * 1e3:>10.1f} | {'':>10} | {f_full / 1e9:>15.2f} |")
    print(f"| {'RCP model, pruning off':<22} | {med['full'] * 1e3:>10.1f} | {kv_full / 2**20:>7.2f} MiB | "
          f"{f_full / 1e9:>15.2f} |")
    print(f"| {'RCP 64-token schedule':<22} | {med['pruned'] * 1e3:>10.1f} | {kv_pruned / 2**20:>7.2f} MiB | "
          f"{f_pruned / 1e9:>15.2f} |")
    time_ratio, flops_ratio = med["pruned"] / med["full"], f_pruned / f_full
    print(f"\nmeasured prefill-time ratio pruned/full: {time_ratio:.3f}")
    print(f"analytic FLOPs ratio pruned/full:        {flops_ratio:.3f}")
    print(f"time ratio / FLOPs ratio:                {time_ratio / flops_ratio:.3f}   (target <= 1.15)")
    print(f"pruner overhead: {overhead * 1e3:.2f} ms = {overhead / med['pruned']:.1%} of the pruned prefill "
          "(target < 5%)")
    print(f"analytic selection FLOPs (Eq. 4 prior: k_proj of the dropped rows + q rows, scores; pruner products): "
          f"{f_select / 1e9:.2f} GFLOPs = {f_select / f_pruned:.1%} of the pruned prefill's FLOPs")
    print(f"time ratio / FLOPs ratio with the selection FLOPs counted: "
          f"{time_ratio / ((f_pruned + f_select) / f_full):.3f}")
    print(f"KV cache pruned/full: {kv_pruned / kv_full:.3f}; loop overhead of the RCP model vs stock LLaVA with "
          f"pruning off: {med['full'] / med['stock']:.3f}x")


if __name__ == "__main__":
    main()
