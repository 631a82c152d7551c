"""Where a run writes, and the rules that keep it from losing anything.

- An output is built in a hidden sibling (`.NAME.partial-XXXX`) and renamed
  into place only when complete, so an interrupted run never leaves something
  that looks finished; an output it replaces is first renamed aside
  (`.NAME.old-XXXX`), then deleted.
- `--overwrite` may delete the old output and nothing else: no input (data
  file, config file, chat template, base model, the state being resumed) may
  be that output or lie inside it, and the directory must be recognisably an
  mdu output: its run record (mdu_run.json) and nothing that mdu does not
  write (`OUTPUT_FILES`). Neither may it be the working directory or hold it.
- One run at a time per output: a lock file beside it (`.NAME.lock`), held
  with `flock` for the whole run. The holder removes what killed runs left
  (staging, renamed-aside outputs, half-written states).
- The location is checked before any weights load: writable, and with room
  for what the run will write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

from mdu_cli.errors import MduError
from mdu_cli.io.output_writer import TOKENIZER_FILES

# A resumable state sits beside its output as OUT.mdu-state (see train/resume.py).
STATE_SUFFIX = ".mdu-state"
# The output layout's own files, named once.
RUN_RECORD, TRAIN_LOG, EVAL_REPORT = "mdu_run.json", "train_log.jsonl", "eval.json"
DELTA_JSON, DELTA_MARKDOWN = "delta_report.json", "delta_report.md"
# Every name mdu writes into an output (unlearn, finetune, and eval's eval.json):
# all that --overwrite may delete. A directory holding anything else is not
# mdu's to replace.
OUTPUT_FILES = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "adapter_config.json", *TOKENIZER_FILES, "*.py",
    "README.md", RUN_RECORD, TRAIN_LOG, DELTA_JSON, DELTA_MARKDOWN, EVAL_REPORT,
)
# What a resumable state directory holds (resume.save_state).
STATE_FILES = ("progress.json", "trainable.safetensors", "training.pt")
# Room kept free beyond the expected size: metadata, tokenizer, report, card.
SPACE_MARGIN_BYTES = 64 * 1024 * 1024


def is_within(path: Path, directory: Path) -> bool:
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def entry_location(path: Path) -> Path:
    """Where a path's own directory entry is: its folder resolved, its name kept
    (for a symbolic link, the link rather than its target)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return path.parent.resolve() / path.name


def check_out_dir(out: Path, overwrite: bool, base_dir: Optional[Path] = None,
                  protected: Iterable[Path] = ()) -> None:
    """Refuse an --out that would lose or mix in anything."""
    if base_dir is not None and is_within(out, base_dir):
        raise MduError(f"--out {out} is inside the base model directory {base_dir}; choose a directory outside it")
    for path in protected:
        if is_within(out, path) and not Path(path).is_dir():
            raise MduError(f"--out {out} is the input file {path}; choose another directory")
    if out.exists() and not out.is_dir():
        raise MduError(f"--out {out} is a file; choose a directory")
    if out.name.endswith(STATE_SUFFIX) and out.is_dir() and any(out.iterdir()):
        raise MduError(f"--out {out} is where mdu keeps the resumable state of a run (resumed with --resume); "
                       "choose another directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not overwrite:
        raise MduError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another directory")
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # the working directory was deleted under us: nothing there to lose
        cwd = None
    if out.exists() and cwd is not None and is_within(cwd, out):
        raise MduError(f"--out {out} is, or holds, the working directory, which replacing the output would "
                       "delete; choose another --out")
    # Checked with or without --overwrite: a publish replaces the directory
    # either way, and an input inside it would go with it.
    for path in ([base_dir] if base_dir else []) + list(protected):
        # The input where it is named (a link: the link itself, as in a Hugging
        # Face cache snapshot) and where it leads: replacing --out would delete either.
        entry, folder = entry_location(path), out.resolve()
        if out.exists() and (is_within(path, out) or entry == folder or folder in entry.parents):
            raise MduError(f"--out {out} holds the input {path}, which replacing the output would delete; "
                           "choose another --out")
    if non_empty:
        if not (out / RUN_RECORD).is_file() or (out / RUN_RECORD).is_symlink():
            raise MduError(f"--out {out} is not an mdu output (it has no {RUN_RECORD}), and --overwrite replaces "
                           "only a previous mdu output; choose another --out, or empty it yourself")
        foreign = foreign_entries(out, OUTPUT_FILES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise MduError(f"--out {out} holds what mdu did not write ({shown}), which --overwrite would delete; "
                           "move it out, or choose another --out")


def foreign_entries(directory: Path, names: Iterable[str]) -> list[str]:
    """The entries of `directory` that are not plain files matching `names`:
    subfolders (shown with a trailing /), links and anything else."""
    import fnmatch

    names = tuple(names)
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
        elif not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in names):
            foreign.append(entry.name)
    return foreign


def remove_state(state_dir: Path) -> bool:
    """Delete a finished run's resumable state, when it is one: mdu's files and
    nothing else (a directory of the user's that happens to carry the name stays)."""
    if not state_dir.is_dir() or state_dir.is_symlink() or foreign_entries(state_dir, STATE_FILES):
        return False
    shutil.rmtree(state_dir, ignore_errors=True)
    return True


def check_report_file(path: Path, option: str, inputs: Iterable[Path] = ()) -> None:
    """A file a command is about to write (a report, eval.json): not one of its
    inputs, and in a place it can be written. Checked before any reading."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and (path.resolve() == Path(source).resolve() or
                                      (path.exists() and os.path.samefile(path, source))):
            raise MduError(f"{option} {path} is {source}, which this command reads; write the report elsewhere")
    if path.is_dir():
        raise MduError(f"{option} {path} is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not written_by_mdu(path):
        # Writing over a file is deleting it: only a report mdu wrote may be replaced.
        raise MduError(f"{option} {path} exists and is not a report mdu wrote; choose another file name, or "
                       "remove it yourself")
    problem = unwritable(path.parent)
    if problem:
        raise MduError(f"{option} {path}: {problem}; choose another path")


def unwritable(directory: Path) -> Optional[str]:
    """Why `directory` (or the folder its creation would start from) cannot be
    written, or None."""
    ancestor = Path(directory)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def written_by_mdu(path: Path) -> bool:
    """Whether an existing file is one of mdu's reports, which a new run may
    replace: a delta report (JSON or Markdown), an evaluation report, or a
    plot matplotlib drew. A link, or anything else, is not."""
    import json

    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        if path.suffix == ".png":
            return head.startswith(b"\x89PNG") and b"Matplotlib" in head
        if path.suffix == ".md":
            return head.startswith(b"## Parameter delta")
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and (
        {"schema_version", "tensors", "total"} <= document.keys()
        or {"splits", "mc_samples", "model"} <= document.keys())


def leftovers(out: Path) -> list[Path]:
    """What killed runs on `out` left beside it: staging directories, outputs
    renamed aside, half-written resumable states."""
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    patterns = (f".{name}.partial-*", f".{name}.old-*", f".{name}.mdu-state.tmp-*", f".{name}.mdu-state.old-*")
    return sorted(p for pattern in patterns for p in parent.glob(pattern))


def remove_leftovers(out: Path, protected: Iterable[Path] = ()) -> list[Path]:
    """Delete the leftovers of killed runs (call with the lock held), except
    anything that is or holds an input: a user may name files as they like."""
    protected = list(protected)
    removed = []
    for path in leftovers(out):
        if any(is_within(p, path) for p in protected):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class OutputLock:
    """An exclusive lock on an output location, so that two runs on one --out
    refuse instead of racing. The lock file is removed by its holder; a
    process that locked a file removed meanwhile tries again on the new one."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.handle: Optional[int] = None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MduError(f"cannot create {self.path.parent} ({err.strerror}); choose a writable --out") from None
        for _ in range(100):
            try:
                handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise MduError(f"cannot write in {self.path.parent} ({err.strerror}); "
                               "choose a writable --out") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(handle)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise MduError(f"another mdu run is writing {self.path.parent / self.path.name[1:-5]} "
                                   f"(it holds {self.path}); wait for it to finish, or choose another --out") from None
                raise MduError(f"cannot lock {self.path} ({err.strerror})") from None
            try:
                same = os.fstat(handle).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.write(handle, f"{os.getpid()}\n".encode())
                self.handle = handle
                return self
            os.close(handle)  # the holder removed the file between our open and our lock
        raise MduError(f"cannot lock {self.path}: it keeps being replaced; is another run starting and stopping?")

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.handle)
            self.handle = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def new_staging_dir(out: Path) -> Path:
    """A hidden sibling of `out`, on the same filesystem so the final rename is atomic."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as err:
        raise MduError(f"cannot write in {out.parent} ({err.strerror}); choose a writable --out") from None
    return staging


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse to start a run whose output cannot fit, rather than fail at the end."""
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN_BYTES:
        raise MduError(f"{directory}: {human_size(free)} free, but {what} needs about "
                       f"{human_size(needed + SPACE_MARGIN_BYTES)}; free some space or choose another --out")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing what is there.

    The old output is first renamed aside, so that at no moment does `out`
    hold a mixture of the two.
    """
    if out.exists() or out.is_symlink():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(staging, out)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(staging, out)
