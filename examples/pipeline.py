"""Answer a question about an image with `pipeline("image-text-to-text")`, pruning active.

    python examples/pipeline.py                       # a tiny random RCP model in a temp folder, removed after
    python examples/pipeline.py --model DIR_OR_REPO --image cat.jpg --question "What is this?"

The pipeline loads the model through `AutoModelForImageTextToText` with `trust_remote_code=True` (the folder's
`auto_map`) and the processor with `AutoProcessor`; `pipe.model.last_pruning_info` tells how many visual tokens
the last prompt kept after each pruning layer.
"""

import argparse

from _demo_folder import check_rcp_model, demo_or, kept_tokens_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder written by save_pretrained, or a Hub repo id (default: tiny demo)")
    parser.add_argument("--image", help="image file or URL (default: a random image for the demo)")
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with demo_or(args.model) as model_id:
        return run(args, model_id)


def run(args, model_id):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=model_id, trust_remote_code=True)
    check_rcp_model(pipe.model, model_id)
    if args.image:
        image = args.image
    else:
        import numpy as np
        from PIL import Image

        size = pipe.model.config.vision_config.image_size
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": args.question}]}]
    out = pipe(text=messages, return_full_text=False,
               generate_kwargs={"max_new_tokens": args.max_new_tokens, "do_sample": False})
    answer = out[0]["generated_text"]
    print(f"answer: {answer!r}")
    print(kept_tokens_line(pipe.model))
    return answer


if __name__ == "__main__":
    main()
