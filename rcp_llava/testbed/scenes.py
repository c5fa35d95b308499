"""Procedural scenes and questions of the testbed.

A scene is a few coloured shapes on a noisy, faintly striped background. Every object covers an
`object_cells x object_cells` block of patches snapped to the patch grid, stays inside one image quadrant and
keeps an empty cell to its neighbours, so "which patches hold this object" is exact. Each (colour, shape) pair
occurs at most once per scene.

Five question families, all with one-word answers:

| family      | example                                  | answers                         |
|-------------|------------------------------------------|---------------------------------|
| attribute   | what colour is the triangle?             | a colour, or `small` / `large`  |
| identity    | what shape is the red object?            | a shape                         |
| existence   | is there a blue ring?                    | `yes` / `no` (POPE negatives)   |
| counting    | how many circles are there?              | `zero` ... `three`              |
| position    | where is the green cross?                | `top-left` ... `bottom-right`   |

Everything is a pure function of `(seed, split, index)`, so datasets and training streams are reproducible.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .presets import TestbedPreset


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 215),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle", "diamond", "cross", "ring")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses", "ring": "rings"}
SIZES = ("small", "large")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS = ("zero", "one", "two", "three")
FAMILIES = ("attribute", "identity", "existence", "counting", "position")
# Training-only forms (never in a saved split): `conjunction` asks the attribute questions whose referent is two
# words including the shape, which `attribute` asks rarely (size of a colour + shape: 30% of attribute; colour of a
# size + shape: only when the shape alone is ambiguous) and which the deep decoder answered at chance.
TRAINING_FAMILIES = ("conjunction",)
NEGATIVE_TYPES = ("random", "popular", "adversarial")

# Non-uniform priors make some objects "popular" (POPE's popular negatives are the most frequent absent objects).
COLOUR_PRIOR = np.array([1.0 / (1 + 0.3 * i) for i in range(len(COLOURS))])
COLOUR_PRIOR /= COLOUR_PRIOR.sum()
SHAPE_PRIOR = np.array([1.0 / (1 + 0.3 * i) for i in range(len(SHAPES))])
SHAPE_PRIOR /= SHAPE_PRIOR.sum()

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2, "stream": 3}


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int  # top-left cell of the object's block
    col: int
    quadrant: str
    patches: list  # raster indices of the patches holding >= 3 of its pixels


@dataclass
class Scene:
    image: Image.Image
    objects: list
    grid_size: int
    patch_labels: dict  # name -> np.ndarray (grid*grid,) int64; 0 = background


def _shape_mask(shape: str, box: int, scale: float) -> np.ndarray:
    """Boolean (box, box) mask of a shape centred in the box, occupying `scale` of its width."""
    c = (np.arange(box) + 0.5) / box * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    x, y = x / scale, y / scale
    r = np.sqrt(x**2 + y**2)
    if shape == "square":
        m = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    elif shape == "circle":
        m = r <= 0.92
    elif shape == "triangle":
        m = (y >= -0.9) & (y <= 0.85) & (np.abs(x) <= (y + 0.9) / 1.75 * 0.95)
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 0.98
    elif shape == "cross":
        m = ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    elif shape == "ring":
        m = (r <= 0.95) & (r >= 0.5)
    else:
        raise ValueError(f"Unknown shape {shape!r}.")
    return m


def _place_objects(rng, preset: TestbedPreset, n: int):
    """Top-left cells of `n` blocks: inside one quadrant each, one empty cell between blocks."""
    g, k = preset.grid_size, preset.object_cells
    half = g // 2
    occupied = np.zeros((g + 2, g + 2), dtype=bool)  # padded by one cell on each side
    cells = []
    candidates = [(r, c) for r in range(g - k + 1) for c in range(g - k + 1)
                  if (r + k <= half or r >= half) and (c + k <= half or c >= half)]
    order = rng.permutation(len(candidates))
    for i in order:
        r, c = candidates[i]
        # the block plus a one-cell margin must be free (padded coordinates: +1)
        if occupied[r: r + k + 2, c: c + k + 2].any():
            continue
        occupied[r + 1: r + k + 1, c + 1: c + k + 1] = True
        cells.append((r, c))
        if len(cells) == n:
            break
    return cells


def _draw_background(rng, preset: TestbedPreset) -> np.ndarray:
    s = preset.image_size
    base = rng.uniform(0.12, 0.32)
    tint = rng.uniform(-0.03, 0.03, size=3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(6, 14) * s / 96
    stripes = 0.03 * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period + rng.uniform(0, 6.3))
    img = base + tint[None, None, :] + stripes[:, :, None]
    return img.astype(np.float32)


def generate_scene(rng, preset: TestbedPreset, num_objects=None) -> Scene:
    """Draw one scene. `num_objects` defaults to a uniform draw in `[min_objects, max_objects]`."""
    g, p, k = preset.grid_size, preset.patch_size, preset.object_cells
    if num_objects is None:
        num_objects = int(rng.integers(preset.min_objects, preset.max_objects + 1))
    cells = _place_objects(rng, preset, num_objects)
    img = _draw_background(rng, preset)
    colours, shapes = list(COLOURS), list(SHAPES)
    used, objects = set(), []
    labels = {name: np.zeros(g * g, dtype=np.int64) for name in ("colour", "shape", "size", "part")}
    labels["quadrant"] = np.array([(r >= g // 2) * 2 + (c >= g // 2) for r in range(g) for c in range(g)])
    box = k * p
    for r, c in cells:
        while True:
            colour = colours[rng.choice(len(colours), p=COLOUR_PRIOR)]
            shape = shapes[rng.choice(len(shapes), p=SHAPE_PRIOR)]
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        size = SIZES[int(rng.integers(2))]
        mask = _shape_mask(shape, box, 1.0 if size == "large" else 0.62)
        rgb = np.array(COLOURS[colour], dtype=np.float32) / 255 * rng.uniform(0.9, 1.0)
        y0, x0 = r * p, c * p
        region = img[y0: y0 + box, x0: x0 + box]
        region[mask] = rgb
        patches = []
        for dr in range(k):
            for dc in range(k):
                sub = mask[dr * p: (dr + 1) * p, dc * p: (dc + 1) * p]
                idx = (r + dr) * g + (c + dc)
                if sub.sum() >= 3:
                    patches.append(idx)
                labels["colour"][idx] = 1 + colours.index(colour)
                labels["shape"][idx] = 1 + shapes.index(shape)
                labels["size"][idx] = 1 + SIZES.index(size)
                labels["part"][idx] = 1 + dr * k + dc if k == 2 else 1
        quadrant = QUADRANTS[(r >= g // 2) * 2 + (c >= g // 2)]
        objects.append(SceneObject(colour, shape, size, r, c, quadrant, patches))
    img = img + rng.normal(0, preset.noise_std, size=img.shape).astype(np.float32)
    image = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    return Scene(image=image, objects=objects, grid_size=g, patch_labels=labels)


# ----------------------------------------------------------------------------------------------- questions

def _unique(objects, target, keys):
    """True when `target` is the only object matching it on `keys`."""
    return sum(all(getattr(o, key) == getattr(target, key) for key in keys) for o in objects) == 1


def _patches(objs):
    return sorted(i for o in objs for i in o.patches)


def _attribute(rng, scene):
    objs = scene.objects
    order = rng.permutation(len(objs))
    if rng.random() < 0.7:  # colour of an object named by shape (and size if needed)
        for i in order:
            t = objs[i]
            for keys in (("shape",), ("size", "shape")):
                if _unique(objs, t, keys):
                    ref = " ".join(getattr(t, key) for key in keys)
                    return f"what colour is the {ref}?", t.colour, [t], {}
    return _size_question(objs[order[0]])


def _size_question(t):
    """"what size is the <colour> <shape>?": (colour, shape) pairs are unique in a scene, so it always names one."""
    return f"what size is the {t.colour} {t.shape}?", t.size, [t], {}


def _conjunction(rng, scene):
    """Half "what size is the <colour> <shape>?", half "what colour is the <size> <shape>?" (any object whose size
    and shape single it out; else the size question): the two-word referents of `_attribute`, asked often."""
    objs = scene.objects
    order = rng.permutation(len(objs))
    if rng.random() < 0.5:
        for i in order:
            t = objs[i]
            if _unique(objs, t, ("size", "shape")):
                return f"what colour is the {t.size} {t.shape}?", t.colour, [t], {}
    return _size_question(objs[order[0]])


def _identity(rng, scene):
    objs = scene.objects
    for i in rng.permutation(len(objs)):
        t = objs[i]
        for keys in (("colour",), ("size", "colour")):
            if _unique(objs, t, keys):
                ref = " ".join(getattr(t, key) for key in keys)
                return f"what shape is the {ref} object?", t.shape, [t], {}
    t = objs[0]  # unreachable in practice: (colour, shape) pairs are unique, fall back to a shape-free phrase
    return f"what shape is the {t.size} {t.colour} object?", t.shape, [t], {}


def _existence(rng, scene):
    objs = scene.objects
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        t = objs[int(rng.integers(len(objs)))]
        return f"is there a {t.colour} {t.shape}?", "yes", [t], {"negative_type": ""}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    kind = NEGATIVE_TYPES[int(rng.integers(3))]
    colours, shapes = list(COLOURS), list(SHAPES)
    if kind == "adversarial":
        # both attributes are in the scene, on different objects: only binding colour to shape answers it
        pool = [(c, s) for c, s in absent if any(o.colour == c for o in objs) and any(o.shape == s for o in objs)]
        if not pool:
            kind = "random"
    if kind == "popular":
        weight = np.array([COLOUR_PRIOR[colours.index(c)] * SHAPE_PRIOR[shapes.index(s)] for c, s in absent])
        top = np.argsort(-weight, kind="stable")[:3]
        pool = [absent[i] for i in top]
    if kind == "random":
        pool = absent
    colour, shape = pool[int(rng.integers(len(pool)))]
    evidence = [o for o in objs if o.colour == colour or o.shape == shape]
    return f"is there a {colour} {shape}?", "no", evidence, {"negative_type": kind}


def _counting(rng, scene):
    objs = scene.objects
    options = {}  # count -> list of (key, value)
    for key, values in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        for v in values:
            n = sum(getattr(o, key) == v for o in objs)
            if n < len(COUNT_WORDS):
                options.setdefault(n, []).append((key, v))
    counts = sorted(options)
    n = counts[int(rng.integers(len(counts)))]
    key, value = options[n][int(rng.integers(len(options[n])))]
    text = f"how many {value} objects are there?" if key == "colour" else f"how many {PLURALS[value]} are there?"
    return text, COUNT_WORDS[n], [o for o in objs if getattr(o, key) == value], {}


def _position(rng, scene):
    t = scene.objects[int(rng.integers(len(scene.objects)))]
    return f"where is the {t.colour} {t.shape}?", t.quadrant, [t], {}


_FAMILY_FNS = {"attribute": _attribute, "identity": _identity, "existence": _existence,
               "counting": _counting, "position": _position, "conjunction": _conjunction}


def make_question(rng, scene: Scene, family: str) -> dict:
    """One question of `family` about `scene`: question, answer, family, evidence_patches, negative_type."""
    if family not in _FAMILY_FNS:
        raise ValueError(f"Unknown question family {family!r}; choose one of {FAMILIES + TRAINING_FAMILIES}.")
    question, answer, evidence, extra = _FAMILY_FNS[family](rng, scene)
    return {"question": question, "answer": answer, "family": family, "evidence_patches": _patches(evidence),
            "negative_type": extra.get("negative_type", "")}


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def make_sample(preset: TestbedPreset, seed: int, split: str, index: int, families=FAMILIES, num_questions=1,
                num_objects=None):
    """Scene `index` of `split` and `num_questions` questions about it (families cycle from a random start).

    Returns `(scene, questions)`; the first question's family is `families[index % len(families)]` so a split is
    balanced across families.
    """
    rng = sample_rng(seed, split, index)
    if callable(num_objects):  # a curriculum: num_objects(rng) -> int
        num_objects = num_objects(rng)
    scene = generate_scene(rng, preset, num_objects)
    questions = []
    for j in range(num_questions):
        family = families[(index + j) % len(families)]
        questions.append(make_question(rng, scene, family))
    return scene, questions


def scene_record(scene: Scene) -> dict:
    """Dataset columns describing the scene (beyond the image)."""
    return {
        "object_patches": sorted(i for o in scene.objects for i in o.patches),
        "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "row": o.row, "col": o.col,
                     "quadrant": o.quadrant, "patches": list(o.patches)} for o in scene.objects],
        "grid_size": scene.grid_size,
    }
