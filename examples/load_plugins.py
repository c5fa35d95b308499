"""Build a full RCP model from a stock LLaVA checkpoint plus a small plug-in-only checkpoint (PEFT-style).

    python examples/load_plugins.py     # tiny demo: random "trained" plug-ins + a stock base, in temp folders
    python examples/load_plugins.py --base llava-hf/llava-1.5-7b-hf --plugins DIR_OR_REPO [--out FULL_DIR]

A plug-in folder holds `rcp_config.json` (pruning method, layers, sizes, budget, `base_model_name_or_path`, library
version) and `rcp_plugins.safetensors` (pruners + repair adapters only, 0.64% of the model on the demo). Written
by `model.save_plugins(folder)`; loaded by `RcpLlavaForConditionalGeneration.from_base(base, plugins=folder)`.
With `--out`, the full model is saved as a Hub-loadable folder (weights + remote code + processor).
"""

import argparse
import os
import tempfile


def folder_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def build_demo(root):
    """A stock LLaVA folder (the base) and a plug-in folder from a 'trained' RCP model on that base."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from rcp_llava.demo import build_demo_model, build_demo_processor

    trained = build_demo_model(randomize_plugins=True)
    stock_config = LlavaConfig.from_dict(
        {k: v for k, v in trained.config.to_dict().items() if k in LlavaConfig().to_dict()}
    )
    base = LlavaForConditionalGeneration(stock_config).eval()
    base.load_state_dict({k: v for k, v in trained.state_dict().items() if ".rcp_plugins." not in k})
    base_dir, plugin_dir = os.path.join(root, "base"), os.path.join(root, "plugins")
    base.save_pretrained(base_dir)
    build_demo_processor(trained.config).save_pretrained(base_dir)
    trained.save_plugins(plugin_dir, base_model_name_or_path=base_dir)
    return trained, base_dir, plugin_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="stock LLaVA folder or repo id (default: tiny demo)")
    parser.add_argument("--plugins", help="plug-in folder or repo id (default: tiny demo)")
    parser.add_argument("--out", help="save the assembled full model here (a new or empty folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = parser.parse_args(argv)
    if (args.base is None) != (args.plugins is None):
        parser.error("give both --base and --plugins, or neither (demo)")
    if args.out is not None:  # checked before the model is assembled, and nothing in it replaced unasked
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out {args.out!r} is a file; give a folder")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            parser.error(f"--out {args.out!r} already holds files ({', '.join(sorted(os.listdir(args.out))[:4])}"
                         f"{', ...' if len(os.listdir(args.out)) > 4 else ''}); choose a new folder or pass "
                         "--overwrite to replace them")
    if args.base is not None:
        return run(args)
    with tempfile.TemporaryDirectory(prefix="rcp_llava_plugins_") as root:  # the demo folders, removed at exit
        trained, args.base, args.plugins = build_demo(root)
        print(f"demo: stock base in {args.base}, plug-ins in {args.plugins} (removed at exit)")
        return run(args, trained)


def run(args, trained=None):
    import torch
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    if os.path.isdir(args.plugins):
        print(f"plug-in folder: {sorted(os.listdir(args.plugins))}, {folder_size(args.plugins) / 1e3:.1f} kB")

    model = RcpLlavaForConditionalGeneration.from_base(args.base, plugins=args.plugins).eval()
    processor = AutoProcessor.from_pretrained(args.base)
    n_plugin = sum(p.numel() for p in model.plugin_parameters())
    n_all = sum(p.numel() for p in model.parameters())
    print(f"assembled {type(model).__name__}: {n_plugin} plug-in parameters of {n_all} "
          f"({100 * n_plugin / n_all:.2f}%), pruning layers {model.config.pruning_layers}")

    import numpy as np
    from PIL import Image

    size = model.config.vision_config.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    print(f"kept visual tokens per pruning layer: {model.last_pruning_info.kept_counts.tolist()[0]}")
    if trained is not None:
        with torch.no_grad():
            same = torch.equal(logits, trained(**inputs).logits)
        print(f"logits identical to the model the plug-ins were saved from: {same}")
    if args.out:
        model.save_pretrained(args.out, overwrite=args.overwrite)
        processor.save_pretrained(args.out)
        print(f"saved the full model to {args.out}: {sorted(os.listdir(args.out))}")
    return logits


if __name__ == "__main__":
    main()
