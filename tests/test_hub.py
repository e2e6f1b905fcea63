"""Pull and push through a Hub-compatible server, with the real huggingface_hub
client and the real CLI in subprocesses (HF_ENDPOINT must be set before
huggingface_hub is imported).

Experts live on the server with two commits each, so a pinned revision pulls
different weights than ``main``; a run pulls them by tag, by sha and by branch,
pushes its winner, and the pushed repo is read back as a Hub user would.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

import tiny  # noqa: E402

pytestmark = pytest.mark.hub

# A distinctive token, so that finding it anywhere in the outputs means a leak.
TOKEN = "hf_swarmCanaryToken8f3a1c"
RESULT_MARK = "@@RESULT@@"
REPO = "swarm/tiny-merge"


@pytest.fixture(scope="module")
def hub():
    with HubServer(valid_tokens=(TOKEN,)) as server:
        yield server


def card_readme(license: str = "apache-2.0") -> str:
    return f"---\nlicense: {license}\ntags:\n- tiny\n---\n\n# a tiny expert\n"


def folder_files(folder: Path, **extra) -> dict:
    files = {p.name: p for p in Path(folder).iterdir() if p.is_file()}
    files.update(extra)
    return files


@pytest.fixture(scope="module")
def hub_experts(hub, tiny_experts, tmp_path_factory):
    """Three experts on the server, each with an older and a newer commit.

    The recipe asks for expert-a by tag v1 (older commit), expert-b by the sha
    of its older commit, expert-c at main (newer commit); the commits it should
    get hold tiny_experts 0, 1 and 2 in that order.
    """
    e0, e1, e2 = tiny_experts
    readme = card_readme()
    shas = {}
    shas["a"] = hub.add_repo("org/expert-a", folder_files(e0, **{"README.md": readme}), revision_tag="v1")
    hub.add_repo("org/expert-a", folder_files(e1, **{"README.md": readme}), message="newer weights")
    shas["b"] = hub.add_repo("org/expert-b", folder_files(e1, **{"README.md": readme}))
    hub.add_repo("org/expert-b", folder_files(e2, **{"README.md": readme}), message="newer weights")
    hub.add_repo("org/expert-c", folder_files(e0, **{"README.md": readme}))
    shas["c"] = hub.add_repo("org/expert-c", folder_files(e2, **{"README.md": readme}), message="newer weights")
    # Repos for the error cases.
    hub.add_repo("org/gated", folder_files(e0), gated=True)
    hub.add_repo("org/private", folder_files(e0), private=True)
    hub.add_repo("org/no-weights", {"config.json": (e0 / "config.json").read_bytes(), "README.md": readme})
    pickled = tmp_path_factory.mktemp("pickled")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(e1 / name, pickled / name)
    torch.save(load_file(str(e1 / "model.safetensors")), pickled / "pytorch_model.bin")
    shas["bin"] = hub.add_repo("org/only-bin", pickled)
    wide = tmp_path_factory.mktemp("wide")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny.make_config(300, layers=2, hidden=48)).save_pretrained(wide)
    hub.add_repo("org/wide", folder_files(wide))
    return shas


EXPERTS = (
    "  - org/expert-a@v1\n"
    "  - {{model: org/expert-b, revision: {b}}}\n"
    "  - org/expert-c\n"
)


def write_recipe(tmp_path: Path, experts: str, extra: str = "") -> Path:
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", tiny.arithmetic_rows(8))
    tiny.write_jsonl(tmp_path / "data" / "test.jsonl", tiny.arithmetic_rows(8, offset=5))
    text = (
        f"name: tiny-merge\nexperts:\n{experts}"
        "objective:\n  type: loglik\n  dev: data/dev.jsonl\n  test: data/test.jsonl\n  batch_size: 64\n"
        "swarm:\n  size: 4\n  max_iterations: 1\n"
        f"output:\n  dir: {tmp_path / 'out'}\n" + extra
    )
    path = tmp_path / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    return path


def hub_env(hub: HubServer, home: Path, token: str | None = TOKEN, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def cli(hub: HubServer, home: Path, *args, token: str | None = TOKEN, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm_merge.cli", *map(str, args)],
                          env=hub_env(hub, home, token, **extra), capture_output=True, text=True, timeout=300)


def client(hub: HubServer, home: Path, code: str) -> object:
    """Run ``code`` with the real client in a subprocess; it calls report(obj)."""
    prelude = f"import json\ndef report(obj):\n    print({RESULT_MARK!r} + json.dumps(obj), flush=True)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=hub_env(hub, home),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    return json.loads(lines[-1][len(RESULT_MARK):])


def error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mergekit-swarm: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def assert_affine_merge(folder: Path, expert_folders, coefficients) -> None:
    merged = load_file(str(folder / "model.safetensors"))
    experts = [load_file(str(Path(p) / "model.safetensors")) for p in expert_folders]
    for name, tensor in merged.items():
        want = sum(float(c) * e[name].double() for c, e in zip(coefficients, experts))
        assert torch.allclose(tensor.double(), want, atol=1e-5), name


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


# --------------------------------------------------------------- pull + push


@pytest.fixture(scope="module")
def pushed(hub, hub_experts, tmp_path_factory):
    """One run over Hub experts that pushes its winner; (out dir, process, hf home)."""
    tmp = tmp_path_factory.mktemp("pushed")
    recipe = write_recipe(tmp, EXPERTS.format(b=hub_experts["b"]),
                          f"  push_to_hub: {REPO}\n  private: false\n")
    proc = cli(hub, tmp / "home", recipe)
    assert proc.returncode == 0, proc.stderr
    assert not hub.errors, hub.errors
    return tmp / "out", proc, tmp / "home"


def test_experts_pulled_at_the_pinned_commits_which_are_recorded(pushed, hub_experts, tiny_experts):
    out, proc, home = pushed
    report = json.loads((out / "swarm.json").read_text())
    experts = report["experts"]
    assert [e["model"] for e in experts] == ["org/expert-a", "org/expert-b", "org/expert-c"]
    # A tag and a branch are recorded as the commit they resolved to.
    assert [e["revision"] for e in experts] == [hub_experts["a"], hub_experts["b"], hub_experts["c"]]
    assert [e["requested_revision"] for e in experts] == ["v1", hub_experts["b"], None]
    assert all(not e["local"] and e["license"] == "apache-2.0" for e in experts)
    # The weights are those of the pinned commits, not of main.
    assert_affine_merge(out, tiny_experts, report["coefficients"]["model"])
    # The card names every commit; mergekit_config.yml pins them in full.
    card = (out / "README.md").read_text()
    for e in experts:
        assert f"https://huggingface.co/{e['model']}/tree/{e['revision']}" in card
    models = [m["model"] for m in yaml.safe_load((out / "mergekit_config.yml").read_text())["models"]]
    assert models == [f"{e['model']}@{e['revision']}" for e in experts]
    # Only safetensors, configs, tokenizer and card were downloaded: no pickles, no code.
    cached = [p.name for p in (home / "hub").rglob("*") if p.is_file() or p.is_symlink()]
    assert any(n == "model.safetensors" for n in cached)
    assert not [n for n in cached if n.endswith((".bin", ".py", ".pt"))]


def test_pushed_repo_reads_back_as_a_hub_user_would(pushed, hub, tmp_path):
    out, proc, _ = pushed
    report = json.loads((out / "swarm.json").read_text())
    files = hub.list_files(REPO)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "swarm.json",
            "mergekit_config.yml", "swarm_history.png"} <= set(files)
    assert "swarm-state.json" not in files and not any(f.startswith(".staging") for f in files)
    message = hub.commit_message(REPO)
    winner = next(r for r in report["scores"]["rows"] if r["kind"] == "winner")
    assert "org/expert-a" in message and f"dev {winner['dev']['utility']:.4f}" in message
    assert f"test {winner['test']['utility']:.4f}" in message
    assert f"pushed to {REPO}" in proc.stdout

    got = client(hub, tmp_path / "home", f"""
        from huggingface_hub import HfApi, ModelCard, snapshot_download
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = snapshot_download({REPO!r})
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("1+2=", return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] - ids["input_ids"].shape[1]
        card = ModelCard.load({REPO!r})
        report(dict(new=new, data=card.data.to_dict(), text=card.text,
                    private=HfApi().model_info({REPO!r}).private))
    """)
    assert got["new"] == 2 and got["private"] is False
    data = got["data"]
    assert data["base_model"] == ["org/expert-a", "org/expert-b", "org/expert-c"]
    assert data["base_model_relation"] == "merge"
    assert {"merge", "mergekit", "model-swarms", "swarm_merge"} <= set(data["tags"])
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    # No evaluation results in the metadata (the Hub lists those as benchmark results); the table has them.
    assert "model-index" not in data and "eval_results" not in data
    text = got["text"]
    assert f"| **swarm winner** | {winner['dev']['utility']:.4f} | {winner['test']['utility']:.4f} |" in text
    # The recipe as written, each expert pinned to the commit it resolved to; no unset defaults.
    block = text.split("The recipe, as run")[1].split("```yaml")[1].split("```")[0]
    written = yaml.safe_load(block)
    assert written["experts"] == [f"{e['model']}@{e['revision']}" for e in report["experts"]]
    assert "reward_model" not in block and "rubric" not in block and "lora_space" not in block
    assert "](swarm_history.png)" in text and f'from_pretrained("{REPO}")' in text
    assert "| **swarm winner** |" in text and "| uniform average |" in text and "add (test)" in text
    assert "mergekit_config.yml" in text and "feng2025modelswarms" in text


def test_token_never_written_or_printed(pushed, hub):
    out, proc, _ = pushed
    assert TOKEN in hub.tokens_seen  # it was used...
    assert_no_token(proc.stdout, proc.stderr)  # ...and never shown or written
    for f in out.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_push_subcommand_to_another_repo_points_the_card_there(pushed, hub, tmp_path):
    out, _, _ = pushed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = cli(hub, tmp_path / "home", "push", copy, "--repo", "swarm/elsewhere")
    assert proc.returncode == 0, proc.stderr
    readme = hub.read_file("swarm/elsewhere", "README.md").decode()
    assert 'from_pretrained("swarm/elsewhere")' in readme and f'from_pretrained("{REPO}")' not in readme
    assert hub.read_file("swarm/elsewhere", "swarm.json") == (copy / "swarm.json").read_bytes()
    assert "swarm-state.json" not in hub.list_files("swarm/elsewhere")
    assert_no_token(proc.stdout, proc.stderr)


def test_failed_push_keeps_the_output_then_push_succeeds(hub, hub_experts, tmp_path):
    recipe = write_recipe(tmp_path, EXPERTS.format(b=hub_experts["b"]), "  push_to_hub: swarm/retry\n")
    # The commit endpoint answers 500 once (the client does not retry it): the
    # repo is created and the blobs uploaded, then the commit fails.
    fault = hub.fail_next("/api/models/swarm/retry/commit/", status=500)
    proc = cli(hub, tmp_path / "home", recipe)
    assert fault.hits == 1
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    out = tmp_path / "out"
    assert "HTTP 500" in line and f"mergekit-swarm push {out} --repo swarm/retry" in line
    assert hub.repo_exists("swarm/retry") and "model.safetensors" not in hub.list_files("swarm/retry")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"swarm.json", "model.safetensors", "README.md", "swarm-state.json"} <= set(before)

    again = cli(hub, tmp_path / "home", "push", out, "--repo", "swarm/retry")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # same repo: card unchanged
    assert hub.read_file("swarm/retry", "model.safetensors") == before["model.safetensors"]
    assert hub.read_file("swarm/retry", "README.md") == before["README.md"]
    # The recipe's output.private (default true) applies to the repo it created.
    assert client(hub, tmp_path / "h2", "from huggingface_hub import HfApi\n"
                  "report(HfApi().model_info('swarm/retry').private)") is True
    assert_no_token(proc.stdout, proc.stderr, again.stdout, again.stderr)


def test_push_refuses_a_folder_that_is_not_a_finished_run(hub, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "swarm-state.json").write_text("{}")
    proc = cli(hub, tmp_path / "home", "push", tmp_path / "half", "--repo", "swarm/never")
    assert proc.returncode == 2
    assert "no swarm.json" in error_line(proc)
    assert not hub.repo_exists("swarm/never")


def test_push_without_a_token_says_how_to_log_in(pushed, hub, tmp_path):
    out, _, _ = pushed
    proc = cli(hub, tmp_path / "home", "push", out, "--repo", "swarm/no-token", token=None)
    assert proc.returncode == 2  # a missing input, as before a run (test_cli)
    line = error_line(proc)
    assert "no Hub token" in line and "HF_TOKEN" in line and "mergekit-swarm push" in line
    assert not hub.repo_exists("swarm/no-token")


# ---------------------------------------------------------------- pull errors


@pytest.mark.parametrize("expert, env, code, message", [
    ("org/nope", {}, 2, "repo 'org/nope' not found on the Hub"),
    ("org/gated", {}, 2, "is gated and this token has no access"),
    ("org/private", {"HF_TOKEN": "hf_someoneElsesToken1"}, 2, "not found on the Hub (or private without access)"),
    ("org/expert-a@v9", {}, 2, "revision 'v9' not found in 'org/expert-a'"),
    ("org/only-bin", {}, 2, "allow_pickle: true"),
    ("org/no-weights", {}, 2, "has no *.safetensors weights"),
    ("org/expert-a@v1", {"HF_HUB_OFFLINE": "1"}, 2, "not in the local cache and HF_HUB_OFFLINE is set"),
    ("org/expert-a@v1", {"fault": "/api/models/org/expert-a"}, 1, "the Hub answered HTTP 503; retry later"),
], ids=["not-found", "gated", "private", "revision", "pickle-only", "no-weights", "offline", "server-error"])
def test_pull_errors_exit_with_one_clear_line(expert, env, code, message, hub, hub_experts, tmp_path):
    env = dict(env)
    if "fault" in env:
        hub.fail_next(env.pop("fault"), status=503, times=1, method="GET")
    recipe = write_recipe(tmp_path, f"  - {expert}\n  - org/expert-c\n")
    proc = cli(hub, tmp_path / "home", recipe, **env)
    hub.clear_faults()
    assert proc.returncode == code, proc.stderr
    assert message in error_line(proc)
    assert not (tmp_path / "out").exists()
    assert_no_token(proc.stdout, proc.stderr)


def test_download_cut_for_good_exits_1_and_the_next_run_pulls(hub, hub_experts, tmp_path):
    home = tmp_path / "home"
    recipe = write_recipe(tmp_path, "  - org/expert-a@v1\n  - org/expert-c\n")
    # Every download from the repo is cut after 1000 bytes, past the client's retries.
    fault = hub.fail_next("/org/expert-a/resolve/", method="GET", truncate_after=1000, times=100)
    proc = cli(hub, home, recipe)
    hub.clear_faults()
    assert fault.hits > 1
    assert proc.returncode == 1
    assert "the connection to the Hub broke" in error_line(proc) and "run again" in error_line(proc)
    assert not (tmp_path / "out").exists()
    got = client(hub, home, """
        from swarm_merge.experts import pull_expert
        from swarm_merge.recipe import ExpertRef
        report(pull_expert(ExpertRef(model="org/expert-a", revision="v1")).revision)
    """)
    assert got == hub_experts["a"]


def test_offline_run_uses_the_cache_of_an_earlier_pull(hub, hub_experts, tmp_path):
    home = tmp_path / "home"
    recipe = write_recipe(tmp_path, EXPERTS.format(b=hub_experts["b"]))
    # A dry run online fetches only the small files: not enough to run offline.
    assert cli(hub, home, recipe, "--dry-run").returncode == 0
    offline = cli(hub, home, recipe, "--dry-run", HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and "not in the local cache" in error_line(offline)
    # After a real pull, the cache serves the same refs (tag, sha, branch) offline.
    client(hub, home, f"""
        from swarm_merge.experts import pull_experts
        from swarm_merge.recipe import ExpertRef
        pull_experts([ExpertRef(model="org/expert-a", revision="v1"),
                      ExpertRef(model="org/expert-b", revision={hub_experts["b"]!r}),
                      ExpertRef(model="org/expert-c")])
        report(None)
    """)
    offline = cli(hub, home, recipe, "--dry-run", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    for key in ("a", "b", "c"):
        assert hub_experts[key] in offline.stdout
    assert "HF_HUB_OFFLINE is set; using the cached snapshot" in offline.stderr


# ------------------------------------------------------------------- dry run


def test_dry_run_resolves_commits_and_sizes_without_downloading_weights(hub, hub_experts, tmp_path):
    recipe = write_recipe(tmp_path, EXPERTS.format(b=hub_experts["b"]))
    hub.clear_log()
    proc = cli(hub, tmp_path / "home", recipe, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for key in ("a", "b", "c"):
        assert hub_experts[key] in proc.stdout
    assert "(asked v1)" in proc.stdout and "download 1" in proc.stdout and "weights 1" in proc.stdout
    assert "dry run: nothing was written" in proc.stdout and not (tmp_path / "out").exists()
    # Weights were only touched by ranged reads of their headers.
    weight_gets = [r for r in hub.request_log if r.method == "GET" and r.path.endswith(".safetensors")]
    assert weight_gets and all(r.header("range") for r in weight_gets)
    assert not list((tmp_path / "home").rglob("*.safetensors"))

    # Incompatible shapes are found from the headers too, before any download.
    bad = write_recipe(tmp_path, "  - org/expert-a@v1\n  - org/wide\n")
    proc = cli(hub, tmp_path / "home", bad, "--dry-run")
    assert proc.returncode == 2 and "has shape" in error_line(proc)
    assert not list((tmp_path / "home").rglob("*.safetensors"))


def test_allow_pickle_converts_bin_weights_with_the_weights_only_loader(hub, hub_experts, tiny_experts, tmp_path):
    got = client(hub, tmp_path / "home", """
        from swarm_merge.experts import pull_experts
        from swarm_merge.recipe import ExpertRef
        experts = pull_experts([ExpertRef(model="org/only-bin"), ExpertRef(model="org/expert-a", revision="v1")],
                               allow_pickle=True)
        e = experts[0]
        report(dict(path=str(e.path), revision=e.revision, pickled=e.pickled,
                    files=sorted(p.name for p in e.path.iterdir())))
    """)
    assert got["revision"] == hub_experts["bin"] and got["pickled"] is True
    assert "model.safetensors" in got["files"] and "config.json" in got["files"]
    assert not [f for f in got["files"] if f.endswith(".bin")]
    converted = load_file(str(Path(got["path"]) / "model.safetensors"))
    original = load_file(str(tiny_experts[1] / "model.safetensors"))
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[n], original[n]) for n in original)
    # A dry run sizes the pickled expert from the listing, without downloading it.
    recipe = write_recipe(tmp_path, "  - org/only-bin\n  - org/expert-a@v1\n", "allow_pickle: true\n")
    proc = cli(hub, tmp_path / "dry", recipe, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert hub_experts["bin"] in proc.stdout and "pickled weights (allow_pickle)" in proc.stdout
    assert not list((tmp_path / "dry").rglob("*.bin"))


def test_hub_failures_are_told_apart_honestly():
    """snapshot_download reports every failure to reach the Hub as LocalEntryNotFoundError
    once the cache cannot help; the cause decides: a server error is not "offline"."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    from swarm_merge.experts import hub
    from swarm_merge.errors import ExpertError, HubError
    from swarm_merge.recipe import ExpertRef

    ref = ExpertRef(model="org/x", revision="v1")
    response = httpx2.Response(502, request=httpx2.Request("GET", "http://hub.invalid/api/models/org/x"))

    def raised(cause: Exception, exc: Exception | None = None) -> Exception:
        try:
            with hub._pull_errors(ref, "expert"):
                if exc is None:
                    raise cause
                raise exc from cause
        except Exception as got:  # noqa: BLE001 - the mapping is what is tested
            return got
        raise AssertionError("nothing raised")

    local = hf_errors.LocalEntryNotFoundError("cannot find the requested files")
    server = raised(hf_errors.HfHubHTTPError("Bad Gateway", response=response), local)
    assert isinstance(server, HubError) and "HTTP 502" in str(server)
    offline = raised(hf_errors.OfflineModeIsEnabled("offline"), local)
    assert isinstance(offline, hub.HubUnreachable) and "HF_HUB_OFFLINE" in offline.reason
    down = raised(httpx2.ConnectError("refused"), local)
    assert isinstance(down, hub.HubUnreachable) and "cannot connect" in down.reason
    refused = raised(hf_errors.HfHubHTTPError("Unauthorized", response=httpx2.Response(401, request=response.request)))
    assert isinstance(refused, ExpertError) and "HF_TOKEN" in str(refused)
    message = str(hub.unreachable_error(ref, offline.reason))
    assert "not in the local cache" in message and "unset HF_HUB_OFFLINE" in message


def test_push_destination_is_checked_before_the_search(tmp_path):
    from swarm_merge.errors import RecipeError
    from swarm_merge.recipe import load_recipe

    recipe = write_recipe(tmp_path, "  - org/expert-a\n  - org/expert-b\n", "  push_to_hub: not a repo\n")
    with pytest.raises(RecipeError, match="output.push_to_hub: 'not a repo' is not a Hub repo id; write org/name"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["output.push_to_hub=org/merged"]).output.push_to_hub == "org/merged"


def test_sharded_pickled_local_folder_with_tied_weights_converts(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from swarm_merge.errors import ExpertError
    from swarm_merge.experts import pull_expert
    from swarm_merge.recipe import ExpertRef

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    source = tiny.make_experts(tmp_path / "src", 1, tie=True)[0]
    model = AutoModelForCausalLM.from_pretrained(source)
    state = model.state_dict()  # lm_head.weight and embed_tokens.weight share storage
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))

    with pytest.raises(ExpertError, match="allow_pickle: true"):
        pull_expert(ExpertRef(model=str(folder)))
    expert = pull_expert(ExpertRef(model=str(folder)), allow_pickle=True)
    assert expert.pickled and expert.path != folder and Path(constants.HF_HOME) in expert.path.parents
    assert sorted(p.name for p in expert.path.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(expert.tensors) == set(state)
    reloaded = AutoModelForCausalLM.from_pretrained(expert.path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    # A second pull reuses the conversion.
    mtime = (expert.path / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    again = pull_expert(ExpertRef(model=str(folder)), allow_pickle=True)
    assert again.path == expert.path
    assert (again.path / "model-00001-of-00002.safetensors").stat().st_mtime_ns == mtime


# ------------------------------------------- sharded repos, stray weight files


@pytest.fixture(scope="module")
def sharded_repos(hub, hub_experts, tiny_experts, tmp_path_factory):
    """org/sharded: two shards, their index and a consolidated.safetensors holding the same
    tensors again (as many Mistral-style repos); plus repos a pull must refuse before any
    weight moves. Returns (local copy of org/sharded, its weight_map)."""
    from test_experts import REMOTE_MAP, make_sharded

    folder = tmp_path_factory.mktemp("sharded") / "repo"
    weight_map = make_sharded(tiny_experts[0], folder)
    hub.add_repo("org/sharded", folder_files(folder, **{"README.md": card_readme()}))
    config = json.loads((folder / "config.json").read_text())
    hub.add_repo("org/remote-code", folder_files(folder, **{
        "config.json": json.dumps({**config, "model_type": "swarmy", "auto_map": REMOTE_MAP}),
        "modeling_swarmy.py": "raise SystemExit('remote code ran')\n"}))
    files = folder_files(folder)
    del files["model-00002-of-00002.safetensors"]
    hub.add_repo("org/missing-shard", files)
    return folder, weight_map


def weight_requests(hub: HubServer, repo: str) -> list:
    return [r for r in hub.request_log if r.path.startswith(f"/{repo}/resolve/") and r.path.endswith(".safetensors")]


def pulled_bytes(hub: HubServer, repo: str) -> int:
    """Bytes of the files a pull of a sharded repo takes: the small files and the two shards."""
    from swarm_merge.experts import SMALL_PATTERNS
    from test_experts import SHARDS

    return sum(len(data) for name, data in hub.files(repo).items()
               if name in SHARDS or any(fnmatch.fnmatch(name, p) for p in SMALL_PATTERNS))


def test_a_sharded_repo_pulls_only_the_indexed_shards(hub, sharded_repos, tiny_experts, tmp_path):
    from test_experts import SHARDS, one_copy

    folder, weight_map = sharded_repos
    hub.clear_log()
    code = """
        from pathlib import Path
        from swarm_merge.experts import pull_expert
        from swarm_merge.recipe import ExpertRef
        e = pull_expert(ExpertRef(model="org/sharded"))
        # TensorInfo.file is the resolved path: a blob of the cache, which the snapshot links to.
        names = {str(p.resolve()): p.name for p in e.path.iterdir()}
        report(dict(params=e.num_parameters, nbytes=e.nbytes, download=e.download_bytes, revision=e.revision,
                    shards={n: names[t.file] for n, t in e.tensors.items()},
                    listing=sorted(p.name for p in e.path.iterdir())))
    """
    got = client(hub, tmp_path / "home", code)
    params, nbytes = one_copy(tiny_experts[0])
    assert got["params"] == params and got["nbytes"] == nbytes  # one copy of the weights, not two
    assert got["shards"] == weight_map
    assert "consolidated.safetensors" not in got["listing"] and set(SHARDS) <= set(got["listing"])
    # The stray copy was never asked for; each shard was downloaded whole, once.
    assert not [r for r in hub.request_log if "consolidated" in r.path]
    gets = [r.path.rsplit("/", 1)[-1] for r in weight_requests(hub, "org/sharded") if r.method == "GET"]
    assert sorted(gets) == sorted(SHARDS)
    assert got["download"] == pulled_bytes(hub, "org/sharded")

    # Offline, the cache of that pull is complete without the stray copy.
    hub.clear_log()
    offline = client(hub, tmp_path / "home", "import os\nos.environ['HF_HUB_OFFLINE'] = '1'\n" + textwrap.dedent(code))
    assert offline["revision"] == got["revision"] and offline["shards"] == weight_map
    assert not hub.request_log


def test_a_dry_run_of_a_sharded_repo_reads_only_the_indexed_headers(hub, sharded_repos, hub_experts, tiny_experts,
                                                                    tmp_path):
    from swarm_merge.experts import human_bytes
    from test_experts import SHARDS, one_copy

    recipe = write_recipe(tmp_path, "  - org/sharded\n  - org/expert-a@v1\n")
    hub.clear_log()
    proc = cli(hub, tmp_path / "home", recipe, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    params, nbytes = one_copy(tiny_experts[0])
    line = next(line for line in proc.stdout.splitlines() if "org/sharded @" in line)
    assert f"weights {human_bytes(nbytes)}," in line, proc.stdout
    assert f"download {human_bytes(pulled_bytes(hub, 'org/sharded'))}" in line, proc.stdout
    assert f"{params / 1e6:.1f}M parameters each" in proc.stdout
    assert not [r for r in hub.request_log if "consolidated" in r.path]
    reads = weight_requests(hub, "org/sharded")
    assert {r.path.rsplit("/", 1)[-1] for r in reads if r.method == "GET"} == set(SHARDS)
    assert all(r.header("range") for r in reads if r.method == "GET")  # headers only
    assert not list((tmp_path / "home").rglob("*.safetensors"))


@pytest.mark.parametrize("repo, message", [
    ("org/remote-code", "needs remote code (trust_remote_code), which swarm_merge never runs; "),
    ("org/missing-shard", "names shard 'model-00002-of-00002.safetensors', which the repo does not have at "),
], ids=["remote-code", "missing-shard"])
def test_a_repo_refused_from_its_small_files_downloads_no_weights(repo, message, hub, sharded_repos, tmp_path):
    recipe = write_recipe(tmp_path, f"  - {repo}\n  - org/expert-c\n")
    hub.clear_log()
    proc = cli(hub, tmp_path / "home", recipe)
    assert proc.returncode == 2, proc.stderr
    assert message in error_line(proc)
    assert not weight_requests(hub, repo)
    assert not [r for r in hub.request_log if r.path.endswith(".py")]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- LoRA adapters


def test_adapters_from_the_hub_pinned_with_their_base_resolved_and_pushed(hub, tmp_path):
    """Adapters on the server (one pinned by tag to its older commit); the base comes from
    their adapter_config.json, is pulled from the server, and the pushed repo holds the
    adapter and the merged model, which a Hub user loads."""
    base = tiny.make_base(tmp_path / "models")
    old, new, other = tiny.make_adapters(tmp_path / "models", base, 3, base_name="org/tiny-base")
    base_sha = hub.add_repo("org/tiny-base", folder_files(base, **{"README.md": card_readme()}))
    pinned = hub.add_repo("org/adapter-x", folder_files(old), revision_tag="v1")
    hub.add_repo("org/adapter-x", folder_files(new), message="newer adapter")
    hub.add_repo("org/adapter-y", folder_files(other))
    repo = "swarm/tiny-lora"
    recipe = write_recipe(tmp_path, "  - org/adapter-x@v1\n  - org/adapter-y\n",
                          f"  push_to_hub: {repo}\n  private: false\n  merge_adapter: true\n")
    proc = cli(hub, tmp_path / "home", recipe)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "swarm.json").read_text())
    assert report["base_model"]["model"] == "org/tiny-base" and report["base_model"]["revision"] == base_sha
    assert report["experts"][0]["revision"] == pinned and report["experts"][0]["adapter"]["r"] == 4
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert written and all(k.startswith("base_model.model.") for k in written)
    files = set(hub.list_files(repo))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "swarm.json",
            "merged/config.json", "merged/model.safetensors", "merged/README.md"} <= files
    assert "swarm-state.json" not in files and "config.json" not in files
    got = client(hub, tmp_path / "home2", f"""
        import torch
        from huggingface_hub import ModelCard, snapshot_download
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained("org/tiny-base")
        model = PeftModel.from_pretrained(base, {repo!r})
        path = snapshot_download({repo!r}, allow_patterns="merged/*")
        merged = AutoModelForCausalLM.from_pretrained(f"{{path}}/merged")
        ids = torch.tensor([[5, 17, 42, 9]])
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
        card = ModelCard.load({repo!r})
        report(dict(diff=diff, data=card.data.to_dict()))
    """)
    assert got["diff"] < 1e-5
    assert got["data"]["base_model"] == "org/tiny-base" and got["data"]["base_model_relation"] == "adapter"
