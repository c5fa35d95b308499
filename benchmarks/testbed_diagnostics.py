"""Where a testbed model's accuracy is missing: accuracy per question form, and whether the features carry what the
decoder misses (issue 16: the deep build's size questions).

    python benchmarks/testbed_diagnostics.py --folder ~/.cache/rcp_llava/testbed/deep --name testbed_diagnostics_deep

* Question forms: the attribute and identity questions split by what they ask (colour / size / shape) and by how
  many words name the object ("the ring" vs "the small ring"), first-token accuracy on `--split`.
* Feature probes: for every object of the first `--probe_images` images of `--probe_split`, its patches' projected
  features (the LLM's input), their mean and max; a logistic probe per attribute (size, colour, shape) trained on 3/4 of the
  objects, accuracy on the held-out quarter. 1.0 = the attribute is linearly in the features the decoder reads.
"""

import argparse
import os
from collections import defaultdict

from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                               write_results)


def question_form(question):
    """'what colour is the small ring?' -> ('colour', 2); None for the other families' questions."""
    words = question.rstrip("?").split()
    if len(words) < 5 or words[0] != "what":
        return None
    if words[1] in ("colour", "size") and words[2] == "is" and words[3] == "the":
        return words[1], len(words) - 4
    if words[1] == "shape" and words[2] == "is" and words[3] == "the" and words[-1] == "object":
        return "shape", len(words) - 5
    return None


def form_accuracy(model, processor, rows, batch_size=64):
    """`{"asks colour, named by 1 word": (accuracy, n), ...}` over the rows whose question has a form."""
    import torch

    from rcp_llava.testbed.evaluate import predict

    rows = [r for r in rows if question_form(r["question"]) is not None]
    predictions = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            predictions += predict(model, processor, rows[start:start + batch_size])
    groups = defaultdict(list)
    for row, prediction in zip(rows, predictions):
        asks, words = question_form(row["question"])
        groups[f"asks {asks}, named by {words} word{'s' if words > 1 else ''}"].append(prediction == row["answer"])
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(groups.items())}


def probe_accuracy(features, labels, steps=500, seed=0):
    """Held-out accuracy of a multinomial logistic probe: features (M, D) float, labels (M,) int; trained on the
    first 3/4 (standardised with their statistics), scored on the rest."""
    import torch

    torch.manual_seed(seed)
    labels = torch.as_tensor(labels)
    classes, y = torch.unique(labels, return_inverse=True)
    n = len(y) * 3 // 4
    x = torch.as_tensor(features, dtype=torch.float32)
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    layer = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(x[:n]), y[:n]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((layer(x[n:]).argmax(-1) == y[n:]).float().mean())


def object_features(model, processor, rows, batch_size=50):
    """(features (M, 2 * d), {attribute: labels (M,)}) of every object in `rows`: the mean and the max of its patches'
    projected features."""
    import torch

    feats, labels = [], defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            pixels = processor.image_processor([r["image"] for r in chunk], return_tensors="pt")["pixel_values"]
            out = model.model.get_image_features(pixel_values=pixels)
            out = getattr(out, "pooler_output", out)
            out = torch.stack(list(out)) if isinstance(out, (list, tuple)) else out  # (B, N, d)
            for b, row in enumerate(chunk):
                for obj in row["objects"]:
                    patches = out[b].reshape(-1, out.shape[-1])[obj["patches"]]  # (P, d), P varies at borders
                    feats.append(torch.cat([patches.mean(0), patches.amax(0)]))
                    for attribute in ("size", "colour", "shape"):
                        labels[attribute].append(obj[attribute])
    codes = {a: [sorted(set(v)).index(x) for x in v] for a, v in labels.items()}
    return torch.stack(feats), codes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="Testbed folder (model/ and dataset/ inside).")
    parser.add_argument("--model", default=None, help="Another model folder to diagnose (default: FOLDER/model).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_samples", type=positive_int, default=None)
    parser.add_argument("--probe_split", default="validation")
    parser.add_argument("--probe_images", type=positive_int, default=400)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--name", type=result_name, default="testbed_diagnostics")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    folder = os.path.expanduser(args.folder)
    model_dir = args.model or os.path.join(folder, "model")
    for path, flag in ((os.path.join(folder, "dataset"), "--folder"), (model_dir, "--model")):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag}: no folder {path!r}; pass a built testbed (build_testbed.py's output).")
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)

    from datasets import load_from_disk
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # The splits before the model loads (a missing one was a bare KeyError after it).
    data = load_from_disk(os.path.join(folder, "dataset"))
    if not hasattr(data, "keys"):
        raise ValueError(f"--folder {args.folder!r}: dataset/ is one split, not the testbed's DatasetDict; pass a "
                         "built testbed (build_testbed.py's output).")
    for flag, name in (("--split", args.split), ("--probe_split", args.probe_split)):
        if name not in data:
            raise ValueError(f"{flag} {name!r}: {os.path.join(folder, 'dataset')} has no such split; it has "
                             f"{list(data)}.")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    split = data[args.split]
    rows = [split[i] for i in range(len(split) if args.max_samples is None else min(args.max_samples, len(split)))]
    forms = form_accuracy(model, processor, rows)
    probe_split = data[args.probe_split]
    probe_rows = [probe_split[i] for i in range(min(args.probe_images, len(probe_split)))]
    features, labels = object_features(model, processor, probe_rows)
    probes = {a: probe_accuracy(features, y) for a, y in labels.items()}

    command = command_line(__file__, argv)
    lines = [f"# Testbed diagnostics: `{model_dir}`", "", f"Command: `{command}`", "",
             f"Question forms ({len(rows)} `{args.split}` samples, first-token accuracy; n in brackets):", "",
             "| question | accuracy |", "|---|---|"]
    lines += [f"| {form} | {acc:.3f} ({n}) |" for form, (acc, n) in forms.items()]
    lines += ["", f"Linear probes on the projected patches of {len(features)} objects ({len(probe_rows)} "
              f"`{args.probe_split}` images; held-out quarter):", "", "| attribute | probe accuracy |", "|---|---|"]
    lines += [f"| {a} | {acc:.3f} |" for a, acc in probes.items()]
    markdown = "\n".join(lines) + "\n"
    write_results(stem, markdown=markdown, overwrite=args.overwrite,
                  data={"command": command, "model": model_dir,
                        "forms": {k: {"accuracy": a, "n": n} for k, (a, n) in forms.items()}, "probes": probes,
                        "objects": len(features)})
    print(markdown)
    return forms, probes


if __name__ == "__main__":
    main()
