"""Tiny RCP-LLaVA configs and inputs built in code: no network, seconds per test."""

import importlib.util
import json
import os
import sys

import pytest
import torch

# The package is installed (`pip install -e .`): the Hub pair at the repo root imports by name, no sys.path edit.
from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import RcpLlavaForConditionalGeneration


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two threads: the machines have two cores. RCP_TEST_THREADS=1 lets a second suite (a helper's, a mutation run) share
# them without both crawling from oversubscription.
torch.set_num_threads(int(os.environ.get("RCP_TEST_THREADS", "2")))


IMAGE_TOKEN = 99
PAD = 0
VOCAB = 100
NUM_VISUAL = 16  # image 16 px, patch 4


def tiny_config(**overrides):
    """Llama 4x32 (GQA 4 heads / 2 kv heads) + CLIP 2x32, 16 visual tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
    )
    kwargs = dict(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=IMAGE_TOKEN,
        image_seq_length=NUM_VISUAL, pruning_layers=[1, 2], repair_layers=[2, 3], pruning_keep_counts=[10, 5],
        pruner_hidden_size=16, repair_bottleneck_size=8,
    )
    kwargs.update(overrides)
    return RcpLlavaConfig(**kwargs)


def make_model(seed=0, randomize_plugins=False, attn_implementation="sdpa", dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    model = RcpLlavaForConditionalGeneration(config).to(dtype).eval()
    if randomize_plugins:
        randomize_plugin_parameters(model, seed)
    return model


def randomize_plugin_parameters(model, seed=0, scale=0.5):
    """Give every plug-in tensor a non-trivial value, as after training (gates open, FiLM non-zero)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.model.rcp_plugins.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
        # Centre the random pruners' logits near 0 (a random token MLP puts them near -2), so the adaptive threshold
        # keeps a number of tokens that differs between rows and layers.
        for pruner in model.model.rcp_plugins.pruners.values():
            pruner.bias.fill_(0.5)


def stock_copy(model):
    """A stock LlavaForConditionalGeneration with the same backbone weights."""
    from transformers import LlavaForConditionalGeneration

    stock = LlavaForConditionalGeneration(model.config).to(model.dtype).eval()
    backbone = {k: v for k, v in model.state_dict().items() if ".rcp_plugins." not in k}
    stock.load_state_dict(backbone, strict=True)
    return stock


def make_batch(specs, seed=0, dtype=torch.float32):
    """Left-padded batch. specs: list of (prefix_len, question_len, has_image)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prefix, question, has_image in specs:
        ids = [1] + torch.randint(3, 90, (prefix,), generator=g).tolist()
        if has_image:
            ids += [IMAGE_TOKEN] * NUM_VISUAL
        ids += torch.randint(3, 90, (question,), generator=g).tolist()
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    n_images = sum(1 for s in specs if s[2])
    pixel_values = torch.randn(n_images, 3, 16, 16, generator=g).to(dtype) if n_images else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def row_inputs(batch, i, specs):
    """Row i of a batch made by make_batch, unpadded."""
    valid = batch["attention_mask"][i].bool()
    image_index = sum(1 for s in specs[:i] if s[2])
    out = {
        "input_ids": batch["input_ids"][i][valid].unsqueeze(0),
        "attention_mask": batch["attention_mask"][i][valid].unsqueeze(0),
        "pixel_values": batch["pixel_values"][image_index: image_index + 1] if specs[i][2] else None,
    }
    return out


def load_benchmark(name):
    """A script of `benchmarks/` as a module, loaded by its path (`benchmarks/` is not a package, and nothing puts
    it on `sys.path`)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _in_the_repository_root(monkeypatch):
    """Every test runs from the repository root, as CI runs them, wherever pytest is started: a recorded command
    (`rcp_llava.results.command_line`) has the root-relative form only there."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def tiny():
    return make_model()


@pytest.fixture
def compiles(monkeypatch):
    """The `torch.compile` calls made during the test, as (the function's qualified name, its options); each still
    compiles."""
    made = []
    compile_ = torch.compile

    def spy(fn, **kwargs):
        made.append((fn.__qualname__, kwargs))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return made


def prompt_states(model, batch):
    """What the decoder's first layer sees, built without the RCP loop: `(h (B, T, D), image (B, T) bool,
    cos_sin)` -- the prompt embeddings with the projected image features scattered in, and the rotary tables."""
    inner = model.model
    ids = batch["input_ids"]
    h = inner.get_input_embeddings()(ids)
    feats = torch.cat(list(inner.get_image_features(batch["pixel_values"], return_dict=True).pooler_output))
    image = ids == IMAGE_TOKEN
    h = h.masked_scatter(image.unsqueeze(-1), feats.to(h.dtype))
    return h, image, inner.language_model.rotary_emb(h, batch["position_ids"])


def allowed_keys(alive):
    """`(B, T, T)` bool: causal attention restricted to the `alive (B, T)` keys; a dead row attends to itself
    only (no NaN; its output is never read)."""
    seq = alive.shape[1]
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)).unsqueeze(0) & alive.unsqueeze(1)
    return allowed | (torch.eye(seq, dtype=torch.bool).unsqueeze(0) & ~alive.unsqueeze(2))


def at_positions(ref_logits, positions):
    """`ref_logits (B, T, V)` of a full-length reference gathered at a pruned output's `token_positions (B, T')`
    (padding slots read position 0; mask them with `positions >= 0`)."""
    return ref_logits.gather(1, positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, ref_logits.shape[-1]))


def masked_reference(model, batch, keep_masks, points=None):
    """Full-length forward through the same layers, the dropped tokens masked out of attention (as keys) from
    their pruning point on (`points`, default the config's; 0 = before layer 0). Independent of the pruned loop:
    no gather, no compaction, no cache."""
    points = list(model.config.pruning_points if points is None else points)
    lm = model.model.language_model
    h, image, cos_sin = prompt_states(model, batch)
    vis_id = torch.where(image, image.long().cumsum(1) - 1, 0)
    alive = batch["attention_mask"].bool().clone()
    for idx, layer in enumerate(lm.layers):
        if idx in points:
            alive &= ~image | keep_masks[:, points.index(idx)].gather(1, vis_id)  # keep: (B, N)
        h = layer(h, attention_mask=allowed_keys(alive).unsqueeze(1), position_embeddings=cos_sin)
    return model.lm_head(lm.norm(h))


def make_image(path, size=(4, 3), color=(255, 0, 0)):
    """A small RGB image file at `path` (its folders created): the benchmark readers' and loaders' test images."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path, obj):
    """`obj` as JSON at `path` (its folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def sentencepiece_like_processor(generation_prompt, add_eos_token=False, bos_in_template=False):
    """A LLaVA processor with a small Llama-style BPE tokenizer (metaspace, "▁There" is one token), trained here, and
    llava-hf's LLaVA-1.5 template with the given generation prompt (`bos_in_template`: the template writes the BOS
    first, as Llama-3's and Mistral's do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, CLIPImageProcessor, LlamaTokenizer, LlavaProcessor

    from rcp_llava.lmms_eval_model import LLAVA_15_CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    corpus = ["USER: ASSISTANT: How many cats are there? There are two cats. What colour? Red."] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]])
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_eos_token = add_eos_token
    template = LLAVA_15_CHAT_TEMPLATE.replace("{{ 'ASSISTANT:' }}", "{{ '" + generation_prompt + "' }}")
    if bos_in_template:  # a tokenizer that adds BOS too (as Llama's), so a second one shows
        template = "{{ bos_token }}" + template
        tok.add_bos_token = True
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=4, chat_template=template,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


# Runs `python -I` with this package's modules missing, then the caller's script (`PATH ARGS...` or `-c CODE`).
# Isolated mode alone keeps site-packages, where `pip install -e .` maps them (its editable finder) and `pip install .`
# puts them: a first meta-path finder refuses them, as on a machine without the package.
_WITHOUT_PACKAGE = """
import runpy, sys

class NotInstalled:
    names = {"rcp_llava", "modeling_rcp_llava", "configuration_rcp_llava", "train_rcp"}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
if sys.argv[1] == "-c":  # the code runs in __main__ itself, as `python -c` runs it (pickling its classes works)
    _code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    del NotInstalled, runpy, sys  # nothing of this prelude left in the namespace the code sees
    exec(compile(globals().pop("_code"), "<string>", "exec"), globals())
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_where_rcp_llava_is_not_installed(args, tmp_path):
    """Run `python -I *args` (`["script.py", ...]` or `["-c", code, ...]`) in `tmp_path` as a machine without this
    package would: none of its modules importable (`_WITHOUT_PACKAGE`; `importlib.util.find_spec` of one raises
    ModuleNotFoundError where a bare machine returns None), isolated mode (neither the repository nor
    PYTHON* variables on the path), the Hub offline, a private HF modules cache. Returns the completed process; the
    caller asserts on it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    return subprocess.run([sys.executable, "-I", "-c", _WITHOUT_PACKAGE, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
