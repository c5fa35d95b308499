"""The lmms-eval model `rcp_llava` (issue 18), end to end and offline: `python -m lmms_eval` on a local task built
from a micro testbed scores what the project's own evaluator scores on the same samples.

Needs the optional extra (`pip install -e ".[lmms]"`); skipped without lmms-eval.
"""

import glob
import json
import os
import re
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


@pytest.fixture(scope="module")
def micro_testbed(tmp_path_factory):
    """(testbed folder, RCP model folder, task folder): the micro testbed, an RCP model on its backbone with random
    decoder weights, and the lmms-eval task `rcp_testbed` over its test split. The 8-step micro model answers every
    question with the same special token; random decoder weights make it say words that differ between samples, so
    comparing two runs' answers sample by sample means something."""
    import torch
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.lmms_eval_model import write_testbed_task
    from rcp_llava.testbed import build_testbed

    root = tmp_path_factory.mktemp("micro")
    folder = build_testbed("micro", output_dir=root / "testbed", pruning_eval=False)
    model = RcpLlavaForConditionalGeneration.from_pretrained(folder / "model", pruning_layers=[1],
                                                             repair_layers=[1], visual_token_budget=16.0,
                                                             pruner_hidden_size=8, repair_bottleneck_size=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "multi_modal_projector" in name):
                p.normal_(0.0, 0.5 if "lm_head" not in name else 3.0, generator=g)
    model.save_pretrained(root / "rcp")
    AutoProcessor.from_pretrained(folder / "model").save_pretrained(root / "rcp")
    write_testbed_task(root / "tasks", folder / "dataset", split="test")
    return folder, root / "rcp", root / "tasks"


def _run_lmms_eval(launcher, model_args, tasks_dir, out_dir, limit, cwd):
    """`launcher -m lmms_eval` on the task `rcp_testbed`, offline, on CPU; returns the finished process (asserted
    to have exited 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([*launcher, "-m", "lmms_eval", "--model", "rcp_llava", "--model_args", model_args,
                           "--tasks", "rcp_testbed", "--include_path", str(tasks_dir), "--limit", str(limit),
                           "--batch_size", "4", "--device", "cpu", "--output_path", str(out_dir), "--log_samples"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def _project_evaluation(micro_testbed, method, budget, num_rows):
    """What the project's own evaluator scores for the run `_run_lmms_eval` made: `method` at `budget` (as
    --model_args gives them; "" for the checkpoint's) on the first `num_rows` test rows. Returns (the method's
    model, processor, rows, `evaluate_model`'s result)."""
    from datasets import load_from_disk
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.evaluation import EvalData, evaluate_model, method_model, method_overrides
    from rcp_llava.lmms_eval_model import budget_tokens

    folder, model_dir, _ = micro_testbed
    loaded = RcpLlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    overrides = (method_overrides(method, budget_tokens(budget, loaded.config.num_visual_tokens), loaded.config)
                 if budget else {"pruning_method": method})
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(num_rows))
    pruned = method_model(loaded, **overrides)
    return pruned, processor, rows, evaluate_model(pruned, processor, EvalData("testbed", rows, "testbed"),
                                                   batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("method, budget", [("rcp", "1/4"), ("vispruner", "1/4"), ("none", "")])
def test_lmms_eval_run_equals_the_projects_evaluator(micro_testbed, tmp_path, method, budget):
    from rcp_llava.evaluation import first_token_predictions

    _, model_dir, tasks_dir = micro_testbed
    args = f"pretrained={model_dir},pruning_method={method}"  # batch size and device: lmms-eval's own flags
    if budget:
        args += f",budget={budget}"
    _run_lmms_eval([sys.executable], args, tasks_dir, tmp_path / "out", 8, tmp_path)
    results, samples = _lmms_outputs(tmp_path / "out", "rcp_testbed")

    pruned, processor, rows, ours = _project_evaluation(micro_testbed, method, budget, 8)
    assert results["exact_match,none"] == pytest.approx(ours["score"], abs=1e-9)
    # sample by sample: lmms-eval's generated answer is the first token our evaluator predicts (special tokens
    # are dropped by its decoding)
    predictions, _, _ = first_token_predictions(pruned, processor, rows)
    special = set(processor.tokenizer.all_special_tokens)
    expected = ["" if p in special else p for p in predictions]
    assert [samples[i]["filtered_resps"].strip() for i in range(8)] == expected
    assert sum(bool(e) for e in expected) >= 4 and len(set(expected)) >= 2  # words, and not all the same
    assert [samples[i]["exact_match"] for i in range(8)] == ours["correct"]


@pytest.mark.slow
def test_a_data_parallel_run_shards_the_documents_and_records_each_once(micro_testbed, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmms_eval` (the launch `accelerate launch` makes too): each rank runs its share
    of the documents and the scores are the project evaluator's. Seven documents on two ranks: rank 1 has three, and
    lmms-eval pads it with a copy of its last request, which the model recorded as a fourth document."""
    from rcp_llava.schedule import average_tokens

    _, model_dir, tasks_dir = micro_testbed
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = _run_lmms_eval(torchrun, f"pretrained={model_dir},pruning_method=rcp,budget=1/4", tasks_dir,
                          tmp_path / "out", 7, tmp_path)
    results, samples = _lmms_outputs(tmp_path / "out", "rcp_testbed")

    pruned, _, _, ours = _project_evaluation(micro_testbed, "rcp", "1/4", 7)
    assert sorted(samples) == list(range(7))
    assert [samples[i]["exact_match"] for i in range(7)] == ours["correct"]
    assert results["exact_match,none"] == pytest.approx(ours["score"], abs=1e-9)
    log = proc.stdout + proc.stderr
    per_layer = average_tokens(pruned.config.tokens_per_layer())  # fixed counts: every document's
    assert per_layer < pruned.config.num_visual_tokens
    for rank, documents in ((0, 4), (1, 3)):
        assert re.search(rf"rcp_llava \(rank {rank} of 2\): {documents} documents with an image read {per_layer:.2f} "
                         r"visual tokens per decoder layer", log), log[-3000:]


def test_loglikelihood_agrees_with_the_first_token_evaluator(micro_testbed):
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

    folder, model_dir, _ = micro_testbed
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(8))

    lm = RcpLlava(pretrained=str(model_dir), budget="1/4", device="cpu")
    lm.task_dict = {"t": {"test": rows}}
    requests = [Instance("loglikelihood", (r["question"], r["answer"], lambda doc: [doc["image"]], i, "t", "test"), i,
                         {"task": "t", "doc_id": i, "repeats": 1}) for i, r in enumerate(rows)]
    answers = lm.loglikelihood(requests)

    ours = method_model(RcpLlavaForConditionalGeneration.from_pretrained(model_dir),
                        **method_overrides("rcp", 16, lm.model.config))
    processor = AutoProcessor.from_pretrained(model_dir)
    predictions, _, _ = first_token_predictions(ours, processor, rows)
    assert [greedy for _, greedy in answers] == [p == r["answer"] for p, r in zip(predictions, rows)]
    for (logprob, _), r in zip(answers, rows):
        batch = prompt_batch(processor, [r["question"]], [r["image"].convert("RGB")])
        with torch.no_grad():
            logits = ours(**batch, use_cache=False).logits[0, -1].log_softmax(-1)
        answer_id = processor.tokenizer.convert_tokens_to_ids(r["answer"])
        assert logprob == pytest.approx(float(logits[answer_id]), abs=1e-4)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from rcp_llava.demo import save_demo_folder

    return str(save_demo_folder(tmp_path_factory.mktemp("lmms") / "demo")[0])


@pytest.fixture
def loguru_messages():
    """lmms-eval's log (loguru, where the model's summary goes) at INFO, captured while the test runs."""
    from loguru import logger

    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(sink)


def _from_args(folder, args, batch_size=1):
    """The model as `python -m lmms_eval --model_args ...` builds it: lmms-eval's own parser, its batch size."""
    from rcp_llava.lmms_eval_model import RcpLlava

    return RcpLlava.create_from_arg_string(f"pretrained={folder},{args}".rstrip(","),
                                           {"batch_size": batch_size, "max_batch_size": None, "device": "cpu"})


def test_budget_is_a_count_when_whole():
    """`budget=1` was read as the fraction 1 and kept all 576 tokens, where 2 kept 2: a sweep 1, 2, 4, ... got an
    unpruned first point. A whole number is a count; a fraction has '/' or '.'."""
    from rcp_llava.lmms_eval_model import budget_tokens

    assert [budget_tokens(b, 576) for b in ("1", 1, "64", "1/9", "0.25", "1.0", "64.0")] == [1, 1, 64, 64, 144, 576, 64]
    for bad, message in (("0", "must be a positive"), ("577", "between 1 and the 576"), ("1/0", "neither"),
                         ("2.5", "whole number"), ("many", "neither")):
        with pytest.raises(ValueError, match=rf"`budget` '{re.escape(bad)}' .*{message}"):
            budget_tokens(bad, 576)


@pytest.mark.parametrize("args, batch_size, message", [
    ("dtype=bogus", 1, "`dtype` is 'bogus'; use auto, float32, bfloat16 or float16"),
    ("dtype=nn", 1, "`dtype` is 'nn'"),
    ("pruning_keep_counts=a:b", 1, "`pruning_keep_counts` is 'a:b'; give one count per pruning layer"),
    ("max_new_tokens=abc", 1, "`max_new_tokens` is 'abc'; give a whole number >= 1"),
    ("max_new_tokens=0", 1, "`max_new_tokens` is 0; give a whole number >= 1"),  # generated nothing
    ("", 0, "`batch_size` is 0; give a whole number >= 1"),  # no batch ever held a request
    ("flop_matched=maybe,budget=8", 1, "`flop_matched` is 'maybe'; use true or false"),
    ("flop_matched=true", 1, "`flop_matched=true` sets how `budget` is met; give a `budget` too"),
    ("pruning_keep_counts=6:3,budget=2", 1, r"give `budget` \(2\) or `pruning_keep_counts` \('6:3'\), not both"),
    ("", "auto", "`batch_size` 'auto' is not supported; give a number"),
    ("budget=4,flop_matched=true", 1, r"`budget=4` \(4 tokens\) with pruning_method='rcp', flop_matched=true: "
                                      "`visual_token_budget` 4 cannot be reached"),
    ("dtype=float64", 1, "`dtype` is 'float64'"),
    ("budget=0.0", 1, "`budget` 0.0 must be a positive token count or fraction"),
    ("budget=-1/9", 1, "`budget` '-1/9' must be a positive"),
    ("budget=many", 1, "`budget` 'many' is neither"),
    ("pruning_method=fast", 1, r"`pruning_method` is 'fast'; use one of \["),
    ("pruning_method=none,budget=64", 1, r"`pruning_method=none` prunes nothing, so `budget=64` would be ignored"),
    ("pruning_method=none,pruning_keep_counts=6:3", 1, r"`pruning_method=none` prunes nothing, so "
                                                     r"`pruning_keep_counts=6:3` would be ignored"),
])
def test_model_arguments_are_refused_by_name(demo_folder, args, batch_size, message):
    """Each was a raw `int()` / `getattr(torch, ...)` error, or silently taken (maybe -> false, a budget dropped).
    Syntax errors come before the checkpoint loads (a 7B load for a typo otherwise)."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    loads = []
    original = RcpLlavaForConditionalGeneration.from_pretrained.__func__

    def from_pretrained(cls, *a, **k):
        loads.append(a)
        return original(cls, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RcpLlavaForConditionalGeneration, "from_pretrained", classmethod(from_pretrained))
        with pytest.raises(ValueError, match=rf"^rcp_llava: {message}"):
            _from_args(demo_folder, args, batch_size)
    assert bool(loads) == ("cannot be reached" in message)  # only a reachable-budget check needs the model


def test_model_arguments_that_load(demo_folder):
    import torch

    lm = _from_args(demo_folder, "dtype=torch.float16,pruning_keep_counts=6:3,max_new_tokens=5", batch_size=2)
    assert lm.model.dtype == torch.float16 and lm.model.config.pruning_keep_counts == [6, 3]
    assert (lm.batch_size, lm.max_new_tokens) == (2, 5)
    assert _from_args(demo_folder, "budget=1").model.config.pruning_keep_counts == [1, 1]


@pytest.mark.parametrize("args, told", [
    ("pruning_method=vispruner,pruning_keep_counts=4", "prunes before the LLM and needs `pre_llm_keep_count`"),
    ("pruning_method=fastv,pruning_keep_counts=6:3", "prunes at one layer: `pruning_layers` must hold one layer"),
])
def test_counts_for_a_method_that_prunes_elsewhere_are_named_as_given(demo_folder, args, told):
    """The config's error named `pre_llm_keep_count` / `pruning_layers`, which `--model_args` refuses as unknown: the
    user gave counts for the model's pruning layers, and is told to give a budget."""
    counts = args.split("pruning_keep_counts=")[1]
    with pytest.raises(ValueError, match=rf"^rcp_llava: `pruning_keep_counts={counts}` with pruning_method='\w+': "
                                         rf".*{re.escape(told)}.* The counts are kept tokens at the model's pruning "
                                         r"layers \[1, 2\]; .* give `budget=K` instead\."):
        _from_args(demo_folder, args)


def test_generate_until_takes_a_none_max_new_tokens_and_names_a_non_image_visual(demo_folder):
    """A task's `max_new_tokens: None` crashed in `int()`; llava_hf uses its default. A file path as the visual got
    "needs exactly one image ...; gives 1 visual(s)", which read as a contradiction. (Its message no longer asks for
    exactly one image: documents without one are taken, `test_documents_without_an_image_and_with_several`.)"""
    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "max_new_tokens=3")
    docs = [{"q": "what colour is the shape ?", "img": demo_image(seed=1)}]
    lm.task_dict = {"t": {"test": docs}}

    def request(gen_kwargs, visual):
        return Instance("generate_until", ("what colour is the shape ?", gen_kwargs, visual, 0, "t", "test"), 0,
                        {"task": "t", "doc_id": 0, "repeats": 1})

    default = lm.generate_until([request({"max_new_tokens": None, "until": []}, lambda d: [d["img"]])])
    three = lm.generate_until([request({"max_new_tokens": 3, "until": []}, lambda d: [d["img"]])])
    assert default == three and len(lm.tokenizer(default[0], add_special_tokens=False)["input_ids"]) <= 3
    with pytest.raises(ValueError, match=r"visuals must be images \(PIL images\); t/test doc 0 gives 1 "
                                         r"visual\(s\) \(str\), 0 of them image\(s\)"):
        lm.generate_until([request({"until": []}, lambda d: ["/images/0.png"])])


def test_a_tasks_do_sample_false_keeps_generation_greedy(demo_folder):
    """MM-Vet's `temperature: 0.2, do_sample: false` sampled (4 distinct answers over 4 seeds): the temperature alone
    decided. Greedy now, equal to temperature 0; without `do_sample` a temperature above 0 still samples."""
    import torch
    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "max_new_tokens=6")
    lm.task_dict = {"t": {"test": [{"img": demo_image(seed=1)}]}}

    def answers(gen_kwargs, seeds=range(4)):
        out = set()
        for seed in seeds:
            torch.manual_seed(seed)
            request = Instance("generate_until", ("what colour is the shape ?", {"until": [], **gen_kwargs},
                                                  lambda d: [d["img"]], 0, "t", "test"), 0,
                               {"task": "t", "doc_id": 0, "repeats": 1})
            out.add(lm.generate_until([request])[0])
        return out

    greedy = answers({"temperature": 0}, seeds=[0])
    assert answers({"temperature": 0.2, "top_p": 1.0, "do_sample": False}) == greedy
    assert answers({"temperature": 0.2, "top_p": 1.0, "do_sample": "false"}) == greedy
    assert len(answers({"temperature": 5.0, "top_p": 1.0})) > 1  # sampling still samples


def test_argument_spellings_and_a_tasks_sampling_settings(demo_folder, tmp_path):
    """`flop_matched=1` is true (lmms-eval users write 1 / 0), counts given from Python may be comma-separated, a task
    name that cannot name a YAML file is refused, and a sampling task's `top_p` reaches `generate`."""
    from datasets import Dataset, DatasetDict
    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image
    from rcp_llava.lmms_eval_model import _as_bool, _keep_counts, write_testbed_task

    assert [_as_bool(v, "flop_matched") for v in ("1", "True", "yes", "0", "false", "No")] == [True] * 3 + [False] * 3
    assert _keep_counts("93,25,8") == _keep_counts("93:25:8") == [93, 25, 8]
    DatasetDict({"test": Dataset.from_dict({"question": ["q"], "answer": ["a"]})}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=re.escape("`name` 'my task' must be letters, digits, '_', '.' or '-'")):
        write_testbed_task(tmp_path / "tasks", tmp_path / "ds", name="my task")
    assert not (tmp_path / "tasks").exists() or not os.listdir(tmp_path / "tasks")
    lm = _from_args(demo_folder, "max_new_tokens=2")
    lm.task_dict = {"t": {"test": [{"img": demo_image(seed=1)}]}}
    seen, generate = {}, lm.model.generate
    lm.model.generate = lambda **kwargs: seen.update(kwargs) or generate(**kwargs)
    lm.generate_until([Instance("generate_until", ("what colour?", {"until": [], "temperature": 0.7, "top_p": 0.5},
                                                   lambda d: [d["img"]], 0, "t", "test"), 0,
                                {"task": "t", "doc_id": 0, "repeats": 1})])
    assert (seen["do_sample"], seen["temperature"], seen["top_p"]) == (True, 0.7, 0.5)


def test_the_task_writer_keeps_the_folders_other_utils(tmp_path):
    """The task's functions went to `utils.py`, overwriting the one an --include_path folder's other tasks load."""
    from rcp_llava.lmms_eval_model import write_testbed_task

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("def my_doc_to_text(doc):\n    return doc['q']\n")
    path = write_testbed_task(tasks, dataset, name="my_testbed")
    assert (tasks / "utils.py").read_text() == "def my_doc_to_text(doc):\n    return doc['q']\n"
    assert sorted(os.listdir(tasks)) == ["my_testbed.yaml", "my_testbed_utils.py", "utils.py"]
    text = open(path).read()
    for function in ("doc_to_visual", "doc_to_text", "process_results"):
        assert f"!function my_testbed_utils.{function}" in text


def test_a_processor_without_a_chat_template_gets_llava_15s(demo_folder, tmp_path):
    """`apply_chat_template` raised on every request ("this processor does not have a chat template"): older llava-hf
    revisions were saved without one; lmms-eval's llava_hf falls back to a Vicuna template. The demo's word-level
    tokenizer reads LLaVA-1.5's "USER: <image>\\nQ ASSISTANT:" as its own template's tokens, so the answers agree."""
    import shutil

    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image

    bare = tmp_path / "bare"
    shutil.copytree(demo_folder, bare)
    for name in os.listdir(bare):
        if name.startswith("chat_template"):
            os.remove(bare / name)
        elif name in ("processor_config.json", "tokenizer_config.json"):
            config = json.loads((bare / name).read_text())
            config.pop("chat_template", None)
            (bare / name).write_text(json.dumps(config))
    answers = []
    for folder in (demo_folder, bare):
        lm = _from_args(folder, "max_new_tokens=4")
        lm.task_dict = {"t": {"test": [{"img": demo_image(seed=2)}]}}
        request = Instance("generate_until", ("what colour is the shape ?", {"until": []}, lambda d: [d["img"]], 0,
                                              "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
        answers.append(lm.generate_until([request]))
    from rcp_llava.lmms_eval_model import LLAVA_15_CHAT_TEMPLATE

    assert lm.processor.chat_template == LLAVA_15_CHAT_TEMPLATE
    assert lm._prompt("what colour ?") == "USER: <image>\nwhat colour ? ASSISTANT:"
    assert answers[0] == answers[1]


def _request(context, gen_kwargs, visual, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance("generate_until", (context, gen_kwargs, visual, doc_id, "t", "test"), 0,
                    {"task": "t", "doc_id": doc_id, "repeats": 1})


def test_until_cuts_at_a_tasks_stops_but_not_at_lmms_evals_default_blank_line(demo_folder, monkeypatch):
    """lmms-eval gives `until: ["\\n\\n"]` to every task that names none (MM-Vet's long answers): the wrapper cut
    them after the first paragraph, where llava_hf returns them whole. A task's own stop strings still cut. (The
    demo's word-level tokenizer cannot write a newline, so the decoded text is given.)"""
    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "max_new_tokens=2")
    lm.task_dict = {"t": {"test": [{"img": demo_image(seed=1)}]}}
    answer = "A red circle.\n\nIt is next to a square. STOP and more"
    monkeypatch.setattr(lm.tokenizer, "batch_decode", lambda ids, **kwargs: [answer] * len(ids))
    visual = lambda d: [d["img"]]  # noqa: E731
    assert lm.generate_until([_request("q ?", {"until": ["\n\n"]}, visual)]) == [answer]
    assert lm.generate_until([_request("q ?", {"until": "\n\n"}, visual)]) == [answer]
    assert lm.generate_until([_request("q ?", {"until": ["\n\n", "STOP"]}, visual)]) == [
        "A red circle.\n\nIt is next to a square."]
    assert lm.generate_until([_request("q ?", {"until": ["."]}, visual)]) == ["A red circle"]


@pytest.mark.parametrize("method", ["rcp", "none"])
def test_documents_without_an_image_and_with_several(demo_folder, method):
    """A text-only document (lmms-eval's scienceqa gives `[]` for questions without an image) aborted the whole run
    with "pruning needs exactly one image"; the model takes such rows unpruned. Each answer equals the model's own
    greedy answer on that prompt alone, in a batch with an image row as alone. Several images run unpruned only."""
    import torch

    from rcp_llava.data import prompt_messages
    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, f"pruning_method={method},max_new_tokens=3", batch_size=2)
    docs = [{"img": [demo_image(seed=1)]}, {"img": []}, {"img": [demo_image(seed=2), demo_image(seed=3)]}]
    lm.task_dict = {"t": {"test": docs}}
    visual = lambda d: d["img"]  # noqa: E731
    processor = lm.processor

    def alone(doc_id):
        images = docs[doc_id]["img"]
        messages = prompt_messages("what colour is the shape ?", num_images=len(images))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        return lm.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    question = "what colour is the shape ?"
    pair = lm.generate_until([_request(question, {"until": []}, visual, 0),
                              _request(question, {"until": []}, visual, 1)])
    assert pair == [alone(0), alone(1)]
    assert lm.generate_until([_request(question, {"until": []}, visual, 1)]) == [alone(1)]
    score, _ = lm.loglikelihood([type("R", (), {"args": (question, " w1", visual, 1, "t", "test")})()])[0]
    assert score < 0
    two = [_request(question, {"until": []}, visual, 2)]
    if method == "none":
        assert lm.generate_until(two) == [alone(2)]
    else:
        with pytest.raises(ValueError, match=r"^rcp_llava: pruning_method='rcp' prunes one image per prompt; t/test "
                                             r"doc 2 gives 2 images\. Evaluate this task with pruning_method=none"):
            lm.generate_until(two)


@pytest.mark.parametrize("generation_prompt, add_eos_token", [("ASSISTANT:", False), ("ASSISTANT: ", False),
                                                              ("ASSISTANT:", True)])
def test_loglikelihood_scores_the_whole_continuation(demo_folder, generation_prompt, add_eos_token):
    """The continuation started after as many tokens as the prompt has alone: with a generation prompt ending in a
    space ("▁There" absorbs it) or a tokenizer that appends EOS, its first token went unscored (a one-token choice
    "A" scored nothing: log-probability 0 for every choice). It starts where the collator starts an answer, and an
    EOS the tokenizer appends to every text is not the continuation's (it was scored)."""
    from types import SimpleNamespace

    import torch
    from conftest import sentencepiece_like_processor
    from PIL import Image

    lm = _from_args(demo_folder, "")
    processor = sentencepiece_like_processor(generation_prompt, add_eos_token)
    lm.processor, lm._tokenizer = processor, processor.tokenizer
    scored = []

    class Model(torch.nn.Module):  # records the labelled tokens; uniform logits
        dtype, config, last_pruning_info = torch.float32, lm.model.config, None  # what the wrapper reads

        def forward(self, input_ids, labels=None, **kwargs):
            scored.append(input_ids[0][labels[0] != -100].tolist())
            return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], len(processor.tokenizer)))

    lm._model = Model()
    lm.task_dict = {"t": {"test": [{"img": Image.new("RGB", (8, 8))}]}}
    space = "" if generation_prompt.endswith(" ") else " "  # the prompt or the continuation holds the space
    for continuation in (space + "There are two cats", space + "A"):
        request = SimpleNamespace(args=("How many cats?", continuation, lambda d: [d["img"]], 0, "t", "test"))
        (logprob, _), = lm.loglikelihood([request])
        text = processor.tokenizer.decode(scored[-1]).strip()  # special tokens kept: an appended EOS is not scored
        assert text == continuation.strip() and logprob < 0


def _scoring_lm(demo_folder, processor, logits_of):
    """The wrapper on `processor`, its model replaced by one whose logits are `logits_of(input_ids)` (1, T, V); the
    labelled tokens and input ids of each call are recorded in the returned list."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    lm = _from_args(demo_folder, "")
    lm.processor, lm._tokenizer = processor, processor.tokenizer
    seen = []

    class Model(torch.nn.Module):
        dtype, config, last_pruning_info = torch.float32, lm.model.config, None  # what the wrapper reads

        def forward(self, input_ids, labels=None, **kwargs):
            seen.append((input_ids[0].tolist(), input_ids[0][labels[0] != -100].tolist()))
            return SimpleNamespace(logits=logits_of(input_ids))

    lm._model = Model()
    lm.task_dict = {"t": {"test": [{"img": Image.new("RGB", (8, 8))}]}}
    return lm, seen


def _loglikelihood_request(context, continuation):
    from types import SimpleNamespace

    return SimpleNamespace(args=(context, continuation, lambda d: [d["img"]], 0, "t", "test"))


@pytest.mark.parametrize("bos_in_template, continuation, scored", [(False, "</s>", "</s>"),
                                                                    (True, " two</s>", "two</s>")])
def test_a_continuation_ending_with_eos_is_scored_with_an_eos_appending_tokenizer(demo_folder, bos_in_template,
                                                                                  continuation, scored):
    """A tokenizer appending EOS to every text (`add_eos_token`): the last EOS is not the continuation's and is left
    out, unless it is all the continuation has (a choice "</s>": the prompt alone ends with the same EOS, so the
    continuation starts at the last token; left out there too, it scored no token: log-probability 0 and a greedy
    match). With a template writing BOS the texts are tokenized without special tokens, so nothing is appended and
    the continuation's own final EOS is scored."""
    import torch
    from conftest import sentencepiece_like_processor

    processor = sentencepiece_like_processor("ASSISTANT:", add_eos_token=True, bos_in_template=bos_in_template)
    eos = processor.tokenizer.eos_token_id

    def never_eos(input_ids):
        logits = torch.zeros(1, input_ids.shape[1], len(processor.tokenizer))
        logits[..., eos] = -5.0
        return logits

    lm, seen = _scoring_lm(demo_folder, processor, never_eos)
    (logprob, greedy), = lm.loglikelihood([_loglikelihood_request("How many cats?", continuation)])
    ids, labelled = seen[-1]
    assert ids.count(eos) == (1 if bos_in_template else 2) and ids[-1] == eos
    assert processor.tokenizer.decode(labelled).replace(" ", "") == scored and labelled[-1] == eos
    assert not greedy and logprob < -5


def test_greedy_needs_every_continuation_token_and_the_log_probability_sums_them(demo_folder):
    """`greedy` is lmms-eval's exact-match flag: every continuation token the argmax (one right was read as a
    match), and the log-probability is the sum of each token's, read off the logits that predict it. A model that
    predicts each next token with logit 4 (the others 0) gives C * log(e^4 / (e^4 + V - 1)); uniform on the last
    one, no greedy match and that token at log(1 / V). The continuation may be given as a function of the document,
    as lmms-eval's tasks may."""
    import math

    import torch
    from conftest import sentencepiece_like_processor

    processor = sentencepiece_like_processor("ASSISTANT:")
    vocab, wrong_last = len(processor.tokenizer), []

    def next_token(input_ids):
        logits = torch.zeros(1, input_ids.shape[1], vocab)
        logits[0, torch.arange(input_ids.shape[1] - 1), input_ids[0, 1:]] = 4.0
        if wrong_last:
            logits[0, -2] = 0.0
        return logits

    lm, seen = _scoring_lm(demo_folder, processor, next_token)
    right, wrong = math.log(math.exp(4) / (math.exp(4) + vocab - 1)), math.log(1 / vocab)
    request = _loglikelihood_request("How many cats?", lambda doc: " There are two cats")
    (logprob, greedy), = lm.loglikelihood([request])
    count = len(seen[-1][1])
    assert count == len(processor.tokenizer(" There are two cats", add_special_tokens=False)["input_ids"]) > 1
    assert greedy and logprob == pytest.approx(count * right, abs=1e-4)
    wrong_last.append(True)
    (logprob, greedy), = lm.loglikelihood([request])
    assert not greedy and logprob == pytest.approx((count - 1) * right + wrong, abs=1e-4)


def test_a_tasks_image_placeholder_and_whitespace_leave_the_prompt_unchanged(demo_folder):
    """Tasks write the question as LLaVA's "<image>\\n" + question (and with stray whitespace): the template puts the
    image first, so the placeholder is removed and the text stripped, and the prompt is the plain question's, one
    image token (two was the processor's "2 <image> tokens and 1 images"; a newline after the template's image
    was another prompt than the one the model was evaluated with)."""
    lm = _from_args(demo_folder, "")
    plain = lm._prompt("What colour is the shape?")
    assert lm._prompt("<image>\nWhat colour is the shape? ") == plain
    assert lm._prompt("  What colour is the shape?\n") == plain
    assert plain.count(lm.processor.image_token) == 1


def test_a_tasks_generation_arguments_reach_generate(demo_folder):
    """A task's `max_new_tokens` (the model's default when it gives None) and `num_beams` go to `generate`, greedy
    at temperature 0: the testbed's one-token answers and a beam-search task ran with the model's own settings."""
    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "max_new_tokens=3")
    lm.task_dict = {"t": {"test": [{"img": demo_image(seed=1)}]}}
    seen, generate = [], lm.model.generate
    lm.model.generate = lambda **kwargs: seen.append(kwargs) or generate(**kwargs)
    for gen_kwargs in ({"max_new_tokens": 1}, {"max_new_tokens": None}, {"max_new_tokens": 2, "num_beams": 2}):
        lm.generate_until([Instance("generate_until", ("what colour?", {"until": [], "temperature": 0, **gen_kwargs},
                                                       lambda d: [d["img"]], 0, "t", "test"), 0,
                                    {"task": "t", "doc_id": 0, "repeats": 1})])
    assert [(k["max_new_tokens"], k["num_beams"], k["do_sample"]) for k in seen] == [(1, 1, False), (3, 1, False),
                                                                                     (2, 2, False)]


def test_a_template_writing_bos_gets_one(demo_folder):
    """A chat template that writes BOS (Llama-3's, Mistral's) with a tokenizer that adds one: generation and
    log-likelihood prompts had two (the processor's call added its own), as `rcp_llava.data.encode_texts` now
    prevents for training and evaluation alike."""
    from types import SimpleNamespace

    import torch
    from conftest import sentencepiece_like_processor
    from PIL import Image

    lm = _from_args(demo_folder, "")
    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    lm.processor, lm._tokenizer = processor, processor.tokenizer
    bos = processor.tokenizer.bos_token_id
    image = Image.new("RGB", (8, 8))
    inputs = lm._encode([[image], [image]], [lm._prompt("How many cats?"), lm._prompt("What colour?")])
    for ids, attention in zip(inputs["input_ids"], inputs["attention_mask"]):
        assert ids[attention.bool()].tolist().count(bos) == 1
    seen = []

    class Model(torch.nn.Module):
        dtype, config, last_pruning_info = torch.float32, lm.model.config, None  # what the wrapper reads

        def forward(self, input_ids, labels=None, **kwargs):
            seen.append((input_ids[0].tolist(), input_ids[0][labels[0] != -100].tolist()))
            return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], len(processor.tokenizer)))

    lm._model = Model()
    lm.task_dict = {"t": {"test": [{"img": image}]}}
    request = SimpleNamespace(args=("How many cats?", " There are two cats", lambda d: [d["img"]], 0, "t", "test"))
    (logprob, _), = lm.loglikelihood([request])
    ids, scored = seen[-1]
    assert ids.count(bos) == 1 and logprob < 0
    assert processor.tokenizer.decode(scored).strip() == "There are two cats"


@pytest.mark.parametrize("method", ["rcp", "vispruner", "fastv"])
def test_each_documents_visual_tokens_are_recorded_and_summarised(demo_folder, method, loguru_messages):
    """lmms-eval's results hold scores only: the wrapper recorded nothing of what a document's prefill kept, so a run
    could not be placed at its compute. Each document with an image now records its visual tokens per decoder layer
    (the mean over all layers, as `tokens_per_layer` counts them); text-only documents are left out, beams count a
    document once, and the summary goes to lmms-eval's log."""
    from rcp_llava.demo import demo_image
    from rcp_llava.schedule import average_tokens

    docs = [{"img": [demo_image(seed=1)]}, {"img": []}, {"img": [demo_image(seed=2), demo_image(seed=3)]}]
    visual = lambda d: d["img"]  # noqa: E731
    question = "what colour is the shape ?"
    lm = _from_args(demo_folder, f"pruning_method={method},budget=8,max_new_tokens=2", batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    expected = average_tokens(lm.model.config.tokens_per_layer())
    assert expected < lm.model.config.num_visual_tokens
    lm.generate_until([_request(question, {"until": []}, visual, 0), _request(question, {"until": []}, visual, 1)])
    lm.generate_until([_request(question, {"until": [], "num_beams": 2}, visual, 0)])
    lm.loglikelihood([type("R", (), {"args": (question, " w1", visual, 0, "t", "test")})()])
    # logged by the calls themselves (before the summary below logs it again)
    assert any(f"rcp_llava: 3 documents with an image read {expected:.2f} visual tokens per decoder layer" in m
               for m in loguru_messages)
    assert lm.visual_tokens_per_layer == [expected] * 3
    assert lm.visual_token_summary() == {"documents": 3, "mean_visual_tokens_per_layer": expected,
                                         "num_visual_tokens": lm.model.config.num_visual_tokens,
                                         "per_task": {"t": {"documents": 3, "mean_visual_tokens_per_layer": expected}}}

    unpruned = _from_args(demo_folder, "pruning_method=none,max_new_tokens=2")
    unpruned.task_dict = lm.task_dict
    unpruned.generate_until([_request(question, {"until": []}, visual, 2)])
    assert unpruned.visual_tokens_per_layer == [2 * lm.model.config.num_visual_tokens]  # two images, every layer


def test_a_document_is_recorded_once_per_call(demo_folder):
    """lmms-eval pads a data-parallel rank that has fewer documents with copies of its last request, and a
    multiple-choice document sends one loglikelihood request per choice: each was recorded as another document, so
    the summary's count and its per-task means weighed them again. A later call records a document anew."""
    import copy

    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "pruning_method=rcp,budget=8,max_new_tokens=1", batch_size=2)
    docs = [{"img": [demo_image(seed=1)]}, {"img": [demo_image(seed=2)]}]
    lm.task_dict = {"t": {"test": docs}}
    visual = lambda d: d["img"]  # noqa: E731
    last = _request("what shape ?", {"until": []}, visual, 1)
    padding = copy.copy(last)  # lmms-eval 0.7.3's `_clone_padding_request`: a shallow copy, marked as padding
    padding.metadata = {**last.metadata, "__padding_only__": True}
    answers = lm.generate_until([_request("what colour ?", {"until": []}, visual, 0), last, padding])
    assert len(answers) == 3 and answers[1] == answers[2]
    assert len(lm.visual_tokens_per_layer) == 2
    choices = [type("R", (), {"args": ("what colour ?", f" {word}", visual, 0, "t", "test")})()
               for word in ("w1", "w2", "w3")]
    assert len(lm.loglikelihood(choices)) == 3
    assert len(lm.visual_tokens_per_layer) == 3  # a new call: document 0 again, once for its three choices
    assert lm.visual_token_summary()["per_task"]["t"]["documents"] == 3


def test_the_rank_is_the_launchers_and_the_summary_names_it(demo_folder, monkeypatch, loguru_messages):
    """`accelerate launch` and torchrun set RANK and WORLD_SIZE: the model said rank 0 of 1 on every rank, and lmms-eval
    0.7.0 sized each rank's padding by `lm.rank`. Each rank's summary covers its own documents, and now says so."""
    from rcp_llava.demo import demo_image

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lm = _from_args(demo_folder, "pruning_method=rcp,budget=8,max_new_tokens=1")
    assert (lm.rank, lm.world_size) == (1, 2)
    lm.task_dict = {"t": {"test": [{"img": [demo_image(seed=1)]}]}}
    lm.generate_until([_request("what colour ?", {"until": []}, lambda d: d["img"], 0)])
    assert any("rcp_llava (rank 1 of 2): 1 documents with an image read" in m for m in loguru_messages), \
        loguru_messages
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    alone = _from_args(demo_folder, "pruning_method=none")
    assert (alone.rank, alone.world_size) == (0, 1)


def test_beams_record_each_documents_own_visual_tokens(tmp_path):
    """With fixed counts every document records the same number, and the beam call above sends one document: reading
    row i instead of the document's first beam row (i * beams) passed (a mutation audit). Adaptive RCP, two documents
    that keep different counts: beams record what greedy records, document by document."""
    from rcp_llava.demo import demo_image, save_demo_folder

    folder = str(save_demo_folder(tmp_path / "adaptive", pruning_keep_counts=None, visual_token_budget=6.0)[0])
    lm = _from_args(folder, "max_new_tokens=2", batch_size=2)
    docs = [{"img": [demo_image(seed=1)]}, {"img": [demo_image(seed=5)]}]
    lm.task_dict = {"t": {"test": docs}}
    visual = lambda d: d["img"]  # noqa: E731
    question = "what colour is the shape ?"
    lm.generate_until([_request(question, {"until": []}, visual, d) for d in (0, 1)])
    greedy = lm.visual_tokens_per_layer[-2:]
    assert greedy[0] != greedy[1]
    lm.generate_until([_request(question, {"until": [], "num_beams": 2}, visual, d) for d in (0, 1)])
    assert lm.visual_tokens_per_layer[-2:] == greedy


def test_the_visual_token_summary_is_per_task_and_outlives_lmms_evals_clean_up(demo_folder):
    """lmms-eval sends every task's requests in one call: one pooled mean gave no task its own compute figure. And
    `simple_evaluate` ends with `lm.clean()`, which deletes the model: the summary then raised AttributeError."""
    from lmms_eval.api.instance import Instance

    from rcp_llava.demo import demo_image

    lm = _from_args(demo_folder, "pruning_method=random,budget=6,max_new_tokens=1", batch_size=3)
    docs = [{"img": [demo_image(seed=1)]}, {"img": [demo_image(seed=2)]}]
    lm.task_dict = {"t": {"test": docs}, "u": {"test": docs}}
    visual = lambda d: d["img"]  # noqa: E731
    requests = [_request("what colour ?", {"until": []}, visual, 0), _request("what shape ?", {"until": []}, visual, 1)]
    requests.append(Instance("generate_until", ("what colour is it ?", {"until": []}, visual, 1, "u", "test"), 0,
                             {"task": "u", "doc_id": 1, "repeats": 1}))  # the same document, in task "u"
    lm.generate_until(requests)
    recorded = {task: list(values) for task, values in lm.visual_tokens_by_task.items()}
    assert sorted(recorded) == ["t", "u"] and len(recorded["t"]) == 2 and len(recorded["u"]) == 1
    assert sorted(lm.visual_tokens_per_layer) == sorted(recorded["t"] + recorded["u"])
    summary = lm.visual_token_summary()
    assert summary["per_task"] == {
        task: {"documents": len(v), "mean_visual_tokens_per_layer": sum(v) / len(v)} for task, v in recorded.items()}
    lm.clean()
    assert not hasattr(lm, "_model") and lm.visual_token_summary() == summary


@pytest.mark.parametrize("method", ["vispruner", "fastv"])
def test_a_method_given_without_a_budget_is_told_to_take_one(demo_folder, method):
    """The config's error named `pre_llm_keep_count` / `pruning_layers`, which `--model_args` refuses as unknown
    (a fix the wrapper itself then refused), without the rcp_llava prefix."""
    with pytest.raises(ValueError, match=rf"^rcp_llava: pruning_method='{method}' on '.*' \(saved with "
                                         r"pruning_method='rcp', pruning layers \[1, 2\]\): .* Give `budget=K` "
                                         r"\(visual tokens to keep, e\.g\. budget=64 or budget=1/9\): it sets the "
                                         r"method's layers and counts\.$"):
        _from_args(demo_folder, f"pruning_method={method}")
    assert _from_args(demo_folder, f"pruning_method={method},budget=4").model.config.pruning_method == method


@pytest.mark.parametrize("method", ["rcp", "attention_topk"])
def test_a_method_at_rcps_layers_on_a_checkpoint_without_them_is_not_told_to_take_a_budget(demo_folder, tmp_path,
                                                                                           method):
    """A budget cannot give such a method the pruning layers it needs: the advice failed in turn."""
    import shutil

    bare = tmp_path / "stock_like"
    shutil.copytree(demo_folder, bare)
    config = json.loads((bare / "config.json").read_text())
    config.update(pruning_method="none", pruning_layers=[], repair_layers=[], pruning_keep_counts=None)
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^rcp_llava: pruning_method='{method}' on '.*' \(saved with "
                                         r"pruning_method='none', pruning layers \[\]\): .* It prunes at the model's "
                                         r"RCP pruning layers, and '.*' has none: use a checkpoint with RCP plug-ins, "
                                         r"or another method\.$") as refused:
        _from_args(str(bare), f"pruning_method={method}")
    assert "budget=K" not in str(refused.value)
    # random can prune before the LLM: a budget is its way out there (the hint had told it to change checkpoints)
    with pytest.raises(ValueError, match=r"Give `budget=K` \(visual tokens to keep"):
        _from_args(str(bare), "pruning_method=random")
    assert _from_args(str(bare), "pruning_method=random,budget=4").model.config.pre_llm_keep_count == 4


@pytest.fixture(scope="module")
def stock_and_plugins(demo_folder, tmp_path_factory):
    """A real stock LLaVA folder (model_type 'llava', no plug-in weights) and the demo model's plug-ins beside it."""
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("stock")
    model = RcpLlavaForConditionalGeneration.from_pretrained(demo_folder)
    model.unload().save_pretrained(root / "stock")
    AutoProcessor.from_pretrained(demo_folder).save_pretrained(root / "stock")
    model.save_plugins(root / "plugins")
    assert json.loads((root / "stock" / "config.json").read_text())["model_type"] == "llava"
    return str(root / "stock"), str(root / "plugins")


def test_a_stock_checkpoint_without_plugins_runs_no_untrained_rcp(stock_and_plugins):
    """rcp on a stock checkpoint without `plugins=` ran on freshly initialised plug-ins (a warning in the log, an
    untrained pruner's scores in the results), where evaluate_methods.py refuses it before loading. The
    training-free methods run on it as before, at the default placement."""
    stock, plugins = stock_and_plugins
    with pytest.raises(ValueError, match=rf"^rcp_llava: pruning_method='rcp' runs the model's trained plug-ins, and "
                                         rf"'{re.escape(stock)}' is a stock LLaVA checkpoint, which has none: give "
                                         r"`plugins=`"):
        _from_args(stock, "pruning_method=rcp,budget=4")
    # with its plug-ins it runs (at their placement)
    assert _from_args(stock, f"plugins={plugins},pruning_method=rcp,pruning_keep_counts=6:3"
                      ).model.config.pruning_keep_counts == [6, 3]
    for args, method in (("pruning_method=attention_topk,budget=4", "attention_topk"),
                         ("pruning_method=attention_topk,pruning_keep_counts=6:3:2", "attention_topk"),
                         ("pruning_method=random,pruning_keep_counts=6:3:2", "random"),
                         ("pruning_method=vispruner,budget=4", "vispruner"), ("pruning_method=none", "none")):
        model = _from_args(stock, args).model
        assert model.config.pruning_method == method and not list(model.model.rcp_plugins.parameters()), args
    assert _from_args(stock, "pruning_method=random,pruning_keep_counts=6:3:2").model.config.pruning_keep_counts == [
        6, 3, 2]


def test_plugins_revision_without_plugins_is_refused(demo_folder):
    """It was dropped: the results named a plug-in revision that never loaded."""
    with pytest.raises(ValueError, match=r"^rcp_llava: `plugins_revision=v2` is the revision of `plugins`, and no "
                                         r"`plugins` is given; add `plugins=`"):
        _from_args(demo_folder, "plugins_revision=v2")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_dtype_keeps_the_plugins_float32(stock_and_plugins, demo_folder, dtype):
    """`model.to(device, dtype)` after loading cast the float32 plug-ins too: the model scored was not the one
    `from_pretrained(..., dtype=...)` / `from_base(..., dtype=...)` gives. Now it is, tensor for tensor."""
    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    stock, plugins = stock_and_plugins
    for lm, reference in (
            (_from_args(demo_folder, f"dtype={dtype}"),
             RcpLlavaForConditionalGeneration.from_pretrained(demo_folder, dtype=torch_dtype)),
            (_from_args(stock, f"plugins={plugins},dtype={dtype}"),
             RcpLlavaForConditionalGeneration.from_base(stock, plugins=plugins, dtype=torch_dtype))):
        ours = lm.model.state_dict()
        assert {p.dtype for n, p in lm.model.named_parameters() if n.startswith("model.rcp_plugins.")} == {
            torch.float32}
        assert lm.model.model.language_model.embed_tokens.weight.dtype == torch_dtype
        expected = reference.state_dict()
        assert ours.keys() == expected.keys()
        for name, tensor in expected.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_a_tokenizer_without_a_pad_token_pads_with_eos(demo_folder, tmp_path, caplog):
    """llava_hf runs such a checkpoint; the batched requests here failed at the first one ("Asking to pad but the
    tokenizer does not have a padding token"), in loglikelihood too. Padding is masked out: the answers are those
    of the same model with a pad token."""
    import logging
    import shutil

    from transformers import AutoProcessor

    from rcp_llava.demo import demo_image

    bare = tmp_path / "no_pad"
    shutil.copytree(demo_folder, bare)
    processor = AutoProcessor.from_pretrained(bare)
    processor.tokenizer.pad_token = None
    processor.save_pretrained(bare)
    docs = [{"img": [demo_image(seed=1)]}, {"img": [demo_image(seed=2)]}]
    visual = lambda d: d["img"]  # noqa: E731
    answers = []
    for folder in (demo_folder, bare):
        with caplog.at_level(logging.WARNING):
            lm = _from_args(folder, "pruning_method=random,budget=6,max_new_tokens=3", batch_size=2)
        lm.task_dict = {"t": {"test": docs}}
        answers.append(lm.generate_until([_request("what colour is the shape ?", {"until": []}, visual, 0),
                                          _request("what shape ?", {"until": []}, visual, 1)]))
        answers.append(lm.loglikelihood([type("R", (), {"args": ("what shape ?", " w1", visual, 1, "t", "test")})()]))
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token is not None
    assert f"rcp_llava: the tokenizer of {str(bare)!r} has no pad token; padding with its EOS token" in caplog.text
    assert answers[:2] == answers[2:]


@pytest.mark.parametrize("device, environ, expected", [
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "2", "RANK": "6"}, "cuda:2"),  # its own GPU, not every rank's cuda:0
    ("cuda", {}, "cuda"),
    ("cuda:1", {"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "cuda:1"),  # a device named by index is the user's
    ("cpu", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu"),
])
def test_each_data_parallel_rank_evaluates_on_its_own_gpu(device, environ, expected):
    """`accelerate launch -m lmms_eval --device cuda`: lmms-eval shards the requests by rank, but every rank put the
    model on cuda:0."""
    import torch

    from rcp_llava.lmms_eval_model import process_device

    assert process_device(device, environ) == torch.device(expected)


def test_a_bad_count_for_rcp_is_named_without_the_budget_hint(demo_folder):
    with pytest.raises(ValueError, match=r"^rcp_llava: `pruning_keep_counts=99:3` with pruning_method='rcp': "
                                         r"`pruning_keep_counts` \[99, 3\] asks to keep more than the 16 visual "
                                         r"tokens of an image; use counts <= 16\.$"):
        _from_args(demo_folder, "pruning_method=rcp,pruning_keep_counts=99:3")


def test_the_model_takes_its_device_from_process_device(demo_folder, monkeypatch):
    """The wiring of `process_device` (its rule is tested above): a rank's `--device cuda` goes through it."""
    import torch

    import rcp_llava.lmms_eval_model as wrapper

    seen = []
    monkeypatch.setattr(wrapper, "process_device", lambda device: seen.append(device) or torch.device("cpu"))
    lm = wrapper.RcpLlava(pretrained=demo_folder, device="cuda")
    assert seen == ["cuda"] and lm.device == torch.device("cpu")
