"""RCP as its authors built it (issue 15): placements counted from 0, the authors' losses and schedules, the adapters'
shared pruning context, the gradient floor, reproducible runs, one plug-in set per budget."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train_rcp
from conftest import IMAGE_TOKEN, NUM_VISUAL, make_batch, make_model, randomize_plugin_parameters
from configuration_rcp_llava import PAPER_PLACEMENTS, PRUNING_METHODS, RcpLlavaConfig, paper_placement
from modeling_rcp_llava import RENORM_GRAD_FLOOR, RcpLlavaForConditionalGeneration, floored_renorm, soft_key_mask_attention
from train_rcp import batch_sparsity_loss, gaussian_w2, gumbel_schedule, pooled_w2_repair_loss, target_retention_at


# -- placements ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget, layers", [(64, ([1, 13, 25], [22, 29])), (128, ([4, 14, 24], [22, 29])),
                                            (192, ([4, 14, 24], [22, 29]))])
def test_7b_placements_are_the_authors_0_based_layers(budget, layers):
    assert paper_placement(32, budget / 576) == layers
    assert RcpLlavaConfig.paper_placement(32, budget / 576) == layers


@pytest.mark.parametrize("budget, layers", [(64, ([1, 15, 27], [23, 35])), (128, ([3, 17, 32], [23, 35])),
                                            (192, ([3, 17, 32], [23, 35]))])
def test_13b_placements(budget, layers):
    assert paper_placement(40, budget / 576) == layers


def test_other_depths_scale_the_7b_placement_by_relative_depth():
    # l -> round(l * L / 32) half up; pruners >= 1 and strictly increasing; adapters >= the first pruner.
    assert paper_placement(16) == ([1, 7, 13], [11, 15])  # 0.5 -> 1, 6.5 -> 7, 12.5 -> 13; 11, 14.5 -> 15
    assert paper_placement(24) == ([1, 10, 19], [17, 22])
    assert paper_placement(24, 2 / 9) == ([3, 11, 18], [17, 22])
    assert paper_placement(4) == ([1, 2, 3], [3])  # two adapters collapse onto the last layer
    assert paper_placement(2) == ([1], [1])
    # The nearest paper budget decides: 1/9 and 0.15 -> 64's placement; 2/9 and 1/3 -> 128/192's.
    assert paper_placement(32, 0.15) == paper_placement(32, 1 / 9)
    assert paper_placement(32, 1 / 3) == paper_placement(32, 2 / 9) == ([4, 14, 24], [22, 29])
    assert set(PAPER_PLACEMENTS) == {32, 40}
    for bad, match in ((1, "`num_layers` must be an int >= 2"), ("32", "`num_layers` must be an int >= 2")):
        with pytest.raises(ValueError, match=match):
            paper_placement(bad)
    with pytest.raises(ValueError, match=r"`budget_fraction` must be a fraction .* got 0"):
        paper_placement(32, 0)


def test_rcp_defaults_follow_depth_and_budget():
    from conftest import tiny_config

    deep = dict(num_hidden_layers=32, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=100)
    config = tiny_config(pruning_layers=None, repair_layers=None, pruning_keep_counts=None, text_config=deep)
    assert (config.pruning_layers, config.repair_layers) == ([1, 13, 25], [22, 29])
    config = tiny_config(pruning_layers=None, repair_layers=None, pruning_keep_counts=None, text_config=deep,
                         visual_token_budget=NUM_VISUAL / 3)  # 1/3 of the tokens: the 192 placement
    assert (config.pruning_layers, config.repair_layers) == ([4, 14, 24], [22, 29])
    # Given pruners, default adapters start at or after the first one.
    config = tiny_config(pruning_layers=[24, 26], repair_layers=None, pruning_keep_counts=None, text_config=deep)
    assert config.repair_layers == [29]


def _stock_llava_folder(tmp_path, num_layers):
    """A stock `LlavaForConditionalGeneration` checkpoint of the tiny shape with `num_layers` decoder layers."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from conftest import tiny_config

    shape = tiny_config()
    text = dict(shape.text_config.to_dict(), num_hidden_layers=num_layers)
    config = LlavaConfig(text_config=text, vision_config=shape.vision_config.to_dict(),
                         image_token_index=IMAGE_TOKEN, image_seq_length=NUM_VISUAL)
    torch.manual_seed(0)
    folder = tmp_path / f"stock{num_layers}"
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("num_layers", [4, 24])
def test_shallow_stock_llava_loads_with_every_method_on_its_defaults(tmp_path, num_layers):
    """Issue 15 item 11: the default layers never exceed the model (they used to be the 7B's [2, 14, 26])."""
    folder = _stock_llava_folder(tmp_path, num_layers)
    batch = make_batch([(0, 3, True), (2, 4, True)])
    needs = {"vispruner": dict(pre_llm_keep_count=4), "random": dict(pre_llm_keep_count=4)}
    for method in PRUNING_METHODS:
        kwargs = dict(needs.get(method, {}))
        if method in ("fastv", "attention_topk"):
            layers = RcpLlavaConfig.paper_placement(num_layers)[0] if method == "attention_topk" else [2]
            kwargs["pruning_keep_counts"] = [8, 6, 4][: len(layers)]
        model = RcpLlavaForConditionalGeneration.from_pretrained(folder, pruning_method=method, **kwargs).eval()
        expected = {"rcp": paper_placement(num_layers), "attention_topk": (paper_placement(num_layers)[0], []),
                    "fastv": ([1 if num_layers <= 8 else 2], [])}.get(method, ([], []))
        assert (model.config.pruning_layers, model.config.repair_layers) == expected, method
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.logits).all(), method


# -- losses ---------------------------------------------------------------------------------------------


def test_pooled_repair_loss_hand_computed():
    # One dimension; teacher answer positions {0, 2} (pooled mean 1, std 1), student {1, 1, 1} over two samples.
    teacher = torch.tensor([[[0.0], [9.0]], [[2.0], [9.0]]])
    student = torch.tensor([[[1.0], [9.0]], [[1.0], [9.0]]])
    mask = torch.tensor([[True, False], [True, False]])
    loss = pooled_w2_repair_loss([student], [teacher], mask)
    assert loss.item() == pytest.approx((1 - 1) ** 2 + (0 - 1) ** 2, abs=1e-5)  # pooled: the spread is ACROSS samples
    # Per sample, each sample has one position: the spreads are 0 on both sides, only the means differ by 1.
    per_sample = gaussian_w2(student, teacher, mask)
    assert per_sample.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # Two layers average; mean-only drops the spread term; no marked position gives 0.
    assert pooled_w2_repair_loss([student, student + 3], [teacher, teacher], mask).item() == pytest.approx(
        (1.0 + (9 + 1)) / 2, abs=1e-4)
    assert pooled_w2_repair_loss([student], [teacher], mask, mean_only=True).item() == pytest.approx(0.0, abs=1e-6)
    assert pooled_w2_repair_loss([student], [teacher], torch.zeros_like(mask)).item() == 0.0
    # Two dimensions: Eq. (18)'s terms are means over D (a sum over D passed the one-dimensional cases above).
    # Student {0, 2} in both dimensions (mean 1, std 1), teacher {1, 1} (mean 1, std 0): (1^2 + 1^2) / 2 = 1.
    two = pooled_w2_repair_loss([torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])], [torch.ones(1, 2, 2)],
                                torch.ones(1, 2, dtype=torch.bool))
    assert two.item() == pytest.approx(1.0, abs=1e-5)


def test_pooled_repair_loss_two_ranks_equal_one_rank_with_the_whole_batch():
    torch.manual_seed(0)
    student = torch.randn(4, 5, 6, requires_grad=True)
    teacher = torch.randn(4, 5, 6)
    mask = torch.rand(4, 5) > 0.4
    whole = pooled_w2_repair_loss([student], [teacher], mask)
    whole.backward()
    grad_whole = student.grad.clone()

    def sums(s, t, m):
        w = m.unsqueeze(-1).float()
        per_side = [torch.cat([(h * w).sum((0, 1)), (h * h * w).sum((0, 1)), w.sum().view(1)]) for h in (s, t)]
        return per_side

    # Rank r holds rows [2r, 2r + 2); `all_reduce` adds the other rank's sums (what gloo's all_reduce returns).
    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        other = slice(2 - 2 * rank, 4 - 2 * rank)
        s_local = student.detach()[rows].clone().requires_grad_(True)
        other_sums = iter(sums(student.detach()[other], teacher[other], mask[other]))

        def all_reduce(tensor, other_sums=other_sums):
            return tensor + next(other_sums)

        local = pooled_w2_repair_loss([s_local], [teacher[rows]], mask[rows], all_reduce=all_reduce)
        assert local.item() == pytest.approx(whole.item(), rel=1e-5)
        local.backward()
        assert torch.allclose(s_local.grad, grad_whole[rows], atol=1e-6)  # this rank's share of the gradient


def test_batch_sparsity_loss_hand_computed():
    retention = torch.tensor([[1.0, 0.5, 0.25, 0.25], [1.0, 0.25, 0.25, 0.0], [1.0, 1.0, 1.0, 1.0]],
                             requires_grad=True)
    has_image = torch.tensor([True, True, False])
    # r_bar = 0.5 and 0.375 -> batch mean 0.4375; the imageless row is left out.
    loss = batch_sparsity_loss(retention, 0.25, has_image)
    assert loss.item() == pytest.approx(0.1875)
    loss.backward()
    assert torch.allclose(retention.grad[:2], torch.full((2, 4), 1 / 8))  # d|mean - r*| / dr = 1 / (2 rows * 4)
    assert torch.equal(retention.grad[2], torch.zeros(4))
    # One image above the target and one below cancel: the batch, not each image, meets the budget.
    balanced = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    assert batch_sparsity_loss(balanced, 0.25).item() == 0.0
    assert train_rcp.sparsity_loss(balanced, 0.25).item() == pytest.approx(0.25)
    assert batch_sparsity_loss(balanced, 0.25, torch.tensor([False, False])).item() == 0.0


@pytest.mark.parametrize("progress, tau, noise", [(0.0, 1.5, True), (0.3, 0.85, True), (0.6, 0.2, True),
                                                  (0.7, 0.2, True), (0.8, 0.2, False), (0.9, 0.2, False),
                                                  (1.0, 0.2, False)])
def test_gumbel_schedule_is_the_authors(progress, tau, noise):
    assert gumbel_schedule(progress) == (pytest.approx(tau), noise)


def test_gumbel_schedule_geometric_option_and_target_retention():
    assert gumbel_schedule(0.5, kind="geometric") == (pytest.approx(math.sqrt(1.5 * 0.2)), True)
    assert gumbel_schedule(1.0, kind="geometric") == (pytest.approx(0.2), True)
    with pytest.raises(ValueError, match="Unknown Gumbel schedule 'x'"):
        gumbel_schedule(0.5, kind="x")
    # r*: cosine from 1 to the target over the first 10% of training.
    assert target_retention_at(0.0, 0.1) == 1.0
    assert target_retention_at(0.05, 0.1) == pytest.approx(0.55)  # half-way: (1 - cos(pi / 2)) / 2 = 0.5
    assert target_retention_at(0.025, 0.1) == pytest.approx(1 - 0.9 * (1 - math.cos(math.pi / 4)) / 2)
    assert target_retention_at(0.1, 0.1) == target_retention_at(0.7, 0.1) == pytest.approx(0.1)
    assert target_retention_at(0.15, 0.1, warmup=0.3, kind="linear") == pytest.approx(0.55)


def test_eos_is_appended_to_the_answer_when_the_template_omits_it():
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.testbed import build_dataset, build_processor, get_preset

    processor = build_processor(get_preset("micro"))
    row = build_dataset("micro", seed=0)["train"][0]
    with_eos = RcpDataCollator(processor)([row])
    processor.chat_template = processor.tokenizer.chat_template = processor.chat_template.replace("</s> ", " ")
    assert "</s>" not in processor.chat_template
    appended = RcpDataCollator(processor)([row])
    eos = processor.tokenizer.eos_token_id
    for batch in (with_eos, appended):
        answer = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
        assert answer[-1] == eos and answer.count(eos) == 1
    assert torch.equal(with_eos["labels"], appended["labels"])


# -- the adapters' context --------------------------------------------------------------------------------


def _reference_contexts(model, batch, keep_masks):
    """Slow reference of Eqs. 9-10 from the mask layout's hidden states (every token in place)."""
    config = model.config
    with torch.no_grad(), model.pruning_layout("mask"):
        out = model(**batch, visual_keep_masks=keep_masks, output_hidden_states=True, use_cache=False)
    encoder = model.model.rcp_plugins.repair_context
    layers = model.model.language_model.layers
    points = config.pruning_layers
    contexts = {}
    for b in range(batch["input_ids"].shape[0]):
        image_slots = (batch["input_ids"][b] == IMAGE_TOKEN).nonzero().flatten().tolist()
        alive, pruned_states = [True] * NUM_VISUAL, []
        point_context = []
        for p, layer in enumerate(points):
            normed = layers[layer].input_layernorm(out.hidden_states[layer][b, image_slots])  # (N, d)
            for i in range(NUM_VISUAL):
                if alive[i] and not keep_masks[b, p, i]:
                    pruned_states.append(normed[i])
                    alive[i] = False
            masked = torch.tensor(alive, dtype=torch.float32).unsqueeze(-1) * encoder.positions  # m ⊙ P, (N, 64)
            weights = torch.softmax(masked @ encoder.mask_query / 8.0, 0)  # over all N: a pruned position scores 0
            e_mask = encoder.mask_proj(weights @ masked)
            mean = torch.stack(pruned_states).mean(0) if pruned_states else torch.zeros_like(normed[0])
            point_context.append(e_mask + encoder.pruned_proj(mean))
        for r in config.repair_layers:
            nearest = max(p for p, layer in enumerate(points) if layer <= r)
            contexts[(b, r)] = point_context[nearest]
    return contexts


def test_repair_context_reads_the_nearest_pruner_and_all_tokens_pruned_so_far():
    model = make_model(pruning_layers=[1, 2, 3], repair_layers=[2, 3], pruning_keep_counts=None)
    randomize_plugin_parameters(model)
    batch = make_batch([(0, 3, True), (2, 4, True)])
    g = torch.Generator().manual_seed(0)
    first = torch.rand(2, NUM_VISUAL, generator=g) < 0.7
    second = first & (torch.rand(2, NUM_VISUAL, generator=g) < 0.6)
    keep_masks = torch.stack([first, second, second & (torch.rand(2, NUM_VISUAL, generator=g) < 0.5)], 1)
    reference = _reference_contexts(model, batch, keep_masks)
    with torch.no_grad():
        out = model(**batch, visual_keep_masks=keep_masks, use_cache=True)  # physical discard
    stored = out.past_key_values.rcp_state.repair_contexts
    for (b, r), expected in reference.items():
        assert torch.allclose(stored[r][b], expected, atol=1e-5), (b, r)
    # Adapter 2 reads pruner 2 (not a mean over pruners 1 and 2), adapter 3 reads pruner 3: they differ.
    assert not torch.allclose(stored[2], stored[3], atol=1e-4)


def test_gradient_floor_keeps_the_forward_and_bounds_the_backward():
    torch.manual_seed(0)
    num, den = torch.randn(2, 3, 4, dtype=torch.float64), torch.rand(2, 3, 1, dtype=torch.float64) + 1e-12
    assert torch.equal(floored_renorm(num, den), num / den)
    # Above the floor the backward is the exact gradient of num / den (its sign and size: the kept-mass term trains
    # the pruners); below it, the same with den replaced by the floor.
    den = torch.tensor([[[0.5]], [[2.0]], [[1e-4]]], dtype=torch.float64).expand(3, 3, 1).clone()
    num = torch.randn(3, 3, 4, dtype=torch.float64)
    weight = torch.randn(3, 3, 4, dtype=torch.float64)
    got = torch.autograd.grad((floored_renorm(num.requires_grad_(), den.requires_grad_(), 1e-3) * weight).sum(),
                              (num, den))
    floored_den = den.detach().clamp_min(1e-3)
    want = torch.autograd.grad((num / floored_den.requires_grad_() * weight).sum(), (num, floored_den))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert (got[1][:2] != 0).all()
    # A row whose kept attention mass is 1e-12: key 0 kept (score -27.6 below key 1), key 1 dropped.
    query = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    query[..., 0] = 1.0
    key = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    key[0, 0, 1, 0] = math.log(1e12)
    value = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out, _ = soft_key_mask_attention(None, query, key, value, None, scaling=1.0, rcp_key_keep=keep)
    assert torch.allclose(out[0, 0, 0], value[0, 0, 0], atol=1e-9)  # exactly the kept token's value
    out.sum().backward()
    floored = keep.grad.abs().max().item()
    # Without the floor: dL/dM_1 = -w_1 (v_1 - out) / (w_0 M_0) ~ 1e12.
    keep.grad = None
    w = torch.softmax(torch.tensor([0.0, math.log(1e12)], dtype=torch.float64), 0)
    unfloored = (w[1] * (value[0, 0, 1] - value[0, 0, 0]) / (w[0] * 1.0)).abs().sum().item()
    assert unfloored > 1e11 and floored <= 2 * (value.abs().max().item() * 2) / RENORM_GRAD_FLOOR + 1
    assert floored < 1e5


# -- reproducibility and per-budget sets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    from rcp_llava.testbed import build_testbed

    return build_testbed("micro", output_dir=tmp_path_factory.mktemp("fidelity") / "testbed", pruning_eval=False)


def _job(folder, out, *extra):
    return ["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
            "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8",
            "--repair_bottleneck_size", "8", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
            "--max_eval_samples", "4", "--save_strategy", "no", *extra]


def test_the_same_seed_gives_bit_identical_plugins(micro_folder, tmp_path):
    runs = []
    for name in ("a", "b"):
        train_rcp.main(_job(micro_folder, tmp_path / name, "--seed", "3", "--budget_fraction", "0.25"))
        runs.append(load_file(tmp_path / name / "plugins" / "rcp_plugins.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    train_rcp.main(_job(micro_folder, tmp_path / "c", "--seed", "4", "--budget_fraction", "0.25"))
    other = load_file(tmp_path / "c" / "plugins" / "rcp_plugins.safetensors")
    assert any(not torch.equal(runs[0][k], other[k]) for k in other)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    norms = json.loads((tmp_path / "a" / "grad_norms.json").read_text())
    assert len(norms) == 2 and metrics["grad_norm"]["max"] == max(norms) and metrics["seed"] == 3


def test_one_plugin_set_per_budget(micro_folder, tmp_path):
    results = train_rcp.main(_job(micro_folder, tmp_path, "--budgets", "1/4,1/8", "--calibrate_retention"))
    assert list(results) == ["1/4", "1/8"]
    for label, folder, budget in (("1/4", "budget_1_4", 16.0), ("1/8", "budget_1_8", 8.0)):
        config = json.loads((tmp_path / folder / "plugins" / "rcp_config.json").read_text())
        assert config["visual_token_budget"] == budget
        saved = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert saved["visual_token_budget"] == budget and saved == results[label]
        calibration = saved["calibration"]
        assert calibration["n"] == 4 and calibration["target"] == pytest.approx(budget / 64)
    assert json.loads((tmp_path / "budgets.json").read_text()) == results
    # The calibration script on a trained set: before / after on the test split, the shift kept in the JSON.
    from conftest import load_benchmark

    out = load_benchmark("calibrate_retention").main([
        "--model", str(tmp_path / "budget_1_4" / "model"), "--data", str(micro_folder / "dataset"),
        "--output_dir", str(tmp_path / "cal"), "--name", "c"])
    saved = json.loads((tmp_path / "cal" / "c.json").read_text())
    assert saved["after"]["retention"] == out["after"]["retention"] and 0 <= saved["after"]["accuracy"] <= 1
    assert "| after |" in (tmp_path / "cal" / "c.md").read_text()


def test_fixed_count_training(micro_folder, tmp_path):
    metrics = train_rcp.main(_job(micro_folder, tmp_path, "--pruning_keep_counts", "7"))
    assert json.loads((tmp_path / "plugins" / "rcp_config.json").read_text())["pruning_keep_counts"] == [7]
    assert metrics["rcp"]["kept_per_pruning_layer"] == [7.0]


def test_plugin_counts_at_the_authors_widths_match_the_paper():
    """Default widths (pruner 512 / 4 heads, bottleneck 512, one shared context encoder): our live parameters, and
    with the parameters the authors' code allocates but never uses added back, exactly the paper's counts."""
    from conftest import load_benchmark

    plugin_params = load_benchmark("plugin_params")
    c7, c13 = plugin_params.counts("LLaVA-1.5-7B"), plugin_params.counts("LLaVA-1.5-13B")
    assert (c7["pruners"], c7["adapters"]) == (14_982_201, 15_811_650)
    assert (round(c7["pruners_paper_count"] / 1e3), round(c7["adapters_paper_count"] / 1e3)) == (16_558, 20_147)
    # 13B: the paper prints 19.70M + 24.87M (authors-code-facts: 19.705M + 24.868M; we count 19.704M + 24.868M).
    assert (round(c13["pruners_paper_count"] / 1e4), round(c13["adapters_paper_count"] / 1e4)) == (1_970, 2_487)
    assert (c7["pruning_layers"], c7["repair_layers"]) == ([1, 13, 25], [22, 29])


def test_ablation_variants_of_the_earlier_recipe_patch_and_restore():
    import modeling_rcp_llava as m
    from conftest import load_benchmark

    ablations = load_benchmark("ablations")
    flags, _, trained = ablations.variant_spec("old_recipe")
    assert trained and flags == ["--repair_loss_pooling", "sample", "--sparsity_reduction", "sample",
                                 "--sparsity_schedule", "linear", "--sparsity_warmup_ratio", "0.3",
                                 "--gumbel_schedule", "geometric"]
    assert ablations.variant_spec("lambda_repair=40")[0] == ["--lambda_repair", "40"]
    assert ablations.variant_spec("clip=0")[0] == ["--max_grad_norm", "0"]
    with ablations.patched("old_recipe"):
        model = make_model()
        assert model.model.rcp_plugins.repair_adapters["2"].gate.item() == 0.0
        assert model.model.rcp_plugins.pruners["1"].bias.item() == 0.0
        assert m.RENORM_GRAD_FLOOR < 1e-30
    assert (m.RcpRepairAdapter.gate_init, m.RcpPruner.bias_init, m.RENORM_GRAD_FLOOR) == (0.1, 2.0, 1e-3)
    with pytest.raises(ValueError, match="Unknown variant 'old'"):
        ablations.variant_spec("old")


def test_help_renders(capsys):
    """argparse formats help strings with %: a bare percent sign in a field's help crashes `--help`."""
    with pytest.raises(SystemExit) as exit_info:
        train_rcp.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--budgets", "--calibrate_retention", "--repair_loss_pooling", "--gumbel_schedule", "--detach_prior"):
        assert flag in out, flag


def test_floored_renorm_passes_no_gradient_where_nothing_was_kept():
    """A row whose kept mass is exactly 0 (no kept key): the forward clamps it, and no gradient (never NaN) flows
    to its denominator, with the floor and without it (floor = tiny, the division as it was before)."""
    for floor in (RENORM_GRAD_FLOOR, torch.finfo(torch.float32).tiny):
        num = torch.zeros(1, 2, 3, requires_grad=True)
        den = torch.tensor([[[0.0], [0.5]]], requires_grad=True)
        out = floored_renorm(num, den, floor)
        assert out.tolist() == [[[0.0] * 3, [0.0] * 3]], floor  # 0 / 0 is 0 (the clamp), not NaN
        out.sum().backward()
        assert torch.isfinite(den.grad).all() and torch.isfinite(num.grad).all(), floor
        assert den.grad[0, 0, 0] == 0.0 and den.grad[0, 1, 0] == 0.0  # num = 0: nothing to move either


def test_an_explicit_zero_floor_is_the_plain_division_not_the_default():
    """`floor=0.0` asks for no floor (the exact gradient -sum(num) / den^2); `floor or default` read it as "not
    given" and divided by the default 1e-3 squared, a gradient 1e4 times too small at den = 1e-5."""
    num = torch.tensor([[1.0, 2.0]])
    for floor, expected in ((0.0, -3.0 / 1e-10), (None, -3.0 / RENORM_GRAD_FLOOR ** 2)):
        den = torch.tensor([[1e-5]], requires_grad=True)
        floored_renorm(num, den, floor).sum().backward()
        assert den.grad.item() == pytest.approx(expected, rel=1e-5), floor


def test_the_renormalisation_keeps_a_half_precision_kept_mass_below_its_smallest_normal():
    """float16's smallest normal number is 6.1e-5: a kept mass below it (a query whose attention sits on a dropped
    key) was clamped up to it in float16, so the training layout's output shrank by the ratio (0.40 off the
    physical discard at a kept mass of 3.3e-5, 0.91 at 4.5e-6). The division now runs in float32."""
    num = torch.tensor([[2.0 ** -16, -(2.0 ** -17)]], dtype=torch.float16)
    den = torch.tensor([[2.0 ** -16]], dtype=torch.float16)  # 1.5e-5: a float16 subnormal, exactly
    out = floored_renorm(num, den)
    assert out.dtype == torch.float16
    assert torch.equal(out, (num.float() / den.float()).half())
    assert out.tolist() == [[1.0, -0.5]]

    class Module:
        num_key_value_groups = 1

    head_dim = 8
    query, key = torch.zeros(1, 1, 1, head_dim), torch.zeros(1, 1, 3, head_dim)
    query[..., 0] = 1.0
    key[..., 1, 0] = 11.0 * head_dim ** 0.5  # the dropped key scores 11 above the two kept ones: kept mass 3.3e-5
    value = torch.randn(1, 1, 3, head_dim, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[1.0, 0.0, 1.0]])
    out, _ = soft_key_mask_attention(Module(), query.half(), key.half(), value.half(), None, scaling=head_dim ** -0.5,
                                     rcp_key_keep=keep.half())
    discard = (value[..., 0, :] + value[..., 2, :]) / 2  # attention over the kept keys alone (equal scores)
    assert (out.float().squeeze() - discard.squeeze()).abs().max() < 5e-3


def test_a_repair_after_a_point_that_dropped_nothing_reads_a_zero_pruned_mean():
    """A pruning point that keeps every candidate (count 16 of 16) has pruned nothing yet: the adapters' context
    reads the pruned tokens' mean as 0 (the count clamped at 1, Eq. 10), not 0 / 0 -- which made every logit NaN."""
    model = make_model(randomize_plugins=True, pruning_layers=[1, 2], repair_layers=[1, 3], pruning_keep_counts=[16, 5])
    with torch.no_grad():
        out = model(**make_batch([(2, 3, True)]))
    assert out.logits.isfinite().all()
    assert out.keep_masks[0, 0].all() and out.keep_masks[0, 1].sum() == 5
