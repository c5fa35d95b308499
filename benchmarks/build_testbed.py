"""Build the synthetic-VQA testbed: dataset, a stock LLaVA trained on it from scratch, and its metrics.

    # the main job's preset (`rcp_llava.testbed.MAIN_PRESET`, deep: 96 px, 144 visual tokens, 16 decoder layers)
    # into ~/.cache/rcp_llava/testbed/deep (~50 min on 2 CPU cores: 3023 s when last built), where `train_rcp.py`,
    # `testbed_report.py` and every "testbed" reader look by default
    python benchmarks/build_testbed.py

    # tiny (4 decoder layers, ~40 min) into an explicit folder; rerunning reuses the dataset, resumes training from
    # its checkpoints, skips what is done
    python benchmarks/build_testbed.py --preset tiny --output_dir outputs/testbed_tiny

    # paper geometry (336 px, patch 14, 576 visual tokens) on a GPU
    python benchmarks/build_testbed.py --preset paper --output_dir outputs/testbed_paper

    # then, with stock classes:
    #   LlavaForConditionalGeneration.from_pretrained("outputs/testbed_tiny/model")
    #   AutoProcessor.from_pretrained("outputs/testbed_tiny/model")
    #   datasets.load_from_disk("outputs/testbed_tiny/dataset")
"""

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from rcp_llava.results import command_line, positive_int
from rcp_llava.testbed import MAIN_PRESET, PRESETS, build_testbed, default_cache_dir


@dataclass
class BuildArguments:
    # The main job's testbed, which every reader of "testbed" defaults to (it was tiny: testbed_report's "build the
    # testbed first" then built a preset the report did not read).
    preset: str = field(default=MAIN_PRESET, metadata={"help": f"One of {sorted(PRESETS)} (default {MAIN_PRESET}, "
                                                               "the main job's)."})
    output_dir: str = field(default=None, metadata={"help": "Output folder (default: $RCP_LLAVA_CACHE/testbed/<preset>)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data generator and of the training."})
    pruning_eval: bool = field(default=True, metadata={"help": "Also report random / oracle / saliency pruning."})
    eval_max_samples: int = field(default=None, metadata={"help": "Evaluate on the first N test samples only."})
    save_steps: int = field(default=200, metadata={"help": "Trainer checkpoint interval (steps)."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads."})


# Counts checked at parsing, as `positive_int` words it: `--eval_max_samples 0` stored a NaN accuracy in metrics.json
# for good (a later build skips the evaluation it holds), `--num_threads 0` was torch's error naming no flag.
COUNTS = ("eval_max_samples", "save_steps", "num_threads")


def main(argv=None):
    parser = HfArgumentParser(BuildArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    for name in COUNTS:
        value = getattr(args, name)
        if value is not None:
            try:
                positive_int(str(value))
            except argparse.ArgumentTypeError as error:
                parser.error(f"argument --{name}: {error}")
    if not 0 <= args.seed < 2 ** 32:  # build_testbed refuses it too, naming `seed`, not the flag
        parser.error(f"argument --seed: {args.seed} is outside [0, 2**32 - 1] (numpy seeds the data generator)")
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir) if args.output_dir else default_cache_dir(args.preset)
    command = command_line(__file__, argv)
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
