"""The tool never destroys what the user has, and never calls a failed run a success.

Every test puts canary files beside (and inside) the folders the tool must not
touch and checks them afterwards; bad input must exit 2 with one line naming
the problem, and write nothing. Run in process (``cli.main``) except where a
process boundary is the point.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm_merge import output
from swarm_merge.cli import main
from swarm_merge.report import read as read_report

import tiny


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_experts, monkeypatch):
    """A project folder with a recipe, copies of the experts, data and canaries;
    the working directory is ``project/work``. Checks at teardown that nothing
    outside ``project/out*`` changed."""
    project = tmp_path / "project"
    experts = []
    for p in tiny_experts:
        dest = project / "experts" / p.name
        shutil.copytree(p, dest)
        (dest / "canary.txt").write_text("expert canary")
        experts.append(dest)
    recipe = tiny.write_recipe(project, experts)
    for folder in (project, project / "data", project / "experts", tmp_path):
        (folder / "canary.txt").write_text("canary")
    work = project / "work"
    work.mkdir()
    (work / "canary.txt").write_text("cwd canary")
    monkeypatch.chdir(work)
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("project/out")}

    class World:
        root, dir, recipe_path, expert_paths = tmp_path, project, recipe, experts
        out = project / "out"

        def untouched(self, *, ignore=()):
            def kept(k):
                return not any(k.startswith(i) for i in ignore)

            after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("project/out") and kept(k)}
            assert after == {k: v for k, v in before.items() if kept(k)}, "the tool changed files outside its output"

    yield World()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1, err
    return errors[0]


def cli(w, *args) -> int:
    return main([str(w.recipe_path), "--no-progress", *map(str, args)])


# ------------------------------------------------------- 1. --out and --force


@pytest.mark.parametrize("target", ["recipe folder", "expert", "parent of cwd", "cwd", "data folder", "home",
                                    "experts folder", "inside an expert"])
@pytest.mark.parametrize("flags", [(), ("--force",), ("--resume",)])
def test_out_folder_that_is_or_holds_an_input_is_refused(world, capsys, monkeypatch, target, flags):
    monkeypatch.setenv("HOME", str(world.root / "home" / "me"))  # deep enough not to be a "system folder"
    if target == "recipe folder":  # run from elsewhere, so that the recipe's own rule is what refuses
        (world.root / "elsewhere").mkdir()
        monkeypatch.chdir(world.root / "elsewhere")
    out = {
        "recipe folder": world.dir,
        "expert": world.expert_paths[0],
        "parent of cwd": "..",
        "cwd": ".",
        "data folder": world.dir / "data",
        "home": Path.home(),
        "experts folder": world.dir / "experts",
        "inside an expert": world.expert_paths[1] / "sub",
    }[target]
    assert cli(world, "--out", out, *flags) == 2
    line = error_line(capsys)
    assert "--force" not in line or "--resume and --force" in line, line  # never suggests --force here
    reason = {"recipe folder": "the recipe's folder", "expert": "is the expert", "parent of cwd": "the working directory",
              "cwd": "is the working directory", "data folder": "holds the dev data file", "home": "is the home folder",
              "experts folder": "holds the expert", "inside an expert": "lies inside the expert"}[target]
    assert reason in line, line
    world.untouched()
    assert not (world.expert_paths[1] / "sub").exists()


@pytest.mark.parametrize("out", ["/", "/tmp", "/usr", "/etc", "/home", "/proc/self", "/sys/x", "/dev/shm/x"])
def test_system_folders_are_refused_even_with_force(world, capsys, out):
    assert cli(world, "--out", out, "--force") == 2
    line = error_line(capsys)
    assert "system folder" in line or "holds" in line, line
    assert "--force" not in line
    world.untouched()


@pytest.mark.parametrize("name", ["../..", "/abs/path", "../../x", "a/b", "..", "x\ny", "# Title <b>"])
def test_a_recipe_name_is_a_name(world, capsys, name):
    text = world.recipe_path.read_text().replace("name: tiny", f"name: {json.dumps(name)}")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("  dir:")) + "\n"
    world.recipe_path.write_text(text)
    assert main([str(world.recipe_path), "--force"]) == 2
    assert "is not a plain name" in error_line(capsys)
    world.untouched(ignore=("project/recipe.yml",))


def test_resume_and_force_together_is_an_error(world, capsys):
    assert cli(world, "--resume", "--force") == 2
    assert "contradict" in error_line(capsys)
    assert not world.out.exists()


@pytest.mark.parametrize("flags", [(), ("--force",), ("--resume",)])
def test_a_folder_with_foreign_files_is_never_touched(world, capsys, flags):
    world.out.mkdir()
    (world.out / "precious.txt").write_text("keep me")
    (world.out / "unrelated.safetensors").write_bytes(b"not ours")
    (world.out / ".swarm-staging").mkdir()  # not marked: not ours either
    (world.out / ".swarm-staging" / "x").write_text("keep")
    (world.out / "swarm-state.json").write_text("{}")  # looks like ours, but no manifest says so
    before = snapshot(world.out)
    assert cli(world, *flags) == 2
    line = error_line(capsys)
    assert "did not write" in line or "nothing to resume" in line, line
    assert snapshot(world.out) == before
    world.untouched()


def test_force_deletes_only_what_the_earlier_run_wrote(world, capsys):
    assert cli(world) == 0
    first = snapshot(world.out)
    assert "model.safetensors" in first and ".swarm-merge.json" in first
    assert cli(world) == 2 and "--resume" in error_line(capsys)  # an earlier run: not silently replaced
    (world.out / "notes.txt").write_text("mine")  # a file the user added after the run
    assert cli(world, "--force") == 2  # a folder with the user's file in it is refused
    assert (world.out / "notes.txt").read_text() == "mine" and snapshot(world.out).keys() - {"notes.txt"} == first.keys()
    (world.out / "notes.txt").unlink()
    assert cli(world, "--force", "--seed", "3") == 0
    assert read_report(world.out / "swarm.json").recipe.swarm.seed == 3
    world.untouched()


def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_next(world, capsys):
    world.out.mkdir()  # what a kill -9 during the model load leaves
    (world.out / output.MANIFEST_FILE).write_text(json.dumps(
        {"tool": "swarm_merge", "version": 1, "status": "searching", "files": ["swarm-state.json"]}))
    (world.out / output.LOCK_FILE).write_text("{}")
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    assert output.is_finished(world.out)


def test_a_symlink_under_the_lock_files_name_is_never_followed(world, capsys):
    world.out.mkdir()
    (world.out / output.MANIFEST_FILE).write_text(json.dumps(
        {"tool": "swarm_merge", "version": 1, "status": "searching", "files": ["swarm-state.json"]}))
    os.symlink(world.dir / "canary.txt", world.out / output.LOCK_FILE)
    assert cli(world) == 2
    assert "lock file" in error_line(capsys)
    world.untouched()


def test_an_expert_cards_license_list_or_oddity_never_breaks_a_run(tmp_path):
    from swarm_merge.publish.card import expert_license

    for value, want in (("mit", "mit"), ("[mit, apache-2.0]", "mit OR apache-2.0"), ("{a: 1}", None), ("3", None)):
        (tmp_path / "README.md").write_text(f"---\nlicense: {value}\n---\n# x\n")
        assert expert_license(tmp_path) == want, value


# ---------------------------------------------------- 4. failed runs fail


def test_an_expert_with_nan_weights_is_bad_input(world, capsys):
    path = world.expert_paths[1] / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[3]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert cli(world) == 2
    line = error_line(capsys)
    assert name in line and "NaN or inf" in line
    assert not world.out.exists()


def test_chat_template_without_one_is_bad_input(world, capsys):
    assert cli(world, "--set", "objective.chat_template=true") == 2
    assert "no chat template" in error_line(capsys)
    assert not world.out.exists()


@pytest.mark.parametrize("device", ["meta", "foo", "cuda:x", ""])
def test_a_device_that_is_not_one_is_bad_input(world, capsys, device):
    assert cli(world, "--device", device) == 2
    assert "is not a device" in error_line(capsys)
    assert not world.out.exists()


def test_an_evaluation_that_raises_fails_the_run_at_once(world, capsys, monkeypatch):
    from swarm_merge import objectives

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("the device fell over")

    monkeypatch.setitem(objectives.OBJECTIVES, "loglik", dataclasses.replace(objectives.OBJECTIVES["loglik"], score=broken))
    assert cli(world) == 1
    assert "the device fell over" in error_line(capsys)
    assert len(calls) == 1  # not once per particle
    assert not world.out.exists()  # nothing worth keeping was written: the folder is gone again
    world.untouched()


def test_no_finite_utility_in_the_initial_swarm_fails_the_run(world, capsys, monkeypatch):
    from swarm_merge import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "loglik", dataclasses.replace(
        objectives.OBJECTIVES["loglik"], score=lambda m, t, ex, *a, **k: objectives.Score(float("nan"), {}, len(ex))))
    assert cli(world) == 1
    assert "finite utility" in error_line(capsys)
    assert not (world.out / "swarm.json").exists() and not (world.out / "config.json").exists()
    state = (world.out / "swarm-state.json").read_text()
    json.loads(state, parse_constant=_refuse)  # strict JSON even with NaN utilities


def _refuse(constant):
    raise AssertionError(f"{constant} in a report or checkpoint: not strict JSON")


def test_failed_particles_rank_worst_and_reports_stay_strict_json(world, monkeypatch):
    from swarm_merge import objectives

    real = objectives.OBJECTIVES["loglik"].score
    calls = []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        score = real(*args, **kwargs)
        return objectives.Score(float("nan"), score.groups, score.n) if len(calls) % 3 == 0 else score

    monkeypatch.setitem(objectives.OBJECTIVES, "loglik", dataclasses.replace(objectives.OBJECTIVES["loglik"], score=sometimes_nan))
    assert cli(world) == 0
    for name in ("swarm.json", "swarm-state.json", ".swarm-merge.json"):
        json.loads((world.out / name).read_text(), parse_constant=_refuse)
    state = json.loads((world.out / "swarm-state.json").read_text())
    assert any(hit["utility"] is None for hit in state["memo"].values())  # a NaN was recorded as null
    read_report(world.out / "swarm.json")


# ------------------------------------------------- 5. one run at a time


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(world, capsys):
    world.out.mkdir()
    (world.out / output.MANIFEST_FILE).write_text(json.dumps(
        {"tool": "swarm_merge", "version": 1, "status": "searching", "files": ["swarm-state.json"]}))
    fd = os.open(world.out / output.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.write(fd, json.dumps({"pid": 4242, "host": "builder", "since": "today"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert cli(world, "--force") == 2
        line = error_line(capsys)
        assert "in use by another mergekit-swarm run" in line and "pid 4242 on builder" in line
    finally:
        os.close(fd)
    # The holder is gone (as after a crash): its lock file does not block the next run.
    assert cli(world, "--force") == 0


# ------------------------------------------- 6. publishing is atomic


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("moves_before_kill", [0, 3, "before report", "before gate"])
def test_a_kill_during_publish_never_leaves_a_loadable_model_without_its_report(world, monkeypatch,
                                                                               moves_before_kill):
    from transformers import AutoModelForCausalLM

    assert cli(world) == 0
    files = sorted(p.name for p in world.out.iterdir())
    real_replace = os.replace
    moved = []

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if src.parent.name == output.STAGING and dst.parent == world.out:
            limit = moves_before_kill
            if limit == "before report" and src.name == output.REPORT_FILE:
                raise Killed
            if limit == "before gate" and src.name == "config.json":
                raise Killed
            if isinstance(limit, int) and len(moved) >= limit:
                raise Killed
            moved.append(src.name)
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(Killed):
        cli(world, "--resume")
    monkeypatch.setattr(output.os, "replace", real_replace)
    # Until swarm.json is in place the folder does not load as a model.
    assert not (world.out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: no config.json there
        AutoModelForCausalLM.from_pretrained(world.out)
    assert not output.is_finished(world.out)
    # A plain rerun refuses; --resume repairs it.
    assert cli(world) == 2
    assert cli(world, "--resume") == 0
    assert sorted(p.name for p in world.out.iterdir()) == files
    assert output.is_finished(world.out)
    AutoModelForCausalLM.from_pretrained(world.out)
    world.untouched()


# --------------------------------------- 7. resume checks the experts' content


def test_resume_after_an_expert_changed_in_place_is_refused(world, capsys):
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    path = world.expert_paths[0] / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same names, shapes, dtypes and file size: only the values
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert cli(world, "--set", "swarm.max_iterations=1", "--resume") == 2
    assert "different inputs" in error_line(capsys)


def test_a_malformed_checkpoint_is_bad_input(world, capsys):
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    before = snapshot(world.out)
    good = json.loads((world.out / "swarm-state.json").read_text())
    damaged = json.dumps({**good, "state": {"x": 1}})
    older = json.dumps({**good, "version": good["version"] - 1})  # e.g. racing's stages were other rows then
    for bad in ("[]", '{"version": 2, "fingerprint": "x"}', "{not json", damaged, older):
        (world.out / "swarm-state.json").write_text(bad)
        assert cli(world, "--set", "swarm.max_iterations=1", "--resume") == 2
        line = error_line(capsys)
        assert "checkpoint" in line or "swarm-state.json" in line, line
        assert bad != older or ("another swarm_merge version" in line and "--force" in line), line
    assert snapshot(world.out).keys() == before.keys()


# ----------------------------------------- 8. test rows that are dev rows


def test_a_test_set_equal_to_the_dev_set_is_flagged_and_the_card_says_so(world, capsys):
    shutil.copy(world.dir / "data" / "dev.jsonl", world.dir / "data" / "test.jsonl")
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    assert "not held out" in capsys.readouterr().out
    report = read_report(world.out / "swarm.json")
    assert report.data.test_rows_in_dev == report.data.test_rows == 12
    card = (world.out / "README.md").read_text()
    assert "also appear in the dev set" in card and "the test set never was" not in card
    world.untouched(ignore=("project/data/test.jsonl",))


# ------------------------------------------- 9. hostile recipes and names


def test_a_yaml_alias_bomb_is_a_short_error(world, capsys):
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    world.recipe_path.write_text("\n".join(bomb) + "\nexperts: [./x, ./y]\nobjective:\n  type: *i\n  dev: d.jsonl\n")
    assert main([str(world.recipe_path)]) == 2
    line = error_line(capsys)
    assert len(line) < 400 and "objective type" in line  # the message does not expand it
    bomb.append("j: [" + ",".join(["*i"] * 40) + "]")  # over the alias budget
    world.recipe_path.write_text("\n".join(bomb) + "\nexperts: [./x, ./y]\n")
    assert main([str(world.recipe_path)]) == 2
    line = error_line(capsys)
    assert len(line) < 400 and "aliases" in line


def test_an_expert_folder_name_cannot_inject_markdown_into_the_card(world, tiny_experts):
    odd = world.dir / "experts" / "x|y <b>bold<b> [link](evil.example)"
    shutil.copytree(tiny_experts[0], odd)
    text = world.recipe_path.read_text().replace(f"  - {world.expert_paths[0]}\n", f"  - {json.dumps(str(odd))}\n")
    world.recipe_path.write_text(text)
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    card = (world.out / "README.md").read_text()
    import re

    prose = re.sub(r"(`{3,})yaml\n.*?\n\1", "", card, flags=re.S)  # code blocks are inert
    assert "<b>" not in prose and "](evil.example)" not in prose
    assert "&lt;b&gt;" in prose and "x\\|y" in prose


def test_markdown_escaping_and_fences():
    from swarm_merge.publish.card import fence, md

    assert md("a|b\nc") == "a\\|b c"
    assert md("<script>") == "&lt;script&gt;"
    assert md("[x](y)") == "\\[x\\]\\(y\\)"
    assert fence("no ticks") == "```" and fence("a ````` b") == "``````"


# ---------------------------------------------------------- 10. bad inputs


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _float8(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _bad_config(kind):
    def apply(w):
        cfg = w.expert_paths[1] / "config.json"
        if kind == "list":
            cfg.write_text("[1, 2]")
        elif kind == "latin1":
            cfg.write_bytes(json.dumps({"model_type": "llama", "name": "café"}, ensure_ascii=False).encode("latin-1"))
        else:  # remote code
            data = json.loads(cfg.read_text())
            data.update(model_type="my_secret_arch", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
            cfg.write_text(json.dumps(data))
    return apply


BAD_INPUTS = {
    "recipe not UTF-8": (lambda w: _write(w.recipe_path, w.recipe_path.read_bytes() + b"# \xff\xfe\n"), (),
                         "not UTF-8"),
    "config.json a list": (_bad_config("list"), (), "not an object"),
    "config.json not UTF-8": (_bad_config("latin1"), (), "not UTF-8"),
    "remote code": (_bad_config("remote"), (), "remote code"),
    "dev not UTF-8": (lambda w: _write(w.dir / "data" / "dev.jsonl", b'{"prompt": "caf\xe9", "answer": "1"}\n'), (),
                      "not UTF-8"),
    "dev number too long": (lambda w: _write(w.dir / "data" / "dev.jsonl",
                                             b'{"prompt": "1", "answer": ' + b"9" * 5000 + b"}\n"), (), ":1:"),
    "dev a FIFO": (lambda w: ((w.dir / "data" / "dev.jsonl").unlink(), os.mkfifo(w.dir / "data" / "dev.jsonl")), (),
                   "not a regular file"),
    "dev nested too deep": (lambda w: _write(w.dir / "data" / "dev.jsonl", b"[" * 200000 + b"\n"), (), ":1:"),
    "an unsupported dtype": (lambda w: _float8(w.expert_paths[2]), (), "cannot merge"),
    "seed -1": (None, ("--seed", "-1"), "swarm.seed"),
    "out under a file": (None, ("--out", "{dir}/data/dev.jsonl/out"), "lies under the file"),
    "out is a file": (None, ("--out", "{dir}/data/dev.jsonl"), "is a file"),
    "out in /proc": (None, ("--out", "/proc/self/x"), "system folder"),
    "out with NUL": (None, ("--out", "a\x00b"), "NUL"),
    "out too long": (None, ("--out", "x" * 300), "too long"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, capsys, case):
    setup, flags, message = BAD_INPUTS[case]
    if setup:
        setup(world)
    flags = [f.replace("{dir}", str(world.dir)) for f in flags]
    if "\x00" in "".join(flags):  # argv cannot carry NUL: the library call is the way in
        from swarm_merge import RunOptions, load_recipe, run
        from swarm_merge.errors import OutputError

        with pytest.raises(OutputError, match=message):
            run(load_recipe(world.recipe_path), RunOptions(out_dir=flags[1], progress=False))
    else:
        assert cli(world, *flags) == 2
        assert message in error_line(capsys)
    assert not world.out.exists()
    assert not any(p.name.startswith(".swarm") for p in world.dir.rglob("*"))


# --------------------------------------------------- the pushed run is portable


def test_push_folder_refuses_an_unfinished_run(world, capsys):
    assert cli(world, "--set", "swarm.max_iterations=1") == 0
    (world.out / "config.json").unlink()
    manifest = json.loads((world.out / output.MANIFEST_FILE).read_text())
    manifest["status"] = "publishing"
    (world.out / output.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main(["push", str(world.out), "--repo", "me/x"]) == 2
    assert "not a finished" in error_line(capsys)


def test_a_report_of_another_schema_version_is_refused_clearly(world, tmp_path):
    from swarm_merge.report import ReportError

    old = tmp_path / "swarm.json"
    old.write_text(json.dumps({"recipe": {}, "experts": [], "scores": {"rows": []}}))  # 0.1.0 had no schema_version
    with pytest.raises(ReportError, match="schema 1 but this swarm_merge reads schema 2"):
        read_report(old)


def test_the_checkpoint_and_report_never_hold_nan_even_from_torch(tmp_path):
    """Strict JSON is enforced at the writer, not only by the callers."""
    with pytest.raises(ValueError):
        output.write_json_atomic(tmp_path / "x.json", {"u": float(torch.tensor(float("nan")))})
    assert not list(tmp_path.iterdir())
