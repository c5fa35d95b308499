"""Bad input gets a clear error naming the field (acceptance 7); save/load round trips (acceptance 8)."""

import logging

import pytest
import torch
from conftest import NUM_VISUAL, make_batch, make_model, randomize_plugin_parameters, stock_copy, tiny_config

from configuration_rcp_llava import RcpLlavaConfig
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
        ({"query_dropout": 1.5}, ValueError, r"`query_dropout`"),
        ({"gumbel_temperature": 0}, ValueError, r"`gumbel_temperature`"),
        ({"num_pruning_queries": 0}, ValueError, r"`num_pruning_queries`"),
        ({"pruning_layers": "1,2"}, TypeError, r"`pruning_layers` must be a list of ints"),
    ],
)
def test_bad_config_fields(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


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
