"""PEFT with a pruning model: LoRA on the backbone keeps the pruning exact, transformers' own adapter round trip
(`add_adapter` -> `save_pretrained` -> `load_adapter`) works as on stock, and plug-in checkpoints refuse tensors PEFT
wrapped instead of saving or loading the wrong ones."""

import copy
import os

import pytest
import torch
from conftest import make_batch, make_model, randomize_plugin_parameters

peft = pytest.importorskip("peft")  # the [dev] extra installs it

PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]
METHODS = {"rcp": dict(), "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[],
                                        pruning_keep_counts=[6])}
GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def _model(**overrides):
    model = make_model(randomize_plugins=True, **overrides)
    model.generation_config.pad_token_id = 0
    return model


def _lora(model, init=True, **config):
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=init, **config))


@pytest.mark.parametrize("name", list(METHODS))
def test_lora_on_the_backbone_prunes_as_the_model_it_wraps(name):
    """RCP's prior and FastV call the pruning layer's own q/k projections: LoRA wrapping them must reach selection. At
    init (B = 0) the PEFT model is the model itself, bit for bit; with random LoRA weights it keeps what its merged
    backbone keeps (merging reorders the sums: 1e-6)."""
    model = _model(**METHODS[name])
    batch = make_batch(PADDED)
    with torch.no_grad():
        ref, ref_tokens = model(**batch), model.generate(**batch, **GREEDY)
    wrapped = _lora(copy.deepcopy(model), target_modules=["q_proj", "k_proj", "v_proj"]).eval()
    with torch.no_grad():
        out = wrapped(**batch)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.keep_masks, ref.keep_masks)
        assert torch.equal(wrapped.generate(**batch, **GREEDY), ref_tokens)
    torch.manual_seed(0)
    lora = _lora(copy.deepcopy(model), init=False, target_modules=["q_proj", "k_proj", "v_proj"]).eval()
    with torch.no_grad():
        out = lora(**batch)
        assert not torch.equal(out.keep_masks, ref.keep_masks)  # the LoRA weights changed the attention prior
        merged = lora.merge_and_unload()
        same = merged(**batch)
        assert torch.equal(same.keep_masks, out.keep_masks)
        valid = same.token_positions >= 0
        assert (same.logits[valid] - out.logits[valid]).abs().max() <= 1e-5


def test_transformers_adapter_round_trip_as_on_stock(tmp_path):
    """`add_adapter` -> `save_pretrained` -> `load_adapter`: on 50040c4 RCP's `load_adapter` took every folder for a
    plug-in checkpoint ("has no rcp_config.json"), and `save_pretrained` put the Hub files into the adapter folder.
    An adapter folder now holds what stock writes, and loads back to the same logits; RCP plug-ins still load by the
    same name, and refuse an adapter name."""
    model = _model()
    batch = make_batch(PADDED)
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    model.add_adapter(peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "lora"))
    assert not {"config.json", "modeling_rcp_llava.py", "model.safetensors"} & set(os.listdir(tmp_path / "lora"))
    fresh.load_adapter(str(tmp_path / "lora"))
    with torch.no_grad():
        a, b = model(**batch), fresh(**batch)
        plain = _model()(**batch)
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, plain.logits)

    # In a subfolder, as transformers addresses it (`adapter_kwargs`), and with PEFT-only arguments on a plain folder.
    os.makedirs(tmp_path / "nested")
    os.rename(tmp_path / "lora", tmp_path / "nested" / "lora")
    for folder, how in ((tmp_path / "nested", dict(adapter_kwargs={"subfolder": "lora"})),
                        (tmp_path / "nested" / "lora", dict(is_trainable=True))):
        again = _model()
        again.load_adapter(str(folder), **how)
        with torch.no_grad():
            assert torch.equal(again(**batch).logits, a.logits), how

    plugins = _model(seed=5)
    plugins.save_plugins(tmp_path / "plugins")
    target = _model()
    target.load_adapter(str(tmp_path / "plugins"))
    assert all(torch.equal(v, plugins.plugin_state_dict()[k]) for k, v in target.plugin_state_dict().items())
    with pytest.raises(TypeError, match="RCP plug-ins have no adapter names"):
        target.load_adapter(str(tmp_path / "plugins"), adapter_name="other")


@pytest.mark.parametrize("wrap", ["modules_to_save", "all-linear"])
def test_plugin_checkpoints_refuse_peft_wrapped_plugins(wrap, tmp_path):
    """On 50040c4 `save_plugins` under `modules_to_save=["rcp_plugins"]` wrote 136 tensors (the untrained original and
    the trained copy) and under LoRA on every linear map PEFT's `base_layer` names: files `load_plugins` then refused.
    Both now refuse to save (or load) with the fix; saved after `merge_and_unload`, the trained values round-trip."""
    model = _model()
    config = (dict(target_modules=["q_proj"], modules_to_save=["rcp_plugins"]) if wrap == "modules_to_save"
              else dict(target_modules="all-linear"))
    torch.manual_seed(0)
    wrapped = _lora(model, init=False, **config)
    with torch.no_grad():  # "training": the plug-ins PEFT trains (the copy, or their LoRA factors) move
        for name, p in wrapped.named_parameters():
            if p.requires_grad and "rcp_plugins" in name:
                p.add_(0.1)
    with pytest.raises(ValueError, match=r"`save_plugins`: PEFT wrapped \d+ plug-in tensor\(s\) .*merge_and_unload"):
        wrapped.save_plugins(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before the folder is made
    from train_rcp import RcpTrainer, RcpTrainingArguments

    with pytest.raises(ValueError, match=r"`RcpTrainer`: PEFT wrapped \d+ plug-in tensor\(s\)"):
        RcpTrainer(model=wrapped.get_base_model(), args=RcpTrainingArguments(output_dir=str(tmp_path / "run"),
                                                                              report_to=[]))
    with pytest.raises(ValueError, match=r"`load_plugins`: PEFT wrapped .*load the plug-ins before wrapping"):
        wrapped.load_plugins(tmp_path / "refused")
    batch = make_batch(PADDED)
    with torch.no_grad():
        before = wrapped.eval()(**batch)
    merged = wrapped.merge_and_unload()
    merged.save_plugins(tmp_path / "merged")
    loaded = _model(seed=7)
    loaded.load_state_dict({k: v for k, v in merged.state_dict().items() if ".rcp_plugins." not in k}, strict=False)
    loaded.load_plugins(tmp_path / "merged")
    assert all(torch.equal(v, merged.plugin_state_dict()[k]) for k, v in loaded.plugin_state_dict().items())
    with torch.no_grad():
        after = loaded.eval()(**batch)
    assert torch.equal(after.keep_masks, before.keep_masks)
    assert (after.logits - before.logits)[after.token_positions >= 0].abs().max() <= 1e-5


def test_rcp_trainer_refuses_a_peft_model_by_name(tmp_path):
    """On 50040c4 a `PeftModel` got "The model has no plug-in parameters to train" (its names carry PEFT's prefix)."""
    from train_rcp import RcpTrainer, RcpTrainingArguments

    wrapped = _lora(_model(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"got a PEFT-wrapped model \(PeftModel\).*merge_and_unload\(\)` \(LoRA"):
        RcpTrainer(model=wrapped, args=RcpTrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_from_base_and_unload_carry_transformers_adapters_and_refuse_peft_models_layers(tmp_path, caplog):
    """A base with `add_adapter` LoRA lost its adapter state in `from_base` (and an RCP model in `unload`): the LoRA
    layers came along but `active_adapters()` found none, and `save_pretrained` wrote PEFT-named full weights that
    reloaded with random q/v projections (logits 0.52 off). Now the adapter comes along, and saves as on stock. A
    `PeftModel`'s injected layers (its base model) and from_pretrained arguments for a loaded base are refused."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    model = _model()
    model.save_plugins(tmp_path / "plugins")
    batch = make_batch(PADDED)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock = copy.deepcopy(model).unload()
    stock.save_pretrained(tmp_path / "stock")
    torch.manual_seed(0)
    with_lora = copy.deepcopy(stock)
    with_lora.add_adapter(config)
    rcp = RcpLlavaForConditionalGeneration.from_base(with_lora, plugins=str(tmp_path / "plugins")).eval()
    assert rcp.active_adapters() == ["default"]
    rcp.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "generation_config.json"]
    again = RcpLlavaForConditionalGeneration.from_base(str(tmp_path / "stock"), plugins=str(tmp_path / "plugins"))
    again.load_adapter(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, rcp(**batch).logits, rtol=0, atol=0)
    # unload keeps it too
    unloaded = rcp.unload()
    assert unloaded.active_adapters() == ["default"]
    # a deleted adapter leaves empty PEFT wrappers, which compute the base: not refused
    emptied = copy.deepcopy(with_lora)
    emptied.delete_adapter("default")
    RcpLlavaForConditionalGeneration.from_base(emptied, plugins=str(tmp_path / "plugins"))
    # A PeftModel's base holds LoRA layers but no adapter state: no save could restore them
    wrapped = _lora(copy.deepcopy(stock), init=False, target_modules=["q_proj", "v_proj"])
    with pytest.raises(TypeError, match=r"^The LlavaForConditionalGeneration holds PEFT adapter layers that a "
                                        r"`PeftModel` injected .*merge them first \(`peft_model.merge_and_unload\(\)`\)"):
        RcpLlavaForConditionalGeneration.from_base(wrapped.get_base_model(), plugins=str(tmp_path / "plugins"))
    # the PeftModel itself got "must be a Hub id, a folder or a loaded LlavaForConditionalGeneration"
    with pytest.raises(TypeError, match=r"^`base_model` is a PEFT PeftModel: the RCP model cannot hold its adapter "
                                        r"layers\. Merge them first \(`from_base\(peft_model\.merge_and_unload\(\), "):
        RcpLlavaForConditionalGeneration.from_base(wrapped, plugins=str(tmp_path / "plugins"))
    # from_pretrained's arguments do nothing to a loaded base: refused, not dropped
    with pytest.raises(TypeError, match=r"^`from_base` shares a loaded `base_model` as it is, so "
                                        r"\['attn_implementation', 'dtype'\] would be ignored"):
        RcpLlavaForConditionalGeneration.from_base(stock, plugins=str(tmp_path / "plugins"), dtype=torch.bfloat16,
                                                   attn_implementation="eager")


def test_a_folder_with_plugins_and_a_peft_adapter_loads_either_on_request(tmp_path, caplog):
    """`save_pretrained` after `add_adapter` and `save_plugins` into one folder: `load_adapter(folder)` loaded the
    plug-ins and said nothing of the adapter, and `load_adapter(folder, adapter_name=...)` raised "RCP plug-ins have
    no adapter names". The plug-ins load by default (with a warning naming the adapter); PEFT's arguments load it."""
    import logging

    model = _model()
    torch.manual_seed(0)
    model.add_adapter(peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "both")
    model.save_plugins(tmp_path / "both")
    fresh = copy.deepcopy(model)
    fresh.delete_adapter("default")
    randomize_plugin_parameters(fresh, seed=5)  # other plug-ins than the folder's: the load must bring them back
    assert not any(torch.equal(v, model.plugin_state_dict()[k]) for k, v in fresh.plugin_state_dict().items()
                   if v.numel() > 1)
    with caplog.at_level(logging.WARNING, logger="modeling_rcp_llava"):
        fresh.load_adapter(str(tmp_path / "both"))
    assert "holds RCP plug-ins and a PEFT adapter (adapter_config.json): the plug-ins are loaded" in caplog.text
    saved = model.plugin_state_dict()
    assert fresh.plugin_state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.plugin_state_dict().items())
    fresh.load_adapter(str(tmp_path / "both"), adapter_name="lora")
    assert fresh.active_adapters() == ["lora"]
    batch = make_batch(PADDED)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_is_trainable_on_a_plugin_folder_is_pefts(tmp_path):
    """`load_adapter(plugins, is_trainable=False)` was accepted and ignored (the plug-ins stayed trainable), and
    `is_trainable=True` was refused as "RCP plug-ins have no adapter names"."""
    model = _model()
    model.save_plugins(tmp_path / "plugins")
    fresh = _model(seed=1).train()
    fresh.load_adapter(str(tmp_path / "plugins"), is_trainable=False)
    assert not any(p.requires_grad for p in fresh.plugin_parameters())
    # inference, as PEFT's and transformers' load_adapter: eval mode (dropout off), which the load had left as it was
    assert {m.training for m in fresh.modules()} == {False}
    assert all(torch.equal(fresh.plugin_state_dict()[k], v) for k, v in model.plugin_state_dict().items())
    fresh.train().load_adapter(str(tmp_path / "plugins"), is_trainable=True)
    assert all(p.requires_grad for p in fresh.plugin_parameters()) and fresh.training
    fresh.load_adapter(str(tmp_path / "plugins"))  # not given: as it was
    assert all(p.requires_grad for p in fresh.plugin_parameters()) and fresh.training
    # ... frozen and in eval mode too (a default of True would make a user's frozen plug-ins trainable again)
    fresh.load_adapter(str(tmp_path / "plugins"), is_trainable=False)
    fresh.load_adapter(str(tmp_path / "plugins"))
    assert not any(p.requires_grad for p in fresh.plugin_parameters()) and not fresh.training


@pytest.mark.parametrize("subfolder", [None, "rcp-64"])
def test_a_peft_adapter_on_a_model_built_from_plugins_records_what_rebuilds_it(tmp_path, subfolder):
    """PEFT records the wrapped model's `name_or_path` as the adapter's base; `from_base` left it at the stock
    checkpoint, so reloading the adapter built the default placement with new plug-ins (17 positions became 28)."""
    import json

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    model = _model(pruning_layers=[1, 2], repair_layers=[2, 3])
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "stock")
    plugins = tmp_path / "plugins" / (subfolder or "")
    model.save_plugins(plugins, base_model_name_or_path=str(tmp_path / "stock"))
    built = RcpLlavaForConditionalGeneration.from_base(str(tmp_path / "stock"), plugins=str(tmp_path / "plugins"),
                                                       subfolder=subfolder).eval()
    assert built.name_or_path == str(plugins).rstrip(os.sep)
    # the stock model under it keeps the stock name: swapping plug-ins on it recorded the plug-in folder as the base
    assert built.unload().name_or_path == str(tmp_path / "stock")
    torch.manual_seed(0)
    wrapped = _lora(built, init=False, target_modules=["q_proj", "v_proj"]).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(plugins).rstrip(os.sep)
    base = RcpLlavaForConditionalGeneration.from_pretrained(recorded)  # what PEFT's AutoPeftModel does with it
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert base.config.pruning_layers == [1, 2]  # the placement it was trained on, not the default [1, 2, 3]
    batch = make_batch(PADDED)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, wrapped(**batch).logits, rtol=0, atol=0)
    built.save_plugins(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "rcp_config.json").read_text())
    assert again["base_model_name_or_path"] == str(tmp_path / "stock")  # the plug-ins still name the stock base


def test_plugins_lora_wrapped_by_target_parameters_are_refused_by_name():
    """PEFT's `target_parameters` replaces the module holding the parameter with a wrapper; the forward failed deep
    ("'ParamWrapper' object has no attribute 'queries'"), neither running nor naming the cause."""
    model = _model()
    wrapped = _lora(model, init=False, target_modules=[], target_parameters=["pruners.1.queries",
                                                                              "repair_context.positions"])
    with pytest.raises(TypeError, match=r"^The plug-in module\(s\) \['pruners\.1', 'repair_context'\] were replaced by "
                                        r"ParamWrapper \(PEFT's `target_parameters`\?\): the pruned forward reads "
                                        r"their parameters directly\. Target the plug-ins' linear layers"):
        wrapped(**make_batch(PADDED))


def test_plugins_swapped_on_a_model_built_from_plugins_record_the_stock_base(tmp_path):
    """A model `from_base` names by its plug-in folder, given to `from_base` again (or its unnamed base's plug-ins
    saved), recorded that folder as the base: the saved set could not load ("trained for another model than
    '.../pA': hidden_size 32 != 4096")."""
    import json

    from conftest import stock_copy

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration as Rcp

    model = _model()
    stock_copy(model).save_pretrained(tmp_path / "stock")
    for name in ("pA", "pB"):
        model.save_plugins(tmp_path / name, base_model_name_or_path=str(tmp_path / "stock"))
    first = Rcp.from_base(str(tmp_path / "stock"), plugins=str(tmp_path / "pA"))
    swapped = Rcp.from_base(first, plugins=str(tmp_path / "pB"))
    assert swapped.rcp_base_model_name_or_path == str(tmp_path / "stock")
    swapped.save_plugins(tmp_path / "pC")
    assert json.loads((tmp_path / "pC" / "rcp_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "stock")
    assert Rcp.from_pretrained(str(tmp_path / "pC")).config.pruning_layers == model.config.pruning_layers
    unnamed = Rcp.from_base(stock_copy(model), plugins=str(tmp_path / "pA"))  # a base in memory, with no name
    assert unnamed.name_or_path == str(tmp_path / "pA") and unnamed.unload().name_or_path == ""
    unnamed.save_plugins(tmp_path / "pD")
    assert json.loads((tmp_path / "pD" / "rcp_config.json").read_text())["base_model_name_or_path"] is None


def test_prefix_tuning_is_refused_with_pruning_and_named_prompt_tuning_trains():
    """PEFT's prefix tuning hands its virtual tokens to the model as `past_key_values`, which a pruned prefill cannot
    start from: refused, naming the adapter and the two ways that work. Prompt tuning prepends them to the input
    embeddings and trains with pruning on; `pruning_method='none'` takes prefix tuning as stock does."""
    batch = make_batch(PADDED)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prefix = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    wrapped = peft.get_peft_model(_model(), prefix)
    with pytest.raises(ValueError, match=r"already holds 4 tokens\. Start a new cache for each prompt with an image "
                                         r"\(PEFT's prefix tuning puts its virtual tokens there: use "
                                         r"`pruning_method='none'` with it, or prompt tuning"):
        wrapped(**batch, labels=labels)
    stock = peft.get_peft_model(_model(pruning_method="none", pruning_layers=[], repair_layers=[],
                                       pruning_keep_counts=None), prefix)
    stock(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None for n, p in stock.named_parameters() if p.requires_grad)
    prompt = peft.get_peft_model(_model(), peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                                   num_virtual_tokens=4))
    out = prompt(**batch, labels=labels)
    out.loss.backward()
    assert prompt.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    assert prompt.base_model.last_pruning_info.kept_counts[:, 0].tolist() == [10, 10, 10]
