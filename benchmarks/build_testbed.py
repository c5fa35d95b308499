"""Build the synthetic-VQA testbed: dataset, a stock LLaVA trained on it from scratch, and its metrics.

    # tiny preset (96 px, 144 visual tokens) into ~/.cache/rcp_llava/testbed/tiny (~40 min on 2 CPU cores)
    python benchmarks/build_testbed.py

    # explicit folder; rerunning reuses the dataset, resumes training from its checkpoints, skips what is done
    python benchmarks/build_testbed.py --preset tiny --output_dir outputs/testbed_tiny

    # paper geometry (336 px, patch 14, 576 visual tokens) on a GPU
    python benchmarks/build_testbed.py --preset paper --output_dir outputs/testbed_paper

    # then, with stock classes:
    #   LlavaForConditionalGeneration.from_pretrained("outputs/testbed_tiny/model")
    #   AutoProcessor.from_pretrained("outputs/testbed_tiny/model")
    #   datasets.load_from_disk("outputs/testbed_tiny/dataset")
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from rcp_llava.results import command_line
from rcp_llava.testbed import PRESETS, build_testbed, default_cache_dir


@dataclass
class BuildArguments:
    preset: str = field(default="tiny", metadata={"help": f"One of {sorted(PRESETS)}."})
    output_dir: str = field(default=None, metadata={"help": "Output folder (default: $RCP_LLAVA_CACHE/testbed/<preset>)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data generator and of the training."})
    pruning_eval: bool = field(default=True, metadata={"help": "Also report random / oracle / saliency pruning."})
    eval_max_samples: int = field(default=None, metadata={"help": "Evaluate on the first N test samples only."})
    save_steps: int = field(default=200, metadata={"help": "Trainer checkpoint interval (steps)."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads."})


def main():
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses()
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir) if args.output_dir else default_cache_dir(args.preset)
    command = command_line(__file__)
    t0 = time.time()
    build_testbed(args.preset, out, seed=args.seed, pruning_eval=args.pruning_eval,
                  eval_max_samples=args.eval_max_samples, save_steps=args.save_steps, command=command)
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    print(f"\ntestbed {args.preset} in {out} ({time.time() - t0:.0f}s this run)")
    print(f"test accuracy {test['overall']:.3f} on {test['n']} samples")
    for family, acc in test["families"].items():
        print(f"  {family:10s} {acc:.3f}  (chance {metrics['chance'][family]:.3f})")
    for kind, acc in test["existence_negatives"].items():
        print(f"  existence/{kind:11s} {acc:.3f}")
    if "pruning" in metrics:
        budgets = list(metrics["budgets"])
        print("\npruning (test accuracy)  " + "  ".join(f"{b} ({metrics['budgets'][b]})" for b in budgets))
        for name, row in metrics["pruning"].items():
            print(f"  {name:9s}" + "".join(f"  {row[b]['overall']:8.3f}" for b in budgets))
    print(f"\nfull model: {test['overall']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
