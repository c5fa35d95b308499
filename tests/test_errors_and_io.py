"""Bad input gets a clear error naming the field (acceptance 7); save/load round trips (acceptance 8)."""

import json
import logging
import re

import pytest
import torch
from transformers import GenerationConfig
from conftest import (
    IMAGE_TOKEN, NUM_VISUAL, make_batch, make_model, randomize_plugin_parameters, stock_copy, tiny_config,
)

from configuration_rcp_llava import RcpLlavaConfig, default_fastv_layer, paper_placement
from modeling_rcp_llava import PLUGIN_PREFIX, RcpLlavaForConditionalGeneration


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"pruning_layers": [0, 2]}, ValueError, r"`pruning_layers` contains 0"),
        ({"pruning_layers": [1, 4]}, ValueError, r"`pruning_layers` contains \[4\].*4 layers"),
        ({"pruning_layers": [-1, 2]}, ValueError, r"`pruning_layers` contains \[-1\]"),
        ({"pruning_layers": [2, 1], "pruning_keep_counts": None}, ValueError, r"strictly increasing"),
        ({"repair_layers": [9]}, ValueError, r"`repair_layers` contains \[9\]"),
        ({"repair_layers": [0]}, ValueError, r"before the first pruning layer"),
        ({"pruning_keep_counts": [5, 10]}, ValueError, r"`pruning_keep_counts` must be non-increasing"),
        ({"pruning_keep_counts": [17, 5]}, ValueError, r"more than the 16 visual tokens"),
        ({"pruning_keep_counts": [5]}, ValueError, r"has 1 entries but `pruning_layers` has 2"),
        ({"pruning_keep_counts": [-1, -1]}, ValueError, r"must be >= 0"),
        ({"pruning_method": "magic"}, ValueError, r"`pruning_method` is 'magic'"),
        ({"visual_token_budget": 100}, ValueError, r"`visual_token_budget` is 100"),
        # a fraction where a count is meant: accepted as 0.11 tokens per layer, which layer 0 alone exceeds
        ({"visual_token_budget": 1 / 9}, ValueError, r"^`visual_token_budget` is 0\.111+, but it counts visual tokens "
                                                    r"per decoder layer \(e\.g\. 64 of 576\), not a fraction: for "
                                                    r"0\.111111 of the 16 visual tokens give 1\.77778\.$"),
        ({"query_dropout": 1.5}, ValueError, r"`query_dropout`"),
        ({"gumbel_temperature": 0}, ValueError, r"`gumbel_temperature`"),
        ({"num_pruning_queries": 0}, ValueError, r"`num_pruning_queries`"),
        ({"pruning_layers": "1,2"}, TypeError, r"`pruning_layers` must be a list of ints"),
    ],
)
def test_bad_config_fields(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_a_numpy_budget_is_a_number():
    """`np.int64(4)` was refused as "must be a number in (0, 16]", which 4 is; it is kept as a float (JSON), and
    read as a number by the default placement too (a review: it fell back to 64 of 576 there)."""
    import numpy as np
    from transformers import LlamaConfig

    config = tiny_config(visual_token_budget=np.int64(4))
    assert type(config.visual_token_budget) is float and config.visual_token_budget == 4.0
    assert RcpLlavaConfig.from_dict(json.loads(config.to_json_string())).visual_token_budget == 4.0
    text = LlamaConfig(hidden_size=32, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=100).to_dict()
    for budget in (np.int64(128 * 16 // 576), 128 * 16 / 576):  # 2/9 of the 16 visual tokens: [4, 14, 24]
        placed = tiny_config(text_config=text, visual_token_budget=budget, pruning_layers=None, repair_layers=None,
                             pruning_keep_counts=None)
        assert placed.pruning_layers == RcpLlavaConfig.paper_placement(32, int(budget) / 16)[0]
    assert RcpLlavaConfig.paper_placement(32, 3 / 16)[0] == [4, 14, 24]


@pytest.mark.parametrize("method", ["rcp", "attention_topk", "fastv"])
def test_a_one_layer_decoder_names_the_depth_and_the_way_out(method):
    """The default placement said "`num_layers` must be an int >= 2", a name the user never gave; `none` loads."""
    from transformers import LlamaConfig

    text = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=100).to_dict()
    with pytest.raises(ValueError, match=rf"^`pruning_method='{method}'` prunes before a decoder layer after layer 0, "
                                         r"but this model's `text_config.num_hidden_layers` is 1: there is none\. "
                                         r"Load it with `pruning_method='none'`"):
        tiny_config(text_config=text, pruning_method=method, pruning_layers=None, repair_layers=None,
                    pruning_keep_counts=None)
    assert tiny_config(text_config=text, pruning_method="none", pruning_layers=None, repair_layers=None,
                       pruning_keep_counts=None).pruning_layers == []


def test_image_token_feature_mismatch():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    batch["input_ids"] = batch["input_ids"][:, 1:]  # one image token fewer than features? no: drop a text token
    batch["input_ids"][0, 5] = 7  # replace one image token by text
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match=r"holds 15 image tokens .* gave 16 features"):
        model(**batch)


def test_two_images_in_one_prompt_is_refused_when_pruning():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    ids = torch.cat([batch["input_ids"], batch["input_ids"][:, 1:]], 1)
    with pytest.raises(ValueError, match=r"one image of 16 visual tokens per prompt"):
        model(input_ids=ids, pixel_values=torch.cat([batch["pixel_values"]] * 2))


@pytest.mark.parametrize("method", ["rcp", "fastv", "vispruner"])
def test_a_per_call_feature_strategy_other_than_the_configs_is_named(method):
    """`vision_feature_select_strategy="full"` per call gives 17 tokens per image; it failed as "Pruning needs one image
    of 16 visual tokens per prompt, but a row holds 17 ... Pass one image per prompt" (one image was passed)."""
    overrides = {"vispruner": dict(pruning_method="vispruner", pruning_layers=None, repair_layers=None,
                                   pruning_keep_counts=None, pre_llm_keep_count=8),
                 "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[],
                               pruning_keep_counts=[6])}.get(method, {})
    model = make_model(**overrides)
    batch = make_batch([(2, 3, True)])
    ids = batch["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    batch["input_ids"] = torch.cat([ids[:, :first], torch.full((1, 1), IMAGE_TOKEN), ids[:, first:]], 1)  # 17
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with pytest.raises(ValueError, match=r"^`vision_feature_select_strategy='full'` differs from the config's "
                                         r"'default', whose 16 visual tokens the pruning is sized for\. Set it in the "
                                         r"config"):
        model(**batch, vision_feature_select_strategy="full")
    stock = stock_copy(model)
    model.config.pruning_method = "none"
    with torch.no_grad():
        assert torch.equal(model(**batch, vision_feature_select_strategy="full").logits,
                           stock(**batch, vision_feature_select_strategy="full").logits)


def test_static_cache_is_refused():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*not supported with pruning"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")


def test_right_padding_is_refused_by_generate():
    model = make_model()
    batch = make_batch([(2, 3, True), (4, 5, True)])
    # Re-pad the shorter row on the right.
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    batch["input_ids"][0] = 0
    batch["input_ids"][0, : len(row)] = row
    batch["attention_mask"][0] = 0
    batch["attention_mask"][0, : len(row)] = 1
    with pytest.raises(ValueError, match=r"Right padding is not supported .*padding_side = 'left'"):
        model.generate(**batch, max_new_tokens=2)
    # without a mask `generate` infers one from the pad id: the right padding ran, with transformers' warning only
    mask = batch.pop("attention_mask")
    with pytest.raises(ValueError, match=r"Right padding is not supported .*padding_side = 'left'"):
        model.generate(**batch, max_new_tokens=2, pad_token_id=0)
    batch["input_ids"][0] = torch.where(mask[0].bool(), batch["input_ids"][0], 0).roll(int((mask[0] == 0).sum()))
    left = model.generate(**batch, max_new_tokens=2, pad_token_id=0)  # left-padded, mask inferred: runs
    right = torch.where(mask.bool(), batch["input_ids"], 0)  # the right-padded ids again, as `inputs=` (a review)
    right[0] = batch["input_ids"][0].roll(-int((mask[0] == 0).sum()))
    with pytest.raises(ValueError, match=r"Right padding is not supported"):
        model.generate(inputs=right, pixel_values=batch["pixel_values"], max_new_tokens=2, pad_token_id=0)
    assert left.shape == (2, batch["input_ids"].shape[1] + 2)


def test_chunked_prefill_is_refused_with_an_image_when_pruning():
    """`prefill_chunk_size` with pre-encoded image features (`mm_encoder_outputs`, which pass transformers' own
    chunking check) pruned the first chunk as the whole prompt: the pruners saw part of the question, the rest came
    as decoded tokens, and RCP's logits moved by 0.195, unannounced. Without pruning it is stock chunking."""
    model = make_model()
    batch = make_batch([(2, 3, True)])
    with torch.no_grad():
        image = model.model.get_image_features(batch.pop("pixel_values"), return_dict=True)
    for where in ({"prefill_chunk_size": 20}, {"generation_config": GenerationConfig(prefill_chunk_size=20)}):
        with pytest.raises(ValueError, match=r"^`prefill_chunk_size` is not supported with `pruning_method='rcp'`: "
                                             r"the first chunk would be pruned as the whole prompt"):
            model.generate(**batch, mm_encoder_outputs={"image": image}, max_new_tokens=2, **where)
    model.config.pruning_method = "none"
    whole = model.generate(**batch, mm_encoder_outputs={"image": image}, max_new_tokens=3, do_sample=False)
    chunked = model.generate(**batch, mm_encoder_outputs={"image": image}, max_new_tokens=3, do_sample=False,
                             prefill_chunk_size=20)
    assert torch.equal(whole, chunked)


def test_continuing_a_cache_with_a_new_image_is_refused():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        with pytest.raises(ValueError, match=r"prefill that starts from an empty cache"):
            model(**batch, past_key_values=out.past_key_values, use_cache=True)


def test_visual_keep_masks_shape_is_checked():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    with pytest.raises(ValueError, match=r"`visual_keep_masks` has shape \(1, 1, 16\), expected \(1, 2, 16\)"):
        model(**batch, visual_keep_masks=torch.ones(1, 1, NUM_VISUAL, dtype=torch.bool))


# 8. Round trips ---------------------------------------------------------------------------------


def without_load_metadata(d):
    return {k: without_load_metadata(v) if isinstance(v, dict) else v for k, v in d.items()
            if k not in ("_name_or_path", "dtype")}


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = make_model(visual_token_budget=6.0)
    randomize_plugin_parameters(model)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # backbone keys as llava-hf writes them
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys and "model.rcp_plugins.pruners.1.bias" in keys
    loaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    # Everything but the load metadata transformers adds (`_name_or_path`, the sub-configs' `dtype`) is equal.
    assert without_load_metadata(loaded.config.to_dict()) == without_load_metadata(model.config.to_dict())
    for field in ("pruning_layers", "repair_layers", "pruning_keep_counts", "visual_token_budget", "pruning_method"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    batch = make_batch([(2, 3, True)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_from_pretrained_on_a_stock_llava_checkpoint(tmp_path, caplog):
    from safetensors import safe_open
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model = make_model()
    stock_config = LlavaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlavaConfig().to_dict()})
    stock = LlavaForConditionalGeneration(stock_config).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if ".rcp_plugins." not in k})
    stock.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the llava-hf layout on disk
        assert "language_model.model.embed_tokens.weight" in set(f.keys())
    loggers = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "configuration_utils")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            loaded = RcpLlavaForConditionalGeneration.from_pretrained(
                tmp_path, pruning_layers=[1, 2], repair_layers=[3], pruning_keep_counts=[8, 4],
                pruner_hidden_size=16, repair_bottleneck_size=8,
            )
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    assert loaded.config.model_type == "rcp_llava" and loaded.config.pruning_layers == [1, 2]
    for key, value in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Issue 18: one line says the plug-ins are new (it was a MISSING row per plug-in tensor in transformers' load
    # report), and a stock config is read as rcp_llava without the "model of type llava" warning.
    assert "RCP plug-ins are new" in caplog.text and "pruning layers [1, 2], repair layers [3]" in caplog.text
    assert "MISSING" not in caplog.text and "rcp_plugins" not in caplog.text
    assert "to instantiate a model of type" not in caplog.text
    assert all(k.startswith(PLUGIN_PREFIX) for k in loaded.plugin_state_dict())
    # Fresh plug-ins from a stock checkpoint get the authors' init (issue 15: gate 0.1, pruner bias 2.0; before, an
    # exact no-op), and with the plug-ins disabled the logits are the stock model's.
    assert loaded.model.rcp_plugins.repair_adapters["3"].gate.item() == pytest.approx(0.1)
    assert loaded.model.rcp_plugins.pruners["1"].bias.item() == 2.0
    batch = make_batch([(2, 3, True)])
    with torch.no_grad(), loaded.plugins_disabled():
        assert torch.allclose(loaded.eval()(**batch).logits, stock.eval()(**batch).logits, atol=1e-6)


def test_config_round_trip_from_a_stock_config_dir(tmp_path):
    from transformers import LlavaConfig

    cfg = tiny_config()
    LlavaConfig(**{k: v for k, v in cfg.to_dict().items() if k in LlavaConfig().to_dict()}).save_pretrained(tmp_path)
    loaded = RcpLlavaConfig.from_pretrained(tmp_path, pruning_layers=[1], repair_layers=[], pruning_keep_counts=None)
    assert loaded.model_type == "rcp_llava"
    loaded.save_pretrained(tmp_path / "again")
    assert '"model_type": "rcp_llava"' in (tmp_path / "again" / "config.json").read_text()


def test_a_sub_config_override_at_load_places_the_pruners_on_the_decoder_it_builds(tmp_path):
    """`from_pretrained(stock, text_config={"num_hidden_layers": 8})` (stock LLaVA takes it) placed the pruners for
    the saved 32 layers, then failed to build the model naming `pruning_layers`, which the user never set."""
    from transformers import LlamaConfig, LlavaConfig

    cfg = tiny_config()
    stock = {k: v for k, v in cfg.to_dict().items() if k in LlavaConfig().to_dict()}
    stock["text_config"] = LlamaConfig(hidden_size=32, num_hidden_layers=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=100).to_dict()
    LlavaConfig(**stock).save_pretrained(tmp_path)
    loaded = RcpLlavaConfig.from_pretrained(tmp_path, text_config={"num_hidden_layers": 8})
    fresh = tiny_config(text_config={**stock["text_config"], "num_hidden_layers": 8}, pruning_layers=None,
                        repair_layers=None, pruning_keep_counts=None)
    assert loaded.text_config.num_hidden_layers == 8 and loaded.text_config.hidden_size == 32  # the rest is kept
    assert (loaded.pruning_layers, loaded.repair_layers) == (fresh.pruning_layers, fresh.repair_layers) \
        == RcpLlavaConfig.paper_placement(8)
    # A vision override is checked with the counts it meets, at load (it returned a config its checks refuse).
    with pytest.raises(ValueError, match=r"`pruning_keep_counts` \[16, 8, 4\] asks to keep more than the 4 visual"):
        RcpLlavaConfig.from_pretrained(tmp_path, pruning_keep_counts=[16, 8, 4], vision_config={"image_size": 8})


def test_counts_and_cards_are_never_derived_from_an_invalid_edit():
    """An edit after construction is checked before the config counts tokens: `tokens_per_layer()` zipped one
    count over two layers into [16, 8, 8, 8] (and a model card printed its 10.0 average)."""
    from rcp_llava.hub import build_model_card

    for edit, match in [({"pruning_keep_counts": [8]}, r"has 1 entries but `pruning_layers` has 2"),
                        ({"pruning_keep_counts": [3, 8]}, r"must be non-increasing"),
                        ({"pruning_layers": [2, 1]}, r"strictly increasing")]:
        config = tiny_config()
        for name, value in edit.items():
            setattr(config, name, value)
        for derive in (config.tokens_per_layer, config.pruned_average_tokens, lambda: config.point_keep_counts,
                       lambda: build_model_card(config, "user/repo", base_model="llava-hf/llava-1.5-7b-hf")):
            with pytest.raises(ValueError, match=match):
                derive()


# -- save_pretrained: other files, failed pushes, other filesystems (a probe of 95e2da2) --------------------------


def _names(folder):
    import os

    return sorted(os.listdir(folder))


def test_save_pretrained_keeps_weights_of_another_name_or_variant(tmp_path):
    """`_move_saved_folder` removed every `model*` weight file the save did not write: a user's
    `model_ema.safetensors` and a `variant="fp16"` save were deleted silently (stock keeps both). Only the earlier
    files of the weights being written go: a sharded save's shards and index when the next save is one file."""
    model = make_model(randomize_plugins=True)
    folder = tmp_path / "m"
    model.save_pretrained(folder, variant="fp16")
    (folder / "model_ema.safetensors").write_bytes((folder / "model.fp16.safetensors").read_bytes())
    model.save_pretrained(folder, max_shard_size="200KB")
    shards = [n for n in _names(folder) if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in _names(folder)
    model.save_pretrained(folder)
    weights = [n for n in _names(folder) if n.endswith((".safetensors", ".json")) and n.startswith("model")]
    assert weights == ["model.fp16.safetensors", "model.safetensors", "model_ema.safetensors"]
    reloaded = RcpLlavaForConditionalGeneration.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_a_failed_push_keeps_the_saved_folder(tmp_path, monkeypatch):
    """The upload ran inside the staging save, and its failure removed the staging folder before anything was moved:
    `save_pretrained(push_to_hub=True)` with the connection dropping lost the whole local save (stock keeps it).
    The upload now follows the local save, with transformers' own repo, card and changed-files calls."""
    import types

    import transformers.modeling_utils as hf_modeling
    from transformers.utils.hub import PushToHubMixin

    calls = {}

    class Api:
        def create_repo(self, repo_id, exist_ok=True, **kwargs):
            calls["repo"] = (repo_id, kwargs)
            return types.SimpleNamespace(repo_id="someone/" + repo_id)

    def upload(self, folder, repo_id, timestamps, **kwargs):
        calls["upload"] = (folder, repo_id, sorted(timestamps), kwargs)
        raise ConnectionError("connection reset during upload")

    monkeypatch.setattr(hf_modeling, "hf_api", lambda *a, **k: Api())
    monkeypatch.setattr(hf_modeling, "create_and_tag_model_card",
                        lambda *a, **k: types.SimpleNamespace(save=lambda path: open(path, "w").write("card")))
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    model = make_model()
    folder = tmp_path / "rcp-push"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text("{}")  # there before: not a change of this save
    with pytest.raises(ConnectionError, match="connection reset"):
        model.save_pretrained(folder, push_to_hub=True, private=True, commit_message="msg", token="hf_t")
    assert {"config.json", "model.safetensors", "modeling_rcp_llava.py", "README.md"} <= set(_names(folder))
    assert not [n for n in _names(folder) if n.startswith(".rcp-save")]
    # the token reaches the repo's creation too (a review: it went to the upload only, so another login's account)
    assert calls["repo"] == ("rcp-push", {"private": True, "token": "hf_t"})
    assert calls["upload"][:3] == (str(folder), "someone/rcp-push", ["preprocessor_config.json"])
    assert calls["upload"][3]["commit_message"] == "msg" and calls["upload"][3]["token"] == "hf_t"
    RcpLlavaForConditionalGeneration.from_pretrained(folder)  # a complete model
    # A card already in the folder (an RCP model card) is kept and uploaded, not replaced by the Hub's template.
    (folder / "README.md").write_text("# my RCP card")
    with pytest.raises(ConnectionError):
        model.save_pretrained(folder, push_to_hub=True)
    assert (folder / "README.md").read_text() == "# my RCP card" and "README.md" not in calls["upload"][2]
    # a folder given with a trailing separator names the same repo (basename of "rcp-push/" is "")
    with pytest.raises(ConnectionError):
        model.save_pretrained(f"{folder}/", push_to_hub=True)
    assert calls["repo"][0] == "rcp-push"


def test_save_pretrained_stages_inside_the_folder(tmp_path, monkeypatch):
    """The staging folder sat beside the target, so a target that is a mount point (or a link to another disk) made
    every rename cross filesystems: "Invalid cross-device link". It is now inside the target; a failed first save
    leaves no folder, a failed later save the previous one."""
    import os

    model = make_model()
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((os.path.dirname(os.path.dirname(src)), os.path.dirname(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    model.save_pretrained(tmp_path / "m")
    assert renames and {a for a, _ in renames} == {str(tmp_path / "m")} == {b for _, b in renames}
    monkeypatch.setattr(os, "replace", real_replace)

    import transformers.modeling_utils as hf_modeling

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_modeling, "save_file", disk_full, raising=False)
    monkeypatch.setattr(hf_modeling, "safe_save_file", disk_full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    before = {n: (tmp_path / "m" / n).read_bytes() for n in _names(tmp_path / "m")}
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "m")
    assert {n: (tmp_path / "m" / n).read_bytes() for n in _names(tmp_path / "m")} == before


def test_a_killed_saves_staging_is_removed_by_the_next_save(tmp_path):
    """A save killed mid-write (SIGKILL, out of memory) left `.rcp-save-<pid>` with partial weights inside the model
    folder for good, and a push of the folder uploaded it. The next save removes staging whose process is gone."""
    import os
    import subprocess
    import sys

    model = make_model()
    model.save_pretrained(tmp_path / "m")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "m" / f".rcp-save-{dead.stdout.strip()}").mkdir()
    (tmp_path / "m" / f".rcp-save-{dead.stdout.strip()}" / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / "m" / f".rcp-save-{os.getppid()}"  # a save in progress in another process: left alone
    alive.mkdir()
    model.save_pretrained(tmp_path / "m")
    assert [n for n in _names(tmp_path / "m") if n.startswith(".rcp-save")] == [alive.name]


def test_a_missing_local_plugin_folder_is_named(tmp_path):
    """`from_base(..., plugins=path)`, `load_plugins` and `load_adapter` on a mistyped local path said transformers'
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (README promises the path is named)."""
    model = make_model()
    for path in (str(tmp_path / "no_such_dir"), "./outputs/rcp_deep/plugins"):
        with pytest.raises(FileNotFoundError, match=r"`plugins` .*: no such folder \(and it is not a Hub repo id"):
            model.load_plugins(path)
        with pytest.raises(FileNotFoundError, match=r"`plugins` .*: no such folder"):
            model.load_adapter(path)


def test_visual_tokens_per_image_is_one_rule_for_every_llava_config():
    """N of a stock LlavaConfig, of RcpLlavaConfig and of the FLOP accounting: train_rcp computed its own without the
    CLS token of `vision_feature_select_strategy="full"`, so its budget range was one token short of the config's."""
    from transformers import LlavaConfig

    from configuration_rcp_llava import visual_tokens_per_image
    from rcp_llava.flops import _num_image_feature_tokens

    for strategy, n in (("default", NUM_VISUAL), ("full", NUM_VISUAL + 1)):
        config = tiny_config(vision_feature_select_strategy=strategy)
        stock = LlavaConfig(**{k: v for k, v in config.to_dict().items() if k in LlavaConfig().to_dict()})
        assert visual_tokens_per_image(stock) == config.num_visual_tokens == _num_image_feature_tokens(stock) == n


def test_numpy_scalars_placement_takes_them_and_fields_name_their_type():
    """`paper_placement(32, np.float32(1/9))` said "must be a fraction in (0, 1], got np.float32(0.11)", which it is;
    config fields refuse numpy scalars (saved as JSON; stock's strict check refuses them too), but said "must be a
    positive int, got np.int64(8)", which read as a contradiction."""
    import numpy as np

    assert RcpLlavaConfig.paper_placement(np.int64(32), np.float32(64 / 576)) == ([1, 13, 25], [22, 29])
    for overrides, error, message in [
        ({"num_pruning_queries": np.int64(8)}, ValueError,
         "`num_pruning_queries` must be a positive int, got np.int64(8) (int64, not a Python int: pass int(value))."),
        ({"query_dropout": np.float32(0.1)}, ValueError, "`query_dropout` must be a float in [0, 1), got "
                                                         "np.float32(0.1) (float32, not a Python float: pass "
                                                         "float(value))."),
        ({"pruning_layers": [np.int64(1), 2]}, TypeError, "`pruning_layers` must be a list of ints, got "
                                                          "[np.int64(1), 2] (int64, not a Python int: pass int(value))."),
        ({"query_dropout": 2.0}, ValueError, "`query_dropout` must be a float in [0, 1), got 2.0."),
    ]:
        with pytest.raises(error) as err:
            tiny_config(**overrides)
        assert str(err.value) == message


def test_config_boundaries_of_placement_and_layers():
    """Each boundary of the config's defaults and checks, pinned where a mutation of it passed every other test."""
    from transformers import LlamaConfig

    def text(layers):
        return LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=100).to_dict()

    # 96 of 576 is as far from 64 as from 128: the tie goes to the smaller budget's placement
    assert paper_placement(32, 96 / 576) == ([1, 13, 25], [22, 29])
    # a budget of all N tokens is a budget (the 192-token placement), not "no budget" (the 64-token default)
    assert tiny_config(text_config=text(32), pruning_layers=None, repair_layers=None, pruning_keep_counts=None,
                       visual_token_budget=16.0).pruning_layers == [4, 14, 24]
    assert default_fastv_layer(8) == 1 and default_fastv_layer(9) == 2  # FastV's K=2, scaled down to 8 layers
    # on two layers the one adapter sits at the pruner's own layer
    assert tiny_config(text_config=text(2), pruning_layers=None, repair_layers=None,
                       pruning_keep_counts=None).repair_layers == [1]
    # 0.5 tokens per layer is reachable when N / L < 1 (a pre-LLM method keeping none in most layers)
    assert tiny_config(text_config=text(32), pruning_layers=[1, 2], repair_layers=[2, 3],
                       visual_token_budget=0.5).visual_token_budget == 0.5
    with pytest.raises(ValueError, match=re.escape("`repair_layers` contains [4], but the text model has 4 layers; "
                                                   "use indices in [0, 4).")):
        tiny_config(repair_layers=[2, 4])
    with pytest.raises(ValueError, match=re.escape("`pruning_layers` is empty; `pruning_method='rcp'` needs at least "
                                                   "one pruning layer.")):
        tiny_config(pruning_layers=[], repair_layers=[], pruning_keep_counts=None)


def test_a_plugin_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The weights are written to a temporary name and renamed over the old file: a save that dies after writing
    part of them (disk full, a kill) leaves the previous plug-ins loadable and no temporary file behind."""
    import modeling_rcp_llava

    model = make_model(randomize_plugins=True)
    folder = tmp_path / "plugins"
    model.save_plugins(folder)
    before = {n: (folder / n).read_bytes() for n in _names(folder)}

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(modeling_rcp_llava, "_save_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_plugins(folder)
    monkeypatch.undo()
    assert {n: (folder / n).read_bytes() for n in _names(folder)} == before
    fresh = make_model()
    fresh.load_plugins(folder)
    assert all(torch.equal(a, b) for a, b in zip(fresh.plugin_parameters(), model.plugin_parameters()))


def test_a_sharded_variant_save_keeps_the_plain_weights(tmp_path):
    """A sharded `variant="fp16"` save removes only earlier files of its own weights (the fp16 family), never
    `model.safetensors` of the plain save beside it."""
    model = make_model()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    model.save_pretrained(folder, variant="fp16", max_shard_size="100KB")
    names = _names(folder)
    assert "model.safetensors" in names
    assert len([n for n in names if n.startswith("model.fp16-")]) > 1


def test_from_base_copies_the_generation_config_instead_of_sharing_it():
    """`from_base(loaded_model)` shares the backbone's modules, not its generation settings: editing the RCP model's
    `generation_config` leaves the stock model's as it was."""
    base = stock_copy(make_model())
    rcp = RcpLlavaForConditionalGeneration.from_base(base)
    rcp.generation_config.max_new_tokens = 7
    assert base.generation_config.max_new_tokens is None


def test_from_base_with_trained_plugins_on_a_stock_folder_does_not_call_them_new(tmp_path, caplog):
    """`from_base(stock_folder, plugins=...)` loads trained plug-ins over a stock checkpoint: the "RCP plug-ins are
    new ... Train them" warning is for a stock checkpoint loaded without any."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model = make_model(randomize_plugins=True)
    stock_config = LlavaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlavaConfig().to_dict()})
    stock = LlavaForConditionalGeneration(stock_config)
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if ".rcp_plugins." not in k})
    stock.save_pretrained(tmp_path / "base")  # a llava-typed folder (`stock_copy` keeps the rcp_llava config)
    model.save_plugins(tmp_path / "plugins", base_model_name_or_path=str(tmp_path / "base"))
    with caplog.at_level(logging.WARNING):
        loaded = RcpLlavaForConditionalGeneration.from_base(tmp_path / "base", plugins=tmp_path / "plugins")
    assert "RCP plug-ins are new" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(loaded.plugin_parameters(), model.plugin_parameters()))
    with caplog.at_level(logging.WARNING):
        RcpLlavaForConditionalGeneration.from_base(tmp_path / "base")
    assert "RCP plug-ins are new" in caplog.text  # the warning itself still comes where it belongs
