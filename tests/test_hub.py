"""Hub integration: remote code in a fresh offline process, Auto registration, pipelines, plug-in-only checkpoints,
model cards and the push helper (up to the upload call; the Hub is never contacted)."""

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_where_rcp_llava_is_not_installed


import modeling_rcp_llava  # noqa: E402
from modeling_rcp_llava import (  # noqa: E402
    PLUGIN_PREFIX,
    PRUNING_FIELDS,
    RCP_AUTO_MAP,
    RCP_CONFIG_NAME,
    RCP_PLUGINS_NAME,
    RcpLlavaForConditionalGeneration,
    RcpLlavaModel,
    RcpPruner,
)
from configuration_rcp_llava import RcpLlavaConfig  # noqa: E402
from rcp_llava import demo, hub  # noqa: E402


QUESTION = "what is in the image?"


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def demo_inputs(processor, size=16, seed=0):
    image = demo.demo_image(size, seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return image, processor(images=image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved demo folder (model + processor + card) and the in-process model it came from."""
    folder = tmp_path_factory.mktemp("hub") / "rcp-demo"
    folder, model, processor = demo.save_demo_folder(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def plugin_setup(tmp_path_factory):
    """A 'trained' RCP model (random plug-ins), the stock LLaVA base it was built on (saved), and its plug-ins."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("plugins")
    trained = demo.build_demo_model(seed=3, randomize_plugins=True)
    stock_config = LlavaConfig.from_dict(
        {k: v for k, v in trained.config.to_dict().items() if k in LlavaConfig().to_dict()}
    )
    base = LlavaForConditionalGeneration(stock_config).eval()
    base.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith(PLUGIN_PREFIX)})
    base.save_pretrained(root / "base")
    files = trained.save_plugins(root / "plugins", base_model_name_or_path=str(root / "base"))
    trained.save_pretrained(root / "full")
    return trained, root, files


# ------------------------------------------------------------------------------------------------
# Remote-code files
# ------------------------------------------------------------------------------------------------


def test_the_helper_runs_where_the_package_is_not_installed(tmp_path):
    """Isolated mode alone kept the editable install's finder (`pip install -e .`, as in CI): the Hub-file tests
    that run `run_where_rcp_llava_is_not_installed` imported the project and could not see a Hub file lean on it."""
    code = ("import importlib, sys\n"
            "for name in ('modeling_rcp_llava', 'configuration_rcp_llava', 'rcp_llava', 'rcp_llava.data', 'train_rcp'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError as err:\n"
            "        print('missing', err.name)\n"
            "assert 'runpy' not in globals() and '_code' not in globals()  # nothing of the prelude, as python -c\n"
            "import pickle, transformers\n"
            "class Local:\n"
            "    pass\n"
            "print('argv', sys.argv[1:], __name__, len(pickle.dumps(Local())) > 0)\n")  # run in __main__ itself
    proc = run_where_rcp_llava_is_not_installed(["-c", code, "a", "b"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["missing modeling_rcp_llava", "missing configuration_rcp_llava",
                                        "missing rcp_llava", "missing rcp_llava", "missing train_rcp",
                                        "argv ['a', 'b'] __main__ True"]
    (tmp_path / "script.py").write_text(code)
    proc = run_where_rcp_llava_is_not_installed(["script.py", "c"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "argv ['c'] __main__ True"


@pytest.mark.parametrize("name", ["configuration_rcp_llava.py", "modeling_rcp_llava.py"])
def test_hub_files_import_only_stdlib_torch_transformers(name):
    from transformers.dynamic_module_utils import check_imports, get_imports, get_relative_imports

    path = os.path.join(ROOT, name)
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    assert set(get_imports(path)) <= allowed, set(get_imports(path)) - allowed
    expected = {"modeling_rcp_llava.py": ["configuration_rcp_llava"], "configuration_rcp_llava.py": []}[name]
    assert get_relative_imports(path) == expected
    assert check_imports(path) == expected  # the loader's own check (raises ImportError on a missing package)


def test_save_pretrained_writes_a_hub_folder(saved):
    folder, model, _ = saved
    names = set(os.listdir(folder))
    assert {*hub.FULL_MODEL_FILES, "model.safetensors", "README.md", "processor_config.json",
            "tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == RCP_AUTO_MAP
    assert config["model_type"] == "rcp_llava"
    for name in ("configuration_rcp_llava.py", "modeling_rcp_llava.py"):  # byte-identical copies of the repo files
        assert (folder / name).read_bytes() == Path(ROOT, name).read_bytes()
    assert RcpLlavaForConditionalGeneration._auto_class is None  # the temporary marking is undone


def test_demo_folder_is_written_where_asked(tmp_path):
    """`save_demo_folder(DIR)` writes into DIR and returns it; ignoring DIR for a new temp folder (a mutation audit)
    passed every test, which read the folder it returns."""
    folder = tmp_path / "demo"
    returned, _, _ = demo.save_demo_folder(folder)
    assert returned == folder
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(folder))


def test_demo_model_is_the_documented_tiny_model():
    """`build_demo_model()` is what the module documents: 4 text layers, 16 visual tokens, pruners before layers 1 and
    2 keeping 8 then 4, one repair adapter after layer 3; `overrides` replace config fields; generation pads and stops
    with the text config's ids; the plug-ins are randomized (a fresh model's are a no-op). Keep counts [8, 5], the
    overrides ignored, or zero plug-ins (a mutation audit) passed every test that reads the demo's folder."""
    model = demo.build_demo_model()
    config = model.config
    assert (config.text_config.num_hidden_layers, config.image_seq_length, config.pruning_layers,
            config.pruning_keep_counts, config.repair_layers) == (4, 16, [1, 2], [8, 4], [3])
    assert demo.build_demo_model(pruning_keep_counts=[6, 3]).config.pruning_keep_counts == [6, 3]
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 2)
    plugins = list(model.plugin_parameters())
    assert plugins and all(bool((p != 0).any()) for p in plugins)


def test_demo_folder_saves_the_model_its_seed_and_plugin_setting_build(tmp_path):
    """`save_demo_folder(DIR, seed=..., randomize_plugins=...)` saves `build_demo_model` of those arguments: either one
    ignored (a mutation audit) saved another model than asked, and no test noticed."""
    for seed, randomize in ((3, False), (3, True)):
        folder = tmp_path / f"demo-{seed}-{randomize}"
        _, model, _ = demo.save_demo_folder(folder, seed=seed, randomize_plugins=randomize)
        expected = demo.build_demo_model(seed=seed, randomize_plugins=randomize).state_dict()
        saved = RcpLlavaForConditionalGeneration.from_pretrained(folder).state_dict()
        assert saved.keys() == expected.keys() == model.state_dict().keys()
        assert all(torch.equal(saved[k], expected[k]) for k in saved), (seed, randomize)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), (seed, randomize)
    plugins = [p for p in demo.build_demo_model(seed=3, randomize_plugins=False).plugin_parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(plugins, demo.build_demo_model(seed=3).plugin_parameters()))


def test_demo_module_saves_a_folder_where_asked_and_prints_it(tmp_path):
    """`python -m rcp_llava.demo --demo-folder DIR` (the README's way to get a Hub-loadable folder) saves into DIR and
    prints its path (the one thing a caller of `--demo-folder` without DIR learns). Printing nothing (a mutation
    audit) passed every test; ignoring DIR failed only the slow examples test."""
    folder = tmp_path / "cli demo"
    proc = subprocess.run([sys.executable, "-m", "rcp_llava.demo", "--demo-folder", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == str(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(folder))


def test_demo_tokenizer_keeps_the_special_ids_and_the_models_vocab():
    """The demo tokenizer puts `<pad>`, `<s>`, `</s>` at the config's ids 0-2 and `<image>` at its image index, and
    holds exactly `vocab_size` tokens. Filling ids with words first (a mutation audit) put `<unk>`, `USER`,
    `ASSISTANT` at 0-2 and appended the special tokens at 1000-1002, beyond the model's embedding table."""
    config = demo.demo_config()
    tokenizer = demo.build_demo_processor(config).tokenizer
    assert len(tokenizer) == config.text_config.vocab_size == 1000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 999]) == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert config.image_token_index == 999


def test_fresh_offline_process_loads_through_every_auto_class(saved, tmp_path):
    """save -> a fresh `python -I` process, package not importable, HF_HUB_OFFLINE=1, private HF_MODULES_CACHE:
    AutoConfig, AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel, AutoProcessor, the pipeline and the
    model card's usage snippet; logits and `generate` identical to the in-process model."""
    folder, model, processor = saved
    image, inputs = demo_inputs(processor)
    image.save(tmp_path / "image.jpg")  # the card snippet opens "image.jpg"
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_hidden = model.model(**inputs).last_hidden_state
        ref_tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ref_kept = model.last_pruning_info.kept_counts
    ref_answer = processor.decode(ref_tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    card_snippet = hub.usage_snippet(str(folder))

    script = textwrap.dedent(f"""
        import importlib, json, sys, os
        # `run_where_rcp_llava_is_not_installed` hides the project (an editable install, as in CI, maps it even
        # under `python -I`): this process sees an environment without it, as a Hub user has.
        for name in ("modeling_rcp_llava", "configuration_rcp_llava", "rcp_llava"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} is importable: the test must run without the project")
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's (conftest: RCP_TEST_THREADS): equal logits
        from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor, pipeline)
        folder = {str(folder)!r}
        inputs = torch.load("inputs.pt")
        out = {{}}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        out["config_class"] = type(config).__module__ + "." + type(config).__name__
        config.validate_pruning()
        for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            out[auto.__name__ + "_class"] = type(model).__module__ + "." + type(model).__name__
            out[auto.__name__ + "_file"] = sys.modules[type(model).__module__].__file__
            with torch.no_grad():
                out[auto.__name__ + "_logits"] = model(**inputs).logits
                out[auto.__name__ + "_tokens"] = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6,
                                                                do_sample=False)
            out[auto.__name__ + "_kept"] = model.last_pruning_info.kept_counts
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        out["AutoModel_class"] = type(base).__name__
        with torch.no_grad():
            out["AutoModel_hidden"] = base(**inputs).last_hidden_state
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        out["processor_class"] = type(processor).__name__
        from PIL import Image
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        out["processor_ids"] = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")["input_ids"]
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open("image.png")}},
                                                 {{"type": "text", "text": {QUESTION!r}}}]}}]
        res = pipe(text=messages, return_full_text=False,
                   generate_kwargs=dict(max_new_tokens=6, min_new_tokens=6, do_sample=False))
        out["pipeline_answer"] = res[0]["generated_text"]
        out["pipeline_kept"] = pipe.model.last_pruning_info.kept_counts
        namespace = {{}}
        exec({card_snippet!r}, namespace)  # the model card's usage snippet, verbatim
        out["snippet_kept"] = namespace["model"].last_pruning_info.kept_counts
        torch.save(out, "out.pt")
    """)
    (tmp_path / "check.py").write_text(script)
    image.save(tmp_path / "image.png")  # lossless copy for the pipeline comparison
    proc = run_where_rcp_llava_is_not_installed(["check.py"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = torch.load(tmp_path / "out.pt")

    assert out["config_class"].startswith("transformers_modules.") and out["config_class"].endswith(".RcpLlavaConfig")
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        assert out[auto + "_class"].startswith("transformers_modules.")
        assert out[auto + "_class"].endswith(".RcpLlavaForConditionalGeneration")
        assert out[auto + "_file"].startswith(str(tmp_path / "modules"))
        assert torch.equal(out[auto + "_logits"], ref_logits), auto
        assert torch.equal(out[auto + "_tokens"], ref_tokens), auto
        assert torch.equal(out[auto + "_kept"], ref_kept), auto
    assert out["AutoModel_class"] == "RcpLlavaModel"
    assert torch.equal(out["AutoModel_hidden"], ref_hidden)
    assert out["processor_class"] == "LlavaProcessor"
    assert torch.equal(out["processor_ids"], inputs["input_ids"])  # `<image>` expanded to the visual tokens
    assert out["pipeline_answer"].strip() == ref_answer.strip()
    assert torch.equal(out["pipeline_kept"], ref_kept)  # pruning active in the pipeline
    assert out["snippet_kept"].shape == ref_kept.shape


def test_installed_package_registers_the_auto_classes(saved):
    """`import rcp_llava` registers the classes: no trust_remote_code, no remote module."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    import rcp_llava

    folder, model, processor = saved
    assert isinstance(AutoConfig.from_pretrained(folder), rcp_llava.RcpLlavaConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(loaded) is RcpLlavaForConditionalGeneration
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is RcpLlavaForConditionalGeneration
    assert type(AutoModel.from_pretrained(folder)) is rcp_llava.RcpLlavaModel
    _, inputs = demo_inputs(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


# ------------------------------------------------------------------------------------------------
# Plug-in-only checkpoints
# ------------------------------------------------------------------------------------------------


def test_plugin_folder_files_and_format(plugin_setup):
    import hashlib

    from safetensors import safe_open

    trained, root, files = plugin_setup
    plugins = root / "plugins"
    assert sorted(os.listdir(plugins)) == sorted(hub.PLUGIN_FILES) == [RCP_CONFIG_NAME, RCP_PLUGINS_NAME]
    assert [Path(f).name for f in files] == [RCP_CONFIG_NAME, RCP_PLUGINS_NAME]
    text = (plugins / RCP_CONFIG_NAME).read_text()
    record = json.loads(text)
    assert text == json.dumps(record, indent=2, sort_keys=True) + "\n"
    assert {*PRUNING_FIELDS, "base_model_name_or_path", "library_version", "hidden_size",
            "num_hidden_layers"} <= set(record)
    assert record["base_model_name_or_path"] == str(root / "base")
    assert record["library_version"] == modeling_rcp_llava.RCP_LLAVA_VERSION
    assert record["pruning_layers"] == [1, 2] and record["hidden_size"] == 128
    with safe_open(plugins / RCP_PLUGINS_NAME, framework="pt") as f:
        # the fingerprint of what the config says about the tensors pairs the two files (a save interrupted
        # between their renames is refused)
        fields = {k: record[k] for k in (*PRUNING_FIELDS, "hidden_size", "num_hidden_layers", "num_visual_tokens")}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        assert f.metadata() == {"format": "pt", "rcp_config_sha256": digest, "rcp_config_fields": ",".join(fields)}
        assert set(f.keys()) == set(trained.plugin_state_dict())
    # Plug-ins are <= 1% of the full model folder.
    assert folder_bytes(plugins) <= 0.01 * folder_bytes(root / "full"), (folder_bytes(plugins),
                                                                          folder_bytes(root / "full"))


def test_version_matches_setup_cfg():
    import configparser

    import rcp_llava

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert rcp_llava.__version__ == modeling_rcp_llava.RCP_LLAVA_VERSION == cfg["metadata"]["version"]


def test_tested_transformers_matches_setup_cfg():
    """The version the import-time warning names is setup.cfg's pin: `>=5.23,<5.24` <-> (5, 23)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    pin = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if "transformers" in line]
    major, minor = modeling_rcp_llava.TESTED_TRANSFORMERS
    assert pin == [f"transformers>={major}.{minor},<{major}.{minor + 1}"]


def test_datasets_pin_holds_what_the_code_imports():
    """setup.cfg allowed datasets 3.x, whose namespace has no `List` (added in 4.0): `train_rcp` and the testbed
    failed at import there, and pip upgraded nothing."""
    import configparser

    import rcp_llava.testbed.data as testbed_data

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    pin = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.startswith("datasets")]
    assert pin == ["datasets>=4.0"]
    assert testbed_data.List.__module__.startswith("datasets.")  # the 4.0 name the pin is for


@pytest.mark.parametrize("version,warned", [("5.23.0", False), ("5.23.4.dev0", False), ("5.17.0", True),
                                            ("5.24.0", True), ("6.0.0", True), ("5.2", True), ("main", True)])
def test_untested_transformers_message(version, warned):
    message = modeling_rcp_llava.untested_transformers(version)
    if not warned:
        assert message is None
        return
    assert message == (f"rcp-llava's decoder loop was measured on transformers 5.23.x and relies on its internals; "
                       f"this is transformers {version}, untested: pruned outputs may differ or fail. Install "
                       "`transformers>=5.23,<5.24`.")


def test_import_warns_once_on_an_untested_transformers():
    """Remote code runs on whatever transformers is installed (pip's pin does not apply): importing the modeling
    file on another version names it on stderr; on the tested one it says nothing."""
    # The version is patched on the module that `sys.modules` holds once transformers' model classes are loaded:
    # loading them replaces the lazy `transformers` module object (measured on 5.23).
    code = ("import sys; from transformers import LlavaForConditionalGeneration, DynamicCache; "
            "sys.modules['transformers'].__version__ = {!r}; import modeling_rcp_llava")
    for version, expected in (("5.17.0", 1), (None, 0)):
        patched = code.format(version) if version else "import modeling_rcp_llava"
        result = subprocess.run([sys.executable, "-c", patched], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("this is transformers 5.17.0, untested") == expected, result.stderr[-2000:]
        assert result.stderr.count("rcp-llava's decoder loop was measured on") == expected, result.stderr[-2000:]


def test_from_base_round_trip_identical_logits(plugin_setup):
    trained, root, _ = plugin_setup
    model = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(root / "plugins")).eval()
    for name in PRUNING_FIELDS:
        assert getattr(model.config, name) == getattr(trained.config, name), name
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    processor = demo.build_demo_processor(trained.config)
    _, inputs = demo_inputs(processor, seed=1)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, trained(**inputs).logits)
        a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        b = trained.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    # save_plugins defaults to the base it was built from.
    model.save_plugins(root / "again")
    assert json.loads((root / "again" / RCP_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(root / "base")


def test_from_base_overrides_and_no_plugins(plugin_setup):
    trained, root, _ = plugin_setup
    model = RcpLlavaForConditionalGeneration.from_base(
        str(root / "base"), plugins=str(root / "plugins"), pruning_keep_counts=[6, 2], dtype=torch.float64
    )
    assert model.config.pruning_keep_counts == [6, 2] and model.dtype == torch.float64
    fresh = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), pruning_layers=[1], repair_layers=[],
                                                       pruning_keep_counts=[3])
    # Fresh plug-ins: the authors' initialisation (pruner bias 2.0; issue 15), not the trained set's.
    assert fresh.config.pruning_layers == [1] and fresh.model.rcp_plugins.pruners["1"].bias.item() == 2.0


def _edit_plugins(root, name, edit_config=None, drop_keys=()):
    from safetensors.torch import load_file, save_file

    src, dst = root / "plugins", root / name
    dst.mkdir()
    record = json.loads((src / RCP_CONFIG_NAME).read_text())
    if edit_config:
        edit_config(record)
    (dst / RCP_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
    tensors = {k: v for k, v in load_file(src / RCP_PLUGINS_NAME).items() if k not in drop_keys}
    save_file(tensors, dst / RCP_PLUGINS_NAME, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", 256, r"`hidden_size` 256 \(plug-ins\) != 128 \(base\)"),
    ("num_hidden_layers", 32, r"`num_hidden_layers` 32 \(plug-ins\) != 4 \(base\)"),
    # another vision tower's N failed after the base loaded, blaming the plug-in sizes (the context's table is N wide)
    ("num_visual_tokens", 64, r"`num_visual_tokens` 64 \(plug-ins\) != 16 \(base\)"),
])
def test_from_base_mismatch_fails_before_any_tensor(plugin_setup, monkeypatch, field, value, match):
    _, root, _ = plugin_setup
    bad = _edit_plugins(root, f"bad_{field}", lambda r: r.update({field: value}))

    def no_tensor(*args, **kwargs):
        raise AssertionError("a tensor was read before the compatibility check")

    monkeypatch.setattr(modeling_rcp_llava, "_load_safetensors", no_tensor)
    monkeypatch.setattr(RcpLlavaForConditionalGeneration, "from_pretrained", no_tensor)
    with pytest.raises(ValueError, match=match):
        RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(bad))


def test_load_plugins_into_a_model_built_in_code_names_it_so(plugin_setup):
    """A model built in code has no name (`name_or_path` is ''): the size mismatch read "trained for another model
    than ''"."""
    _, root, _ = plugin_setup
    model = demo.build_demo_model(seed=5, text_config=dict(demo.demo_config().text_config.to_dict(), hidden_size=64))
    assert model.name_or_path == ""
    with pytest.raises(ValueError, match=r"were trained for another model than this one \(built in code, no name\): "
                                         r"`hidden_size` 128 \(plug-ins\) != 64 \(base\)\."):
        model.load_plugins(str(root / "plugins"))


def test_load_plugins_shape_mismatch_fails_before_copy(plugin_setup):
    trained, root, _ = plugin_setup
    model = demo.build_demo_model(seed=5, randomize_plugins=False, pruner_hidden_size=16)
    before = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    with pytest.raises(ValueError, match="do not fit this model's plug-in sizes"):
        model.load_plugins(str(root / "plugins"))
    assert all(torch.equal(before[k], v) for k, v in model.plugin_state_dict().items())


def test_missing_plugin_keys_raise_by_default_and_warn_with_strict_false(plugin_setup, caplog):
    """Issue 18 made `from_base` strict by default (a layer mismatch used to warn and silently keep an untrained
    adapter); `strict=False` keeps the old warning."""
    _, root, _ = plugin_setup
    dropped = sorted(k for k in plugin_setup[0].plugin_state_dict() if ".repair_adapters.3.up." in k)
    folder = _edit_plugins(root, "partial", lambda r: r.update(lora_alpha=8), drop_keys=dropped)
    with pytest.raises(ValueError, match=r"do not match the model: missing \['model.rcp_plugins.repair_adapters.3"):
        RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(folder))
    with caplog.at_level(logging.WARNING):
        model = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(folder), strict=False)
    assert "unknown keys ['lora_alpha']" in caplog.text
    assert "have no tensor for 2 plug-in parameter(s)" in caplog.text
    for key in dropped:
        assert key in caplog.text
    assert "LOAD REPORT" not in caplog.text  # the plug-ins are not in transformers' report: they are loaded next
    assert "not sharded" not in caplog.text  # no logger quieting (it made transformers run verify_tp_plan)
    assert model.model.rcp_plugins.repair_adapters["3"].up.bias.abs().sum() == 0  # kept its initial value


def test_plugins_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an RCP plug-in folder"):
        modeling_rcp_llava.read_plugin_config(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------


EVAL_JSON = {
    "average_kept_tokens": 6.0,
    "results": [
        {"dataset": "VQAv2", "dataset_type": "HuggingFaceM4/VQAv2", "split": "testdev", "metric": "accuracy",
         "value": 75.4, "kept_tokens": 6},
        {"dataset": "POPE", "dataset_type": "lmms-lab/POPE", "metric": "f1", "value": 85.9},
    ],
}


@pytest.mark.parametrize("plugins_only", [False, True])
def test_model_card_metadata_table_snippet_round_trip(tmp_path, plugins_only):
    """Issue 18 changed the card: rows say method / budget / tokens per layer; a plug-in card is an adapter card
    (`library_name: rcp-llava`, `base_model_relation: adapter`), not a transformers model without a config."""
    from huggingface_hub import ModelCard

    (tmp_path / "eval.json").write_text(json.dumps(EVAL_JSON))
    config = demo.demo_config()
    card = hub.build_model_card(
        config, repo_id="someone/rcp-llava-demo", base_model="llava-hf/llava-1.5-7b-hf", plugins_only=plugins_only,
        eval_results=tmp_path / "eval.json", training_args={"learning_rate": 1e-4, "num_train_epochs": 1},
        license="llama2",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.base_model == "llava-hf/llava-1.5-7b-hf" and data.license == "llama2"
    assert data.pipeline_tag == "image-text-to-text"
    if plugins_only:
        assert data.library_name == "rcp-llava" and data.to_dict()["base_model_relation"] == "adapter"
    else:
        assert data.library_name == "transformers" and "base_model_relation" not in data.to_dict()
    assert {"rcp-llava", "visual-token-pruning"} <= set(data.tags)
    assert ("rcp-plugins" in data.tags) == plugins_only
    results = {(r.dataset_name, r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("VQAv2", "HuggingFaceM4/VQAv2", "accuracy"): 75.4, ("POPE", "lmms-lab/POPE", "f1"): 85.9}
    assert data.to_dict()["model-index"][0]["name"] == "rcp-llava-demo"
    assert data.to_dict()["rcp_llava"]["pruning_layers"] == [1, 2]
    assert data.to_dict()["rcp_llava"]["average_kept_visual_tokens"] == 6.0
    text = loaded.text
    assert "| rcp |  | 6 | VQAv2 | testdev | accuracy | 75.4 |" in text
    assert "| `pruning_keep_counts` | [8, 4] |" in text
    assert "**Average kept visual tokens per decoder layer:** 6.0 (the mean over all 4 decoder layers" in text
    assert "- `learning_rate`: 0.0001" in text
    if plugins_only:
        assert "RcpLlavaForConditionalGeneration.from_base(base_id, plugins='someone/rcp-llava-demo')" in text
        assert RCP_PLUGINS_NAME in text and "AutoModelForImageTextToText" not in text
    else:
        assert "AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)" in text
        assert "AutoProcessor.from_pretrained(model_id, trust_remote_code=True)" in text
    assert str(loaded) == str(card)  # the round trip keeps the card unchanged


TRAIN_RCP_METRICS = {
    "base_model": "b", "visual_token_budget": 16.0, "num_visual_tokens": 144,
    "full": {"accuracy": 0.916, "n": 500}, "rcp": {"accuracy": 0.802, "avg_visual_tokens_per_layer": 43.799503326416016},
    "rcp_fixed_counts": {"accuracy": 0.792}, "prior_fixed_counts": {"accuracy": 0.8}, "random_fixed_counts": {"accuracy": 0.5},
}


def config_144(**overrides):
    """The demo config at 144 visual tokens (48-px images), the count TRAIN_RCP_METRICS was measured at."""
    vision = demo.demo_config().vision_config.to_dict()
    vision["image_size"] = 48
    return demo.demo_config(vision_config=vision, image_seq_length=144, **overrides)


def test_card_of_a_training_job_keeps_the_baselines_out_of_model_index():
    """train_rcp.py's metrics.json: the unpruned model's accuracy is a labelled baseline row in the text, never this
    checkpoint's result; the testbed (no Hub id) is not in model-index; the kept tokens are rounded."""
    card = hub.build_model_card(config_144(), repo_id="x/y", eval_results=TRAIN_RCP_METRICS, license="mit")
    meta = card.data.to_dict()
    assert "model-index" not in meta and "0.916" not in str(meta)
    assert meta["rcp_llava"]["average_kept_visual_tokens"] == 43.8
    text = card.text
    assert "| rcp (adaptive) | 16 of 144 tokens | 43.8 | rcp-llava testbed |  | accuracy | 0.802 |" in text
    assert "| full model (all visual tokens) (baseline) |  | 144 | rcp-llava testbed |  | accuracy | 0.916 |" in text
    assert "| attention_topk (RCP's prior alone, same counts) (baseline) | 16 of 144 tokens |" in text
    assert text.count("| rcp-llava testbed |") == 4  # no two identical unlabelled rows


def test_a_pipe_in_a_name_stays_in_its_cell():
    """A '|' in a dataset or metric name ("vqa|val", lmms-eval's "acc,none|...") split its row into more columns than
    the header has: the value landed under the wrong heading."""
    entries = [{"dataset": "vqa|val", "metric": "acc|norm", "value": 0.5, "method": "fast|v", "baseline": True}]
    table = hub._results_table(entries).splitlines()
    assert table[2] == r"| fast\|v (baseline) |  |  | vqa\|val |  | acc\|norm | 0.5 |"
    assert [len(re.split(r"(?<!\\)\|", line)) for line in table[:3]] == [9, 9, 9]  # 7 cells each


def test_card_accepts_the_projects_evaluation_json():
    evaluation = {"command": "python benchmarks/evaluate_methods.py ...", "methods": ["none", "rcp", "vispruner"],
                  "budgets": ["1/9"], "results": [{"data": "testbed", "kind": "testbed", "num_samples": 1000, "rows": [
                      {"label": "none", "method": "none", "budget": "full", "avg_tokens_all_layers": 144.0, "score": 0.837},
                      {"label": "rcp", "method": "rcp", "budget": "1/9 (k=16)", "avg_tokens_all_layers": 15.9, "score": 0.647},
                      {"label": "vispruner", "method": "vispruner", "budget": "1/9 (k=16)", "avg_tokens_all_layers": 16.0,
                       "score": 0.41}]}]}
    entries, kept = hub.load_eval_results(evaluation)
    assert [(e["method"], e["baseline"]) for e in entries] == [
        ("full model (all visual tokens)", True), ("rcp", False), ("vispruner", True)]
    assert kept == 15.9
    card = hub.build_model_card(demo.demo_config(), repo_id="x/y", eval_results=evaluation, license="mit")
    assert "| rcp | 1/9 (k=16) | 15.9 | rcp-llava testbed |  | first-token accuracy | 0.647 |" in card.text


def test_an_adaptive_checkpoints_card_takes_the_adaptive_row_of_evaluate_methods():
    """evaluate_methods.py writes an "rcp (adaptive)" row beside each fixed-budget RCP row, so the JSON never had
    exactly one RCP row: the card of an adaptive checkpoint said its kept tokens were "not measured" above a table
    holding them. The adaptive row is that checkpoint's own count; a fixed-count config keeps its exact schedule."""
    rows = [{"label": "none", "method": "none", "budget": "full", "avg_tokens_all_layers": 16.0, "score": 0.7},
            {"label": "rcp", "method": "rcp", "budget": "1/3", "avg_tokens_all_layers": 7.75, "score": 0.6},
            {"label": "rcp (adaptive)", "method": "rcp", "budget": "adaptive", "avg_tokens_all_layers": 9.5,
             "score": 0.65}]
    evaluation = {"results": [{"data": "pope", "kind": "benchmark", "rows": rows}]}
    assert hub.load_eval_results(evaluation)[1] is None  # two RCP rows: the JSON alone does not say which
    adaptive = demo.demo_config(pruning_keep_counts=None)
    card = hub.build_model_card(adaptive, repo_id="x/y", eval_results=evaluation, license="mit")
    assert card.data.rcp_llava["average_kept_visual_tokens"] == 9.5
    assert "**Average kept visual tokens per decoder layer:** 9.5" in card.text
    fixed = demo.demo_config()  # keeps [8, 4]: its own schedule, not a row of another budget
    card = hub.build_model_card(fixed, repo_id="x/y", eval_results=evaluation, license="mit")
    assert card.data.rcp_llava["average_kept_visual_tokens"] == round(fixed.pruned_average_tokens(), 1)


def test_a_per_budget_evaluation_gives_each_plugin_set_its_own_rows(tmp_path):
    """evaluate_methods.py --plugins_per_budget scores one plug-in set per budget: the card marked every set's RCP
    rows as this checkpoint's, and missed the adaptive row "rcp (adaptive, 1/9)" (its budget is the set's, not
    "adaptive") as the checkpoint's kept count. Only the set that is this checkpoint (the card's `repo_id`) is its
    own; without one, the evaluated model's rows (budgets the mapping leaves out) are."""
    sets = {label: tmp_path / f"budget_{label.replace('/', '_')}" for label in ("1/9", "2/9")}
    for folder in sets.values():
        folder.mkdir()

    def row(label, method, budget, tokens, score):
        return {"label": label, "method": method, "budget": budget, "avg_tokens_all_layers": tokens, "score": score}

    rows = [row("none", "none", "full", 16.0, 0.7), row("rcp", "rcp", "1/3", 7.75, 0.66),
            row("rcp", "rcp", "2/9", 5.0, 0.6), row("rcp", "rcp", "1/9", 3.0, 0.5),
            row("rcp (adaptive, 2/9)", "rcp", "2/9", 5.5, 0.61), row("rcp (adaptive, 1/9)", "rcp", "1/9", 3.5, 0.52),
            row("vispruner", "vispruner", "1/9", 2.0, 0.4)]
    evaluation = {"results": [{"data": "pope", "kind": "benchmark", "rows": rows,
                               "plugins_per_budget": {k: str(v) for k, v in sets.items()}}]}

    def table(checkpoint):
        return [(e["method"], e["budget"], e["baseline"]) for e in hub.load_eval_results(evaluation, checkpoint)[0]]

    others = [("full model (all visual tokens)", "full", True)]
    assert table(str(sets["1/9"])) == others + [
        ("rcp", "1/3", True), ("rcp (plug-ins trained for 2/9)", "2/9", True), ("rcp", "1/9", False),
        ("rcp (adaptive, 2/9)", "2/9", True), ("rcp (adaptive, 1/9)", "1/9", False), ("vispruner", "1/9", True)]
    assert table(None) == table("x/y") == others + [
        ("rcp", "1/3", False), ("rcp (plug-ins trained for 2/9)", "2/9", True),
        ("rcp (plug-ins trained for 1/9)", "1/9", True), ("rcp (adaptive, 2/9)", "2/9", True),
        ("rcp (adaptive, 1/9)", "1/9", True), ("vispruner", "1/9", True)]
    # the 1/9 set's card, adaptive: its own count is its adaptive row's (the card said "not measured")
    card = hub.build_model_card(demo.demo_config(pruning_keep_counts=None), repo_id=str(sets["1/9"]),
                                eval_results=evaluation, license="mit")
    assert card.data.rcp_llava["average_kept_visual_tokens"] == 3.5
    assert "| rcp (adaptive, 1/9) | 1/9 | 3.5 | pope |  | score | 0.52 |" in card.text
    assert "| rcp (adaptive, 2/9) (baseline) | 2/9 | 5.5 | pope |  | score | 0.61 |" in card.text


def test_unknown_evaluation_json_gets_a_short_error(tmp_path):
    big = {f"key{i}": "x" * 100 for i in range(100)}  # 10 kB, no metric in it
    with pytest.raises(ValueError) as err:
        hub.build_model_card(demo.demo_config(), repo_id="x/y", eval_results=big, license="mit")
    assert "not a format `build_model_card` knows" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ValueError) as err:
        hub.load_eval_results([{"dataset": "d", "value": 1, "junk": "y" * 5000}])
    assert "lacks ['metric']" in str(err.value) and len(str(err.value)) < 400
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        hub.load_eval_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no file"):
        hub.load_eval_results(tmp_path / "missing.json")


def test_license_comes_from_a_local_base_models_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: llama2\n---\n# a base model\n")
    card = hub.build_model_card(demo.demo_config(), repo_id="x/y", base_model=str(base))
    assert card.data.license == "llama2"
    assert hub.base_model_license(str(tmp_path)) is None  # a folder without a card


@pytest.mark.parametrize("content, expected, kept", [
    ({"VQAv2": {"accuracy": 75.4}, "kept_visual_tokens": 60}, [("VQAv2", "accuracy", 75.4)], 60.0),
    ({"overall": 0.9, "n": 10, "families": {}, "kept_visual_tokens": 12.5},
     [("rcp-llava testbed", "accuracy", 0.9)], 12.5),
    ([{"dataset": "GQA", "metric": "accuracy", "value": 61.0}], [("GQA", "accuracy", 61.0)], None),
    ({"base_model": "b", "full": {"accuracy": 0.8, "n": 5}, "rcp": {"accuracy": 0.7, "avg_visual_tokens_per_layer": 9.5},
      "random_fixed_counts": {"accuracy": 0.5}},
     [("rcp-llava testbed", "accuracy", 0.7), ("rcp-llava testbed", "accuracy", 0.8)], 9.5),
])
def test_load_eval_results_shapes(content, expected, kept):
    entries, avg = hub.load_eval_results(content)
    assert [(e["dataset"], e["metric"], e["value"]) for e in entries] == expected and avg == kept


def test_card_without_results_uses_keep_counts():
    card = hub.build_model_card(demo.demo_config(), repo_id="x/y")
    assert "No evaluation results were recorded" in card.text
    assert "model-index" not in str(card)
    kept = demo.demo_config().pruned_average_tokens()
    assert f"**Average kept visual tokens per decoder layer:** {kept:.1f}" in card.text


def test_card_of_adaptive_rcp_calls_the_budget_a_target():
    """RCP's adaptive threshold with nothing measured: the card used to print `visual_token_budget` (7.0) as the
    average kept count while the model kept 15 of 16 tokens after each pruner. It now says the count was not
    measured and the 7.0 is the target; a measured value (argument or train_rcp.py's metrics.json) is stated as
    the kept count."""
    config = demo.demo_config(pruning_keep_counts=None, visual_token_budget=7.0)
    card = hub.build_model_card(config, repo_id="x/y", license="mit")
    assert ("**Average kept visual tokens per decoder layer:** not measured for this card. The target is 7.0 of 16 "
            "per image (`visual_token_budget`, the mean over all 4 decoder layers, the paper's budget definition), "
            "but RCP's adaptive threshold keeps a number that depends on the image (the usage snippet prints the "
            "counts kept for one image).\n") in card.text
    meta = card.data.to_dict()["rcp_llava"]
    assert meta["average_kept_visual_tokens"] is None and meta["visual_token_budget"] == 7.0
    measured = hub.build_model_card(config, repo_id="x/y", average_kept_tokens=15.3, license="mit")
    assert ("**Average kept visual tokens per decoder layer:** 15.3 (the mean over all 4 decoder layers, the "
            "paper's budget definition) (of 16 per image).\n") in measured.text
    assert measured.data.to_dict()["rcp_llava"]["average_kept_visual_tokens"] == 15.3
    job = hub.build_model_card(config_144(pruning_keep_counts=None, visual_token_budget=7.0), repo_id="x/y",
                               eval_results=TRAIN_RCP_METRICS, license="mit")
    assert "**Average kept visual tokens per decoder layer:** 43.8 (the mean over all 4" in job.text
    assert "target" not in job.text


def test_plugin_card_without_base_model_has_a_placeholder(caplog):
    """A plug-in card without `base_model` linked to https://huggingface.co/None and its snippet read
    `base_id = None`; it now says the base was not recorded, the snippet has a placeholder, and a warning says so."""
    with caplog.at_level(logging.WARNING):
        card = hub.build_model_card(demo.demo_config(), repo_id="x/y", plugins_only=True, license="mit")
    assert "plug-in card without `base_model`" in caplog.text
    text = card.text
    assert "None" not in text.split("## Pruning configuration")[0]  # the table's `None` values are config fields
    assert ("RCP plug-ins (pruners + repair adapters) for a LLaVA base model that was not recorded (replace "
            "`BASE_MODEL` in the usage snippet with the checkpoint they were trained on), made with") in text
    assert ("base_id = 'BASE_MODEL'  # not recorded: replace with the LLaVA checkpoint these plug-ins were trained "
            "on\nmodel = RcpLlavaForConditionalGeneration.from_base(base_id, plugins='x/y')\n") in text
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        named = hub.build_model_card(demo.demo_config(), repo_id="x/y", plugins_only=True, license="mit",
                                     base_model="llava-hf/llava-1.5-7b-hf")
    assert "base_model" not in caplog.text
    assert "for [llava-hf/llava-1.5-7b-hf](https://huggingface.co/llava-hf/llava-1.5-7b-hf)" in named.text
    assert "base_id = 'llava-hf/llava-1.5-7b-hf'\n" in named.text
    assert named.data.to_dict()["base_model"] == "llava-hf/llava-1.5-7b-hf"


def test_plugin_card_of_a_local_base_names_the_folder(tmp_path):
    """The testbed job records its base as `<output>/model`: the card linked https://huggingface.co/<that path> and
    wrote the path as `base_model` metadata, which the Hub reads as a repo id. A local base is now named as a folder,
    kept out of `base_model`, and recorded under `rcp_llava.base_model_path`."""
    base = str(tmp_path / "outputs" / "model")
    card = hub.build_model_card(demo.demo_config(), repo_id="x/y", plugins_only=True, license="mit", base_model=base)
    assert "huggingface.co/" + base not in card.text and "https://huggingface.co//" not in card.text
    assert (f"RCP plug-ins (pruners + repair adapters) for the local LLaVA checkpoint `{base}` (not a Hub id: replace "
            "it in the usage snippet with the checkpoint's Hub id when you share them)") in card.text
    assert f"base_id = {base!r}\n" in card.text  # it loads from the folder as it is
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["rcp_llava"]["base_model_path"] == base


# ------------------------------------------------------------------------------------------------
# Push (never reaches the network)
# ------------------------------------------------------------------------------------------------


class FakeApi:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            raise self.fail

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit"


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("plugins_only", [False, True])
def test_push_uploads_the_right_files(saved, plugin_setup, online, plugins_only):
    folder = plugin_setup[1] / "plugins" if plugins_only else saved[0]
    api = FakeApi()
    assert hub.push_rcp_folder(folder, "me/rcp", plugins_only=plugins_only, private=True, api=api) == "commit"
    (_, repo, create_kwargs), (_, upload) = api.calls
    assert repo == "me/rcp" and create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "me/rcp"
    if plugins_only:
        assert upload["allow_patterns"] == [RCP_CONFIG_NAME, RCP_PLUGINS_NAME, "README.md"]
        assert upload["delete_patterns"] is None  # a plug-in push never removes a model beside it
    else:
        assert upload["allow_patterns"] is None
        # the repo's earlier weights of save_pretrained's name go (a sharded push over a single file loaded the old
        # weights), and a Trainer's state in the folder stays out (optimizer.pt, checkpoint-N/ were uploaded)
        assert upload["delete_patterns"] == ["model.safetensors", "model-*-of-*.safetensors",
                                             "model.safetensors.index.json"]
    import fnmatch

    for name in ("optimizer.pt", "checkpoint-1/optimizer.pt", "training_args.bin", "rng_state_0.pth",
                 "tmp-checkpoint-3/trainer_state.json", "model.safetensors.tmp-4242"):  # an atomic write's leftover
        assert any(fnmatch.fnmatch(name, pattern) for pattern in upload["ignore_patterns"]), name
    for name in ("model.safetensors", "config.json", "rcp_plugins.safetensors", "README.md"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in upload["ignore_patterns"]), name


def test_push_to_a_revision_creates_its_branch(saved, online):
    """transformers' push_to_hub creates the branch it uploads to (exist_ok); push_rcp_folder passed `revision` to
    the upload alone, which fails on a branch that does not exist yet. A PR ref is not a branch to create."""
    api = FakeApi()
    hub.push_rcp_folder(saved[0], "me/rcp", revision="rcp-64", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1:] == ("me/rcp", {"branch": "rcp-64", "token": None, "exist_ok": True, "repo_type": "model"})
    assert api.calls[2][1]["revision"] == "rcp-64"
    api = FakeApi()
    hub.push_rcp_folder(saved[0], "me/rcp", revision="refs/pr/3", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


def test_push_offline_is_a_clear_error(saved, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    api = FakeApi()
    with pytest.raises(hub.HubUnreachableError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        hub.push_rcp_folder(saved[0], "me/rcp", api=api)
    assert api.calls == []


def test_push_unreachable_hub_is_a_clear_error(saved, online):
    with pytest.raises(hub.HubUnreachableError, match="Cannot reach the Hub"):
        hub.push_rcp_folder(saved[0], "me/rcp", api=FakeApi(fail=ConnectionError("name resolution failed")))


def stub_model_folder(folder):
    """The files `push_rcp_folder` checks for, without building a model (the upload is faked)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_rcp_llava.py", "modeling_rcp_llava.py", "model.safetensors", "processor_config.json",
                 "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / "config.json").write_text(json.dumps({"auto_map": RCP_AUTO_MAP}))
    return folder


def hub_http_client_module():
    """The HTTP client package huggingface_hub raises its errors from (httpx, or a fork such as httpx2), found
    through huggingface_hub's own error class so the test does not depend on which one is installed."""
    from huggingface_hub.errors import HfHubHTTPError

    base = next(cls for cls in HfHubHTTPError.__mro__[1:] if cls.__name__ == "HTTPError")
    return importlib.import_module(base.__module__.split(".")[0])


def test_push_without_network_is_a_clear_error(tmp_path, online, monkeypatch):
    # What the upload raised on a machine without DNS (huggingface_hub 1.x, HF_HUB_OFFLINE unset): an httpx
    # ConnectError, which is neither an OSError nor a ConnectionError.
    client = hub_http_client_module()
    error = client.ConnectError("[Errno -2] Name or service not known")
    assert not isinstance(error, (OSError, ConnectionError))
    folder = stub_model_folder(tmp_path / "rcp")
    api = FakeApi()

    def upload_folder(**kwargs):
        raise error

    monkeypatch.setattr(api, "upload_folder", upload_folder)
    with pytest.raises(hub.HubUnreachableError) as info:
        hub.push_rcp_folder(folder, "me/rcp", api=api)
    assert str(info.value) == (
        f"Cannot reach the Hub to push {folder} to 'me/rcp' (ConnectError: [Errno -2] Name or service not known). "
        f"The folder is complete; push it again once online with `push_rcp_folder({str(folder)!r}, 'me/rcp')` or "
        f"`hf upload me/rcp {folder}`."
    )
    assert info.value.__cause__ is error
    assert sorted(p.name for p in folder.iterdir()) == [  # the written folder is kept for a later push
        "config.json", "configuration_rcp_llava.py", "model.safetensors", "modeling_rcp_llava.py",
        "processor_config.json", "tokenizer.json"]


def test_push_passes_the_hubs_http_answer_through(tmp_path, online):
    # The Hub answered (e.g. 401): its own error says what to fix, it is not "unreachable".
    from huggingface_hub.errors import HfHubHTTPError

    client = hub_http_client_module()
    url = "https://huggingface.co/api/repos/create"
    error = HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}",
                           response=client.Response(401, request=client.Request("POST", url)))
    with pytest.raises(HfHubHTTPError) as info:
        hub.push_rcp_folder(stub_model_folder(tmp_path / "rcp"), "me/rcp", api=FakeApi(fail=error))
    assert info.value is error


@pytest.mark.parametrize("plugins_only, match", [(False, "model.save_pretrained"), (True, "model.save_plugins")])
def test_push_checks_the_folder_first(tmp_path, online, plugins_only, match):
    (tmp_path / "config.json").write_text("{}")
    api = FakeApi()
    with pytest.raises(FileNotFoundError, match=match):
        hub.push_rcp_folder(tmp_path, "me/rcp", plugins_only=plugins_only, api=api)
    assert api.calls == []


# ------------------------------------------------------------------------------------------------
# Examples
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("example, expect", [
    ("load_from_hub.py", "from module transformers_modules."),
    ("pipeline.py", "visual tokens kept after pruning layers [1, 2]: [8, 4] of 16"),
    ("load_plugins.py", "logits identical to the model the plug-ins were saved from: True"),
    # prompt 0's own length, not the padded width (156, prompt 1's) it printed before
    ("quickstart.py", "-> 153 tokens after the processor (144 visual); left-padded batch of 2, [153, 156] tokens"),
])
def test_examples_run_with_no_arguments(tmp_path, example, expect):
    """Each example runs with no arguments and leaves nothing behind: no demo folder in the temp directory, no copy
    of the remote code in transformers' modules cache (issue 18: 5 MB per run before)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    (tmp_path / "tmp").mkdir()
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), "--max_new_tokens", "4"]
                          if example in ("load_from_hub.py", "pipeline.py")
                          else [sys.executable, os.path.join(ROOT, "examples", example)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert expect in proc.stdout, proc.stdout
    assert os.listdir(tmp_path / "tmp") == []
    modules = tmp_path / "hf_home" / "modules" / "transformers_modules"
    assert not modules.exists() or not any(p.suffix == ".py" and p.name != "__init__.py" for p in modules.rglob("*"))


# ------------------------------------------------------------------------------------------------
# PEFT-style plug-ins (issue 18)
# ------------------------------------------------------------------------------------------------


def _demo_batch(config):
    """One prompt of the demo shape: BOS, two words, the image, a three-word question."""
    g = torch.Generator().manual_seed(0)
    ids = [1, 5, 6] + [config.image_token_index] * config.num_visual_tokens + [7, 8, 9]
    size = config.vision_config.image_size
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(1, 3, size, size, generator=g)}


@pytest.mark.parametrize("is_trainable", [None, False, True])
def test_is_trainable_when_loading_plugins_is_pefts(plugin_setup, is_trainable):
    """`from_base(..., is_trainable=...)` and `from_pretrained(plugin_folder, is_trainable=...)` (the loaders the
    docstrings liken to PEFT's) failed in `__init__` ("unexpected keyword argument 'is_trainable'"), and for a loaded
    base with a message about casting it. As in PEFT: False freezes everything, True trains the plug-ins alone; not
    given, every parameter trains, as after transformers' `from_pretrained`."""
    from transformers import LlavaForConditionalGeneration

    _, root, _ = plugin_setup
    given = {} if is_trainable is None else {"is_trainable": is_trainable}
    stock = LlavaForConditionalGeneration.from_pretrained(root / "base").train()  # a base being fine-tuned
    loads = [RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(root / "plugins"), **given),
             RcpLlavaForConditionalGeneration.from_pretrained(str(root / "plugins"), **given),
             RcpLlavaForConditionalGeneration.from_base(stock, plugins=str(root / "plugins"), **given)]
    for model in loads:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        plugins = {name for name, _ in model.named_parameters() if name.startswith(PLUGIN_PREFIX)}
        everything = {name for name, _ in model.named_parameters()}
        assert trainable == {None: everything, False: set(), True: plugins}[is_trainable]
    # PEFT's `if not is_trainable: eval()`: the loaded base kept training mode (dropout on) for inference. Otherwise
    # the mode is as loaded: eval from a folder (transformers'), the base's own for a loaded one.
    modes = [{m.training for m in model.modules()} for model in loads]
    assert modes == ([{False}] * 3 if is_trainable is False else [{False}, {False}, {True}])
    # the loaded base's modules are shared, so frozen in it too (as PEFT wraps a model in place)
    assert all(p.requires_grad == (is_trainable is None) for p in stock.parameters())


def test_save_plugins_onto_a_file_names_it(plugin_setup, tmp_path):
    """A file at `save_directory` raised a bare "[Errno 17] File exists", even with `overwrite=True`."""
    trained, _, _ = plugin_setup
    (tmp_path / "afile").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError, match=re.escape(
                f"`save_plugins`: save_directory {str(tmp_path / 'afile')!r} is a file, not a folder; pass a folder "
                "path (`overwrite=True` replaces plug-ins in a folder, never a file).")):
            trained.save_plugins(tmp_path / "afile", overwrite=overwrite)
    assert (tmp_path / "afile").read_text() == "x"


def test_from_base_with_a_loaded_model_shares_its_modules_and_equals_the_folder_load(plugin_setup):
    from transformers import LlavaForConditionalGeneration

    trained, root, _ = plugin_setup
    stock = LlavaForConditionalGeneration.from_pretrained(root / "base").eval()
    wrapped = RcpLlavaForConditionalGeneration.from_base(stock, plugins=str(root / "plugins"))
    assert wrapped.model.language_model is stock.model.language_model and wrapped.lm_head is stock.lm_head
    from_folder = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(root / "plugins"))
    for key, value in from_folder.plugin_state_dict().items():
        assert torch.equal(wrapped.plugin_state_dict()[key], value), key
    batch = _demo_batch(wrapped.config)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(**batch).logits, trained.eval()(**batch).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"`base_model` must be a Hub id, a folder or a loaded "
                                        r"LlavaForConditionalGeneration, got int"):
        RcpLlavaForConditionalGeneration.from_base(3)


def test_plugins_in_a_subfolder_and_the_base_revision_recorded(plugin_setup, tmp_path):
    import shutil

    trained, root, _ = plugin_setup
    repo = tmp_path / "repo"
    shutil.copytree(root / "plugins", repo / "rcp-64")
    model = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(repo), subfolder="rcp-64")
    for key, value in trained.plugin_state_dict().items():
        assert torch.equal(model.plugin_state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="has no rcp_config.json"):
        RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(repo))
    model.rcp_base_model_revision = "abc123"  # what from_base(..., revision="abc123") records
    model.save_plugins(tmp_path / "again")
    record = json.loads((tmp_path / "again" / RCP_CONFIG_NAME).read_text())
    assert record["base_model_revision"] == "abc123" and record["base_model_name_or_path"] == str(root / "base")


def test_unload_returns_the_stock_model(plugin_setup):
    from transformers import LlavaForConditionalGeneration

    trained, root, _ = plugin_setup
    stock = trained.unload()
    assert type(stock) is LlavaForConditionalGeneration and stock.model.language_model is trained.model.language_model
    assert not any(".rcp_plugins." in k for k in stock.state_dict())
    reference = LlavaForConditionalGeneration.from_pretrained(root / "base").eval()
    batch = _demo_batch(trained.config)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_print_trainable_parameters_and_load_adapter(plugin_setup, capsys):
    trained, root, _ = plugin_setup
    model = demo.build_demo_model(seed=9, randomize_plugins=False)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.rcp_plugins.parameters():
        p.requires_grad_(True)
    model.print_trainable_parameters()
    plugins = sum(p.numel() for p in model.model.rcp_plugins.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (plugins, total)  # PEFT's pair
    assert capsys.readouterr().out.strip() == (f"trainable params: {plugins:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * plugins / total:.4f} || plug-in params: {plugins:,d}")
    model.load_adapter(str(root / "plugins"))  # the name transformers' PEFT integration uses
    for key, value in trained.plugin_state_dict().items():
        assert torch.equal(model.plugin_state_dict()[key], value), key
    with pytest.raises(TypeError, match="RCP plug-ins have no adapter names"):
        model.load_adapter(str(root / "plugins"), "default")


def test_from_pretrained_on_a_plugin_folder_loads_its_recorded_base(plugin_setup, tmp_path):
    """PEFT's `AutoPeftModel.from_pretrained(adapter)` habit: the plug-in folder names its base model."""
    import shutil

    trained, root, _ = plugin_setup
    model = RcpLlavaForConditionalGeneration.from_pretrained(root / "plugins").eval()
    batch = _demo_batch(trained.config)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained(**batch).logits)
    orphan = tmp_path / "orphan"
    shutil.copytree(root / "plugins", orphan)
    record = json.loads((orphan / RCP_CONFIG_NAME).read_text())
    record.pop("base_model_name_or_path")
    (orphan / RCP_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records no base model"):
        RcpLlavaForConditionalGeneration.from_pretrained(orphan)
    # a base folder since moved: it was "`base_model` '...': no such folder", an argument the user never gave
    record["base_model_name_or_path"] = str(tmp_path / "moved" / "base")
    (orphan / RCP_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(repr(str(orphan)))} is an RCP plug-in folder whose "
                                                rf"{RCP_CONFIG_NAME} records the base model '.*/moved/base' "
                                                r"\(`base_model_name_or_path`\), and there is no such folder \(moved or "
                                                r"deleted\?\): load it with `RcpLlavaForConditionalGeneration\.from_base"
                                                rf"\(new_base, plugins={re.escape(repr(str(orphan)))}\)`"):
        RcpLlavaForConditionalGeneration.from_pretrained(str(orphan))


def test_plugins_meet_a_model_that_cannot_take_them_or_a_missing_subfolder_by_name(plugin_setup, tmp_path):
    """Loading RCP plug-ins into a model of a method without plug-ins (attention_topk, none) blamed their layers
    ("Were they trained with other `pruning_layers`?"), and a `subfolder` without plug-ins named the root folder."""
    from rcp_llava.evaluation import method_model

    trained, root, _ = plugin_setup
    for method in ("attention_topk", "none"):
        other = method_model(trained, pruning_method=method, repair_layers=[])
        with pytest.raises(ValueError, match=rf"^This model runs `pruning_method='{method}'`, which has no plug-ins, "
                                             r"so the RCP plug-ins '.*' have nowhere to go\. Load them into an RCP "
                                             r"model: `from_base\(base, plugins="):
            other.load_plugins(str(root / "plugins"))
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(repr(str(root)))} \(subfolder 'rcp-64': "
                                                rf"{re.escape(repr(str(root / 'rcp-64')))}\) has no {RCP_CONFIG_NAME}"):
        trained.load_plugins(str(root), subfolder="rcp-64")


def test_from_base_and_a_plugin_folder_take_the_hub_download_arguments(plugin_setup, tmp_path):
    """`cache_dir`, `local_files_only` and `force_download` went to `from_pretrained` twice ("got multiple values for
    keyword argument 'local_files_only'"): stock `from_pretrained` takes them, offline users pass them."""
    trained, root, _ = plugin_setup
    batch = _demo_batch(trained.config)
    hub = dict(local_files_only=True, cache_dir=str(tmp_path / "cache"), force_download=False)
    for model in (RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(root / "plugins"), **hub),
                  RcpLlavaForConditionalGeneration.from_pretrained(root / "plugins", **hub)):
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).logits, trained(**batch).logits)


def test_offloaded_models_run_save_and_refuse_plugins_they_cannot_hold(plugin_setup, tmp_path):
    """`device_map="auto"` offloading to 'disk' (weights on the meta device until their hooks run), as stock LLaVA
    runs and saves: the repair context read its projections' meta weights ("Tensor on device meta"); `save_plugins`
    copied out of meta tensors; `load_plugins` copied into them and reported success while the model kept its old
    plug-ins; and `from_base` offloaded plug-ins that the stock checkpoint does not hold (KeyError at the forward)."""
    from safetensors.torch import load_file

    trained, root, _ = plugin_setup
    batch = _demo_batch(trained.config)
    with torch.no_grad():
        want = trained(**batch).logits

    def offload(tag):
        return dict(device_map="auto", max_memory={"cpu": "120KB"}, offload_folder=str(tmp_path / tag))

    full = RcpLlavaForConditionalGeneration.from_pretrained(root / "full", **offload("full")).eval()
    assert set(full.hf_device_map.values()) == {"disk"} and all(p.is_meta for p in full.plugin_parameters())
    with torch.no_grad():  # the repair context's projections run through their hooks (float32, not float64)
        torch.testing.assert_close(full(**batch).logits, want, rtol=0, atol=1e-6)
    full.save_plugins(tmp_path / "resaved", base_model_name_or_path=str(root / "base"))
    saved = load_file(tmp_path / "resaved" / "rcp_plugins.safetensors")
    assert saved.keys() == {k for k in trained.plugin_state_dict()} and all(
        torch.equal(saved[k], v) for k, v in trained.plugin_state_dict().items())
    with pytest.raises(ValueError, match=r"^This model's plug-ins are offloaded by its `device_map` \(model\.rcp_plugins"
                                         r"\..* is on the meta device\), so .* cannot be copied into them"):
        full.load_plugins(root / "plugins")

    based = RcpLlavaForConditionalGeneration.from_base(str(root / "base"), plugins=str(root / "plugins"),
                                                       **offload("base"))
    assert based.hf_device_map == {"": "disk", "model.rcp_plugins": "cpu"}  # kept out of the offload
    # in eval mode as the rest of the loaded model: the plug-ins built in place of the offloaded ones trained
    assert {m.training for m in based.modules()} == {False}
    assert not any(p.is_meta for p in based.model.rcp_plugins.parameters())
    with torch.no_grad():
        assert torch.equal(based(**batch).logits, want)


@pytest.mark.parametrize("example", ["load_from_hub.py", "pipeline.py"])
def test_examples_name_a_stock_llava_folder(tmp_path, example):
    """`--model` on a stock LLaVA folder crashed with an AttributeError (`last_pruning_info`, `pruning_layers`)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model = demo.build_demo_model(seed=1)
    stock = LlavaConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k in LlavaConfig().to_dict()})
    LlavaForConditionalGeneration(stock).save_pretrained(tmp_path / "stock")
    demo.build_demo_processor(model.config).save_pretrained(tmp_path / "stock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), "--model",
                           str(tmp_path / "stock"), "--max_new_tokens", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "loaded a LlavaForConditionalGeneration, not an RCP-LLaVA model" in proc.stderr


def _example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "examples"))  # as when run: `_demo_folder` sits beside them
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("example", ["load_from_hub.py", "pipeline.py"])
def test_examples_load_a_folder_where_rcp_llava_is_not_installed(tmp_path, example):
    """As their docstrings promise: `--model DIR` imported `modeling_rcp_llava` for its path check, so it failed with
    ModuleNotFoundError where rcp-llava is not installed."""
    folder = demo.save_demo_folder(tmp_path / "demo")[0]
    examples = os.path.join(ROOT, "examples")
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {examples!r})  # as `python examples/{example}` puts it\n"
            f"sys.argv = [{example!r}] + sys.argv[1:]\n"
            f"runpy.run_path({os.path.join(examples, example)!r}, run_name='__main__')\n")
    proc = run_where_rcp_llava_is_not_installed(["-c", code, "--model", str(folder), "--max_new_tokens", "2"],
                                                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "visual tokens kept after pruning layers [1, 2]: [8, 4] of 16" in proc.stdout
    proc = run_where_rcp_llava_is_not_installed(["-c", code, "--model", str(tmp_path / "no" / "such")], tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"FileNotFoundError: `--model` {str(tmp_path / 'no' / 'such')!r}: no such folder (and it is not a Hub repo id "
        "of the form 'user/name'). Check the path.")


@pytest.mark.parametrize("example", ["load_from_hub", "pipeline"])
def test_examples_name_a_missing_model_folder(tmp_path, example):
    """It reached transformers, which said "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    with pytest.raises(FileNotFoundError, match=r"^`--model` '.*/no/such/folder': no such folder"):
        _example(example).main(["--model", str(tmp_path / "no" / "such" / "folder")])


@pytest.mark.parametrize("example", ["load_from_hub", "pipeline"])
@pytest.mark.parametrize("method, expect", [
    ("none", "no visual token pruned (pruning_method='none'): all 16 kept"),
    ("vispruner", "visual tokens kept before the LLM: [6] of 16"),
    ("fastv", "visual tokens kept after pruning layers [2]: [5] of 16"),
])
def test_examples_report_what_each_method_kept(tmp_path, capsys, example, method, expect):
    """On a folder saved with `pruning_method="none"` the examples crashed (`last_pruning_info` is None), and on a
    VisPruner folder they printed "kept after pruning layers []: [6]" (its point is before the LLM)."""
    overrides = {
        "none": dict(pruning_method="none", pruning_layers=None, repair_layers=None, pruning_keep_counts=None),
        "vispruner": dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                          pre_llm_keep_count=6),
        "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[], pruning_keep_counts=[5]),
    }[method]
    folder = demo.save_demo_folder(tmp_path / method, **overrides)[0]
    _example(example).main(["--model", str(folder), "--max_new_tokens", "2"])
    assert expect in capsys.readouterr().out


@pytest.mark.parametrize("example", ["load_from_hub", "pipeline"])
def test_examples_point_a_plugin_folder_to_load_plugins(tmp_path, example):
    """A plug-in-only folder reached transformers: "Unrecognized model ... Should have a `model_type` key"."""
    demo.build_demo_model().save_plugins(tmp_path / "plugins")
    with pytest.raises(SystemExit, match=rf"^--model '{tmp_path / 'plugins'}' is a plug-in-only checkpoint .* Run "
                                         r"examples/load_plugins\.py --base BASE --plugins "):
        _example(example).main(["--model", str(tmp_path / "plugins")])


def test_load_plugins_example_keeps_what_out_holds(tmp_path, capsys):
    """`--out` on a folder with files replaced its config.json silently; a file failed after the model was built."""
    module = _example("load_plugins")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    argv = ["--base", str(tmp_path / "nothing"), "--plugins", str(tmp_path / "nothing")]  # checked first: never read
    with pytest.raises(SystemExit):
        module.main(argv + ["--out", str(tmp_path / "full")])
    assert "--out '" + str(tmp_path / "full") + "' already holds files (config.json); choose a new folder or pass " \
           "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(argv + ["--out", str(tmp_path / "afile")])
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "full" / "config.json").read_text() == (tmp_path / "afile").read_text() == "mine"


def test_a_local_file_error_during_a_push_is_not_called_unreachable(tmp_path, monkeypatch):
    """Any OSError read as "Cannot reach the Hub", including a file the upload could not read (a review)."""
    import huggingface_hub

    from rcp_llava import hub

    folder, _, _ = demo.save_demo_folder(tmp_path / "demo")

    def upload_folder(self, **kwargs):
        assert ".rcp-save-*" in kwargs["ignore_patterns"]  # a killed save's staging is never uploaded
        raise PermissionError(13, "Permission denied", str(folder / "model.safetensors"))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None, raising=False)
    with pytest.raises(PermissionError, match="Permission denied"):
        hub.push_rcp_folder(folder, "someone/rcp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plugins_load_in_float32_on_a_half_precision_backbone(tmp_path, dtype):
    """A trained folder holds float32 plug-ins on a half-precision backbone (how RcpTrainer trains them, as PEFT's
    adapters); `from_pretrained` rounded them to the backbone's dtype (the trained model's logits came back 2.4e-3
    off), and so did every load in half precision and the plug-ins new on a stock checkpoint. They stay float32,
    as PEFT's `autocast_adapter_dtype` keeps adapters, through the library class and the Hub's remote code."""
    from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

    trained = demo.build_demo_model(seed=2).to(dtype)
    trained.model.rcp_plugins.float()
    with torch.no_grad():  # trained values: most not representable in `dtype` (cast from it, they were)
        g = torch.Generator().manual_seed(0)
        for param in trained.model.rcp_plugins.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 1e-3)
    assert all(not torch.equal(p, p.to(dtype).float()) for p in trained.model.rcp_plugins.parameters())
    trained.save_pretrained(tmp_path / "mixed")
    want = trained.state_dict()
    for load in (lambda: RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "mixed"),
                 lambda: RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "mixed", dtype=dtype),
                 lambda: AutoModelForImageTextToText.from_pretrained(tmp_path / "mixed", trust_remote_code=True,
                                                                     dtype="auto")):
        loaded = load()
        assert loaded.dtype == dtype and {p.dtype for p in loaded.plugin_parameters()} == {torch.float32}
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    stock_config = LlavaConfig.from_dict({k: v for k, v in trained.config.to_dict().items()
                                          if k in LlavaConfig().to_dict()})
    LlavaForConditionalGeneration(stock_config).save_pretrained(tmp_path / "stock")
    loads = (lambda: RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", dtype=dtype),
             lambda: RcpLlavaForConditionalGeneration.from_base(tmp_path / "stock", dtype=dtype),
             lambda: RcpLlavaForConditionalGeneration.from_base(
                 LlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", dtype=dtype)))
    news = []
    for load in loads:
        torch.manual_seed(0)  # every way initialises the new plug-ins alike (a review: from_base's were not)
        news.append(load())
    first = news[0].plugin_state_dict()
    for new in news:
        assert all(torch.equal(new.plugin_state_dict()[k], v) for k, v in first.items())
        assert new.dtype == dtype and {p.dtype for p in new.plugin_parameters()} == {torch.float32}
        pruner = next(iter(new.model.rcp_plugins.pruners.values()))
        assert float(pruner.bias) == RcpPruner.bias_init
        with torch.no_grad():  # the forward runs on the mixed model (each plug-in casts at its boundaries)
            assert torch.isfinite(new(**_demo_batch(new.config)).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_bare_model_loads_as_the_full_one(tmp_path, caplog, dtype):
    """`RcpLlavaModel` (what `AutoModel` loads) had no `from_pretrained` of its own: new plug-ins on a stock
    checkpoint came in the backbone's half precision (the float32 invariant broke), transformers listed each as
    MISSING, and a pickle-only folder loaded (the project loads safetensors only)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    trained = demo.build_demo_model(seed=2)
    stock_config = LlavaConfig.from_dict({k: v for k, v in trained.config.to_dict().items()
                                          if k in LlavaConfig().to_dict()})
    stock = LlavaForConditionalGeneration(stock_config)
    stock.save_pretrained(tmp_path / "stock")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        bare = RcpLlavaModel.from_pretrained(tmp_path / "stock", dtype=dtype)
    assert bare.dtype == dtype and {p.dtype for p in bare.rcp_plugins.parameters()} == {torch.float32}
    assert "RCP plug-ins are new" in caplog.text and "rcp_plugins" not in caplog.text  # not in the load report
    torch.manual_seed(0)
    full = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", dtype=dtype)
    want = full.model.state_dict()
    assert bare.state_dict().keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in bare.state_dict().items())
    torch.save(stock.state_dict(), tmp_path / "stock" / "pytorch_model.bin")
    (tmp_path / "stock" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        RcpLlavaModel.from_pretrained(tmp_path / "stock")


class _UserRcp(RcpLlavaForConditionalGeneration):
    """A user's subclass, in the user's module (here this test file)."""


def test_a_subclass_saves_the_hub_files_not_its_own_module(tmp_path):
    """save_pretrained copied the module of the instance's class: a user's subclass put the user's script into the
    Hub folder (uploaded by push_to_hub) and left out modeling_rcp_llava.py, which the folder's auto_map names; a
    subclass defined in a notebook (no `__file__`) failed to save at all."""
    _UserRcp(demo.build_demo_model().config).save_pretrained(tmp_path / "sub")
    names = sorted(os.listdir(tmp_path / "sub"))
    assert names == ["config.json", "configuration_rcp_llava.py", "generation_config.json", "model.safetensors",
                     "modeling_rcp_llava.py"]
    assert (tmp_path / "sub" / "modeling_rcp_llava.py").read_bytes() == Path(modeling_rcp_llava.__file__).read_bytes()
    notebook = type("NotebookRcp", (RcpLlavaForConditionalGeneration,), {"__module__": "__main__"})
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    try:
        if main_file is not None:
            del sys.modules["__main__"].__file__
        notebook(demo.build_demo_model().config).save_pretrained(tmp_path / "notebook")
    finally:
        if main_file is not None:
            sys.modules["__main__"].__file__ = main_file
    assert sorted(os.listdir(tmp_path / "notebook")) == names


def test_a_stock_llava_config_is_refused_with_the_fix(tmp_path):
    """`Model.from_pretrained(id, config=AutoConfig.from_pretrained(id))` with a llava-hf id (a stock LlavaConfig),
    the constructor and `_from_config` failed with "'LlavaConfig' object has no attribute 'validate_pruning'"."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    rcp_config = demo.build_demo_model().config
    stock = LlavaConfig.from_dict({k: v for k, v in rcp_config.to_dict().items() if k in LlavaConfig().to_dict()})
    LlavaForConditionalGeneration(stock).save_pretrained(tmp_path / "stock")
    for name, build in (("RcpLlavaForConditionalGeneration", lambda: RcpLlavaForConditionalGeneration(stock)),
                        ("RcpLlavaModel", lambda: RcpLlavaModel(stock)),
                        ("RcpLlavaForConditionalGeneration",
                         lambda: RcpLlavaForConditionalGeneration._from_config(stock)),
                        ("RcpLlavaForConditionalGeneration",
                         lambda: RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", config=stock))):
        with pytest.raises(TypeError, match=re.escape(
                f"{name} needs an RcpLlavaConfig, got a LlavaConfig as `config`: load it with "
                "`RcpLlavaConfig.from_pretrained(model_id)`")):
            build()
    # the conversion the message gives
    converted = RcpLlavaConfig.from_dict(stock.to_dict())
    model = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", config=converted)
    assert model.config.pruning_method == "rcp"


def test_a_save_interrupted_between_weights_and_config_is_refused_at_load(tmp_path, monkeypatch):
    """`save_plugins` renames the weights, then the config: a save interrupted between the two left new weights
    beside the previous config, which loaded silently (the config said counts [10, 5] of weights saved with [8, 4]).
    The weights record the config's fingerprint; such a pair is refused before any tensor is copied."""
    from conftest import make_model, randomize_plugin_parameters

    model = make_model(randomize_plugins=True)
    model.save_plugins(tmp_path)
    other = make_model(randomize_plugins=True, pruning_keep_counts=[8, 4])
    randomize_plugin_parameters(other, seed=9)

    def interrupted(path, text):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(modeling_rcp_llava, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save_plugins(tmp_path, overwrite=True)
    monkeypatch.undo()
    fresh = make_model(seed=4)
    before = {k: v.clone() for k, v in fresh.plugin_state_dict().items()}
    message = (f"{tmp_path / RCP_PLUGINS_NAME} was saved with another {RCP_CONFIG_NAME} than "
               f"{tmp_path / RCP_CONFIG_NAME} beside it (its pruning fields or sizes differ: an interrupted "
               "`save_plugins`, or files of two checkpoints mixed): save the plug-ins again.")
    with pytest.raises(ValueError) as err:
        fresh.load_plugins(str(tmp_path))
    assert str(err.value) == message
    assert all(torch.equal(v, before[k]) for k, v in fresh.plugin_state_dict().items())
    with pytest.raises(ValueError) as err:
        RcpLlavaForConditionalGeneration.from_base(fresh, plugins=str(tmp_path))
    assert str(err.value) == message
    other.save_plugins(tmp_path, overwrite=True)  # a whole save pairs them again
    fresh.load_plugins(str(tmp_path))
    assert all(torch.equal(v, other.plugin_state_dict()[k]) for k, v in fresh.plugin_state_dict().items())
    # a hand edit of the base's name (a moved base folder) or of the versions is no mismatch
    record = json.loads((tmp_path / RCP_CONFIG_NAME).read_text())
    record.update(base_model_name_or_path="/elsewhere/base", library_version="0.0.0")
    (tmp_path / RCP_CONFIG_NAME).write_text(json.dumps(record))
    fresh.load_plugins(str(tmp_path))


def test_the_pair_fingerprint_reads_the_field_names_it_was_made_with(tmp_path):
    """The names hashed are recorded beside the digest: a checkpoint of a release with other pruning fields (here
    fewer, and a config key this one does not know) pairs the same, instead of every such checkpoint being refused."""
    import hashlib

    from safetensors.torch import load_file, save_file
    from conftest import make_model

    model = make_model(randomize_plugins=True)
    model.save_plugins(tmp_path)
    record = json.loads((tmp_path / RCP_CONFIG_NAME).read_text())
    record["a_future_field"] = 3
    (tmp_path / RCP_CONFIG_NAME).write_text(json.dumps(record))
    names = ["pruning_layers", "pruning_keep_counts", "hidden_size"]
    digest = hashlib.sha256(json.dumps({k: record[k] for k in names}, sort_keys=True).encode()).hexdigest()
    save_file(load_file(tmp_path / RCP_PLUGINS_NAME), tmp_path / RCP_PLUGINS_NAME,
              metadata={"format": "pt", "rcp_config_sha256": digest, "rcp_config_fields": ",".join(names)})
    make_model(seed=3).load_plugins(str(tmp_path))  # pairs
    record["pruning_keep_counts"] = [9, 4]
    (tmp_path / RCP_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="was saved with another rcp_config.json"):
        make_model(seed=3).load_plugins(str(tmp_path))


def test_a_config_saved_alone_loads_with_auto_config_where_rcp_llava_is_not_installed(tmp_path):
    """`config.save_pretrained(folder)` wrote config.json alone, without `auto_map` or the configuration file: as a
    custom config, `AutoConfig.from_pretrained(folder, trust_remote_code=True)` then failed ("does not recognize this
    architecture") outside this repository. The model's own save keeps its full map."""
    from configuration_rcp_llava import RcpLlavaConfig

    config = RcpLlavaConfig(text_config={"num_hidden_layers": 8}, pruning_keep_counts=[96, 26, 8])
    config.save_pretrained(tmp_path / "config")
    assert sorted(os.listdir(tmp_path / "config")) == ["config.json", "configuration_rcp_llava.py"]
    saved = json.loads((tmp_path / "config" / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_rcp_llava.RcpLlavaConfig"}
    script = ("import json; from transformers import AutoConfig\n"
              "c = AutoConfig.from_pretrained('config', trust_remote_code=True)\n"
              "print(json.dumps([type(c).__module__, c.pruning_layers, c.pruning_keep_counts, "
              "c.text_config.num_hidden_layers]))\n")
    proc = run_where_rcp_llava_is_not_installed(["-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, layers, counts, depth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.")
    assert (layers, counts, depth) == (config.pruning_layers, [96, 26, 8], 8)

    from conftest import make_model

    make_model().save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"] == RCP_AUTO_MAP


def test_a_pruning_card_refuses_the_testbeds_evaluate_accuracy_output():
    """`evaluate_accuracy` feeds the model embeddings with the image merged, so an RCP model never prunes there: its
    card stated the unpruned accuracy as RCP's and "64.0 average kept visual tokens per decoder layer" (of 64)."""
    measured = {"overall": 0.9, "n": 10, "families": {}, "kept_visual_tokens": 16.0}
    with pytest.raises(ValueError, match=r"^`eval_results` is the testbed's `evaluate_accuracy` output, which "
                                         r"measures the model without its own pruning \(`pruning_method='rcp'`"):
        hub.build_model_card(demo.demo_config(), repo_id="x/y", eval_results=measured, license="llama2")
    config = demo.demo_config()
    config.pruning_method, config.pruning_layers, config.repair_layers = "none", [], []
    config.pruning_keep_counts = None
    card = hub.build_model_card(config, repo_id="x/y", eval_results=measured, license="llama2")  # a stock model's
    assert "0.9" in card.text
