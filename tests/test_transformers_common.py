"""transformers' own common model tests (`ModelTesterMixin`) run against RCP-LLaVA (issue 14).

The mixin is not copied here: it is read at test time from the transformers source distribution of the installed
version -- `$TRANSFORMERS_TESTS_DIR` (a folder holding `test_modeling_common.py`), else the sdist's `tests/` unpacked
once into `~/.cache/rcp_llava/` or `$RCP_LLAVA_CACHE` (`pip download transformers==<version> --no-binary :all:
--no-deps`). Without either -- or without `parameterized`, which the mixin imports -- the module is skipped.

The sdist ships `tests/test_modeling_common.py` but neither `tests/generation/` nor `tests/exporters/`, which it
imports from; both are replaced by empty stand-ins, so the generation and export mixins do not run here.

Four test classes, one tester of our own (tiny Llama + tiny CLIP, the prompt holding one image's tokens):
  - `StockLlavaCommonTest`: stock `LlavaModel` / `LlavaForConditionalGeneration`, the control;
  - `NoneModeCommonTest`: `pruning_method="none"` -- must behave as stock, so no expected failure;
  - `RcpFixedCommonTest`: RCP, fixed counts (pruning_layers=[1], repair_layers=[1]);
  - `VisPrunerCommonTest`: the VisPruner baseline (pre-LLM pruning).
The failures each pruning mode is expected to show (legitimate consequences of pruning) are listed in
`EXPECTED_FAILURES` with their reason and marked `xfail(strict=True)`, so a change in either direction shows up.
Failures that are bugs are not listed: they fail until fixed. The transformers LLaVA tester's own skips (gradient
checkpointing: stock LLaVA fails it too) are kept. The whole module takes about a minute on two CPU cores.
"""

import functools
import importlib
import inspect
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.auto import modeling_auto

import rcp_llava  # noqa: F401  (registers rcp_llava with the Auto classes, as for an installed user)
from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration, RcpLlavaModel


# ------------------------------------------------------------------------------------------------
# Locating transformers' tests and importing the mixin
# ------------------------------------------------------------------------------------------------

_PACKAGE = "_hf_common_tests"  # the name the sdist's `tests/` is imported under (its imports are relative)


def _download_tests_dir(version):
    """The sdist's `tests/` for `version`, unpacked once into the cache; None if it cannot be had."""
    cache = Path(os.environ.get("RCP_LLAVA_CACHE", Path.home() / ".cache" / "rcp_llava"))
    target = cache / f"transformers-{version}-tests"
    if (target / "tests" / "test_modeling_common.py").is_file():
        return target / "tests"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
                 "--no-deps", "-d", tmp, "-q"],
                check=True, capture_output=True, timeout=600,
            )
            archives = list(Path(tmp).glob("transformers-*.tar.gz"))
            if not archives:
                return None
            staging = Path(tmp) / "unpacked"
            with tarfile.open(archives[0]) as tar:
                members = []
                for member in tar.getmembers():  # only <root>/tests/..., renamed to tests/...
                    parts = member.name.split("/")
                    if len(parts) > 2 and parts[1] == "tests" and (member.isfile() or member.isdir()):
                        member.name = "/".join(parts[1:])
                        members.append(member)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extra)
            if not (staging / "tests" / "test_modeling_common.py").is_file():
                return None
            if not target.exists():  # another process may have unpacked it meanwhile
                os.replace(staging, target)
    except (OSError, subprocess.SubprocessError, tarfile.TarError):
        return None
    path = target / "tests"
    return path if (path / "test_modeling_common.py").is_file() else None


def _tests_dir():
    given = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if given:
        if not (Path(given) / "test_modeling_common.py").is_file():
            pytest.skip(f"TRANSFORMERS_TESTS_DIR={given} holds no test_modeling_common.py", allow_module_level=True)
        return Path(given)
    path = _download_tests_dir(transformers.__version__)
    if path is None:
        pytest.skip(
            f"transformers' common model tests are not available: set TRANSFORMERS_TESTS_DIR to the `tests/` folder "
            f"of the transformers {transformers.__version__} source, or allow `pip download "
            f"transformers=={transformers.__version__} --no-binary :all: --no-deps` (network) to fetch it.",
            allow_module_level=True,
        )
    return path


def _import_mixin(tests_dir):
    """`test_modeling_common` imported as a submodule of a package whose path is `tests_dir`, with empty stand-ins for
    the two modules the sdist lacks (`generation.test_utils`, `exporters.test_export`)."""
    if f"{_PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{_PACKAGE}.test_modeling_common"]
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(tests_dir)]
    sys.modules[_PACKAGE] = package
    stubs = {
        "generation": None, "generation.test_utils": "GenerationTesterMixin",
        "exporters": None, "exporters.test_export": "ExportTesterMixin",
    }
    for name, mixin in stubs.items():
        module = types.ModuleType(f"{_PACKAGE}.{name}")
        if mixin is None:
            module.__path__ = []
        else:
            setattr(module, mixin, type(mixin, (), {"__doc__": "Stand-in: not shipped in the transformers sdist."}))
        sys.modules[module.__name__] = module
    try:
        with warnings.catch_warnings():  # its marks (flash_attn_test, ...) are registered in transformers' conftest
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            return importlib.import_module(f"{_PACKAGE}.test_modeling_common")
    except ImportError as err:  # a test dependency missing (parameterized, ...)
        pytest.skip(f"transformers' test_modeling_common cannot be imported: {err}", allow_module_level=True)


common = _import_mixin(_tests_dir())
ModelTesterMixin = common.ModelTesterMixin
GenerationTesterMixin = sys.modules[f"{_PACKAGE}.generation.test_utils"].GenerationTesterMixin


# ------------------------------------------------------------------------------------------------
# Our tester: a tiny LLaVA (Llama 2 layers + CLIP 2 layers, 4x4 patches -> 16 visual tokens)
# ------------------------------------------------------------------------------------------------


class TinyLlavaTester:
    """Builds the config and the inputs the mixin asks for. Token ids: 0 pad, 1 the image token (a low id, so the
    mixin's vocabulary shrinking in `test_resize_tokens_embeddings` keeps it), text from [2, vocab)."""

    batch_size = 3
    text_length = 6  # text tokens after the image's
    vocab_size = 96
    image_token_id = 1
    pad_token_id = 0
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    is_training = True

    def __init__(self, parent, config_class=LlavaConfig, **pruning):
        self.parent = parent
        self.config_class = config_class
        self.pruning = pruning
        self.text_config = {
            "model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 2, "intermediate_size": 40, "hidden_act": "silu", "max_position_embeddings": 128,
            "pad_token_id": self.pad_token_id, "bos_token_id": None, "eos_token_id": None,
            "initializer_range": 0.02,
        }
        self.vision_config = {
            "model_type": "clip_vision_model", "image_size": 8, "patch_size": 2, "num_channels": 3,
            "hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 40, "initializer_range": 0.02,
        }
        self.image_size = self.vision_config["image_size"]
        self.patch_size = self.vision_config["patch_size"]
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2
        self.seq_length = self.encoder_seq_length = self.num_image_tokens + self.text_length

    def get_config(self):
        return self.config_class(
            text_config=dict(self.text_config), vision_config=dict(self.vision_config),  # built by their model_type
            image_token_index=self.image_token_id, image_seq_length=self.num_image_tokens,
            vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
            **self.pruning,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        text = common.ids_tensor([self.batch_size, self.text_length], self.vocab_size - 2) + 2
        image = torch.full((self.batch_size, self.num_image_tokens), self.image_token_id, dtype=torch.long)
        input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)  # one text token, the image, the question
        pixel_values = common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return config, {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }


class _CommonTestBase(ModelTesterMixin, GenerationTesterMixin):
    """One mode: `config_class`, its pruning fields and the classes under test. (The generation mixin is the empty
    stand-in; inheriting it only keeps `test_generation_tester_mixin_inheritance` meaningful.)"""

    config_class = RcpLlavaConfig
    pruning = {}
    all_model_classes = (RcpLlavaModel, RcpLlavaForConditionalGeneration)
    _is_composite = True
    # The mixin runs this only for models whose config file carries a copyright year >= 2023; ours carry none.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Many mixin tests pick a model's role by its class *name* in transformers' built-in auto tables (e.g.
        # `MODEL_MAPPING_NAMES` -> base model, skipped by `test_training`; `..._IMAGE_TEXT_TO_TEXT_...` -> gets
        # `labels`). `rcp_llava`'s Auto registration does not reach those name tables, so list our classes in every
        # table that lists llava's, for this class only.
        cls._name_patches = []
        if RcpLlavaModel in cls.all_model_classes:
            for name in dir(modeling_auto):
                table = getattr(modeling_auto, name)
                if name.endswith("_MAPPING_NAMES") and isinstance(table, dict) and "llava" in table:
                    ours = table["llava"].replace("Llava", "RcpLlava")
                    patcher = unittest.mock.patch.dict(table, {"rcp_llava": ours})
                    patcher.start()
                    cls._name_patches.append(patcher)

    @classmethod
    def tearDownClass(cls):
        for patcher in reversed(cls._name_patches):
            patcher.stop()
        super().tearDownClass()

    def setUp(self):
        torch.set_num_threads(min(2, torch.get_num_threads()))
        self.model_tester = TinyLlavaTester(self, self.config_class, **self.pruning)

    def test_forward_declares_output_attentions(self):
        """The mixin decides whether a model can return attentions from its `forward` signature (an
        `output_attentions` parameter, or `**kwargs` annotated with a TypedDict that has it, as stock models'
        `Unpack[TransformersKwargs]`); otherwise it *skips* `test_eager_matches_sdpa_inference_*_output_attentions`
        instead of failing. Checked here so that a missing annotation shows as a failure, not as a silent skip."""
        for model_class in self.all_model_classes:
            params = inspect.signature(model_class.forward).parameters
            kwargs = params.get("kwargs")
            typed = getattr(getattr(kwargs, "annotation", None), "__args__", (None,))[0]
            declared = "output_attentions" in params or "output_attentions" in getattr(typed, "__annotations__", {})
            self.assertTrue(declared, f"{model_class.__name__}.forward does not declare `output_attentions`")

    # transformers' LLaVA tester skips these for stock LLaVA as well (their reasons).
    @unittest.skip("LLaVA: gradient checkpointing does not compute gradients properly (transformers PR 27124)")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip("LLaVA: gradient checkpointing does not compute gradients properly (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip("LLaVA: gradient checkpointing does not compute gradients properly (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass


def _mark_expected_failures(cls, failures):
    """Mark `cls.<name>` xfail(strict) for each (name, reason); a fresh wrapper per class keeps the mark off the
    other classes, which share the mixin's functions."""
    for name, reason in failures.items():
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(self, *args, _original=original, **kwargs):
            return _original(self, *args, **kwargs)

        wrapper.pytestmark = [*getattr(original, "pytestmark", []), pytest.mark.xfail(strict=True, reason=reason)]
        setattr(cls, name, wrapper)
    return cls


# ------------------------------------------------------------------------------------------------
# The modes
# ------------------------------------------------------------------------------------------------


class StockLlavaCommonTest(_CommonTestBase, unittest.TestCase):
    """The control: stock LLaVA under the same tester."""

    config_class = LlavaConfig
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)


class NoneModeCommonTest(_CommonTestBase, unittest.TestCase):
    """`pruning_method="none"` is stock LLaVA: every test that passes for the control passes here."""

    pruning = {"pruning_method": "none"}


class RcpFixedCommonTest(_CommonTestBase, unittest.TestCase):
    pruning = {"pruning_method": "rcp", "pruning_layers": [1], "repair_layers": [1], "pruning_keep_counts": [6],
               "pruner_hidden_size": 16, "repair_bottleneck_size": 8}


class VisPrunerCommonTest(_CommonTestBase, unittest.TestCase):
    pruning = {"pruning_method": "vispruner", "pre_llm_keep_count": 6}


# (test name -> why it fails) per pruning mode, each failure classified as a legitimate consequence of pruning.
# Failures classified as bugs are deliberately NOT listed: they fail until fixed.
_BOOL_OUTPUTS = (
    "pruned outputs carry bool tensors (`keep_masks`, `has_image`); the mixin formats its failure message with "
    "`tuple_output - dict_output` eagerly, which torch refuses for bool. The tuple and dict outputs are equal "
    "(checked with torch.equal for every flag combination)"
)
EXPECTED_FAILURES = {
    RcpFixedCommonTest: {
        "test_attention_outputs": (
            "with output_hidden_states, pruned outputs add `hidden_state_positions` (the original position of each "
            "surviving token's hidden state): one field more than the mixin counts"
        ),
        "test_model_outputs_equivalence": _BOOL_OUTPUTS,
        "test_enable_input_require_grads_with_gradient_checkpointing": (
            "RCP in train mode uses the differentiable ('mask') layout, which refuses gradient checkpointing "
            "(documented)"
        ),
    },
    VisPrunerCommonTest: {
        "test_attention_outputs": (
            "pre-LLM pruning: every layer's attentions cover the surviving tokens only (12 of 22 positions); "
            "also the extra `hidden_state_positions` field"
        ),
        "test_model_outputs_equivalence": _BOOL_OUTPUTS,
    },
}

for _cls, _failures in EXPECTED_FAILURES.items():
    _mark_expected_failures(_cls, _failures)
del _cls, _failures  # a module-level name bound to a TestCase class would be collected a second time
