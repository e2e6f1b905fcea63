"""The output folder: its file names, and the rules that keep a run from
destroying anything that is not its own.

A finished run's folder::

    config.json, model*.safetensors, tokenizer files   the merged model (mergekit)
    mergekit_config.yml                                 the merge, for stock mergekit
    README.md, swarm_history.png                        the model card
    swarm.json                                          the report (:mod:`swarm_merge.report`)
    swarm-state.json                                    the search checkpoint (never pushed)
    .swarm-merge.json                                   the manifest: what this tool wrote here
    .swarm-merge.lock                                   one run at a time (never pushed)

(A LoRA run writes adapter_config.json and adapter_model.safetensors instead of
the model, and with ``output.merge_adapter`` a full model in ``merged/``.)

The rules:

- The output folder may not be, hold or lie inside an input (an expert, the
  base model, a data file, the Hub cache), the recipe's folder, the working
  directory or one of its parents, the home folder, or a system folder; no flag
  overrides this. (It may lie inside the recipe's folder or the working
  directory: ``out/<name>`` beside a recipe is the usual layout.) A shared
  folder anyone can write to (``/tmp``, ``/var/tmp``) is refused too; a folder
  of its own inside one is fine.
- The manifest is validated whole (:class:`Manifest`): it may name only files
  this tool writes, at the top or in ``merged/``; any other manifest is refused,
  never partly used.
- The tool deletes only files that the manifest of an earlier run lists, its
  own temporary files, and its own (marked) staging folder; never a folder
  wholesale. A folder holding anything else is refused, ``--force`` or not.
- One run per folder at a time: an advisory lock (``flock``) that the kernel
  drops when its process dies, so a crashed run never leaves it stuck.
- Publishing is atomic as a user sees it: files move in from the staging
  folder, the plain files first, then ``swarm.json``, then ``merged/`` (its
  ``config.json`` last), then the top-level ``config.json`` (or
  ``adapter_config.json``): until the report is in place no folder loads as a
  model; the manifest says ``complete`` only after that. ``--resume`` repairs an
  interrupted publish.
- A push uploads what the complete manifest lists, less the checkpoint, each
  a regular file in the folder (:func:`push_files`); a symlink is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from swarm_merge.errors import OutputError

__all__ = [
    "REPORT_FILE", "STATE_FILE", "MERGEKIT_FILE", "CARD_FILE", "PLOT_FILE", "MANIFEST_FILE", "LOCK_FILE", "STAGING",
    "MERGED_DIR", "Manifest", "check_flags", "check_path", "check_contents", "OutputFolder", "Unclaimed",
    "write_json_atomic", "is_finished", "push_files", "open_files",
]

REPORT_FILE = "swarm.json"
STATE_FILE = "swarm-state.json"
MERGEKIT_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
PLOT_FILE = "swarm_history.png"
MANIFEST_FILE = ".swarm-merge.json"
LOCK_FILE = ".swarm-merge.lock"
STAGING = ".swarm-staging"
STAGING_MARK = ".swarm-merge-staging"  # inside the staging folder: it is ours
# Published last: without them nothing loads as a model (a full model, or a PEFT adapter).
GATE_FILES = ("config.json", "adapter_config.json")
# lora.MERGED_DIR, the one subfolder this tool writes (output.merge_adapter); named
# here too so that checking a folder imports no torch.
MERGED_DIR = "merged"

# What this tool writes, and so all a manifest may name. A model folder (the
# merge, or merged/) holds what mergekit and transformers write: the config, the
# weights and their index, and the tokenizer files they copy or save (mergekit's
# _copy_tokenizer and tagalong lists, transformers' vocab_files_names).
_MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", CARD_FILE,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model",
    "spm.model", "bpe.codes", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "normalizer.json",
})
_TOP_FILES = _MODEL_FILES | {REPORT_FILE, STATE_FILE, MERGEKIT_FILE, PLOT_FILE, "adapter_config.json",
                             "adapter_model.safetensors"}
_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # mergekit's and transformers' shard names

# Temporary files of write_json_atomic for our own files (left by a kill).
_OUR_TMP = re.compile(r"^\.(swarm-state\.json|swarm\.json|\.swarm-merge\.json|README\.md)\..+\.tmp$")
# Where a run's output never goes: system folders and everything under them.
_SYSTEM = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/boot", "/run")
# Shared scratch folders: anyone may write there, so a run's files could be swapped
# before a push or a load. (Any folder with the sticky bit and o+w counts too.)
_SHARED = ("/tmp", "/var/tmp", "/dev/shm", "/var/lock", "/run/lock", "/private/tmp", "/private/var/tmp")
_MANIFEST_VERSION = 1


def write_json_atomic(path: Path, data) -> None:
    """Strict JSON (NaN refused) so that a kill at any instant leaves the old file or the new one."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------ the path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _shared(path: Path) -> bool:
    """A world-writable folder with the sticky bit: the mark of a shared scratch folder."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & stat.S_IWOTH) and bool(mode & stat.S_ISVTX)


def check_path(out_dir, *, inputs: Sequence[tuple] = (), recipe_dir: Optional[Path] = None) -> Path:  # noqa: C901 (one refusal per line)
    """Refuse an output folder that a run could not write or must not touch.

    Args:
        out_dir: the folder asked for (``--out`` or the recipe's).
        inputs: ``(label, path)`` of every input: expert and base folders, data
            files, the Hub cache. The output may not be, hold or lie inside one.
        recipe_dir: the recipe's folder: the output may not be it or hold it.

    Returns:
        The resolved folder.

    Raises:
        OutputError: with the reason and the fix; no flag overrides it.
    """
    text = os.fspath(out_dir)
    fix = "choose a new folder of its own with --out (e.g. out/<name>)"
    if "\x00" in text:
        raise OutputError(f"output folder {text!r} holds a NUL byte; {fix}")
    if not text.strip():
        raise OutputError(f"the output folder is empty; {fix}")
    if len(os.fsencode(text)) > 4000 or any(len(os.fsencode(p)) > 255 for p in Path(text).parts):
        raise OutputError(f"output folder {text[:60]!r}... is too long for the file system; {fix}")
    path = Path(text).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise OutputError(f"output folder {text!r} cannot be resolved ({type(exc).__name__}); {fix}") from None
    for parent in [resolved, *resolved.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == resolved else f"lies under the file {str(parent)!r}"
            raise OutputError(f"output folder {text!r} {where}; {fix}")
        if parent.exists():
            break
    if len(resolved.parts) <= 2 or any(_inside(resolved, Path(s)) for s in _SYSTEM):
        raise OutputError(f"output folder {str(resolved)!r} is a system folder or lies in one; {fix}")
    if str(resolved) in _SHARED or _shared(resolved):
        raise OutputError(f"output folder {str(resolved)!r} is a shared system folder that anyone can write to; "
                          f"choose a folder of its own inside it (e.g. {str(resolved / 'swarm-out')!r}) with --out")
    protected = [("the home folder", Path.home().resolve()), ("the working directory", Path.cwd().resolve())]
    for label, folder in protected:
        if _inside(folder, resolved):
            what = "is" if folder == resolved else "holds"
            raise OutputError(f"output folder {str(resolved)!r} {what} {label}; {fix}")
    if recipe_dir is not None and _inside(Path(recipe_dir).resolve(), resolved):
        what = "is" if Path(recipe_dir).resolve() == resolved else "holds"
        raise OutputError(f"output folder {str(resolved)!r} {what} the recipe's folder; {fix}")
    for label, value in inputs:
        other = Path(value).expanduser().resolve()
        if _inside(other, resolved):
            what = "is" if other == resolved else "holds"
            raise OutputError(f"output folder {str(resolved)!r} {what} {label} ({str(other)!r}); {fix}")
        if _inside(resolved, other):
            raise OutputError(f"output folder {str(resolved)!r} lies inside {label} ({str(other)!r}); {fix}")
    return resolved


# -------------------------------------------------------------- the contents


class Manifest(BaseModel):
    """``.swarm-merge.json``: what this tool wrote into the folder, and how far the run got.

    Trusted only as far as it validates: every entry must be a file this tool
    writes, at the top or in ``merged/`` (never a bare folder, which would vouch
    for whatever is in it). A manifest that does not validate is refused whole.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tool: Literal["swarm_merge"]
    version: Literal[1]
    status: Literal["searching", "publishing", "complete"]
    files: List[str]

    @field_validator("files")
    @classmethod
    def _ours(cls, files: List[str]) -> List[str]:
        for name in files:
            if not _writable(name):
                raise ValueError(f"{name!r} is not a file this tool writes")
        return files


def _writable(name: str) -> bool:
    """A file name this tool writes: ``<file>`` or ``merged/<file>``."""
    folder, _, base = name.rpartition("/")
    if folder == "":
        return base in _TOP_FILES or bool(_WEIGHTS.fullmatch(base))
    return folder == MERGED_DIR and (base in _MODEL_FILES or bool(_WEIGHTS.fullmatch(base)))


def _read_manifest(out_dir: Path) -> Optional[Manifest]:
    path = out_dir / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        return Manifest.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        reason = (f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}" if isinstance(exc, ValidationError)
                  else getattr(exc, "strerror", None) or str(exc))
        raise OutputError(f"{path} is not a swarm_merge manifest, or it is damaged ({' '.join(reason.split())[:160]}); "
                          "this tool trusts no part of it: choose a new --out folder") from None


def _files(manifest: Optional[Manifest]) -> List[str]:
    return list(manifest.files) if manifest else []


def _foreign(out_dir: Path, manifest: Optional[Manifest]) -> List[str]:
    """What the folder holds that this tool did not write (and so never deletes)."""
    listed = set(_files(manifest))
    folders = {n.split("/")[0] for n in listed if "/" in n}  # merged/, when the manifest lists files in it
    found = []
    for p in out_dir.iterdir():
        name, real_dir = p.name, p.is_dir() and not p.is_symlink()
        if name in (MANIFEST_FILE, LOCK_FILE) or _OUR_TMP.match(name):
            continue
        if name == STAGING and real_dir and (p / STAGING_MARK).is_file():
            continue
        if name in folders and real_dir:  # our subfolder holds only our files
            found += [f"{name}/{q.name}" for q in p.iterdir() if f"{name}/{q.name}" not in listed]
        elif name not in listed or real_dir:  # a folder under a file's name is not ours either
            found.append(name)
    return sorted(found)


def is_finished(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run whose publish completed."""
    out_dir = Path(out_dir)
    try:
        manifest = _read_manifest(out_dir)
    except OutputError:
        return False
    return (manifest is not None and manifest.status == "complete"
            and (out_dir / REPORT_FILE).is_file() and any((out_dir / g).is_file() for g in GATE_FILES))


def _earlier_run(out_dir: Path, manifest: Optional[Manifest]) -> bool:
    """A manifest of a run that got somewhere. A run killed before its first
    checkpoint (status 'searching', nothing it lists on disk) left nothing to
    keep; a 'searching' manifest whose files are there (a kill while starting
    over, or a hand-made one) is kept until --force says otherwise."""
    if manifest is None:
        return False
    return manifest.status != "searching" or any(os.path.lexists(out_dir / n) for n in manifest.files)


def _is_gate(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in GATE_FILES


def _gates_and_report(names: Iterable[str]) -> List[str]:
    """What goes first when a folder's files are replaced: the top-level gates, the
    nested ones (``merged/config.json``), then the report."""
    return [*GATE_FILES, *(n for n in names if "/" in n and _is_gate(n)), REPORT_FILE]


def _publish_order(names: Sequence[str]) -> List[str]:
    """The plain files, the report, each subfolder with its gate last, the top-level gate
    last: a folder loads as a model only once ``swarm.json`` is in place."""
    top = [n for n in names if "/" not in n]
    nested = [n for n in names if "/" in n]
    return ([n for n in top if n != REPORT_FILE and not _is_gate(n)] + [n for n in top if n == REPORT_FILE]
            + [n for n in nested if not _is_gate(n)] + [n for n in nested if _is_gate(n)]
            + [n for n in top if _is_gate(n)])


def check_flags(*, resume: bool, force: bool) -> None:
    if resume and force:
        raise OutputError("--resume and --force contradict each other: --resume continues the run in the "
                          "folder, --force starts it over; pass one of them")


def check_contents(out_dir: Path, *, resume: bool, force: bool, probe_lock: bool = True) -> None:
    """What the folder holds allows this run (read-only; repeated under the lock).

    Raises:
        OutputError: another run holds the lock; foreign files; an earlier run
            without ``--resume``/``--force``; ``--resume`` with nothing to resume.
    """
    check_flags(resume=resume, force=force)
    if not out_dir.exists():
        if resume:
            raise OutputError(f"--resume: {out_dir} does not exist, so there is nothing to resume; drop --resume")
        return
    if not out_dir.is_dir():
        raise OutputError(f"output folder {out_dir} is a file; choose a folder with --out")
    holder = _lock_holder(out_dir) if probe_lock else None
    if holder:
        raise OutputError(f"{out_dir} is in use by another mergekit-swarm run ({holder}); wait for it to finish "
                          "or choose another --out folder")
    manifest = _read_manifest(out_dir)
    foreign = _foreign(out_dir, manifest)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputError(f"{out_dir} holds files this tool did not write ({shown}); it never deletes them: "
                          "choose an empty or new folder with --out")
    if resume:
        if manifest is None or not (out_dir / STATE_FILE).is_file():
            raise OutputError(f"--resume: {out_dir} has no {STATE_FILE} to resume; drop --resume to start a new run")
        return
    if _earlier_run(out_dir, manifest) and not force:
        raise OutputError(f"{out_dir} holds an earlier run; pass --resume to continue it or --force to start over")


# ---------------------------------------------------------------- the lock


def _lock_holder(out_dir: Path) -> Optional[str]:
    """Who holds the folder's lock now, or None (a crashed holder holds nothing)."""
    path = out_dir / LOCK_FILE
    if not path.is_file():
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # not a lock file we can hold: _lock says why
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still running"


# ------------------------------------------------------------ the folder


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # never rmtree: only an empty folder goes
    except OSError:
        pass


class Unclaimed:
    """What the other ranks of a multi-process run hold instead of the OutputFolder:
    its paths, nothing claimed, nothing written (the main rank does all of that)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE


class OutputFolder:
    """A claimed output folder: locked, its manifest kept, its publishing atomic.

    Use as a context manager after every input has been checked::

        with OutputFolder(out_dir, resume=..., force=...) as folder:
            ... search with folder.state_path ...
            stage = folder.new_stage()
            ... write into stage ...
            folder.publish(stage)

    If the run fails before its search wrote a checkpoint, a folder this run
    created is removed again: bad input leaves nothing behind.
    """

    def __init__(self, out_dir: Path, *, resume: bool, force: bool):
        self.path = Path(out_dir)
        self.resume, self.force = resume, force
        self._fd: Optional[int] = None
        self._created = False

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def __enter__(self) -> "OutputFolder":
        check_contents(self.path, resume=self.resume, force=self.force)
        try:
            self.path.mkdir(parents=True)
            self._created = True
        except FileExistsError:  # it was there, or another run made it a moment ago: the lock decides
            pass
        try:
            self._lock()
            # Again under the lock: another run may have written in between.
            check_contents(self.path, resume=self.resume, force=self.force, probe_lock=False)
            manifest = _read_manifest(self.path)
            if manifest is not None and (self.force or not _earlier_run(self.path, manifest)):
                # Starting over. The gates and the report go first, so a kill
                # midway never leaves the old model looking finished.
                self._write_manifest("searching", manifest.files)
                self._remove(_gates_and_report(manifest.files))
                self._remove(manifest.files)
                manifest = None
            self._clear_leftovers()
            if manifest is None:
                self._write_manifest("searching", [STATE_FILE])
        except BaseException:
            self._unlock(remove=self._created)
            if self._created:
                _rmdir_if_empty(self.path)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self.state_path.exists():
            # Nothing worth keeping was written: leave the folder as we found it.
            self._clear_leftovers()
            manifest = _read_manifest(self.path)
            if manifest is not None and manifest.status == "searching":
                (self.path / MANIFEST_FILE).unlink()
            self._unlock(remove=True)
            if self._created:
                _rmdir_if_empty(self.path)
            return False
        self._unlock()
        return False

    # -- lock

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:
            return
        path = self.path / LOCK_FILE
        try:
            # O_NOFOLLOW: a symlink planted under our lock file's name must not
            # make us truncate the file it points to.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"{path} cannot be opened as a lock file ({exc.strerror}); "
                              "remove it if it is not a file, or choose another --out folder") from None
        for attempt in range(20):  # another run's probe holds a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    os.close(fd)
                    raise OutputError(f"{self.path} is in use by another mergekit-swarm run "
                                      f"({_describe_holder(path)}); wait for it to finish "
                                      "or choose another --out folder") from None
                time.sleep(0.05)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd

    def _unlock(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:  # a run that leaves nothing else behind
            try:
                (self.path / LOCK_FILE).unlink()
            except OSError:
                pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    # -- bookkeeping

    def _write_manifest(self, status: str, files: Iterable[str]) -> None:
        # Validated as it is written: this tool never writes a manifest it would refuse to read.
        manifest = Manifest(tool="swarm_merge", version=_MANIFEST_VERSION, status=status, files=sorted(set(files)))
        write_json_atomic(self.path / MANIFEST_FILE, manifest.model_dump(mode="json"))

    def _remove(self, names: Iterable[str]) -> None:
        """Delete files this tool wrote (names from a validated manifest); a subfolder
        only once it is empty (a file someone else put there keeps it)."""
        folders = set()
        for name in names:
            path = self.path / name
            if "/" in name:
                if path.parent.is_symlink() or not path.parent.is_dir():
                    continue
                folders.add(path.parent)
            if path.is_file() or path.is_symlink():
                path.unlink()
        for folder in folders:
            _rmdir_if_empty(folder)

    def _clear_leftovers(self) -> None:
        """Our temporary files and our marked staging folder, from a run that was killed."""
        for p in self.path.iterdir():
            if _OUR_TMP.match(p.name):
                p.unlink()
        staging = self.path / STAGING
        if not staging.is_symlink() and (staging / STAGING_MARK).is_file():
            shutil.rmtree(staging)

    # -- publishing

    def new_stage(self) -> Path:
        """An empty, marked staging folder inside the output folder."""
        stage = self.path / STAGING
        if stage.exists() or stage.is_symlink():
            if stage.is_symlink() or not (stage / STAGING_MARK).is_file():
                raise OutputError(f"{stage} exists and is not this tool's; remove it or choose another --out")
            shutil.rmtree(stage)
        stage.mkdir()
        (stage / STAGING_MARK).write_text("written by swarm_merge; deleted when the run publishes\n")
        return stage

    def publish(self, stage: Path) -> None:
        """Move the staged files in: the plain files, the report, ``merged/`` (its
        ``config.json`` last), the top-level gate (``config.json`` or
        ``adapter_config.json``) last. At no point does a folder, the top one or
        ``merged/``, load as a model without ``swarm.json`` beside it."""
        new = []
        for p in sorted(stage.iterdir()):
            if p.name == STAGING_MARK:
                continue
            if p.is_dir():
                if any(q.is_dir() for q in p.iterdir()):
                    raise RuntimeError(f"{p} holds a folder; outputs go at most one folder deep")
                new += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())]
            else:
                new.append(p.name)
        unnamed = [n for n in new if not _writable(n)]
        if unnamed:  # a bug, not bad input: caught before anything moves
            raise RuntimeError(f"the run staged {', '.join(unnamed)}, which the manifest cannot name; nothing was "
                               "published: report this as a swarm_merge bug")
        for folder in {n.split("/")[0] for n in new if "/" in n}:
            path = self.path / folder
            if path.is_symlink() or (path.exists() and not path.is_dir()):  # appeared during the search
                raise OutputError(f"{path} is a symlink or a file, where this run writes its {folder}/ folder; "
                                  "remove it, then run again with --resume")
        old = _files(_read_manifest(self.path))
        # Recorded first, so that a kill anywhere below leaves every file recognisable.
        self._write_manifest("publishing", set(old) | set(new) | {STATE_FILE})
        # Take every gate (merged/'s too) and then the old report away first: from
        # here until the end no folder loads as a model, old or new.
        self._remove(_gates_and_report(old))
        self._remove([n for n in old if n not in new and n != STATE_FILE])  # e.g. shards of an earlier write
        for name in _publish_order(new):
            if "/" in name:
                (self.path / name).parent.mkdir(exist_ok=True)
            os.replace(stage / name, self.path / name)
        self._write_manifest("complete", set(new) | {STATE_FILE})
        for p in stage.iterdir():
            if p.is_dir():
                p.rmdir()
        (stage / STAGING_MARK).unlink()
        stage.rmdir()


# ---------------------------------------------------------------- the push


def push_files(out_dir: Path) -> List[str]:
    """The files a push uploads: what the complete manifest lists, less the checkpoint.

    Nothing else in the folder (a ``.env``, notes, a file that appeared during
    the search or after it) is ever uploaded, and every listed file must be a
    regular file in the folder (checked here, and again as it is opened).

    Raises:
        OutputError: the run's publish did not complete; the manifest is damaged;
            a listed file is missing, a symlink (at any level) or not a regular file.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.status != "complete":
        raise OutputError(f"{out_dir} is not a finished mergekit-swarm run (no complete {MANIFEST_FILE}); "
                          "run the recipe again with --resume first")
    names = [n for n in manifest.files if n != STATE_FILE]
    with open_files(out_dir, names):
        pass
    return names


@contextlib.contextmanager
def open_files(out_dir: Path, names: Sequence[str]) -> Iterator[Dict[str, BinaryIO]]:
    """``names`` (from :func:`push_files`) opened for reading, never through a symlink.

    ``merged/`` and each file are opened relative to their folder with
    ``O_NOFOLLOW``, and checked to be regular files once open: what is read is
    the file that was checked, whatever its name points at a moment later.
    """
    out_dir = Path(out_dir)
    # O_NONBLOCK: opening a FIFO planted under a listed name returns at once (then fails the check).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

    def refuse(name: str, why: str) -> OutputError:
        return OutputError(f"{out_dir / name} {why}; a push uploads only the regular files the run wrote: "
                           "put the run's own file back (or run the recipe again with --resume), then push again")

    def open_in(folder_fd: int, name: str, shown: str, directory: bool = False) -> int:
        try:
            fd = os.open(name, flags | (os.O_DIRECTORY if directory else 0), dir_fd=folder_fd)
        except FileNotFoundError:
            raise refuse(shown, "is missing") from None
        except OSError as exc:
            try:
                link = stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
            except OSError:
                link = False
            raise refuse(shown, "is a symlink (it could point anywhere)" if link
                         else f"cannot be opened ({exc.strerror})") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
            os.close(fd)
            raise refuse(shown, "is not a folder" if directory else "is not a regular file")
        return fd

    with contextlib.ExitStack() as stack:
        root = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, root)
        folders: Dict[str, int] = {}
        files: Dict[str, BinaryIO] = {}
        for name in names:
            folder, _, base = name.rpartition("/")
            if folder and folder not in folders:
                folders[folder] = open_in(root, folder, folder, directory=True)
                stack.callback(os.close, folders[folder])
            fd = open_in(folders[folder] if folder else root, base, name)
            files[name] = stack.enter_context(os.fdopen(fd, "rb"))
        yield files
