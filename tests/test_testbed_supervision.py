"""The testbed's attention supervision: which rows are supervised, towards which positions, and the loss value."""

import math

import numpy as np
import torch

from rcp_llava.testbed.scenes import COLOURS, SHAPES
from rcp_llava.testbed.supervision import HOPS, attention_supervision_loss, attention_targets


N = 6  # visual tokens
# patches 0-1: red triangle; 2: red circle; 3: blue triangle; 4-5 background
LABELS = {
    "colour": np.array([1 + list(COLOURS).index(c) if c else 0 for c in ("red", "red", "red", "blue", None, None)]),
    "shape": np.array([1 + SHAPES.index(s) if s else 0
                       for s in ("triangle", "triangle", "circle", "triangle", None, None)]),
    "size": np.zeros(N, dtype=np.int64),
}


def _prompt(question_words, answer="red", pad=0):
    tokens = ["USER", ":", *["<image>"] * N, *question_words, "?", "ASSISTANT", ":", answer, "</s>"]
    tokens += ["<pad>"] * pad
    mask = torch.tensor([[1] * (len(tokens) - pad) + [0] * pad])
    is_image = torch.tensor([[t == "<image>" for t in tokens]])
    return tokens, mask, is_image


def _positions(target_row):
    return target_row.nonzero().flatten().tolist()


def test_targets_of_a_two_word_phrase():
    tokens, mask, is_image = _prompt(["is", "there", "a", "red", "triangle"], answer="yes", pad=2)
    t = attention_targets([tokens], mask, is_image, [LABELS])
    first = 2  # visual token j sits at position 2 + j
    red, triangle, colon = tokens.index("red"), tokens.index("triangle"), len(tokens) - 2 - 3
    assert tokens[colon] == ":" and tokens[colon - 1] == "ASSISTANT"
    rows, targets = t["lookup"]
    assert rows.tolist() == [[0, red], [0, triangle]]
    assert _positions(targets[0]) == [first + j for j in (0, 1, 2)]  # every red patch
    assert _positions(targets[1]) == [first + j for j in (0, 1, 3)]  # every triangle patch
    rows, targets = t["referent"]
    assert rows.tolist() == [[0, triangle]] and _positions(targets[0]) == [first, first + 1]  # the red triangle
    rows, targets = t["readout"]
    assert rows.tolist() == [[0, colon]] and _positions(targets[0]) == [triangle]
    assert targets.shape[1] == len(tokens) - 2, "targets span the unpadded length of the longest row"


def test_targets_follow_the_pruned_layout():
    tokens, mask, is_image = _prompt(["what", "colour", "is", "the", "triangle"], answer="red")
    keep = torch.tensor([[False, True, True, False, True, True]])  # drops patches 0 and 3
    t = attention_targets([tokens], mask, is_image, [LABELS], keep=keep)
    first, shift = 2, 2
    triangle = tokens.index("triangle") - shift
    rows, targets = t["lookup"]
    # attribute words of the answers are looked up too (a later turn reads them as context)
    assert rows.tolist() == [[0, triangle], [0, tokens.index("red") - shift]]
    assert _positions(targets[0]) == [first]  # patch 1 is now the first visual token; 0 and 3 are gone
    assert _positions(targets[1]) == [first, first + 1]  # the red patches 1 and 2
    rows, targets = t["referent"]
    assert rows.tolist()[0] == [0, triangle] and _positions(targets[0]) == [first]
    rows, targets = t["readout"]
    assert rows.tolist() == [[0, len(tokens) - 3 - shift]] and _positions(targets[0]) == [triangle]
    assert targets.shape[1] == len(tokens) - shift


def test_absent_referent_is_not_supervised():
    # "blue circle" does not exist: the words are looked up, the phrase has no referent, the readout still points
    # at the phrase's last word
    tokens, mask, is_image = _prompt(["is", "there", "a", "blue", "circle"], answer="no")
    t = attention_targets([tokens], mask, is_image, [LABELS])
    assert len(t["lookup"][0]) == 2 and len(t["referent"][0]) == 0 and len(t["readout"][0]) == 1
    assert _positions(t["readout"][1][0]) == [tokens.index("circle")]


def test_loss_is_minus_log_mass_summed_over_hops():
    tokens, mask, is_image = _prompt(["is", "there", "a", "red", "triangle"], answer="yes")
    t = attention_targets([tokens], mask, is_image, [LABELS])
    length = len(tokens)
    # uniform attention over the whole row in every layer and head
    attn = torch.full((1, 2, length, length), 1.0 / length)
    layers = (0, 1, 1)
    expected = 0.0
    for hop in HOPS:
        _, targets = t[hop]
        expected += np.mean([-math.log(int(row.sum()) / length) for row in targets])
    loss = attention_supervision_loss((attn, attn), t, layers)
    assert abs(float(loss) - expected) < 1e-6
    # all the mass on the targets -> zero loss; the loss reads head 0 only
    perfect = torch.zeros(1, 2, length, length)
    for hop in HOPS:
        rows, targets = t[hop]
        for (b, q), target in zip(rows.tolist(), targets):
            perfect[b, 0, q] = target.float() / target.sum()
    assert float(attention_supervision_loss((perfect, perfect), t, layers)) < 1e-6
    perfect[:, 0], perfect[:, 1] = perfect[:, 1].clone(), perfect[:, 0].clone()
    assert float(attention_supervision_loss((perfect, perfect), t, layers)) > 5


def test_rows_keep_their_sample_and_each_hop_reads_its_own_layer():
    """Every test above has one sample and gives each hop the same attention: rows all labelled sample 0, or every
    hop read at the first hop's layer, passed them (a mutation audit). Two samples of other lengths (right padding):
    each row is its sample's, as alone; and the loss reads each hop at its own layer."""
    import torch.nn.functional as F

    prompts = [_prompt(["is", "there", "a", "red", "triangle"], answer="yes"),
               _prompt(["what", "colour", "is", "the", "small", "circle"], answer="red")]
    width = max(len(tokens) for tokens, _, _ in prompts)
    tokens = [t + ["<pad>"] * (width - len(t)) for t, _, _ in prompts]
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m, _ in prompts])
    is_image = torch.cat([F.pad(i, (0, width - i.shape[1])) for _, _, i in prompts])
    both = attention_targets(tokens, mask, is_image, [LABELS, LABELS])
    for b, prompt in enumerate(prompts):
        alone = attention_targets([prompt[0]], prompt[1], prompt[2], [LABELS])
        for hop in HOPS:
            rows, targets = both[hop]
            mine = rows[:, 0] == b
            assert mine.any(), hop
            assert rows[mine, 1].tolist() == alone[hop][0][:, 1].tolist(), hop
            assert torch.equal(targets[mine][:, :alone[hop][1].shape[1]], alone[hop][1]), hop
    # layer 0 uniform, layer 1 all mass on the targets: only the hops read at layer 0 cost anything
    t = attention_targets([prompts[0][0]], prompts[0][1], prompts[0][2], [LABELS])
    length = len(prompts[0][0])
    uniform = torch.full((1, 1, length, length), 1.0 / length)
    perfect = torch.zeros(1, 1, length, length)
    for hop in HOPS:
        for (b, q), target in zip(t[hop][0].tolist(), t[hop][1]):
            perfect[b, 0, q] = target.float() / target.sum()
    cost = {hop: np.mean([-math.log(int(row.sum()) / length) for row in t[hop][1]]) for hop in HOPS}
    for layers in ((0, 1, 1), (1, 0, 0), (1, 0, 1)):
        expected = sum(cost[hop] for hop, layer in zip(HOPS, layers) if layer == 0)
        loss = attention_supervision_loss((uniform, perfect), t, layers)
        assert abs(float(loss) - expected) < 1e-5 and expected > 1, layers


# the same scene with sizes: patches 0-1 small, 2-3 large (1 = "small", 2 = "large", as `Scene.patch_labels`)
SIZED = {**LABELS, "size": np.array([1, 1, 2, 2, 0, 0])}


def _rows(t, hop, tokens):
    """`[(query word, [target positions])]` of one hop."""
    return [(tokens[q], _positions(target)) for (_, q), target in zip(t[hop][0].tolist(), t[hop][1])]


def test_plural_and_size_words_are_looked_up():
    """A plural ("circles") is its shape and "small" is size value 1: plurals were dropped from the vocabulary, and
    the size values swapped ("small" pointing at the large patches), and no test noticed (a mutation audit)."""
    tokens, mask, is_image = _prompt(["how", "many", "circles", "are", "there"], answer="one")
    t = attention_targets([tokens], mask, is_image, [SIZED])
    assert _rows(t, "lookup", tokens) == [("circles", [4])]  # the circle is patch 2, at position 2 + 2
    assert _rows(t, "referent", tokens) == [("circles", [4])]
    assert _rows(t, "readout", tokens) == [(":", [tokens.index("circles")])]
    tokens, mask, is_image = _prompt(["what", "colour", "is", "the", "small", "triangle"], answer="red")
    t = attention_targets([tokens], mask, is_image, [SIZED])
    assert _rows(t, "lookup", tokens) == [("small", [2, 3]), ("triangle", [2, 3, 5]), ("red", [2, 3, 4])]
    assert _rows(t, "referent", tokens) == [("triangle", [2, 3]), ("red", [2, 3, 4])]


def test_only_the_colon_of_assistant_is_a_readout():
    """A two-turn conversation: the readout rows are the `:` after each `ASSISTANT`, never the `:` after the second
    `USER` (a mutation audit: without the ASSISTANT check it was supervised to read out the first answer)."""
    first = ["USER", ":", *["<image>"] * N, "what", "colour", "is", "the", "circle", "?", "ASSISTANT", ":", "red",
             "</s>"]
    second = ["USER", ":", "how", "many", "triangles", "are", "there", "?", "ASSISTANT", ":", "three", "</s>"]
    tokens = first + second
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    is_image = torch.tensor([[t == "<image>" for t in tokens]])
    t = attention_targets([tokens], mask, is_image, [LABELS])
    colons = [i for i, w in enumerate(tokens) if w == ":" and tokens[i - 1] == "ASSISTANT"]
    assert colons == [15, 27] and tokens[19] == ":"  # 19: the second USER's
    assert t["readout"][0].tolist() == [[0, 15], [0, 27]]
    assert _rows(t, "readout", tokens) == [(":", [tokens.index("circle")]), (":", [tokens.index("triangles")])]


def test_a_word_of_an_absent_attribute_is_not_looked_up():
    """"green" matches no patch: it gets no lookup row. Rows with an empty target (a mutation audit: the
    `if len(target)` check dropped) cost -log(1e-6) each: this prompt's loss was 11.24 instead of 5.78."""
    tokens, mask, is_image = _prompt(["is", "there", "a", "green", "circle"], answer="no")
    t = attention_targets([tokens], mask, is_image, [LABELS])
    assert _rows(t, "lookup", tokens) == [("circle", [4])]
    length = len(tokens)
    attn = torch.full((1, 1, length, length), 1.0 / length)
    loss = attention_supervision_loss((attn, attn, attn), t, (0, 1, 2))
    assert abs(float(loss) - 2 * math.log(length)) < 1e-5  # lookup and readout: one target each


def test_a_hop_without_rows_does_not_end_the_loss():
    """"blue circle" has no referent: the referent hop has no rows and is skipped, the readout after it still counts
    (a mutation audit: `break` for `continue` dropped every later hop, halving this loss); and a prompt with no
    supervised row at all gives a zero tensor, not None."""
    tokens, mask, is_image = _prompt(["is", "there", "a", "blue", "circle"], answer="no")
    t = attention_targets([tokens], mask, is_image, [LABELS])
    assert [len(t[hop][0]) for hop in HOPS] == [2, 0, 1]
    length = len(tokens)
    attn = torch.full((1, 1, length, length), 1.0 / length)
    loss = attention_supervision_loss((attn, attn, attn), t, (0, 1, 2))
    assert abs(float(loss) - 2 * math.log(length)) < 1e-5  # lookup (1 target per row) + readout (1 target)
    tokens, mask, is_image = _prompt(["how", "many", "are", "there"], answer="two")
    t = attention_targets([tokens], mask, is_image, [LABELS])
    assert [len(t[hop][0]) for hop in HOPS] == [0, 0, 0]
    length = len(tokens)
    attn = torch.full((1, 1, length, length), 1.0 / length)
    loss = attention_supervision_loss((attn,), t, (0, 0, 0))
    assert isinstance(loss, torch.Tensor) and loss.shape == () and float(loss) == 0.0


def test_a_phrase_at_the_very_end_of_the_sequence_gets_its_referent():
    """A row that ends on an attribute word (the longest of a batch, no EOS or padding after it): its phrase is
    closed after the last token. Looping over the tokens only (a mutation audit) lost that referent row."""
    tokens, mask, is_image = _prompt(["what", "colour", "is", "the", "circle"], answer="red")
    tokens, mask, is_image = tokens[:-1], mask[:, :-1], is_image[:, :-1]  # no "</s>"
    assert tokens[-1] == "red"
    t = attention_targets([tokens], mask, is_image, [LABELS])
    assert _rows(t, "referent", tokens) == [("circle", [4]), ("red", [2, 3, 4])]


def test_head_probe_equals_eager_output_attentions():
    """The supervised heads' probabilities beside the sdpa kernel (`HeadAttentionProbe`) are eager attention's head 0:
    same loss, same gradients, on a real testbed batch (micro preset, right-padded, pruned subsets)."""
    import dataclasses

    from rcp_llava.testbed.evaluate import pruned_inputs
    from rcp_llava.testbed.presets import get_preset
    from rcp_llava.testbed.supervision import HeadAttentionProbe
    from rcp_llava.testbed.text import build_processor
    from rcp_llava.testbed.train import TRAIN_FAMILIES, ChatCollator, SceneStream, new_model

    preset = dataclasses.replace(get_preset("micro"), text_heads=4, supervised_layers=(0, 1, 1))
    processor = build_processor(preset)
    items = SceneStream(preset, 0, "warmup", 4, turns=2, families=TRAIN_FAMILIES, subset=True)
    batch = ChatCollator(processor, attention_targets=True)([items[i] for i in range(4)])
    targets, keep = batch.pop("attention_targets"), batch.pop("keep")
    assert batch["attention_mask"].min() == 0  # right padding is exercised

    def loss_and_grads(model, use_probe):
        model.zero_grad()
        inputs = pruned_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], keep,
                               labels=batch["labels"], padding_side="right")
        if use_probe:
            with HeadAttentionProbe(model, preset.supervised_layers) as probe:
                model(**inputs)
            attentions = probe.attentions(inputs["attention_mask"], model.config.text_config.num_hidden_layers)
        else:
            attentions = model(**inputs, output_attentions=True).attentions
        loss = attention_supervision_loss(attentions, targets, preset.supervised_layers)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = new_model(preset, processor, seed=0)
    model.set_attn_implementation("eager")
    eager_loss, eager_grads = loss_and_grads(model, use_probe=False)
    model.set_attn_implementation("sdpa")
    probe_loss, probe_grads = loss_and_grads(model, use_probe=True)
    assert float(eager_loss) > 0.1
    assert torch.allclose(probe_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == probe_grads.keys() and any(".q_proj." in n for n in probe_grads)
    for name, grad in eager_grads.items():
        assert torch.allclose(probe_grads[name], grad, rtol=1e-4, atol=1e-6), name
