"""Custom utilities: Python code only from the --objective-code flag, never from a recipe."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from swarm_merge import cli, report as report_mod

CODE = '''
import torch

def utility(model, tokenizer, rows, device):
    """Minus the mean loss of each row's "text" (a hand-written utility)."""
    losses = []
    for row in rows:
        ids = tokenizer(row["text"], return_tensors="pt")["input_ids"].to(device)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return -sum(losses) / len(losses)

def not_a_number(model, tokenizer, rows, device):
    return "high"
'''


def recipe_with(tmp_path, experts, objective: str):
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", [{"text": f"{a}+{a}={2 * a}"} for a in range(6)])
    lines = "\n".join(f"  - {p}" for p in experts)
    path = tmp_path / "recipe.yml"
    path.write_text(f"name: custom\nexperts:\n{lines}\nobjective: {objective}\n"
                    f"swarm: {{size: 5, max_iterations: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    (tmp_path / "score.py").write_text(CODE)
    return path


def test_objective_code_scores_the_search_and_the_report_matches_it(tiny_experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_with(tmp_path, tiny_experts, "{type: custom, dev: data/dev.jsonl}")
    assert cli.main([str(recipe), "--objective-code", f"{tmp_path / 'score.py'}:utility"]) == 0
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    namespace = {}
    exec(CODE, namespace)  # the same function, run on the written model
    rows = [json.loads(line) for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines()]
    with torch.inference_mode():
        want = namespace["utility"](model, tok, rows, torch.device("cpu"))
    assert report.scores.winner.dev.utility == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("objective, flag, code, message", [
    ("{type: custom, dev: data/dev.jsonl, code: 'score.py:utility'}", None, 2, "pass --objective-code"),
    ("{type: loglik, dev: data/dev.jsonl, function: utility}", None, 2, "--objective-code"),
    ("{type: custom, dev: data/dev.jsonl}", None, 2, "needs the Python function"),
    ("{type: loglik, dev: data/dev.jsonl}", "score.py:utility", 2, "no objective has type: custom"),
    ("{type: custom, dev: data/dev.jsonl}", "score.py:missing", 2, "defines no function 'missing'"),
    ("{type: custom, dev: data/dev.jsonl}", "nowhere.py:utility", 2, "not found"),
    ("{type: custom, dev: data/dev.jsonl}", "score.py:not_a_number", 1, "not a number"),
])
def test_code_never_comes_from_a_recipe_and_flag_errors_are_one_line(objective, flag, code, message, tiny_experts,
                                                                     tmp_path, capsys):
    recipe = recipe_with(tmp_path, tiny_experts, objective)
    args = [str(recipe)] + (["--objective-code", str(tmp_path / flag.split(":")[0]) + ":" + flag.split(":")[1]]
                            if flag else [])
    assert cli.main(args) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("mergekit-swarm: error")]
    assert len(err) == 1 and message in err[0], err
    if code == 2:
        assert not (tmp_path / "out").exists()
