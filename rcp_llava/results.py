"""Where the benchmark scripts write, and how: never into the committed `benchmarks/results/` unless asked, never
over an earlier result unless asked, always atomically (a crash leaves the previous file or none, never half).

    from rcp_llava.results import DEFAULT_OUTPUT_DIR, refuse_existing, write_results
    refuse_existing([stem + ".md", stem + ".json"], overwrite=args.overwrite)   # before anything loads
    write_results(stem, markdown="...", data={...}, overwrite=args.overwrite)   # returns the stem written
"""

import json
import os

from transformers.utils import logging

from modeling_rcp_llava import atomic_write, write_text


logger = logging.get_logger(__name__)


# A run lands in the committed tables only with `--output_dir benchmarks/results` (and `--overwrite` to replace
# one): a run made for another purpose must not replace a committed result.
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "benchmarks")


def refuse_existing(paths, overwrite=False, flag="--overwrite", output_flag="--output_dir", choose=None):
    """Raise `FileExistsError` naming the existing `paths` (and the two ways out) unless `overwrite`, and refuse a
    folder the results could not be written into (`check_writable_folder`): both before anything loads, so that a
    run is not computed and then lost at the write. `output_flag` is the script's flag for where they go; `choose`
    the flags that give other names, as the message says them (default "--name / --output_dir" with --output_dir,
    else `output_flag`): efficiency.py names its files by --tag, selection_profile.py by --output_dir alone, and
    told users of either to choose another --name, a flag neither has."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        check_writable_folder(folder, output_flag)
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        other = choose or ("--name / --output_dir" if output_flag == "--output_dir" else output_flag)
        raise FileExistsError(f"{', '.join(existing)} already exist: choose another {other} or pass "
                              f"{flag} to replace them.")


def check_writable_folder(folder, flag="--output_dir"):
    """Raise unless `folder` exists as a writable folder or can be created (its nearest existing ancestor is a
    writable folder). Nothing is created: the writes create the folder when there is something to write."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{flag} {folder!r}: {probe!r} is a file, so the results cannot be written there. "
                                 f"Choose another {flag}.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {folder!r}: {probe!r} is not writable. Choose another {flag}.")


def positive_int(value):
    """argparse `type=` for counts (repeats, samples, batch sizes, threads): a whole number >= 1, so that 0 or -3
    stops at parsing ("argument --repeats: must be a whole number >= 1, got '0'") instead of failing deep in the
    run, or meaning "all"."""
    import argparse

    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return number


def prompt_tokens(value):
    """argparse `type=` for the benchmarks' `--text_tokens` (prompt tokens besides the image): a count >= 2, since
    BOS + the image alone ends the prompt on its image, which the model refuses (naming no flag)."""
    import argparse

    number = positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (BOS and at least one token after the image), got {number}")
    return number


def result_stem(output_flag="--output_dir"):
    """argparse `type=` for a file stem the script writes into the folder of `output_flag` (`--name`): a plain file
    name, so that "a/b" or ".." stops at parsing ("argument --name: ...") instead of failing at the write, after the
    run, with a temporary file's FileNotFoundError, or writing outside that folder."""
    import argparse

    def check(value):
        name = str(value)
        if not name.strip() or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise argparse.ArgumentTypeError(f"must be a file name stem (no folder; put the folder in {output_flag}), "
                                             f"got {value!r}")
        return name

    return check


result_name = result_stem()  # `--name` of the scripts that write into `--output_dir`


def command_line(script, argv=None):
    """The command a result file records: `python benchmarks/NAME.py ARGS`, ARGS from `argv` or `sys.argv`, quoted
    for the shell (`--subsets 'none;0'` was recorded as `--subsets none;0`, two commands when pasted)."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "benchmarks/" + os.path.basename(script), *map(str, args)])


def write_results(stem, markdown=None, data=None, overwrite=True):
    """`stem.json` (data, written first) and `stem.md` (markdown), each atomically; creates the folder. Returns the
    stem written.

    overwrite=False (a run without `--overwrite`, whose `refuse_existing` found the names free at start-up): a file
    that appeared at `stem` since (another job given the same --name, while this one ran) is never replaced, and
    this run is not lost either: it goes to the first free `stem-2`, `stem-3`, ... (both files under one stem), and
    a warning names both paths. Each file is created without replacing one (a hard link of the temporary file), so
    a file that appears at the last moment is not replaced either."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    files = [(".json", None if data is None else json.dumps(data, indent=2)), (".md", markdown)]
    files = [(ext, text) for ext, text in files if text is not None]
    if overwrite:
        for ext, text in files:
            atomic_write(stem + ext, lambda tmp, text=text: write_text(tmp, text))
        return stem
    number = 1
    while not _create_all(stem if number == 1 else f"{stem}-{number}", files):
        number += 1
    if number > 1:
        written = f"{stem}-{number}"
        logger.warning(f"{', '.join(stem + ext for ext, _ in files)}: written by another run while this one ran "
                       f"(without --overwrite); they are kept, and this run's results are in "
                       f"{', '.join(written + ext for ext, _ in files)}.")
        return written
    return stem


def _create_all(stem, files):
    """Create every `stem + ext` with its text, or none of them (False when one exists already)."""
    created = []
    for ext, text in files:
        if not _create_new(stem + ext, text):
            for path in created:  # this run's own files: moved on to the next stem together
                os.remove(path)
            return False
        created.append(stem + ext)
    return True


def _create_new(path, text):
    """Write `text` to `path` atomically unless `path` exists (False then); never replaces a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_text(tmp, text)
        try:
            os.link(tmp, path)  # fails on an existing `path`, unlike a rename
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a check, then the rename
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_figure(fig, path, **kwargs):
    """`fig.savefig` atomically (the format from `path`'s suffix, as the temporary name has none)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
