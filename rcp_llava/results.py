"""Where the benchmark scripts write, and how: never into the committed `benchmarks/results/` unless asked, never
over an earlier result unless asked, always atomically (a crash leaves the previous file or none, never half).

    from rcp_llava.results import DEFAULT_OUTPUT_DIR, refuse_existing, write_results
    refuse_existing([stem + ".md", stem + ".json"], overwrite=args.overwrite)   # before anything loads
    write_results(stem, markdown="...", data={...}, overwrite=args.overwrite)   # returns the stem written
    publish([(path, lambda tmp, final: plot(..., tmp)), ...], overwrite=args.overwrite)  # any files; the paths written
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
    for the shell (`--subsets 'none;0'` was recorded as `--subsets none;0`, two commands when pasted). Run from
    elsewhere than the repository root (the folder above `script`'s), it is `cd WHERE && python /path/to/NAME.py
    ARGS`: relative paths in ARGS are relative to WHERE, and the root-relative form named files that do not exist."""
    import shlex
    import sys

    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    here, root = os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(script)))
    if os.path.realpath(here) == os.path.realpath(root):
        return shlex.join(["python", "benchmarks/" + os.path.basename(script), *args])
    return f"cd {shlex.quote(here)} && " + shlex.join(["python", os.path.abspath(script), *args])


def write_results(stem, markdown=None, data=None, overwrite=True):
    """`stem.json` (data, written first) and `stem.md` (markdown), through `publish`; creates the folder. Returns the
    stem written: `stem`, or `stem-2`, `stem-3`, ... without `overwrite` when another run wrote one of them meanwhile."""
    files = [(".json", None if data is None else json.dumps(data, indent=2)), (".md", markdown)]
    files = [(stem + ext, lambda tmp, final, text=text: write_text(tmp, text)) for ext, text in files
             if text is not None]
    written = publish(files, overwrite)
    return os.path.splitext(written[0])[0] if written else stem


def publish(files, overwrite=True):
    """Put each `(path, write)` of `files` in place and return the paths written: `write(tmp, final)` makes the
    file's content in a temporary file beside it (with its suffix, so that a figure's format follows it), `final`
    mapping each of the `files`' paths to the one it will have (a table that names its figures names them right);
    creates the folders.

    overwrite: each is renamed over its path. Otherwise (a run without `--overwrite`, whose `refuse_existing` found
    the names free at start-up) a file that appeared at one of the paths since (another job given the same --name,
    while this one ran) is never replaced, and this run is not lost either: all its files go to the first numbering
    under which each is free (`-2`, `-3`, ... before each suffix: r-2.json and r-2.md, drift_x-2.png; written again
    for it), and a warning names both. Each is created without replacing a file (a hard link of the temporary), so
    one that appears at the last moment is not replaced either."""
    paths = [path for path, _ in files]
    temps = []
    for path in paths:
        root, ext = os.path.splitext(path)
        temps.append(f"{root}.tmp-{os.getpid()}{ext}")
    try:
        number = 1
        while True:
            for (path, write), tmp in zip(files, temps):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                write(tmp, lambda original, number=number: _numbered(original, number))
            if overwrite:
                for tmp, path in zip(temps, paths):
                    os.replace(tmp, path)
                return paths
            if _create_all(temps, [_numbered(path, number) for path in paths]):
                break
            number += 1
        if number > 1:
            taken = [path for path in paths if os.path.exists(path)] or paths
            logger.warning(f"{', '.join(taken)}: written by another run while this one ran (without --overwrite); "
                           f"they are kept, and this run's results are in "
                           f"{', '.join(_numbered(path, number) for path in paths)}.")
        return [_numbered(path, number) for path in paths]
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _numbered(path, number):
    root, ext = os.path.splitext(path)
    return path if number == 1 else f"{root}-{number}{ext}"


def _create_all(temps, paths):
    """Create every path from its temporary file, or none of them (False when one exists already); never replaces a
    file."""
    created = []  # (temporary, path, whether a hard link: the temporary is still there)
    for tmp, path in zip(temps, paths):
        try:
            os.link(tmp, path)  # fails on an existing `path`, unlike a rename
            created.append((tmp, path, True))
            continue
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a check, then the rename
            if not os.path.exists(path):
                os.replace(tmp, path)
                created.append((tmp, path, False))
                continue
        for done_tmp, done, linked in created:  # this run's own files: moved on to the next numbering together
            if linked:
                os.remove(done)
            else:
                os.replace(done, done_tmp)
        return False
    return True


def save_figure(fig, path, **kwargs):
    """`fig.savefig` atomically (the format from `path`'s suffix, as the temporary name has none)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
