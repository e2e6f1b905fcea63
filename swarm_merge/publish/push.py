"""Push a finished run to the Hub, through huggingface_hub's public API only.

:func:`push` uploads the files a finished run wrote, as its manifest lists them
(``create_repo`` + ``create_commit``, one commit; nothing else in the folder);
:func:`push_folder` does it again later from the folder alone
(``mergekit-swarm push``). :func:`require_token` refuses a push that cannot
succeed before any work.

The token comes from the environment (``HF_TOKEN``) or the ``hf`` login, which
huggingface_hub finds by itself; it is never read from a recipe and never
written to logs, errors, ``swarm.json`` or the card.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional, Tuple, Union

from swarm_merge import output, report as report_mod
from swarm_merge.errors import HubError, OutputError, TokenError
from swarm_merge.experts.hub import describe_error
from swarm_merge.output import REPORT_FILE
from swarm_merge.publish import card

__all__ = ["push", "push_folder", "commit_message", "check_repo_id", "require_token"]

if TYPE_CHECKING:
    from swarm_merge.report import Report

LOG = logging.getLogger(__name__)


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
    experts = report.experts
    winner, uniform = report.scores.winner, report.scores.uniform
    scores = [f"dev {card.fmt(winner.dev.utility)}"]
    if winner.test:
        scores.append(f"test {card.fmt(winner.test.utility)}")
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
        f"(uniform average: dev {card.fmt(uniform.dev.utility)}"
        + (f", test {card.fmt(uniform.test.utility)}" if uniform.test else "") + ").\n"
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
            raise HubError(f"push to {repo_id} failed ({describe_error(exc)}); {retry}") from None
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
