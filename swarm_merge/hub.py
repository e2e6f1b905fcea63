"""Every Hugging Face Hub call, through huggingface_hub's public API only.

The token comes from the environment (``HF_TOKEN``) or the ``hf`` login, which
huggingface_hub finds by itself; it is never read from a recipe and never
written to logs, errors, ``swarm.json`` or the card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

from swarm_merge.errors import ExpertError, HubError
from swarm_merge.recipe import ExpertRef

__all__ = ["download"]

LOG = logging.getLogger(__name__)


def download(
    ref: ExpertRef, *, cache_dir: Optional[str], allow_patterns: List[str], what: str = "expert"
) -> Tuple[Path, str]:
    """Download a repo snapshot (only ``allow_patterns``) and return (folder, commit sha).

    The commit is resolved first, then the snapshot is fetched at that exact
    commit, so what is recorded is what was downloaded. huggingface_hub resumes
    interrupted downloads from its cache on the next run.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    label = f"{what} {str(ref)!r}"
    try:
        folder = snapshot_download(
            ref.model, revision=ref.revision, cache_dir=cache_dir, allow_patterns=allow_patterns
        )
    except hf_errors.GatedRepoError:
        raise ExpertError(
            f"{label} is gated or private and this token has no access; accept its terms on the Hub "
            "or log in with `hf auth login` / set HF_TOKEN"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ExpertError(
            f"{label} not found on the Hub (or private without access); check the repo id, "
            "or log in with `hf auth login` / set HF_TOKEN"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ExpertError(f"{label}: revision {ref.revision!r} not found; check the branch, tag or commit") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise ExpertError(
            f"{label} is not in the local cache and the Hub cannot be reached; "
            "connect, or unset HF_HUB_OFFLINE, or use a local folder"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        raise HubError(f"{label}: Hub request failed ({_status(exc)}); retry later") from None
    path = Path(folder)
    # snapshot_download returns <cache>/snapshots/<commit sha>: the resolved revision.
    return path, path.name


def _status(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(exc).__name__
