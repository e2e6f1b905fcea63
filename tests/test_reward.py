"""type: reward: greedy responses scored by a reward model (a tiny one built here)."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from swarm_merge import cli, report as report_mod


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return tiny.make_reward_model(tmp_path_factory.mktemp("reward"))


def write(tmp_path, experts, objective: str):
    tiny.write_jsonl(tmp_path / "data" / "dev.jsonl", [{"prompt": f"{a}+{a}="} for a in range(6)])
    lines = "\n".join(f"  - {p}" for p in experts)
    path = tmp_path / "recipe.yml"
    path.write_text(f"name: reward\nexperts:\n{lines}\nobjective: {objective}\n"
                    f"swarm: {{size: 5, max_iterations: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return path


def test_reward_is_the_mean_reward_of_the_greedy_responses(tiny_experts, reward_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    recipe = write(tmp_path, tiny_experts, f"{{type: reward, dev: data/dev.jsonl, reward_model: {reward_model}, "
                                           "max_new_tokens: 3}")
    assert cli.main([str(recipe)]) == 0
    from swarm_merge import objectives

    assert not objectives.judges._OBJECTIVE_MODELS  # the reward model is not held after the run
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    assert report.objective_models and report.objective_models[0].revision is None
    # By hand: each prompt alone (no padding), greedy, then the reward head's score of prompt + response.
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    rm_tok = AutoTokenizer.from_pretrained(reward_model)
    rewards = []
    with torch.inference_mode():
        for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            new = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            text = prompt + tok.decode(new, skip_special_tokens=True)
            rewards.append(rm(**rm_tok(text, return_tensors="pt")).logits[0, 0].item())
    assert report.scores.winner.dev.utility == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)


@pytest.mark.parametrize("objective, message", [
    ("{type: reward, dev: data/dev.jsonl}", "needs reward_model"),
    ("{type: loglik, dev: data/dev.jsonl, reward_model: x/y}", "reward_model applies to type: reward"),
    ("{type: reward, dev: data/dev.jsonl, reward_model: TWO}", "has 2 outputs"),
])
def test_reward_refusals(objective, message, tiny_experts, reward_model, tmp_path, capsys):
    import shutil

    two = tmp_path / "two"
    shutil.copytree(reward_model, two)
    config = json.loads((two / "config.json").read_text())
    config.pop("num_labels", None)
    config["id2label"] = {"0": "a", "1": "b"}
    config["label2id"] = {"a": 0, "b": 1}
    (two / "config.json").write_text(json.dumps(config))
    recipe = write(tmp_path, tiny_experts, objective.replace("TWO", str(two)))
    assert cli.main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ------------------------------------------------------------------- the judge


RUBRIC = "Question: {prompt}\nAnswer: {response}\nHow good is the answer, 1 to 3? Rating:"


def test_judge_is_the_mean_expected_rating_of_the_greedy_responses(tiny_experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = tiny.make_base(tmp_path, name="judge")
    recipe = write(tmp_path, tiny_experts, f"{{type: judge, dev: data/dev.jsonl, judge_model: {judge}, "
                                           f"rubric: {json.dumps(RUBRIC)}, scale: [1, 3], max_new_tokens: 3}}")
    assert cli.main([str(recipe)]) == 0
    report = report_mod.read(tmp_path / "out" / "swarm.json")
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    jm = AutoModelForCausalLM.from_pretrained(judge).eval()
    jt = AutoTokenizer.from_pretrained(judge)
    expected = []
    with torch.inference_mode():
        for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            new = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            response = tok.decode(new, skip_special_tokens=True).strip()
            context = RUBRIC.replace("{prompt}", prompt).replace("{response}", response).rstrip() + "\n"
            logps = []
            for r in (1, 2, 3):
                ctx = jt(context)["input_ids"]
                cont = jt(str(r), add_special_tokens=False)["input_ids"]
                logits = jm(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
                logps.append(sum(logits[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            probs = torch.softmax(torch.tensor(logps, dtype=torch.float64), 0)
            expected.append(float((probs * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()))
    assert report.scores.winner.dev.utility == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert 1 <= report.scores.winner.dev.utility <= 3


@pytest.mark.parametrize("extra, message", [
    ("", "needs rubric"),
    (", rubric: 'no placeholder'", "needs rubric"),
    (", rubric: '{response}', scale: [3, 1]", "scale [3, 1]"),
])
def test_judge_refusals(extra, message, tiny_experts, tmp_path, capsys):
    recipe = write(tmp_path, tiny_experts, "{type: judge, dev: data/dev.jsonl, judge_model: ./j" + extra + "}")
    assert cli.main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
