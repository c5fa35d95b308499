"""`save_pretrained` keeps what a folder holds: trained plug-ins of another placement are not replaced silently (as
`save_plugins` refuses them), a plug-in checkpoint beside the model is no "other model", and the bare `RcpLlavaModel`
(`AutoModel`) writes a self-contained Hub folder like the full model."""

import json
import os

import pytest
import torch
from conftest import make_model, run_where_rcp_llava_is_not_installed
from safetensors import safe_open

from modeling_rcp_llava import RCP_AUTO_MAP, RcpLlavaForConditionalGeneration, RcpLlavaModel


def _pruners_in(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return sorted({k.split(".")[3] for k in f.keys() if ".pruners." in k})


def test_save_pretrained_refuses_to_replace_trained_plugins_of_another_placement(tmp_path):
    trained = make_model(randomize_plugins=True)  # pruners before layers 1 and 2, adapters after 2 and 3
    trained.save_pretrained(tmp_path)
    other = make_model(pruning_layers=[1], repair_layers=[3], pruning_keep_counts=[6])
    with pytest.raises(FileExistsError, match=r"other trained RCP plug-ins \(pruning_layers: \[1, 2\] -> \[1\], "
                                              r"repair_layers: \[2, 3\] -> \[3\]\); this save would replace them"):
        other.save_pretrained(tmp_path)
    assert _pruners_in(tmp_path) == ["1", "2"]  # nothing written
    reloaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path)
    for key, value in trained.plugin_state_dict().items():
        assert torch.equal(reloaded.plugin_state_dict()[key], value), key
    other.save_pretrained(tmp_path, overwrite=True)
    assert _pruners_in(tmp_path) == ["1"]


def test_save_pretrained_refuses_another_head_count_and_a_model_without_plugins(tmp_path):
    make_model(randomize_plugins=True).save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match=r"pruner_num_heads: 4 -> 2"):  # same tensors, another computation
        make_model(pruner_num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match=r"would replace them"):  # VisPruner holds no plug-ins
        make_model(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                   pre_llm_keep_count=6).save_pretrained(tmp_path)


def test_the_same_model_saves_again_after_training_or_a_budget_change(tmp_path):
    model = make_model(randomize_plugins=True)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        next(model.model.rcp_plugins.parameters()).add_(1.0)  # more training
    model.config.pruning_keep_counts = [8, 4]  # another budget: same plug-ins
    model.save_pretrained(tmp_path)
    reloaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.pruning_keep_counts == [8, 4]
    for key, value in model.plugin_state_dict().items():
        assert torch.equal(reloaded.plugin_state_dict()[key], value), key


def test_save_plugins_then_save_pretrained_into_one_folder(tmp_path):
    """The plug-in checkpoint was counted as another model's weights without a config, and the full save refused."""
    model = make_model(randomize_plugins=True)
    paths = model.save_plugins(tmp_path)
    before = {p: open(p, "rb").read() for p in paths}
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "rcp_config.json", "rcp_plugins.safetensors"} <= files
    assert all(open(p, "rb").read() == data for p, data in before.items())  # the plug-in checkpoint stays


def test_the_bare_model_saves_a_self_contained_hub_folder(tmp_path):
    """`AutoModel.from_pretrained(rcp_folder)` gives `RcpLlavaModel`; its save kept `auto_map["AutoModel"]` but
    wrote no modeling_rcp_llava.py, so `AutoModel.from_pretrained(saved, trust_remote_code=True)` failed outside
    this repository."""
    model = make_model(randomize_plugins=True)
    bare = model.model
    assert isinstance(bare, RcpLlavaModel)
    bare.save_pretrained(tmp_path / "bare")
    assert {"config.json", "model.safetensors", "configuration_rcp_llava.py", "modeling_rcp_llava.py"} <= set(
        os.listdir(tmp_path / "bare"))
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["auto_map"] == RCP_AUTO_MAP
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        reference = bare(input_ids=ids).last_hidden_state
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import torch; from transformers import AutoModel\n"
              "m = AutoModel.from_pretrained('bare', trust_remote_code=True).eval()\n"
              "with torch.no_grad(): out = m(input_ids=torch.load('ids.pt')).last_hidden_state\n"
              "torch.save([type(m).__module__ + '.' + type(m).__name__, out], 'out.pt')\n")
    proc = run_where_rcp_llava_is_not_installed(["-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, hidden = torch.load(tmp_path / "out.pt")
    assert name.startswith("transformers_modules.") and name.endswith(".RcpLlavaModel")
    assert torch.equal(hidden, reference)


def test_a_variant_save_is_guarded_too(tmp_path):
    """Only model.safetensors was read: a `variant="fp16"` save of other plug-ins went through, and the new
    config.json then described placements the folder's model.safetensors does not hold."""
    make_model(randomize_plugins=True).save_pretrained(tmp_path, variant="fp16")  # model.fp16.safetensors only
    other = make_model(pruning_layers=[2, 3], repair_layers=[3], pruning_keep_counts=[8, 4])
    with pytest.raises(FileExistsError, match=r"pruning_layers: \[1, 2\] -> \[2, 3\]"):
        other.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(FileExistsError, match=r"pruning_layers: \[1, 2\] -> \[2, 3\]"):  # another variant too
        other.save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match=r"pruning_layers: \[1, 2\] -> \[2, 3\]"):  # shards, no variant
        other.save_pretrained(tmp_path, max_shard_size="20KB")
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == ["model.fp16.safetensors"]


def test_a_folder_from_a_release_that_wrote_fewer_fields_saves_again(tmp_path):
    """A layout field absent from an older config.json read as None: its own model was refused ("None -> 4")."""
    model = make_model(randomize_plugins=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pruner_num_heads"]  # an older release's config.json
    (tmp_path / "config.json").write_text(json.dumps(config))
    RcpLlavaForConditionalGeneration.from_pretrained(tmp_path).save_pretrained(tmp_path)


def test_an_unreadable_weights_file_in_the_folder_is_named(tmp_path):
    """A git-lfs pointer or a half download beside the model (model_ema.safetensors) made the re-save fail with
    safetensors' 'header too large', naming no file."""
    model = make_model(randomize_plugins=True)
    model.save_pretrained(tmp_path)
    (tmp_path / "model_ema.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(FileExistsError, match=r"model_ema\.safetensors cannot be read .* pass `overwrite=True`"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, overwrite=True)


def test_a_plugin_folder_from_a_release_that_wrote_fewer_fields_saves_again(tmp_path):
    """`save_plugins` reads an older rcp_config.json with the same defaults as `save_pretrained` reads config.json:
    its own model saves over it, not refused as "pruner_num_heads: None -> 4"."""
    model = make_model(randomize_plugins=True)
    model.save_plugins(tmp_path)
    path = tmp_path / "rcp_config.json"
    record = json.loads(path.read_text())
    del record["pruner_num_heads"]
    path.write_text(json.dumps(record))
    model.save_plugins(tmp_path)
    assert json.loads(path.read_text())["pruner_num_heads"] == 4


def test_plugins_of_another_base_model_are_not_replaced_silently(tmp_path):
    """Same shapes, another base (`base_model_name_or_path`): the plug-ins were trained for another model."""
    make_model(randomize_plugins=True).save_plugins(tmp_path, base_model_name_or_path="org/llava-7b")
    weights = (tmp_path / "rcp_plugins.safetensors").read_bytes()
    other = make_model(seed=5, randomize_plugins=True)
    with pytest.raises(FileExistsError, match=r"org/llava-7b.*org/llava-13b"):
        other.save_plugins(tmp_path, base_model_name_or_path="org/llava-13b")
    assert (tmp_path / "rcp_plugins.safetensors").read_bytes() == weights
    other.save_plugins(tmp_path, base_model_name_or_path="org/llava-13b", overwrite=True)
    assert (tmp_path / "rcp_plugins.safetensors").read_bytes() != weights


def test_a_model_of_another_vocabulary_is_not_saved_over_a_folder(tmp_path):
    """The same plug-ins on another backbone (its vocabulary) would replace the folder's model silently."""
    from configuration_rcp_llava import RcpLlavaConfig

    model = make_model()
    model.save_pretrained(tmp_path)
    config = model.config.to_dict()
    config["text_config"]["vocab_size"] = 120
    other = RcpLlavaForConditionalGeneration(RcpLlavaConfig.from_dict(config))
    with pytest.raises(FileExistsError, match=r"vocab_size: 100 -> 120"):
        other.save_pretrained(tmp_path)
    assert RcpLlavaForConditionalGeneration.from_pretrained(tmp_path).config.text_config.vocab_size == 100
