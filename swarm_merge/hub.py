"""Every Hugging Face Hub call, through huggingface_hub's public API only.

Pull: :func:`resolve` asks the Hub what a ref points at (commit sha, files and
their sizes) without downloading anything; :func:`download` fetches a snapshot
restricted to some file patterns; :func:`cached` finds one in the local cache
when the Hub cannot be reached; :func:`safetensors_headers` reads tensor names
and shapes from the headers alone (HTTP range requests), for ``--dry-run``.

Push: :func:`push` uploads the files a finished run wrote, as its manifest
lists them (``create_repo`` + ``create_commit``, one commit; nothing else in the
folder); :func:`push_folder` does it again later from the folder alone
(``mergekit-swarm push``).

The token comes from the environment (``HF_TOKEN``) or the ``hf`` login, which
huggingface_hub finds by itself; it is never read from a recipe and never
written to logs, errors, ``swarm.json`` or the card.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Dict, Iterator, List, Optional, Tuple, Union

from swarm_merge.errors import ExpertError, HubError, OutputError, TokenError
from swarm_merge.output import REPORT_FILE
from swarm_merge.recipe import ExpertRef

__all__ = ["RepoSnapshot", "HubUnreachable", "resolve", "download", "cached", "unreachable_error",
           "safetensors_headers", "push", "push_folder", "commit_message", "check_repo_id", "require_token"]

if TYPE_CHECKING:
    from swarm_merge.report import Report

LOG = logging.getLogger(__name__)



class HubUnreachable(Exception):
    """The Hub could not be asked (offline mode, no connection); the cache may still serve."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RepoSnapshot:
    """What the Hub says a ref points at: the commit and the files there."""

    repo_id: str
    commit: str
    files: Dict[str, Optional[int]]  # path in the repo -> size in bytes (None if the Hub did not say)


# ---------------------------------------------------------------------- pull


def resolve(ref: ExpertRef, *, what: str = "expert") -> RepoSnapshot:
    """Resolve ``ref`` to a commit and list its files with sizes; downloads nothing.

    Raises:
        ExpertError: repo or revision not found, private without access.
        HubError: the Hub answered with a server error.
        HubUnreachable: offline mode or no connection (the caller may use the cache).
    """
    from huggingface_hub import HfApi

    with _pull_errors(ref, what):
        info = HfApi().model_info(ref.model, revision=ref.revision, files_metadata=True)
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    return RepoSnapshot(repo_id=ref.model, commit=str(info.sha), files=files)


def download(
    ref: ExpertRef, *, cache_dir: Optional[str], allow_patterns: List[str], what: str = "expert",
    revision: Optional[str] = None,
) -> Tuple[Path, str]:
    """Download a repo snapshot (only ``allow_patterns``) and return (folder, commit sha).

    ``revision`` (default: the ref's own) may be a commit sha from :func:`resolve`.
    huggingface_hub retries transient HTTP errors and resumes interrupted
    downloads from its cache on the next run.
    """
    from huggingface_hub import snapshot_download

    try:
        with _pull_errors(ref, what):
            folder = snapshot_download(
                ref.model, revision=revision or ref.revision, cache_dir=cache_dir, allow_patterns=allow_patterns
            )
    except HubUnreachable as exc:  # the Hub answered a moment ago: the connection dropped
        raise HubError(f"{what} {str(ref)!r}: the download stopped ({exc.reason}); "
                       "run again: it resumes where it stopped") from None
    path = Path(folder)
    # snapshot_download returns <cache>/snapshots/<commit sha>, for a tag or a
    # branch too: the folder name is the commit that was downloaded.
    return path, path.name


def cached(ref: ExpertRef, *, cache_dir: Optional[str], allow_patterns: List[str],
           ignore_patterns: Optional[List[str]] = None) -> Optional[Tuple[Path, str]]:
    """The snapshot of ``ref`` already in the local cache, or None.

    None too when the repo listing cached at the pull shows that a file matching
    the patterns is missing (an interrupted or partial pull).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        folder = snapshot_download(ref.model, revision=ref.revision, cache_dir=cache_dir,
                                   allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                   local_files_only=True)
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError, FileNotFoundError):
        return None
    path = Path(folder)
    return path, path.name


def safetensors_headers(ref: ExpertRef, commit: str, files: Optional[List[str]] = None
                        ) -> Optional[Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]]]:
    """Tensor dtype and shape per safetensors file, read from the headers alone
    (HTTP range requests, no weights downloaded); None if the Hub cannot serve them.

    ``files``: exactly the files to read (the shards a pull would download);
    default: what huggingface_hub picks (``model.safetensors``, else the index's shards).
    """
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi

    api = HfApi()
    try:
        if files is None:
            metas = api.get_safetensors_metadata(ref.model, revision=commit).files_metadata
        elif not files:
            metas = {}
        else:
            def parse(name: str):
                return name, api.parse_safetensors_file_metadata(ref.model, name, revision=commit)

            # One small ranged read a shard; a few at a time, as get_safetensors_metadata does.
            with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
                metas = dict(pool.map(parse, files))
    except Exception as exc:  # a server without range support, a malformed header: skip, say so
        LOG.debug("no safetensors headers for %s: %s", ref, type(exc).__name__)
        return None
    return {
        name: {t: (info.dtype, tuple(info.shape)) for t, info in file_meta.tensors.items()}
        for name, file_meta in metas.items()
    }


@contextlib.contextmanager
def _pull_errors(ref: ExpertRef, what: str) -> Iterator[None]:
    """Re-raise huggingface_hub's typed errors with the recipe's words and the fix."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    label = f"{what} {str(ref)!r}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except hf_errors.GatedRepoError:
        raise ExpertError(
            f"{label} is gated and this token has no access; request access on its Hub page, then {login}"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ExpertError(
            f"{label}: repo {ref.model!r} not found on the Hub (or private without access); "
            f"check the repo id, or {login} with access to it"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ExpertError(
            f"{label}: revision {ref.revision!r} not found in {ref.model!r}; check the branch, tag or commit"
        ) from None
    except hf_errors.OfflineModeIsEnabled:
        raise HubUnreachable("HF_HUB_OFFLINE is set") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise HubUnreachable(f"cannot connect to the Hub ({type(exc).__name__})") from None
    except httpx2.TransportError as exc:  # a connection that broke midway, after the client's retries
        raise HubError(f"{label}: the connection to the Hub broke ({type(exc).__name__}); "
                       "run again: downloads resume where they stopped") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        # snapshot_download turns every failure to reach the Hub into this one
        # once the cache cannot help; its cause says which failure it was.
        cause = exc.__cause__
        if isinstance(cause, hf_errors.HfHubHTTPError):
            raise HubError(f"{label}: the Hub answered {_status(cause)}; retry later") from None
        if isinstance(cause, hf_errors.OfflineModeIsEnabled):
            raise HubUnreachable("HF_HUB_OFFLINE is set") from None
        raise HubUnreachable(f"cannot connect to the Hub ({type(cause or exc).__name__})") from None
    except hf_errors.HfHubHTTPError as exc:
        code = _code(exc)
        if code in (401, 403):
            raise ExpertError(f"{label}: the Hub refused access ({_status(exc)}); {login} with access to it") from None
        raise HubError(f"{label}: the Hub answered {_status(exc)}; retry later") from None


def unreachable_error(ref: ExpertRef, reason: str, *, what: str = "expert") -> ExpertError:
    """The error for a Hub ref that is neither reachable nor in the cache."""
    fix = ("unset HF_HUB_OFFLINE, or run once online to fill the cache" if "OFFLINE" in reason
           else "check the connection (HF_ENDPOINT), or run once online to fill the cache")
    return ExpertError(f"{what} {str(ref)!r} is not in the local cache and {reason}; {fix}, or use a local folder")


# ---------------------------------------------------------------------- push


def check_repo_id(repo_id: str) -> None:
    """Refuse a push destination that is not ``org/name`` (the rule of the recipe's
    ``output.push_to_hub``, then huggingface_hub's own validator), before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ok = isinstance(repo_id, str) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id) is not None
    if ok:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            ok = False
    if not ok:
        raise OutputError(f"{str(repo_id)[:120]!r} is not a Hub repo id; write org/name (letters, digits, '-', '_' "
                          "and '.'; no '--' or '..'), e.g. --repo my-org/my-merge")


def require_token(repo_id: str) -> None:
    """Refuse a push that cannot succeed for want of a token, before any work."""
    from huggingface_hub import get_token

    check_repo_id(repo_id)
    if not get_token():
        raise TokenError(
            f"pushing to {repo_id} needs a Hub token and none was found; log in with `hf auth login` "
            "or set HF_TOKEN, or drop --push-to-hub / output.push_to_hub"
        )


def commit_message(report: "Report") -> Tuple[str, str]:
    """(title, description) of the push commit: experts, coefficients, dev/test utility."""
    from swarm_merge.card import fmt

    experts = report.experts
    winner, uniform = report.scores.winner, report.scores.uniform
    scores = [f"dev {fmt(winner.dev.utility)}"]
    if winner.test:
        scores.append(f"test {fmt(winner.test.utility)}")
    names = [e.model if not e.local else e.name for e in experts]
    listed = ", ".join(names) if len(", ".join(names)) <= 80 else f"{len(names)} experts"
    title = f"Model Swarms merge of {listed} ({', '.join(scores)})"
    coefficients = report.coefficients.model
    lines = []
    for k, (e, n) in enumerate(zip(experts, names)):
        rev = f"@{e.revision}" if e.revision else " (local)"
        coef = f": {coefficients[k]:+.4f}" if coefficients else ""
        lines.append(f"- {n}{rev}{coef}")
    search = report.search
    body = (
        f"Winner's {report.recipe.utility_name} utility: {', '.join(scores)} "
        f"(uniform average: dev {fmt(uniform.dev.utility)}"
        + (f", test {fmt(uniform.test.utility)}" if uniform.test else "") + ").\n"
        + "Experts and coefficients"
        + (" (per layer group: see README.md)" if not coefficients else "") + ":\n"
        + "\n".join(lines) + "\n"
        + f"Search: swarm size {report.recipe.swarm.size}, {search.iterations} iterations, "
        f"{search.evaluations} evaluations, {search.stop_reason}.\n"
        + f"Made with swarm_merge {report.versions.get('swarm_merge', '')}".rstrip() + "."
    )
    return title, body


def push(out_dir: Union[str, os.PathLike], repo_id: str, *, private: bool, report: "Report") -> str:
    """Upload the files a finished run wrote to ``repo_id`` in one commit; returns the commit URL.

    Exactly the files the run's manifest lists (:func:`output.push_files`), less
    the search checkpoint; nothing else in the folder, and never through a
    symlink. The repo is created if needed (``private`` applies only then). On
    failure the local folder is left as it is and the error says how to push it again.

    Raises:
        OutputError: a bad repo id; the folder is not a finished run, or a listed
            file is missing or not a regular file.
        TokenError: no token.
        HubError: refused or failed upload (with the retry command).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from swarm_merge import output

    out_dir = Path(out_dir)
    check_repo_id(repo_id)
    again = f"`mergekit-swarm push {out_dir} --repo {repo_id}`"
    if not get_token():
        raise TokenError(f"cannot push to {repo_id}: no Hub token; log in with `hf auth login` or set HF_TOKEN "
                         f"to a token with write access, then run {again}")
    names = output.push_files(out_dir)
    retry = f"the output in {out_dir} is complete and untouched; push it again with {again}"
    title, body = commit_message(report)
    LOG.info("uploading %d files to %s: %s", len(names), repo_id, ", ".join(names))
    api = HfApi()
    with output.open_files(out_dir, names) as files:
        try:
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=_upload_source(fh))
                          for name, fh in files.items()]
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=title, commit_description=body)
        except Exception as exc:  # any failure here has the same remedy: push the folder again
            raise HubError(f"push to {repo_id} failed ({_describe(exc)}); {retry}") from None
    url = str(getattr(info, "commit_url", "") or f"{repo_id}")
    LOG.debug("pushed %s to %s", out_dir, url)
    return url


def _upload_source(fh: BinaryIO) -> Union[str, BinaryIO]:
    """What CommitOperationAdd reads: on Linux ``/proc/self/fd/N``, a path (so that
    huggingface_hub may upload it with Xet, which it does not do for file objects)
    that names the file opened and checked, not whatever its name points at now;
    elsewhere the open file itself."""
    proc = f"/proc/self/fd/{fh.fileno()}"
    return proc if os.path.isdir("/proc/self/fd") and os.path.isfile(proc) else fh


def push_folder(out_dir: Union[str, os.PathLike], repo_id: str, *, private: Optional[bool] = None) -> str:
    """Push a finished run's output folder again (``mergekit-swarm push OUT --repo X``).

    The repo id and the files to upload are checked first; then the model card's
    usage snippet is pointed at ``repo_id``. ``private`` defaults to the run's
    ``output.private``.

    Raises:
        OutputError: a bad repo id; the folder is not a finished run (no
            ``swarm.json``), or a file it lists is missing or not a regular file.
        HubError: the push failed.
    """
    from swarm_merge import card, output, report as report_mod

    check_repo_id(repo_id)  # before anything here is read or edited
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir} is not a folder; give the output folder of a finished mergekit-swarm run")
    unfinished = OutputError(f"{out_dir} is not a finished mergekit-swarm run (no {REPORT_FILE}, or its publish did "
                             "not complete); run the recipe again with --resume first")
    if not (out_dir / REPORT_FILE).is_file():
        raise unfinished
    # The manifest, validated whole, names the files; a damaged one, or a symlinked
    # or missing file, is refused here, before the card is edited.
    names = output.push_files(out_dir)
    if not output.is_finished(out_dir):
        raise unfinished
    report = report_mod.read(out_dir / REPORT_FILE)
    model = "config.json" in names and any(n.endswith(".safetensors") and "/" not in n for n in names)
    adapter = "adapter_config.json" in names and "adapter_model.safetensors" in names
    if not (model or adapter):
        raise OutputError(f"{out_dir} has {REPORT_FILE} but not the model's (or adapter's) config and weights; "
                          "run the recipe again with --resume")
    if private is None:
        private = report.recipe.output.private
    readme = out_dir / output.CARD_FILE
    if output.CARD_FILE in names:
        text = readme.read_text(encoding="utf-8")
        patched = card.set_repo_id(text, repo_id)
        if patched != text:
            import tempfile

            # A fresh temporary name (O_EXCL): never a file or symlink someone left under a fixed one.
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{readme.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(patched)
                os.replace(tmp, readme)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    return push(out_dir, repo_id, private=private, report=report)


def _code(exc: Exception) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _status(exc: Exception) -> str:
    code = _code(exc)
    return f"HTTP {code}" if code else type(exc).__name__


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a failed Hub call."""
    # upload_folder wraps a failed LFS upload in a RuntimeError whose cause is the HTTP error.
    inner = exc.__cause__ if _code(exc) is None and exc.__cause__ is not None else exc
    code = _code(inner)
    if code in (401, 403):
        return (f"HTTP {code}: the token cannot write there; "
                "log in with `hf auth login` or set HF_TOKEN to a write token")
    detail = getattr(inner, "server_message", None) or ""
    detail = " ".join(str(detail).split())[:160]
    text = f"HTTP {code}" if code else type(inner).__name__
    return _scrub(f"{text}: {detail}" if detail else text)


def _scrub(text: str) -> str:
    """Belt and braces: never echo the token, whatever a server put in its message."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "***", text)
