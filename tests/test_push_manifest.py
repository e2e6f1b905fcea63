"""A push uploads exactly what the run wrote, and a manifest can never widen
what the tool may touch.

Two finished tiny runs (module fixtures, each runs once): a full-model merge
whose end-of-run push goes to a local Hub-compatible server (tests/hub_server.py)
and a LoRA run with ``output.merge_adapter``. Pushes run in process: the
client's endpoint is pointed at the server for the duration of each push, and
the pushed repo is read back from the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

import tiny  # noqa: E402

from swarm_merge import cli, output, pipeline  # noqa: E402

TOKEN = "hf_swarmPushCanary5d2e7b"
SECRET = "canary-secret-7f3c9a: must never reach the Hub"
FAST = ["--no-progress", "--set", "swarm.max_iterations=1", "--set", "swarm.size=4"]


@pytest.fixture(scope="module")
def hub():
    with HubServer(valid_tokens=(TOKEN,)) as server:
        yield server


@contextlib.contextmanager
def hub_client(hub):
    """huggingface_hub, in this process, talking to the test server with the test token."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", hub.url)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the server speaks LFS, not Xet
        mp.setenv("HF_TOKEN", TOKEN)
        yield


def pushed_files(hub, repo: str) -> dict:
    from huggingface_hub import HfApi

    listed = HfApi(endpoint=hub.url, token=TOKEN).list_repo_files(repo)
    files = hub.files(repo)
    assert sorted(listed) == sorted(files)
    files.pop(".gitattributes", None)  # create_repo's initial commit, not ours
    return files


def listed(out: Path) -> list:
    return json.loads((out / output.MANIFEST_FILE).read_text())["files"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def full_run(hub, tiny_experts, tmp_path_factory):
    """A finished full-model run that pushed at its end; a file appeared in its
    folder during the search. Returns (root, out)."""
    root = tmp_path_factory.mktemp("full-run")
    recipe = tiny.write_recipe(root, tiny_experts[:2], "  push_to_hub: swarm/end-of-run\n  private: false\n")
    out = root / "out"
    real = pipeline.search.run_search

    def search_then_drop_a_file(*args, **kwargs):
        result = real(*args, **kwargs)
        (out / "during.txt").write_text(SECRET)  # e.g. someone's notes, written while the run searched
        return result

    with hub_client(hub), pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.search, "run_search", search_then_drop_a_file)
        assert cli.main([str(recipe), *FAST]) == 0
    assert not hub.errors, hub.errors
    return root, out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished LoRA run with output.merge_adapter (writes merged/ beside the adapter). Returns out."""
    root = tmp_path_factory.mktemp("lora-run")
    base = tiny.make_base(root)
    adapters = tiny.make_adapters(root / "adapters", base, 2)
    recipe = tiny.write_recipe(root, adapters, "  merge_adapter: true\n")
    assert cli.main([str(recipe), *FAST]) == 0
    return root / "out"


def copy_of(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, symlinks=True)
    return dest


# ------------------------------------------------------------ what is pushed


def test_the_manifest_names_exactly_what_the_tool_wrote(full_run, lora_run):
    from swarm_merge import lora

    assert output.MERGED_DIR == lora.MERGED_DIR
    _, out = full_run
    assert listed(out) == ["README.md", "config.json", "generation_config.json", "mergekit_config.yml",
                           "model.safetensors", "swarm-state.json", "swarm.json", "swarm_history.png",
                           "tokenizer.json", "tokenizer_config.json"]
    assert listed(lora_run) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "merged/README.md",
                                "merged/config.json", "merged/generation_config.json", "merged/model.safetensors",
                                "merged/tokenizer.json", "merged/tokenizer_config.json", "swarm-state.json",
                                "swarm.json", "swarm_history.png"]
    for folder in (out, lora_run):
        manifest = output.Manifest.model_validate_json((folder / output.MANIFEST_FILE).read_text())
        assert manifest.status == "complete"


def test_the_end_of_run_push_uploads_only_what_the_run_wrote(full_run, hub):
    _, out = full_run
    assert (out / "during.txt").is_file()  # appeared during the search: in the folder, not pushed
    files = pushed_files(hub, "swarm/end-of-run")
    assert sorted(files) == sorted(set(listed(out)) - {output.STATE_FILE})
    assert all(files[name] == (out / name).read_bytes() for name in files)


def test_push_uploads_only_the_listed_regular_files_and_names_them(full_run, hub, tmp_path, caplog):
    _, out = full_run
    folder = copy_of(out, tmp_path / "out")
    canary = tmp_path / "outside" / "secret.txt"
    canary.parent.mkdir()
    canary.write_text(SECRET)
    (folder / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    (folder / "notes.txt").write_text(SECRET)
    (folder / "sub").mkdir()
    (folder / "sub" / "data.txt").write_text(SECRET)
    (folder / "merged").mkdir()  # a folder of our name, but this run wrote none
    (folder / "merged" / "config.json").write_text(SECRET)
    os.symlink(canary, folder / "link.txt")
    os.symlink(canary.parent, folder / "linked-folder")
    # Added after the run, under a name the tool could have written.
    (folder / "model-00002-of-00002.safetensors").write_text(SECRET)
    caplog.set_level(logging.INFO, logger="swarm_merge")
    with hub_client(hub):
        assert cli.main(["push", str(folder), "--repo", "swarm/clean"]) == 0
    files = pushed_files(hub, "swarm/clean")
    expected = sorted(set(listed(out)) - {output.STATE_FILE})
    assert sorted(files) == expected
    assert not any(SECRET.encode() in data for data in files.values())
    # The push says what it uploads: one line naming every file.
    lines = [r.getMessage() for r in caplog.records if "uploading" in r.getMessage()]
    assert len(lines) == 1 and all(name in lines[0] for name in expected), lines
    assert "notes.txt" not in lines[0] and output.STATE_FILE not in lines[0]


def test_a_lora_run_pushes_its_adapter_and_its_merged_folder_only(lora_run, hub, tmp_path):
    folder = copy_of(lora_run, tmp_path / "out")
    (folder / "merged" / "notes.txt").write_text(SECRET)  # added to our subfolder after the run
    with hub_client(hub):
        assert cli.main(["push", str(folder), "--repo", "swarm/lora"]) == 0
    files = pushed_files(hub, "swarm/lora")
    assert sorted(files) == sorted(set(listed(lora_run)) - {output.STATE_FILE})
    assert files["merged/model.safetensors"] == (lora_run / "merged" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("source", ["proc path", "file object"])
def test_a_name_swapped_for_a_symlink_during_the_push_still_uploads_the_checked_file(source, full_run, hub, tmp_path,
                                                                                    monkeypatch):
    from huggingface_hub import HfApi

    from swarm_merge.publish import push as push_mod

    _, out = full_run
    folder = copy_of(out, tmp_path / "out")
    canary = tmp_path / "secret.txt"
    canary.write_text(SECRET)
    weights = (folder / "model.safetensors").read_bytes()
    real_create_repo = HfApi.create_repo

    def swap_then_create(self, *args, **kwargs):  # after the files were checked and opened
        (folder / "model.safetensors").unlink()
        os.symlink(canary, folder / "model.safetensors")
        return real_create_repo(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", swap_then_create)
    if source == "file object":  # what non-Linux systems upload
        monkeypatch.setattr(push_mod, "_upload_source", lambda fh: fh)
    repo = f"swarm/swapped-{source.replace(' ', '-')}"
    with hub_client(hub):
        assert cli.main(["push", str(folder), "--repo", repo]) == 0
    files = pushed_files(hub, repo)
    assert files["model.safetensors"] == weights
    assert not any(SECRET.encode() in data for data in files.values())


@pytest.mark.parametrize("where", ["README.md", "tokenizer.json", "merged"])
def test_a_listed_file_that_is_a_symlink_is_refused(where, full_run, lora_run, hub, tmp_path, capsys):
    folder = copy_of(lora_run if where == "merged" else full_run[1], tmp_path / "out")
    canary = tmp_path / "outside"
    canary.mkdir()
    target = folder / where
    if target.is_dir():  # the whole merged/ folder moved out and linked back
        shutil.move(str(target), str(canary / where))
    else:
        (canary / where).write_text(SECRET)
        target.unlink()
    os.symlink(canary / where, target)
    readme = (folder / "README.md").read_bytes() if where != "README.md" else None
    repo = f"swarm/symlink-{where.replace('.', '-')}"
    with hub_client(hub):
        assert cli.main(["push", str(folder), "--repo", repo]) == 2
    line = error_line(capsys)
    assert "symlink" in line and where in line, line
    assert not hub.repo_exists(repo)
    if readme is not None:
        assert (folder / "README.md").read_bytes() == readme  # refused before the card was edited


@pytest.mark.parametrize("repo", ["bad id", "a/b/c", "org/na..me", "org/", "-org/name"])
def test_a_bad_repo_id_is_refused_before_anything_is_edited(repo, full_run, hub, tmp_path, capsys):
    _, out = full_run
    folder = copy_of(out, tmp_path / "out")
    readme = (folder / "README.md").read_bytes()
    seen = len(hub.requests)
    with hub_client(hub):
        assert cli.main(["push", str(folder), f"--repo={repo}"]) == 2
    line = error_line(capsys)
    assert "not a Hub repo id" in line and "org/name" in line, line
    assert (folder / "README.md").read_bytes() == readme
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    assert len(hub.requests) == seen  # the Hub was never asked


def test_a_bad_push_to_hub_flag_is_refused_before_any_work(tiny_experts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = tiny.write_recipe(tmp_path, tiny_experts[:2])
    assert cli.main([str(recipe), *FAST, "--dry-run", "--push-to-hub", "not a repo"]) == 2
    assert "not a Hub repo id" in error_line(capsys)


# ------------------------------------------------- the manifest is not trusted


def manifest_text(files, *, status="complete", **extra) -> str:
    return json.dumps({"tool": "swarm_merge", "version": 1, "status": status, "files": files, **extra})


@pytest.mark.parametrize("flags", [(), ("--force",), ("--resume",)])
@pytest.mark.parametrize("manifest", [
    manifest_text(["merged", "swarm.json"]),  # a bare folder entry
    manifest_text(["merged/", "swarm.json"]),
    manifest_text(["merged/sub/config.json"]),
    manifest_text(["other/config.json"]),
    manifest_text(["../config.json"]),
    manifest_text([".env"]),
    manifest_text(["notes.txt"]),
    manifest_text([".swarm-merge.lock"]),
    manifest_text(["config.json"], status="done"),
    manifest_text(["config.json"], extra="x"),
    manifest_text("config.json"),
    manifest_text([1]),
    json.dumps({"tool": "swarm_merge", "version": 2, "status": "complete", "files": []}),
    "[]",
    "{not json",
])
def test_a_manifest_that_does_not_validate_is_refused_whole(manifest, flags, tiny_experts, tmp_path, capsys):
    recipe = tiny.write_recipe(tmp_path, tiny_experts[:2])
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("the user's own")
    (out / "config.json").write_text("the user's own too")
    (out / output.MANIFEST_FILE).write_text(manifest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main([str(recipe), *FAST, *flags]) == 2
    line = error_line(capsys)
    assert "not a swarm_merge manifest" in line and "choose a new --out" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_manifest_with_a_bare_folder_entry_never_exempts_the_folder_from_push(full_run, hub, tmp_path, capsys):
    _, out = full_run
    folder = copy_of(out, tmp_path / "out")
    (folder / "merged").mkdir()
    (folder / "merged" / "config.json").write_text(SECRET)
    manifest = json.loads((folder / output.MANIFEST_FILE).read_text())
    (folder / output.MANIFEST_FILE).write_text(json.dumps({**manifest, "files": manifest["files"] + ["merged"]}))
    with hub_client(hub):
        assert cli.main(["push", str(folder), "--repo", "swarm/bare-folder"]) == 2
    assert "not a swarm_merge manifest" in error_line(capsys)
    assert not hub.repo_exists("swarm/bare-folder")


def test_a_searching_manifest_listing_a_users_file_is_an_earlier_run(tiny_experts, tmp_path, capsys):
    recipe = tiny.write_recipe(tmp_path, tiny_experts[:2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the user's own")
    (out / output.MANIFEST_FILE).write_text(manifest_text([output.STATE_FILE, "config.json"], status="searching"))
    assert cli.main([str(recipe), *FAST]) == 2
    line = error_line(capsys)
    assert "earlier run" in line and "--force" in line, line
    assert (out / "config.json").read_text() == "the user's own"


# ------------------------------------------------------- kill during publish


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


def loads_as_model(folder: Path) -> bool:
    """What a user sees: transformers loads the folder (a full model, or an adapter on its base)."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(str(folder))
    except (OSError, ValueError):
        return False
    return True


def killed_after(moves: int, real_replace):
    """os.replace that lets ``moves`` calls through, then stands for kill -9."""
    done = []

    def replace(src, dst):
        if len(done) == moves:
            raise Killed
        done.append(dst)
        return real_replace(src, dst)

    return replace


def republish(folder: Path, source: Path) -> None:
    """Publish ``source``'s files into ``folder`` again, as a --resume of a finished run does."""
    with output.OutputFolder(folder, resume=True, force=False) as claimed:
        stage = claimed.new_stage()
        for name in listed(source):
            if name != output.STATE_FILE:
                (stage / name).parent.mkdir(exist_ok=True)
                shutil.copy(source / name, stage / name)
        claimed.publish(stage)


def test_a_kill_at_any_point_of_publish_never_leaves_a_model_without_its_report(lora_run, tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def counting(src, dst):
        calls.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", counting)
    republish(copy_of(lora_run, tmp_path / "count"), lora_run)
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert len(calls) == len(listed(lora_run)) + 1  # the files, less the state file, and two manifest writes

    for kill_at in range(len(calls)):
        folder = copy_of(lora_run, tmp_path / f"kill-{kill_at}")
        monkeypatch.setattr(output.os, "replace", killed_after(kill_at, real_replace))
        with pytest.raises(Killed):
            republish(folder, lora_run)
        monkeypatch.setattr(output.os, "replace", real_replace)
        if not (folder / output.REPORT_FILE).is_file():
            where = f"killed at move {kill_at} ({calls[kill_at]})"
            assert not (folder / "adapter_config.json").exists(), where
            assert not loads_as_model(folder), where
            assert not loads_as_model(folder / output.MERGED_DIR), where
        if kill_at > 0:  # killed writing the first manifest, the old run is still whole
            assert not output.is_finished(folder)
        # A plain run refuses the folder; publishing again (what --resume does) repairs it.
        with pytest.raises(output.OutputError, match="earlier run"):
            output.check_contents(folder, resume=False, force=False)
        republish(folder, lora_run)
        assert output.is_finished(folder) and listed(folder) == listed(lora_run)
        assert loads_as_model(folder / output.MERGED_DIR)


def test_force_starting_over_removes_every_gate_before_the_report(lora_run, tmp_path, monkeypatch):
    folder = copy_of(lora_run, tmp_path / "out")
    removed = []
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if folder in self.parents and self.name != output.LOCK_FILE:
            removed.append(self.relative_to(folder).as_posix())
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    with output.OutputFolder(folder, resume=False, force=True):
        pass
    monkeypatch.setattr(Path, "unlink", real_unlink)
    gates = ["adapter_config.json", "merged/config.json"]
    report = removed.index(output.REPORT_FILE)
    assert all(removed.index(g) < report for g in gates), removed
    assert set(removed[report + 1:]) == set(listed(lora_run)) - {*gates, output.REPORT_FILE}, removed


def test_publish_refuses_a_staged_file_the_manifest_could_not_name(lora_run, tmp_path):
    folder = copy_of(lora_run, tmp_path / "out")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != output.LOCK_FILE}
    with pytest.raises(RuntimeError, match="notes.txt"):
        with output.OutputFolder(folder, resume=True, force=False) as claimed:
            stage = claimed.new_stage()
            shutil.copy(lora_run / "swarm.json", stage / "swarm.json")
            (stage / "notes.txt").write_text("not a file this tool writes")
            claimed.publish(stage)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != output.LOCK_FILE
             and output.STAGING not in p.parts}
    assert after == before


# --------------------------------------------------- shared system folders


@pytest.mark.parametrize("folder", ["/var/tmp", "/var/tmp/", "/tmp", "/dev/shm"])
def test_shared_world_writable_folders_themselves_are_refused(folder, tiny_experts, tmp_path, capsys):
    recipe = tiny.write_recipe(tmp_path, tiny_experts[:2])
    # --dry-run checks the folder too, and writes nothing even where the check is missing.
    assert cli.main([str(recipe), *FAST, "--out", folder, "--force", "--dry-run"]) == 2
    assert "system folder" in error_line(capsys)


def test_a_shared_sticky_folder_is_refused_but_a_folder_inside_it_is_fine(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(output.OutputError, match="anyone can write"):
        output.check_path(shared)
    assert output.check_path(shared / "mine") == shared / "mine"
    assert output.check_path("/var/tmp/swarm-merge-test-out") == Path("/var/tmp/swarm-merge-test-out")
    assert not Path("/var/tmp/swarm-merge-test-out").exists()
