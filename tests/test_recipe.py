"""Recipe validation: every bad input gets one clear line; every shipped recipe validates."""

from pathlib import Path

import pytest

from swarm_merge.errors import RecipeError
from swarm_merge.recipe import ExpertRef, apply_overrides, load_recipe

REPO = Path(__file__).resolve().parents[1]

GOOD = """
name: t
experts: [./a, org/b@v1.0, {model: org/c, revision: 3f2c1d0}]
objective: {type: exact_match, dev: data/dev.jsonl}
"""


def write(tmp_path, text):
    p = tmp_path / "r.yml"
    p.write_text(text)
    return p


def test_expert_refs_parse_and_local_paths_resolve_against_the_recipe(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    a, b, c = r.experts
    assert a.is_local and a.model == str((tmp_path / "a").resolve())
    assert (b.model, b.revision, b.is_local) == ("org/b", "v1.0", False)
    assert (c.model, c.revision) == ("org/c", "3f2c1d0")
    assert r.objective.dev == str((tmp_path / "data/dev.jsonl").resolve())
    assert r.output_dir == "out/t"
    assert ExpertRef.model_validate("/abs/path@x").model == "/abs/path@x"  # '@' in a path is a path


def test_overrides_apply_before_validation(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["swarm.max_iterations=5", "swarm.seed_soup=false", "objective.batch_size=4"])
    assert r.swarm.max_iterations == 5 and r.swarm.seed_soup is False and r.objective.batch_size == 4
    data = apply_overrides({"experts": ["a", "b"]}, ["experts.1=c"])
    assert data["experts"] == ["a", "c"]
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(write(tmp_path, GOOD), ["swarm.size"])
    r = load_recipe(write(tmp_path, GOOD), ["swarm.init=paper", "swarm.init_spread=0.1"])
    assert (r.swarm.init, r.swarm.init_spread) == ("paper", 0.1)
    assert load_recipe(write(tmp_path, GOOD)).swarm.init == "soup"
    with pytest.raises(RecipeError, match="swarm.init"):
        load_recipe(write(tmp_path, GOOD), ["swarm.init=corners"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: t\nexperts: [a, b\n", r"line \d+.*YAML syntax error"),
        (GOOD + "swarm: {sise: 3}\n", r"unknown key 'swarm.sise'; did you mean 'size'\?"),
        (GOOD + "objectiv: {}\n", r"unknown key 'objectiv'; did you mean 'objective'\?"),
        ("name: t\nexperts: [./a]\nobjective: {type: loglik, dev: d.jsonl}\n", "two or more experts"),
        ("name: t\nexperts: [./a, ./b]\nobjective: {type: bleu, dev: d.jsonl}\n", "exact_match, multiple_choice, loglik"),
        (GOOD + "swarm: {size: -3}\n", r"swarm.size.*greater than or equal"),
        (GOOD + "swarm: {step_length: 0}\n", r"swarm.step_length.*greater than 0"),
        (GOOD + "swarm: {drop_n: 1.5}\n", r"swarm.drop_n.*less than or equal to 1"),
        (GOOD + "swarm: {drop_k: -0.1}\n", r"swarm.drop_k"),
        (GOOD + "swarm: {size: 3}\n", r"swarm.size >= 4"),
        ("name: t\nexperts: [./a, ./b]\n", r"missing key 'objective'"),
        ("- a\n- b\n", "a recipe is a YAML mapping"),
        (GOOD + "swarm: {inertia: 0, cognitive: 0, social: 0, repel: 0}\n", "must be > 0"),
        (GOOD + "swarm: {explore_after: -1}\n", r"swarm.explore_after must be auto or an iteration count"),
        (GOOD + "swarm: {explore_after: soon}\n", r"swarm.explore_after"),
        (GOOD + "swarm: {size: 8, max_iterations: 2, scouts: 17}\n", r"swarm.scouts must be auto or a count from 0 to "
         r"size \* max_iterations \(16\)"),
        (GOOD + "swarm: {average_top: 0}\n", r"swarm.average_top must be bag or a number of positions from 1"),
        (GOOD + "swarm: {average_top: top}\n", r"swarm.average_top"),
        ("name: t\nexperts: [./a, ./a]\nobjective: {type: loglik, dev: d.jsonl}\n", "listed twice"),
    ],
)
def test_bad_recipes_fail_with_one_clear_line(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yml")


def test_every_shipped_recipe_validates():
    from swarm_merge import ci

    recipes = ci.recipe_files(REPO)  # tracked *.yml / *.yaml with experts: (not the lm-eval task files)
    assert REPO / "recipes" / "demo.yml" in recipes and REPO / "recipes" / "demo-lm-eval.yml" in recipes
    assert not any("tasks" in p.parts for p in recipes)
    for path in recipes:
        recipe = load_recipe(path)
        for component in recipe.components:
            if component.type == "lm_eval":
                assert Path(component.include_path).is_dir(), f"{path}: task folder missing"
                continue
            assert Path(component.dev).is_file(), f"{path}: dev data missing"
            assert component.test is None or Path(component.test).is_file(), f"{path}: test data missing"
