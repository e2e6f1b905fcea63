"""The test Hub server against the real huggingface_hub client.

The client runs in a subprocess: HF_ENDPOINT must be set before
huggingface_hub is imported, and HF_HUB_DISABLE_XET=1 for uploads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

TOKEN = "hf_test"
RESULT_MARK = "@@RESULT@@"

# Prepended to every client script: report() prints the result for the test to read.
PRELUDE = f"""
import json, os, sys
def report(obj):
    print({RESULT_MARK!r} + json.dumps(obj), flush=True)
def err_name(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception as e:
        return type(e).__name__
    return None
"""


@pytest.fixture(scope="module")
def hub():
    # A small tree page size so every listing goes through the Link-header pagination.
    with HubServer(tree_page_size=3) as server:
        yield server


def run_client(hub: HubServer, code: str, home: Path, token: str | None = TOKEN, timeout: float = 60) -> object:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}\nserver errors: {hub.errors}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert lines, f"no result from client:\n{proc.stdout}\n{proc.stderr}"
    assert not hub.errors, hub.errors
    return json.loads(lines[-1][len(RESULT_MARK):])


def make_model_folder(folder: Path, seed: int = 0) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "README.md": (
            b"---\nlicense: apache-2.0\nbase_model:\n- org/expert-a\n- org/expert-b\n"
            b"tags:\n- merge\n- model-swarms\n---\n\n# merged\n"
        ),
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        # 3 MB of binary: goes through LFS (batch + PUT + verify).
        "model.safetensors": (bytes(range(seed, 251)) + bytes(range(seed))) * (3 * 1024 * 1024 // 251 + 1),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_snapshot(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_then_pull_roundtrip(hub: HubServer, tmp_path: Path) -> None:
    files = make_model_folder(tmp_path / "merged")
    hub.clear_log()
    out = run_client(hub, f"""
        from huggingface_hub import HfApi, ModelCard, snapshot_download
        api = HfApi()
        url = api.create_repo("swarm/merged", exist_ok=True)
        again = api.create_repo("swarm/merged", exist_ok=True)  # 409 -> exist_ok path
        info = api.upload_folder(folder_path={str(tmp_path / "merged")!r}, repo_id="swarm/merged",
                                 commit_message="Model Swarms merge")
        path = snapshot_download("swarm/merged")
        card = ModelCard.load("swarm/merged")
        mi = api.model_info("swarm/merged", files_metadata=True)
        tree = sorted(f.path for f in api.list_repo_tree("swarm/merged", recursive=True))
        report(dict(url=str(url), again=str(again), oid=info.oid, commit_url=info.commit_url, path=path,
                    card=card.data.to_dict(), sha=mi.sha, tree=tree,
                    siblings={{s.rfilename: (s.size, s.lfs is not None) for s in mi.siblings}}))
    """, tmp_path)

    head = hub.resolve("swarm/merged")
    assert out["oid"] == head == out["sha"]
    assert out["url"] == out["again"] == f"{hub.url}/swarm/merged"
    assert out["commit_url"] == f"{hub.url}/swarm/merged/commit/{head}"
    assert hub.commit_message("swarm/merged") == "Model Swarms merge"
    # create_repo made an initial commit with a .gitattributes, like the Hub.
    assert len(hub.commit_ids("swarm/merged")) == 2
    expected = {".gitattributes": hub.read_file("swarm/merged", ".gitattributes"), **files}
    assert read_snapshot(out["path"]) == expected
    assert hub.files("swarm/merged") == expected
    assert out["tree"] == sorted(expected)
    assert out["card"]["base_model"] == ["org/expert-a", "org/expert-b"]
    assert out["siblings"]["model.safetensors"] == [len(files["model.safetensors"]), True]
    assert out["siblings"]["config.json"] == [len(files["config.json"]), False]
    assert hub.is_lfs("swarm/merged", "model.safetensors") and not hub.is_lfs("swarm/merged", "config.json")

    calls = hub.requests
    for method, prefix in [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/swarm/merged/preupload/main"),
        ("POST", "/swarm/merged.git/info/lfs/objects/batch"),
        ("PUT", "/_lfs/upload/"),
        ("POST", "/_lfs/verify/"),
        ("POST", "/api/models/swarm/merged/commit/main"),
        ("GET", "/api/models/swarm/merged/revision/main"),
        ("GET", f"/api/models/swarm/merged/tree/{head}"),
        ("HEAD", f"/swarm/merged/resolve/{head}/model.safetensors"),
        ("GET", f"/swarm/merged/resolve/{head}/model.safetensors"),
        ("HEAD", "/swarm/merged/resolve/main/README.md"),
    ]:
        assert any(m == method and p.startswith(prefix) for m, p in calls), (method, prefix)
    # The token reached the write endpoints.
    commit_auth = [r.authorization for r in hub.request_log if r.path.endswith("/commit/main")]
    assert commit_auth == [f"Bearer {TOKEN}"]
    assert TOKEN in hub.tokens_seen
    # 4 files in the tree, page size 3: the listing was paginated.
    assert sum(1 for m, p in calls if m == "GET" and "/tree/" in p) >= 2


def test_pinned_commit_tag_and_allow_patterns(hub: HubServer, tmp_path: Path) -> None:
    v1 = {"config.json": b'{"v": 1}', "model.safetensors": b"\x00weights-v1" * 1000, "sub/extra.txt": b"one"}
    v2 = {"config.json": b'{"v": 2}', "model.safetensors": b"\x00weights-v2" * 1000, "tokenizer.json": b"{}"}
    sha1 = hub.add_repo("org/expert-a", v1, revision_tag="v1.0")
    sha2 = hub.add_repo("org/expert-a", v2)
    assert hub.commit_ids("org/expert-a") == [sha1, sha2]
    assert hub.resolve("org/expert-a", "v1.0") == sha1 and hub.resolve("org/expert-a", sha1[:8]) == sha1

    out = run_client(hub, f"""
        from huggingface_hub import HfApi, snapshot_download
        api = HfApi()
        refs = api.list_repo_refs("org/expert-a")
        commits = api.list_repo_commits("org/expert-a")
        report(dict(
            pinned=snapshot_download("org/expert-a", revision={sha1!r}),
            tag=snapshot_download("org/expert-a", revision="v1.0"),
            main=snapshot_download("org/expert-a"),
            json_only=snapshot_download("org/expert-a", allow_patterns=["*.json"],
                                        cache_dir={str(tmp_path / "filtered")!r}),
            info_pinned=api.model_info("org/expert-a", revision={sha1!r}).sha,
            info_tag=api.model_info("org/expert-a", revision="v1.0").sha,
            info_main=api.model_info("org/expert-a").sha,
            tree_sub=[f.path for f in api.list_repo_tree("org/expert-a", "sub", revision="v1.0")],
            tags={{t.name: t.target_commit for t in refs.tags}},
            branches={{b.name: b.target_commit for b in refs.branches}},
            commits=[c.commit_id for c in commits],
        ))
    """, tmp_path)

    assert read_snapshot(out["pinned"]) == v1
    assert read_snapshot(out["tag"]) == v1
    assert out["pinned"].endswith(sha1) and out["tag"].endswith(sha1)
    assert read_snapshot(out["main"]) == v2 and out["main"].endswith(sha2)
    assert read_snapshot(out["json_only"]) == {"config.json": v2["config.json"], "tokenizer.json": b"{}"}
    assert (out["info_pinned"], out["info_tag"], out["info_main"]) == (sha1, sha1, sha2)
    assert out["tree_sub"] == ["sub/extra.txt"]
    assert out["tags"] == {"v1.0": sha1} and out["branches"] == {"main": sha2}
    assert out["commits"] == [sha2, sha1]
    # allow_patterns: the .safetensors file was never fetched for the filtered download.
    assert hub.is_lfs("org/expert-a", "model.safetensors")


def test_client_raises_typed_errors(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    hub.add_repo("org/granted", {"config.json": b'{"ok": true}'}, gated=True)
    hub.grant_access("org/granted", TOKEN)
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    hub.add_repo("org/plain", {"config.json": b"{}"})

    out = run_client(hub, """
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        api = HfApi()
        report(dict(
            missing_snapshot=err_name(snapshot_download, "org/nope"),
            missing_info=err_name(api.model_info, "org/nope"),
            missing_file=err_name(hf_hub_download, "org/nope", "config.json"),
            bad_branch=err_name(snapshot_download, "org/plain", revision="no-such-branch"),
            bad_sha=err_name(snapshot_download, "org/plain", revision="0" * 40),
            bad_rev_info=err_name(api.model_info, "org/plain", revision="v9"),
            bad_rev_file=err_name(hf_hub_download, "org/plain", "config.json", revision="v9"),
            no_entry=err_name(hf_hub_download, "org/plain", "nope.bin"),
            gated_snapshot=err_name(snapshot_download, "org/gated"),
            gated_file=err_name(hf_hub_download, "org/gated", "config.json"),
            gated_anon=err_name(hf_hub_download, "org/gated", "config.json", token=False),
            gated_info_sha=api.model_info("org/gated").sha,
            gated_info_flag=api.model_info("org/gated").gated,
            granted=open(hf_hub_download("org/granted", "config.json")).read(),
            private_anon=err_name(api.model_info, "org/private", token=False),
            private_ok=api.model_info("org/private").private,
            write_anon=err_name(api.create_repo, "org/new", token=False),
            write_bad_token=err_name(api.create_repo, "org/new", token="hf_wrong"),
            exists=api.repo_exists("org/plain"), not_exists=api.repo_exists("org/nope"),
            whoami=api.whoami()["name"],
        ))
    """, tmp_path)

    assert out["missing_snapshot"] == "RepositoryNotFoundError"
    assert out["missing_info"] == "RepositoryNotFoundError"
    assert out["missing_file"] == "RepositoryNotFoundError"
    assert out["bad_branch"] == "RevisionNotFoundError"
    assert out["bad_sha"] == "RevisionNotFoundError"
    assert out["bad_rev_info"] == "RevisionNotFoundError"
    assert out["bad_rev_file"] == "RevisionNotFoundError"
    assert out["no_entry"] == "RemoteEntryNotFoundError"
    assert out["gated_snapshot"] == "GatedRepoError"
    assert out["gated_file"] == "GatedRepoError"
    assert out["gated_anon"] == "GatedRepoError"
    assert out["gated_info_sha"] == sha and out["gated_info_flag"] == "manual"
    assert out["granted"] == '{"ok": true}'
    assert out["private_anon"] == "RepositoryNotFoundError"
    assert out["private_ok"] is True
    assert out["write_anon"] == "HfHubHTTPError" and out["write_bad_token"] == "HfHubHTTPError"
    assert not hub.repo_exists("org/new")
    assert (out["exists"], out["not_exists"]) == (True, False)
    assert out["whoami"] == "test-user"
    statuses = {(r.method, r.path): r.status for r in hub.request_log}
    assert statuses[("HEAD", "/org/gated/resolve/main/config.json")] in (401, 403)


def test_fault_on_commit_then_retry_succeeds(hub: HubServer, tmp_path: Path) -> None:
    files = make_model_folder(tmp_path / "merged", seed=1)
    hub.add_repo("swarm/retry", {"README.md": b"old"})
    before = hub.commit_ids("swarm/retry")
    fault = hub.fail_next("/commit/", status=500, times=1)
    hub.clear_log()

    out = run_client(hub, f"""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        try:
            api.upload_folder(folder_path={str(tmp_path / "merged")!r}, repo_id="swarm/retry")
            first = None
        except HfHubHTTPError as e:
            first = [type(e).__name__, e.response.status_code]
        second = api.upload_folder(folder_path={str(tmp_path / "merged")!r}, repo_id="swarm/retry")
        report(dict(first=first, second=second.oid))
    """, tmp_path)

    assert out["first"] == ["HfHubHTTPError", 500]
    assert fault.hits == 1 and fault.times == 0
    assert hub.commit_ids("swarm/retry") == before + [out["second"]]
    assert hub.files("swarm/retry") == files
    commits = [r.status for r in hub.request_log if r.path.endswith("/commit/main")]
    assert commits == [500, 200]
    # The LFS blob went up once: on the retry, the batch answer says it is already there.
    assert sum(1 for m, p in hub.requests if m == "PUT") == 1


def test_fault_on_lfs_put_then_retry_succeeds(hub: HubServer, tmp_path: Path) -> None:
    files = make_model_folder(tmp_path / "merged", seed=2)
    # 507 is a 5xx the client does not retry (it retries 500/502/503/504 five times, 23 s of back-off).
    hub.fail_next("/_lfs/upload/", status=507, method="PUT")
    hub.clear_log()

    out = run_client(hub, f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("swarm/lfs-retry", exist_ok=True)
        try:
            api.upload_folder(folder_path={str(tmp_path / "merged")!r}, repo_id="swarm/lfs-retry")
            first = None
        except Exception as e:
            first = [type(e).__name__, type(e.__cause__).__name__]
        second = api.upload_folder(folder_path={str(tmp_path / "merged")!r}, repo_id="swarm/lfs-retry")
        report(dict(first=first, second=second.oid))
    """, tmp_path)

    assert out["first"] == ["RuntimeError", "HfHubHTTPError"]
    assert out["second"] == hub.resolve("swarm/lfs-retry")
    assert [r.status for r in hub.request_log if r.method == "PUT"] == [507, 200]
    assert [r.status for r in hub.request_log if "/commit/" in r.path] == [200]
    assert {p: hub.read_file("swarm/lfs-retry", p) for p in files} == files


def test_download_resumes_with_range_after_cut_connection(hub: HubServer, tmp_path: Path) -> None:
    # The client reads the body in 10 MiB chunks and resumes from the last whole chunk it
    # got, so the cut must come after 10 MiB for the retry to carry a Range header.
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB, LFS
    sha = hub.add_repo("org/resume", {"model.safetensors": data})
    hub.fail_next("/org/resume/resolve/", method="GET", truncate_after=11 * 1024 * 1024)
    hub.clear_log()

    out = run_client(hub, """
        from huggingface_hub import hf_hub_download
        report(hf_hub_download("org/resume", "model.safetensors"))
    """, tmp_path)

    assert Path(out).read_bytes() == data
    gets = [r for r in hub.request_log if r.method == "GET" and "/resolve/" in r.path]
    assert [(g.fault, g.status) for g in gets] == [(True, 200), (False, 206)]
    assert gets[0].header("range") is None
    assert gets[1].header("range") == f"bytes={10 * 1024 * 1024}-"
    heads = [r for r in hub.request_log if r.method == "HEAD"]
    assert heads and heads[0].path == "/org/resume/resolve/main/model.safetensors"
    assert sha == hub.resolve("org/resume")


def test_server_side_helpers(tmp_path: Path) -> None:
    with HubServer(valid_tokens=None, gitattributes=False) as hub:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "a.txt").write_text("A")
        (tmp_path / "m" / "w.bin").write_bytes(b"\x00\x01")
        sha1 = hub.add_repo("solo", tmp_path / "m", revision_tag="base")
        sha2 = hub.commit("solo", add={"b.txt": "B"}, delete=["a.txt"], message="swap")
        assert hub.list_files("solo") == ["b.txt", "w.bin"]
        assert hub.list_files("solo", "base") == ["a.txt", "w.bin"]
        assert hub.is_lfs("solo", "w.bin") and not hub.is_lfs("solo", "b.txt")
        assert hub.commit_ids("solo") == [sha1, sha2] and hub.commit_message("solo") == "swap"
        assert hub.refs("solo") == {"branches": {"main": sha2}, "tags": {"base": sha1}}
        assert hub.repo_ids() == ["solo"]
        assert hub.url.startswith("http://127.0.0.1:")


def test_other_client_apis(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"x": 1}')
    (folder / "sub" / "notes.txt").write_text("n")

    out = run_client(hub, f"""
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo("swarm/misc", private=True)
        api.upload_file(path_or_fileobj=b"old", path_in_repo="stale.txt", repo_id="swarm/misc")
        api.create_branch("swarm/misc", branch="dev")
        dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="swarm/misc", revision="dev")
        api.create_tag("swarm/misc", tag="v0", revision="dev")
        main = api.upload_folder(folder_path={str(folder)!r}, repo_id="swarm/misc", delete_patterns=["*.txt"])
        pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id="swarm/misc", create_pr=True)
        same = api.upload_folder(folder_path={str(folder)!r}, repo_id="swarm/misc")  # nothing changed
        paths = api.get_paths_info("swarm/misc", ["config.json", "sub", "missing"], revision="main")
        api.delete_file("sub/notes.txt", repo_id="swarm/misc")
        report(dict(
            dev=dev.oid, main=main.oid, pr=[pr.pr_revision, pr.pr_num], same=same.oid,
            files=sorted(api.list_repo_files("swarm/misc")),
            dev_files=sorted(api.list_repo_files("swarm/misc", revision="v0")),
            pr_file=open(hf_hub_download("swarm/misc", "pr.txt", revision=pr.pr_revision)).read(),
            exists=[api.file_exists("swarm/misc", "config.json"), api.file_exists("swarm/misc", "nope")],
            paths=sorted(p.path for p in paths),
            private=api.model_info("swarm/misc").private,
        ))
        api.delete_repo("swarm/misc")
    """, tmp_path)

    assert out["main"] == out["same"]  # an unchanged re-upload makes no commit
    assert out["pr"] == ["refs/pr/1", 1]
    assert out["files"] == [".gitattributes", "config.json"]
    assert out["dev_files"] == [".gitattributes", "dev.txt", "stale.txt"]
    assert out["pr_file"] == "proposal"
    assert out["exists"] == [True, False]
    assert out["paths"] == ["config.json", "sub"]
    assert out["private"] is True
    assert not hub.repo_exists("swarm/misc")
