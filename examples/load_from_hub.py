"""Load a saved RCP-LLaVA folder (or Hub repo) through the Auto classes with remote code, and answer a question.

    python examples/load_from_hub.py                      # a tiny random RCP model in a temp folder, removed after
    python examples/load_from_hub.py --model DIR_OR_REPO  # a real folder written by `save_pretrained`, or a repo id
    HF_HUB_OFFLINE=1 python examples/load_from_hub.py --model DIR --image cat.jpg --question "What is this?"

Loading needs only `torch` and `transformers`: the folder carries `configuration_rcp_llava.py`,
`modeling_rcp_llava.py` and an `auto_map` in `config.json`, so `trust_remote_code=True` rebuilds the model even
where rcp-llava is not installed (this script never imports the model classes itself).
"""

import argparse

from _demo_folder import check_rcp_model, demo_or, kept_tokens_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder written by save_pretrained, or a Hub repo id (default: tiny demo)")
    parser.add_argument("--image", help="image file (default: a random 16x16 image for the demo)")
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with demo_or(args.model) as model_id:
        return run(args, model_id)


def run(args, model_id):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True).eval()
    check_rcp_model(model, model_id)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    print(f"loaded {type(model).__name__} from module {type(model).__module__}")

    if args.image:
        from PIL import Image

        image = Image.open(args.image)
    else:
        import numpy as np
        from PIL import Image

        size = model.config.vision_config.image_size
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    print(kept_tokens_line(model))
    return answer


if __name__ == "__main__":
    main()
