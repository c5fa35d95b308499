"""Loading plug-ins as PEFT users do: a plug-in set in a subfolder through every entry point, the result torch and
PEFT return, and what the tensors' shapes cannot tell (the pruners' head count)."""

import json

import pytest
import torch
from conftest import make_model

from modeling_rcp_llava import RCP_CONFIG_NAME, RCP_PLUGINS_NAME, RcpLlavaForConditionalGeneration


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A stock base folder and a plug-in repo folder holding one set in `rcp-64/`."""
    root = tmp_path_factory.mktemp("repo")
    trained = make_model(randomize_plugins=True)
    trained.unload().save_pretrained(root / "base")
    trained.save_plugins(root / "repo" / "rcp-64", base_model_name_or_path=str(root / "base"))
    return trained, root


def _same_plugins(model, trained):
    for key, value in trained.plugin_state_dict().items():
        assert torch.equal(model.plugin_state_dict()[key], value), key


def test_from_pretrained_reads_a_plugin_set_in_a_subfolder(repo):
    """`from_pretrained(repo, subfolder=...)` looked for model.safetensors in the repo; `from_base`, `load_plugins`
    and `load_adapter` read such a subfolder, as PEFT's `AutoPeftModel.from_pretrained` does."""
    trained, root = repo
    model = RcpLlavaForConditionalGeneration.from_pretrained(str(root / "repo"), subfolder="rcp-64")
    _same_plugins(model, trained)


def test_load_adapter_reads_a_plugin_subfolder_given_through_adapter_kwargs(repo):
    """It found the plug-ins there and then refused: "RCP plug-ins have no adapter names" (no name was given)."""
    trained, root = repo
    model = make_model()
    result = model.load_adapter(str(root / "repo"), adapter_kwargs={"subfolder": "rcp-64"})
    _same_plugins(model, trained)
    assert (result.missing_keys, result.unexpected_keys) == ([], []) and result == ([], [])


def test_load_plugins_returns_what_load_state_dict_returns(repo):
    trained, root = repo
    model = make_model(pruning_layers=[1], repair_layers=[2, 3], pruning_keep_counts=[6])
    result = model.load_plugins(str(root / "repo" / "rcp-64"), strict=False)
    missing, unexpected = result  # still unpacks as before
    assert result.missing_keys == missing == [] and result.unexpected_keys == unexpected
    assert unexpected and all(".pruners.2." in k for k in unexpected)


def test_load_plugins_refuses_another_head_count(repo):
    """The head count changes no tensor shape: plug-ins trained with 4 heads loaded into 2-head pruners silently,
    and scored other tokens (logits 0.26 apart)."""
    _, root = repo
    model = make_model(pruner_num_heads=2)
    with pytest.raises(ValueError, match=r"trained with `pruner_num_heads=4`; this model's pruners split their "
                                         r"attention into 2 heads.*from_base\(base, plugins="):
        model.load_plugins(str(root / "repo" / "rcp-64"))


def test_a_config_that_is_not_an_object_and_a_weights_file_path_are_named(repo, tmp_path):
    _, root = repo
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / RCP_CONFIG_NAME).write_text(json.dumps([]))
    with pytest.raises(ValueError, match=r"holds a JSON list, not the object `save_plugins` writes"):
        make_model().load_plugins(str(folder))  # it was AttributeError: 'list' object has no attribute 'get'
    weights = root / "repo" / "rcp-64" / RCP_PLUGINS_NAME
    with pytest.raises(ValueError, match=r"^`plugins` .*rcp_plugins\.safetensors' is a file; pass the folder that "
                                         r"holds it \('.*rcp-64'\)"):
        make_model().load_plugins(str(weights))  # it was "no such folder", of a file that exists


def test_disable_adapter_runs_the_stock_model_as_peft_does():
    """PEFT's `with model.disable_adapter():` gives the base model's outputs; for RCP that is the stock LLaVA (no
    pruning, no repair), and the plug-ins are back after the block."""
    from conftest import make_batch, stock_copy

    model = make_model(randomize_plugins=True)
    batch = make_batch([(2, 3, True), (5, 6, True)])
    with torch.no_grad():
        stock = stock_copy(model)(**batch).logits
        pruned = model(**batch)
        with model.disable_adapter():
            inside = model(**batch).logits
        after = model(**batch)
    assert torch.equal(inside, stock) and model.last_pruning_info is not None
    assert inside.shape[1] > pruned.logits.shape[1] and torch.equal(after.logits, pruned.logits)


def test_disable_adapter_turns_off_lora_added_with_add_adapter_too():
    """With transformers' `add_adapter` LoRA the block ran the plug-ins off but LoRA on (0.59 off stock). Both are
    off inside now, and after the block LoRA is back on; adapters the user had disabled stay disabled."""
    import copy

    from conftest import make_batch, stock_copy
    from peft import LoraConfig

    model = make_model(randomize_plugins=True)
    batch = make_batch([(2, 3, True), (5, 6, True)])
    with torch.no_grad():
        stock = stock_copy(model)(**batch).logits
        model.add_adapter(LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                     init_lora_weights=False))
        with_lora = model(**batch).logits
        with model.disable_adapter():
            inside = model(**batch).logits
        assert torch.equal(model(**batch).logits, with_lora)  # LoRA back on
        model.disable_adapters()  # the user's choice: off
        without_lora = model(**batch).logits
        with model.disable_adapter():
            pass
        assert torch.equal(model(**batch).logits, without_lora)
    torch.testing.assert_close(inside, stock, rtol=0, atol=1e-6)
    assert not torch.allclose(with_lora, without_lora)  # non-vacuous: LoRA changes the output
    copy.deepcopy(model)  # still a plain module


def test_disable_adapter_of_a_peft_model_is_peft_own_and_turns_off_lora_only():
    """`get_peft_model(model).disable_adapter()` is PEFT's: LoRA off, the plug-ins still pruning (README says so)."""
    import copy

    from conftest import make_batch
    from peft import LoraConfig, get_peft_model

    model = make_model(randomize_plugins=True)
    batch = make_batch([(2, 3, True), (5, 6, True)])
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    with torch.no_grad():
        pruned = model(**batch).logits
        with peft_model.disable_adapter():
            inside = peft_model(**batch).logits
    torch.testing.assert_close(inside, pruned, rtol=0, atol=1e-6)


def test_a_strict_load_refuses_plugin_tensors_the_model_has_no_place_for(tmp_path):
    """Plug-ins trained with adapters after layers 2 and 3, loaded into a model with one after layer 3: the tensors
    of layer 2's adapter have no place, which `strict=True` refuses (as missing ones), rather than warn."""
    make_model(randomize_plugins=True).save_plugins(tmp_path)
    target = make_model(repair_layers=[3])
    with pytest.raises(ValueError, match=r"do not match the model: missing \[\], unexpected "
                                         r"\['model\.rcp_plugins\.repair_adapters\.2\..*Were they trained with other "
                                         r"`pruning_layers` / `repair_layers`\?"):
        target.load_plugins(tmp_path)
    target.load_plugins(tmp_path, strict=False)  # the user's choice: a warning, and layer 3's adapter loads


def test_a_plugin_folder_from_a_release_without_the_token_count_loads(tmp_path):
    """Older plug-in folders recorded neither `num_visual_tokens` nor the weights' fingerprint: the token-count check
    has nothing to compare then, and the plug-ins load."""
    from safetensors.torch import load_file, save_file

    model = make_model(randomize_plugins=True)
    model.save_plugins(tmp_path)
    path = tmp_path / RCP_CONFIG_NAME
    record = json.loads(path.read_text())
    del record["num_visual_tokens"]
    path.write_text(json.dumps(record))
    weights = tmp_path / RCP_PLUGINS_NAME
    save_file(load_file(weights), weights)  # without the metadata
    fresh = make_model()
    fresh.load_plugins(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.plugin_parameters(), model.plugin_parameters()))


def test_a_revision_given_to_from_pretrained_wins_over_the_recorded_base_revision(tmp_path):
    """A plug-in folder records its base's revision; `from_pretrained(plugins, revision=...)` asks for another one,
    which is the one loaded (and recorded on the model), not the recorded one."""
    from conftest import stock_copy

    model = make_model(randomize_plugins=True)
    stock_copy(model).save_pretrained(tmp_path / "base")
    model.rcp_base_model_revision = "v1.0"
    model.save_plugins(tmp_path / "plugins", base_model_name_or_path=str(tmp_path / "base"))
    assert RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "plugins").rcp_base_model_revision == "v1.0"
    loaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "plugins", revision="v2.0")
    assert loaded.rcp_base_model_revision == "v2.0"
