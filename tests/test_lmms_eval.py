"""The lmms-eval model `rcp_llava` (issue 18), end to end and offline: `python -m lmms_eval` on a local task built
from a micro testbed scores what the project's own evaluator scores on the same samples.

Needs the optional extra (`pip install -e ".[lmms]"`); skipped without lmms-eval.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")


def _lmms_outputs(out_dir, task):
    """The task's aggregated results and its logged samples (`--log_samples`), by doc id."""
    files = glob.glob(os.path.join(out_dir, "**", "*_results.json"), recursive=True)
    assert files, f"no results JSON under {out_dir} (lmms-eval exits 0 even when the run failed)"
    results = json.loads(open(sorted(files)[-1]).read())["results"][task]
    samples = {}
    for path in glob.glob(os.path.join(out_dir, "**", f"*_samples_{task}.jsonl"), recursive=True):
        for line in open(path):
            record = json.loads(line)
            samples[record["doc_id"]] = record
    return results, samples


@pytest.mark.slow
@pytest.mark.parametrize("method, budget", [("rcp", "1/4"), ("vispruner", "1/4"), ("none", "")])
def test_lmms_eval_run_equals_the_projects_evaluator(tmp_path, method, budget):
    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.evaluation import EvalData, evaluate_model, first_token_predictions, method_model, method_overrides
    from rcp_llava.lmms_eval_model import budget_tokens, write_testbed_task
    from rcp_llava.testbed import build_testbed
    from transformers import AutoProcessor
    from datasets import load_from_disk

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    model_dir = tmp_path / "rcp"
    model = RcpLlavaForConditionalGeneration.from_pretrained(folder / "model", pruning_layers=[1],
                                                             repair_layers=[1], visual_token_budget=16.0,
                                                             pruner_hidden_size=8, repair_bottleneck_size=8)
    # The 8-step micro model answers every question with the same special token; random decoder weights make it
    # say words that differ between samples, so comparing the two runs' answers sample by sample means something.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "multi_modal_projector" in name):
                p.normal_(0.0, 0.5 if "lm_head" not in name else 3.0, generator=g)
    model.save_pretrained(model_dir)
    AutoProcessor.from_pretrained(folder / "model").save_pretrained(model_dir)
    write_testbed_task(tmp_path / "tasks", folder / "dataset", split="test")
    args = f"pretrained={model_dir},pruning_method={method}"  # batch size and device: lmms-eval's own flags
    if budget:
        args += f",budget={budget}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "rcp_llava", "--model_args", args,
                           "--tasks", "rcp_testbed", "--include_path", str(tmp_path / "tasks"), "--limit", "8",
                           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out"),
                           "--log_samples"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    results, samples = _lmms_outputs(tmp_path / "out", "rcp_testbed")

    loaded = RcpLlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    overrides = (method_overrides(method, budget_tokens(budget, loaded.config.num_visual_tokens), loaded.config)
                 if budget else {"pruning_method": method})
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(8))
    pruned = method_model(loaded, **overrides)
    ours = evaluate_model(pruned, processor, EvalData("testbed", rows, "testbed"), batch_size=4)
    assert results["exact_match,none"] == pytest.approx(ours["score"], abs=1e-9)
    # sample by sample: lmms-eval's generated answer is the first token our evaluator predicts (special tokens
    # are dropped by its decoding)
    predictions, _, _ = first_token_predictions(pruned, processor, rows)
    special = set(processor.tokenizer.all_special_tokens)
    expected = ["" if p in special else p for p in predictions]
    assert [samples[i]["filtered_resps"].strip() for i in range(8)] == expected
    assert sum(bool(e) for e in expected) >= 4 and len(set(expected)) >= 2  # words, and not all the same
    assert [samples[i]["exact_match"] for i in range(8)] == ours["correct"]


def test_loglikelihood_agrees_with_the_first_token_evaluator(tmp_path):
    """`loglikelihood` of each one-word answer: greedy exactly when the project's evaluator predicts it, and the
    log-probability its first-token logits give (the continuation is labelled, so the pruners condition on the
    question alone, and causal attention keeps it out of the prompt's logits)."""
    import torch
    from datasets import load_from_disk
    from lmms_eval.api.instance import Instance
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.data import prompt_batch
    from rcp_llava.evaluation import first_token_predictions, method_model, method_overrides
    from rcp_llava.lmms_eval_model import RcpLlava
    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    model = RcpLlavaForConditionalGeneration.from_pretrained(folder / "model", pruning_layers=[1], repair_layers=[1],
                                                             visual_token_budget=16.0, pruner_hidden_size=8,
                                                             repair_bottleneck_size=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "multi_modal_projector" in name):
                p.normal_(0.0, 0.5 if "lm_head" not in name else 3.0, generator=g)
    model.save_pretrained(tmp_path / "rcp")
    AutoProcessor.from_pretrained(folder / "model").save_pretrained(tmp_path / "rcp")
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(8))

    lm = RcpLlava(pretrained=str(tmp_path / "rcp"), budget="1/4", device="cpu")
    lm.task_dict = {"t": {"test": rows}}
    requests = [Instance("loglikelihood", (r["question"], r["answer"], lambda doc: [doc["image"]], i, "t", "test"), i,
                         {"task": "t", "doc_id": i, "repeats": 1}) for i, r in enumerate(rows)]
    answers = lm.loglikelihood(requests)

    ours = method_model(RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "rcp"),
                        **method_overrides("rcp", 16, lm.model.config))
    processor = AutoProcessor.from_pretrained(tmp_path / "rcp")
    predictions, _, _ = first_token_predictions(ours, processor, rows)
    assert [greedy for _, greedy in answers] == [p == r["answer"] for p, r in zip(predictions, rows)]
    for (logprob, _), r in zip(answers, rows):
        batch = prompt_batch(processor, [r["question"]], [r["image"].convert("RGB")])
        with torch.no_grad():
            logits = ours(**batch, use_cache=False).logits[0, -1].log_softmax(-1)
        answer_id = processor.tokenizer.convert_tokens_to_ids(r["answer"])
        assert logprob == pytest.approx(float(logits[answer_id]), abs=1e-4)
