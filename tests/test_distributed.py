"""Several processes, one search (accelerate launch underneath, gloo on CPU).

The process boundary is what is tested, so these run the real command in
subprocesses: ``mergekit-swarm --num-processes 2`` against one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from swarm_merge import cli, distributed

pytestmark = pytest.mark.processes

REPO = Path(__file__).resolve().parents[1]

# A custom utility that can kill its own process (rank 1, at its 6th evaluation, past the initial swarm and
# its scouts; once) when KILL_MARKER names a file that does not exist yet: a rank dying mid-run.
CODE = '''
import os, signal

CALLS = [0]

def utility(model, tokenizer, rows, device):
    CALLS[0] += 1
    marker = os.environ.get("KILL_MARKER")
    if marker and os.environ.get("RANK") == "1" and CALLS[0] == 6 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    losses = []
    for row in rows:
        ids = tokenizer(row["prompt"] + row["answer"], return_tensors="pt")["input_ids"].to(device)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return -sum(losses) / len(losses)
'''


def command(recipe: Path, out: Path, *flags: str) -> list:
    return [sys.executable, "-m", "swarm_merge", str(recipe), "--out", str(out), "--no-progress", *flags]


def run(cmd, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "KILL_MARKER"}
    full.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=600)


def same_result(a: Path, b: Path) -> None:
    """Same coefficients, utilities, history and comparison (wall times aside)."""
    ra, rb = (json.loads((p / "swarm.json").read_text()) for p in (a, b))

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("seconds", "seconds_mean")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    assert ra["coefficients"] == rb["coefficients"]
    assert ra["scores"] == rb["scores"]
    assert strip(ra["search"]["history"]) == strip(rb["search"]["history"])
    assert ra["search"]["evaluations"] == rb["search"]["evaluations"]
    assert strip(ra.get("comparison")) == strip(rb.get("comparison"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    experts = tiny.make_experts(root / "models", 3)
    base = tiny.make_base(root / "models")
    recipe = tiny.write_recipe(root, experts, f"base_model: {base}\n")
    return root, recipe


def test_two_processes_equal_one_search_and_comparison(setup):
    root, recipe = setup
    one = run(command(recipe, root / "one", "--baselines"))
    assert one.returncode == 0, one.stderr
    two = run(command(recipe, root / "two", "--baselines", "--num-processes", "2"))
    assert two.returncode == 0, two.stderr
    same_result(root / "one", root / "two")
    # the main rank alone printed the table, and the comparison ran (spread too)
    assert two.stdout.count("swarm winner") == 1 and "CMA-ES" in two.stdout


def test_the_plan_counts_processes(setup):
    root, recipe = setup
    proc = run(command(recipe, root / "plan", "--dry-run", "--num-processes", "2"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("processes: 2 (2 on this machine)") == 1
    assert "memory below is per process" in proc.stdout
    assert not (root / "plan").exists()


def test_a_killed_rank_fails_the_run_cleanly_and_resume_finishes_it(setup):
    root, recipe = setup
    (root / "score.py").write_text(CODE)
    custom = root / "custom.yml"
    custom.write_text(recipe.read_text().replace("type: loglik", "type: custom"))
    code = ["--objective-code", f"{root / 'score.py'}:utility"]
    reference = run(command(custom, root / "ref", *code))
    assert reference.returncode == 0, reference.stderr

    out = root / "killed"
    killed = run(command(custom, out, *code, "--num-processes", "2"), KILL_MARKER=str(root / "killed.marker"))
    assert (root / "killed.marker").exists()  # rank 1 did die
    assert killed.returncode != 0
    # nothing that looks finished: no report, no weights, no card; the checkpoint is there
    assert not (out / "swarm.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / "README.md").exists()
    assert (out / "swarm-state.json").is_file()

    resumed = run(command(custom, out, *code, "--resume"))  # another number of processes: one
    assert resumed.returncode == 0, resumed.stderr
    same_result(root / "ref", out)


def test_num_processes_refusals(tiny_recipe, capsys):
    recipe = tiny_recipe()
    assert cli.main([str(recipe), "--num-processes", "0"]) == 2
    assert "--num-processes 0" in capsys.readouterr().err


def test_one_rank_maps_in_order_and_reports_each_item():
    seen = []
    ranks = distributed.Ranks()
    assert ranks.map(lambda x: x * x, [1, 2, 3], on_done=lambda i, r: seen.append((i, r))) == [1, 4, 9]
    assert seen == [(0, 1), (1, 4), (2, 9)]
    assert ranks.broadcast({"a": 1}) == {"a": 1} and ranks.is_main and not ranks.distributed


def test_two_machines_equal_one_process(setup):
    """Two launchers joined over 127.0.0.1 as machine 0 and 1 (accelerate's multi-node flags)."""
    root, recipe = setup
    one = run(command(recipe, root / "one-m"))
    assert one.returncode == 0, one.stderr
    port = str(distributed._free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "swarm_merge",
         *command(recipe, root / "two-m")[3:]],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "swarm winner" in outs[0][0] and "swarm winner" not in outs[1][0]  # machine 0 prints and writes
    same_result(root / "one-m", root / "two-m")


def _ranks(world: int, rank: int, local_world: int, monkeypatch) -> distributed.Ranks:
    from types import SimpleNamespace

    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    state = SimpleNamespace(num_processes=world, process_index=rank, local_process_index=rank % local_world)
    return distributed.Ranks(state)


@pytest.mark.parametrize("world, local_world", [(8, 8), (16, 8), (4, 2)])
def test_each_process_takes_the_gpu_of_its_local_rank(world, local_world, monkeypatch):
    """8 GPUs, one process each (one machine, or two machines of 8): rank r evaluates on
    cuda:(r mod processes per machine); CPU ranks stay on the CPU."""
    import torch

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    got = [distributed.device_for(cuda, _ranks(world, r, local_world, monkeypatch), gpus=local_world)
           for r in range(world)]
    assert got == [torch.device("cuda", r % local_world) for r in range(world)]
    assert all(distributed.device_for(cpu, _ranks(world, r, local_world, monkeypatch), gpus=0) == cpu
               for r in range(world))
    assert distributed.device_for(cuda, distributed.Ranks(), gpus=8) == cuda  # one process: the device asked for


def test_more_processes_than_gpus_or_a_gpu_index_with_several_is_refused(monkeypatch):
    import torch

    from swarm_merge.errors import InputError

    with pytest.raises(InputError, match=r"^8 processes on this machine but torch sees 4 GPU\(s\): one process per "
                                         r"GPU; launch at most 4 \(--num-processes 4\)$"):
        distributed.device_for(torch.device("cuda"), _ranks(8, 5, 8, monkeypatch), gpus=4)
    with pytest.raises(InputError, match=r"^--device cuda:1 with 2 processes: each process takes the GPU of its local "
                                         r"rank; pass --device cuda"):
        distributed.device_for(torch.device("cuda", 1), _ranks(2, 0, 2, monkeypatch), gpus=2)
