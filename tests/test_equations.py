"""The plug-ins' forwards and the training mask's gradient against the paper's equations, written out by hand (per
row, per head, in float64): Eqs. 1-5 of the pruner, Eqs. 11-15 of the repair adapter and the straight-through
gradient of Eqs. 6-7. The init and the whole-model behaviour are pinned elsewhere (test_fidelity, test_contract);
these pin the formulas themselves."""

import math

import torch
import torch.nn.functional as F
from conftest import NUM_VISUAL, make_batch, make_model

from modeling_rcp_llava import RcpPruner, RcpRepairAdapter, _top_k_mask


def _randomized(module, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module.eval()


def test_pruner_forward_is_eqs_1_to_5():
    d, p, heads, nq = 12, 8, 2, 4
    pruner = _randomized(RcpPruner(d, p, heads, nq, query_dropout=0.2, dropout=0.2).double())
    g = torch.Generator().manual_seed(1)
    visual = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    visual_valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    question = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    question_valid = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    prior = torch.randn(2, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = pruner(visual, visual_valid, question, question_valid, prior)
        for b in range(2):
            q_mean = question[b][question_valid[b]].mean(0)  # Eq. (1): the question's mean state
            queries = pruner.queries + pruner.question_norm(pruner.question_proj(q_mean))  # (Nq, p)
            tokens = pruner.visual_proj(visual[b][visual_valid[b]])  # the alive tokens only: (K', p)
            hd = p // heads
            attn = sum(torch.softmax(pruner.attn_q(queries)[:, h * hd:(h + 1) * hd]
                                     @ pruner.attn_k(tokens)[:, h * hd:(h + 1) * hd].T / math.sqrt(hd), -1)
                       for h in range(heads)) / heads  # Eq. (2): heads averaged, (Nq, K')
            cross = attn.T @ pruner.aggregate.weight[0] + pruner.aggregate.bias[0]  # learned reduction over queries
            token = pruner.token_mlp(tokens).squeeze(-1)  # Eq. (3)
            expected = prior[b][visual_valid[b]] + cross + token + pruner.bias  # Eq. (5)
            torch.testing.assert_close(logits[b][visual_valid[b]], expected, rtol=0, atol=1e-12)
    assert torch.isneginf(logits[~visual_valid]).all()


def test_query_dropout_zeroes_that_share_of_query_rows_without_rescaling():
    """Training mode with query_dropout 0.2: about a fifth of the (sample, query) rows enter Eq. (2) as zeros and
    the rest exactly as at inference (whole queries dropped, no 1 / (1 - p) rescaling)."""
    d, p, heads, nq, bsz = 12, 8, 2, 64, 32
    pruner = _randomized(RcpPruner(d, p, heads, nq, query_dropout=0.2, dropout=0.0).double())
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(bsz, 5, d, generator=g, dtype=torch.float64), torch.ones(bsz, 5, dtype=torch.bool),
            torch.randn(bsz, 3, d, generator=g, dtype=torch.float64), torch.ones(bsz, 3, dtype=torch.bool),
            torch.zeros(bsz, 5, dtype=torch.float64))
    seen = []
    pruner.attn_q.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        pruner(*args)  # eval: every query
        pruner.train()
        torch.manual_seed(0)
        pruner(*args)
    full, dropped = seen  # (B, Nq, p) each
    zero = (dropped == 0).all(-1)  # (B, Nq)
    assert 0.15 < zero.float().mean().item() < 0.25  # 2048 rows: 0.2 +- 0.05 is 5.6 standard deviations
    assert zero.any(1).all() and (~zero).any(1).all()  # per query, not per sample (a sample keeps all 64: 0.8^64)
    assert torch.equal(dropped[~zero], full[~zero])


def test_repair_adapter_forward_is_eqs_11_to_15_at_answer_positions_only():
    d, b = 12, 6
    adapter = _randomized(RcpRepairAdapter(d, b).double(), scale=0.3)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, d, generator=g, dtype=torch.float64)
    context = torch.randn(2, b, generator=g, dtype=torch.float64)
    answer = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]]).bool()
    with torch.no_grad():
        out = adapter(hidden, context, answer)
        cond = context[:, None] + adapter.query_proj(hidden)  # Eq. (11)
        gamma, beta = 1 + adapter.film_gamma(cond), adapter.film_beta(cond)  # Eqs. (12), (13)
        delta = adapter.gate * adapter.up(gamma * F.gelu(adapter.down(hidden)) + beta)  # Eq. (14)
        expected = hidden + answer[..., None].double() * delta  # Eq. (15)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        # A row whose context is NaN (nothing to repair it from) and that has no answer position stays as it was:
        # `NaN * 0` would have spread the NaN into it.
        context[0] = float("nan")
        out = adapter(hidden, context, torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1]]).bool())
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[1], expected[1])


def test_training_mask_gradient_is_the_straight_through_sigmoid_of_eqs_6_7():
    """One pruner before layer 1 of 4, no noise, tau 0.5: the hard mask (logit > 0) in the forward, and
    d(sum of the layers' retention) / d logit_i = (3 / N) sigma'(x_i / tau) / tau in the backward (three layers
    read the mask; retention is the kept fraction of N)."""
    model = make_model(pruning_layers=[1], repair_layers=[], pruning_keep_counts=None, randomize_plugins=True)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pruner = model.model.rcp_plugins.pruners["1"]
    pruner.query_dropout = 0.0
    captured = {}

    def keep_logits(module, args, output):
        if output.requires_grad:
            output.retain_grad()
        captured["logits"] = output

    pruner.register_forward_hook(keep_logits)
    tau, batch = 0.5, make_batch([(2, 4, True)])
    with model.pruning_layout("mask"):
        with torch.no_grad():  # centre the logits on 0 with the bias (Eq. 5), so the mask keeps some tokens
            model(**batch, gumbel_temperature=tau, gumbel_noise=False, use_cache=False)
            pruner.bias -= captured["logits"][0].median() - 0.01
        out = model(**batch, gumbel_temperature=tau, gumbel_noise=False, use_cache=False)
    logits = captured["logits"][0].detach()
    kept = int((logits > 0).sum())
    assert 0 < kept < NUM_VISUAL  # a real selection
    assert out.layer_retention[0].tolist() == [1.0] + [kept / NUM_VISUAL] * 3  # the hard mask, cumulative
    out.layer_retention.sum().backward()
    s = torch.sigmoid(logits / tau)
    torch.testing.assert_close(captured["logits"].grad[0], 3 / NUM_VISUAL * s * (1 - s) / tau, rtol=1e-5, atol=1e-9)


def test_top_k_ties_keep_the_lower_index_among_valid_tokens():
    """A fixed-count selection with tied scores keeps the earliest tokens (a stable sort), never a padded one:
    the same kept set on every run and in every batch layout."""
    assert _top_k_mask(torch.tensor([[.5, .5, .5, .5, .9]]), torch.ones(1, 5, dtype=torch.bool), 3).tolist() == [
        [True, True, False, False, True]]
    scores = torch.zeros(2, 600)
    scores[:, ::7] = 1.0  # 86 high tokens, 514 tied low ones
    valid = torch.ones(2, 600, dtype=torch.bool)
    valid[1, :10] = False  # left padding
    mask = _top_k_mask(scores, valid, 200)
    for row in range(2):
        alive = [i for i in range(600) if valid[row, i]]
        high = [i for i in alive if i % 7 == 0]
        expected = set(high + [i for i in alive if i % 7][:200 - len(high)])
        assert set(mask[row].nonzero().flatten().tolist()) == expected
    # k above a row's alive tokens keeps exactly those, not padding ranked after them
    assert torch.equal(_top_k_mask(scores, valid, 595)[1], valid[1])

