"""The demo builder replaces only folders it built itself (recipes/demo/builder/cache.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))

from builder import cache  # noqa: E402


def test_a_folder_the_builder_did_not_write_is_never_replaced(tmp_path):
    final = tmp_path / "add"
    final.mkdir()
    (final / "canary.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not written by this builder"):
        with cache.staged(final) as tmp:
            (tmp / "model.safetensors").write_text("built")
    assert (final / "canary.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["add"]  # no temp folder left either


def test_its_own_build_is_replaced(tmp_path):
    final = tmp_path / "add"
    final.mkdir()
    (final / cache.BUILD_INFO).write_text("{}")
    (final / "old.txt").write_text("old build")
    with cache.staged(final) as tmp:
        (tmp / cache.BUILD_INFO).write_text("{}")
        (tmp / "new.txt").write_text("new build")
    assert sorted(p.name for p in final.iterdir()) == [cache.BUILD_INFO, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["add"]


def test_the_shipped_adapters_are_used_only_for_the_spec_they_were_trained_with():
    # recipes/demo/adapters/<skill>: what a first `make demo` merges instead of training (the merged experts
    # are bit-identical to trained ones: checked when they were shipped, bench/RESULTS.md / the Issue 25 note).
    import json

    from builder.spec import BaseSpec, ExpertSpec
    from builder.train import SHIPPED, shipped_adapter

    for skill in ("add", "words", "capitalize", "repeat"):
        spec = ExpertSpec.for_skill(skill)
        assert shipped_adapter(spec, BaseSpec()) == SHIPPED / skill
        info = json.loads((SHIPPED / skill / "build_info.json").read_text())
        assert info["build_spec"] == spec.key() and info["base_model_name_or_path"] == "../../base"
        assert shipped_adapter(ExpertSpec.for_skill(skill, steps=31), BaseSpec()) is None  # another training
        assert shipped_adapter(spec, BaseSpec(dtype="bfloat16")) is None  # another base


def test_the_200_row_dev_bench_adds_rows_never_tested_or_trained_on():
    # bench/demo200: the demo's 72 dev rows, then 128 more; a row that an expert trained on or that the demo
    # tests would make the bench's dev scores (and racing's savings there) meaningless.
    import importlib.util
    import json

    from builder.skills import SKILLS, eval_prompts, eval_rows

    path = Path(__file__).resolve().parents[1] / "bench" / "demo200" / "build.py"
    spec = importlib.util.spec_from_file_location("demo200_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rows = build.dev_rows()
    committed = [json.loads(line) for line in (path.parent / "data" / "dev.jsonl").read_text().splitlines()]
    assert committed == rows  # the committed file is what the script writes
    dev, test = eval_rows()
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 200 and len(set(prompts)) == 200
    assert {s: sum(r["task"] == s for r in rows) for s in SKILLS} == {s: 50 for s in SKILLS}
    assert sorted(prompts[:72]) == sorted(r["prompt"] for r in dev)  # the demo's rows first
    assert not set(prompts) & {r["prompt"] for r in test}
    trained = build.trained_prompts(eval_prompts())  # (train.training_batches: what train_lora trains on)
    assert len(trained) > 800 and not set(prompts) & trained
