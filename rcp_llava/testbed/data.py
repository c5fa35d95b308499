"""The testbed as a `datasets.DatasetDict` (train / validation / test, images included), deterministic in the seed."""

from datasets import Dataset, DatasetDict, Features, Image, List, Value

from .presets import TestbedPreset, get_preset
from .scenes import FAMILIES, make_sample, scene_record


FEATURES = Features({
    "id": Value("int64"),
    "image": Image(),
    "question": Value("string"),
    "answer": Value("string"),
    "family": Value("string"),
    "negative_type": Value("string"),  # existence "no" questions: random / popular / adversarial; else ""
    "evidence_patches": List(Value("int32")),
    "object_patches": List(Value("int32")),
    "grid_size": Value("int32"),
    "objects": List({
        "colour": Value("string"), "shape": Value("string"), "size": Value("string"), "row": Value("int32"),
        "col": Value("int32"), "quadrant": Value("string"), "patches": List(Value("int32")),
    }),
})

SPLIT_ID_OFFSET = {"train": 0, "validation": 10_000_000, "test": 20_000_000}


def split_rows(preset: TestbedPreset, seed: int, split: str, num_rows: int) -> list:
    """Rows of one split: one scene and one question per row, families cycling so every family is balanced."""
    rows = []
    for i in range(num_rows):
        scene, (q,) = make_sample(preset, seed, split, i, FAMILIES, num_questions=1)
        rows.append({"id": SPLIT_ID_OFFSET[split] + i, "image": scene.image, **q, **scene_record(scene)})
    return rows


def build_dataset(preset="tiny", seed: int = 0, sizes=None) -> DatasetDict:
    """Generate the three splits. `sizes` overrides the preset's `{"train": n, "validation": n, "test": n}`."""
    preset = get_preset(preset)
    sizes = sizes or {"train": preset.num_train, "validation": preset.num_validation, "test": preset.num_test}
    return DatasetDict({
        split: Dataset.from_list(split_rows(preset, seed, split, n), features=FEATURES)
        for split, n in sizes.items()
    })
