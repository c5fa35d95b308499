"""The examples' default model: a tiny random RCP model saved in a temporary folder, removed afterwards.

Imported by `load_from_hub.py` and `pipeline.py` (the folder of a script is on `sys.path` when it runs). It never
imports rcp-llava: the examples load the folder through its remote code, as a user without the package would.
"""

import contextlib
import os
import subprocess
import sys
import tempfile


def build_demo_folder(folder):
    """Save a tiny random RCP model + processor into `folder`, in a child process: this process never imports
    rcp-llava (whose import registers the classes locally), so the load below really runs the folder's code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "rcp_llava.demo", "--demo-folder", folder], cwd=root, check=True,
                   capture_output=True, text=True)
    return folder


def check_model_folder(model_id):
    """A file, or a local-looking path (absolute, ./, ../, ~ or more than one '/') that does not exist, named before
    transformers reads it as a Hub repo id. rcp-llava's `check_model_source` rule, written here: importing it would
    fail where rcp-llava is not installed (and register its classes where it is)."""
    path = os.fspath(model_id)
    if os.path.isfile(path):
        raise ValueError(f"`--model` {path!r} is a file; pass the folder that holds it "
                         f"({os.path.dirname(path) or '.'!r}).")
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"`--model` {path!r}: no such folder (and it is not a Hub repo id of the form "
                                "'user/name'). Check the path.")


@contextlib.contextmanager
def demo_or(model_id):
    """`model_id`, or a tiny random demo model in a temporary folder removed on exit, together with the copy of
    its remote code that `trust_remote_code` makes (transformers' modules cache; unless HF_MODULES_CACHE is set)."""
    if model_id is not None:
        check_model_folder(model_id)  # a missing folder: not HF's "Repo id must be in the form ..."
        if os.path.isfile(os.path.join(model_id, "rcp_config.json")) and not os.path.isfile(
                os.path.join(model_id, "config.json")):  # transformers said "Unrecognized model ... model_type"
            raise SystemExit(f"--model {model_id!r} is a plug-in-only checkpoint (save_plugins: rcp_config.json, "
                             "no config.json): it needs its stock base model. Run examples/load_plugins.py --base "
                             f"BASE --plugins {model_id}.")
        yield model_id
        return
    with tempfile.TemporaryDirectory(prefix="rcp_llava_demo_") as tmp:
        os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tmp, "modules"))  # read when transformers loads
        folder = build_demo_folder(os.path.join(tmp, "model"))
        print(f"saved a tiny random RCP model to {folder} (removed at exit)")
        yield folder


def check_rcp_model(model, model_id):
    """SystemExit with the fix when `model_id` loaded something other than an RCP-LLaVA model (a stock LLaVA folder:
    these examples read the pruning fields, and stock has none -- it crashed with an AttributeError)."""
    if not hasattr(model, "last_pruning_info"):
        raise SystemExit(f"--model {model_id!r} loaded a {type(model).__name__}, not an RCP-LLaVA model (no pruning "
                         "fields). Give a folder written by RcpLlavaForConditionalGeneration.save_pretrained, or add "
                         "plug-ins to a stock LLaVA with examples/load_plugins.py --base.")


def kept_tokens_line(model):
    """What the last `generate` kept, in the model's own terms: the points a pre-LLM method (VisPruner) prunes at
    are before the LLM, not `pruning_layers` (empty there), and `pruning_method="none"` prunes nothing
    (`last_pruning_info` is None: reading its counts crashed with an AttributeError)."""
    config, info = model.config, model.last_pruning_info
    n = config.num_visual_tokens
    if info is None:
        return f"no visual token pruned (pruning_method={config.pruning_method!r}): all {n} kept"
    # `pruning_points`' 0 is the pre-LLM point; the config refuses it together with pruning layers
    where = "before the LLM" if 0 in config.pruning_points else f"after pruning layers {list(config.pruning_layers)}"
    return f"visual tokens kept {where}: {info.kept_counts.tolist()[0]} of {n}"
