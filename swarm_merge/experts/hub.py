"""Every Hugging Face Hub call that pulls, through huggingface_hub's public API only.

:func:`resolve` asks the Hub what a ref points at (commit sha, files and
their sizes) without downloading anything; :func:`download` fetches a snapshot
restricted to some file patterns; :func:`cached` finds one in the local cache
when the Hub cannot be reached; :func:`safetensors_headers` reads tensor names
and shapes from the headers alone (HTTP range requests), for ``--dry-run``.

A pull's errors are mapped to one line by ``_pull_errors``; pushing is
:mod:`swarm_merge.publish.push`, whose failures :func:`describe_error` words.

The token comes from the environment (``HF_TOKEN``) or the ``hf`` login, which
huggingface_hub finds by itself; it is never read from a recipe and never
written to logs, errors, ``swarm.json`` or the card.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from swarm_merge.errors import ExpertError, HubError
from swarm_merge.recipe import ExpertRef

__all__ = ["RepoSnapshot", "HubUnreachable", "resolve", "download", "cached", "unreachable_error",
           "safetensors_headers", "describe_error"]

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


def _code(exc: Exception) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _status(exc: Exception) -> str:
    code = _code(exc)
    return f"HTTP {code}" if code else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """A short, token-free description of a failed Hub call (a push's, too)."""
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
