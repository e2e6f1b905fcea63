"""Reuse of built folders, and writes that never leave a half-built one.

* A folder is reused when it holds its required files and the build spec key
  recorded in its build_info.json equals the one asked for (``status``).
* Every folder is written into a temporary sibling ``.<name>.tmp-<pid>`` and
  renamed into place only when complete (``staged``), so a killed build never
  leaves a folder that looks complete.  The pid in the name is the lock: a
  later build removes only the temp folders of processes that are gone, so two
  builds at once each finish their own copy (identical: the build is
  deterministic) and the last rename wins.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .spec import BuildSpec

BUILD_INFO = "build_info.json"


def status(folder: Path, spec: BuildSpec, required: tuple[str, ...]) -> str:
    """'ok', 'missing', 'incomplete' or 'stale' (built with another spec)."""
    if not folder.exists():
        return "missing"
    if not all((folder / f).is_file() for f in (*required, BUILD_INFO)):
        return "incomplete"
    try:
        info = json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return "incomplete"
    return "ok" if info.get("build_spec") == spec.key() else "stale"


def write_build_info(folder: Path, spec: BuildSpec, extra: dict) -> None:
    """Record the spec's key (what ``status`` compares) and facts about the build."""
    info = {"build_spec": spec.key(), **extra}
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def refuse_foreign(final: Path) -> None:
    if final.exists() and not (final / BUILD_INFO).is_file():
        raise RuntimeError(f"{final} exists and was not written by this builder (no {BUILD_INFO}); "
                           "move it away or choose another --out")


@contextmanager
def staged(final: Path):
    """Yield an empty temp folder beside ``final``; on success it replaces ``final``.

    On an error the temp folder is removed and nothing is published.
    """
    refuse_foreign(final)  # before any work
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(parent, final.name)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _make_readable(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """safetensors are written 0600; make them as readable as the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place, replacing an old build of ours.

    A folder at ``final`` without our build_info.json is not ours (``--out``
    pointed somewhere else): it is refused, never replaced.
    """
    refuse_foreign(final)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def clean_stale_tmp(parent: Path, name: str) -> None:
    """Remove temp folders of ``name`` left by builds whose process is gone."""
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
