"""The scale bench (bench/scale/) runs: on tiny experts it builds, times every strategy, runs the
tool under a memory budget, and prints its tables and the cost model. Its figures are not checked
here (this machine is noisy); bench/RESULTS.md holds them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

pytestmark = pytest.mark.processes

REPO = Path(__file__).resolve().parents[1]


def test_the_scale_bench_runs_on_tiny_experts(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tiny.make_tokenizer().save_pretrained(tokenizer)
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale" / "bench_scale.py"), "--sizes", "tiny", "--experts", "2",
         "--repeats", "1", "--runs", "auto", "--max-memory", "100KB", "--cache", str(cache), "--tokenizer",
         str(tokenizer)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for strategy in ("floor", "in-memory", "one-model", "streaming"):
        assert f"| {strategy} |" in out
    # a 100 KB budget is below every mode's estimate: auto falls back to streaming
    assert "| auto, --max-memory 0.00 GiB | streaming |" in out
    assert "## The cost model" in out and "| 70B | 10 | H200 141GB | streaming |" in out
    result = json.loads((cache / "results.json").read_text())[0]
    assert result["k"] == 2 and result["runs"][0]["ran"] == "streaming"
    assert result["workers"]["one-model"]["bytes_read"] == 2 * result["params"] * 2  # K bfloat16 experts, once
    # the written merge of the whole run is gone with its temp dir; the experts stay cached
    assert (cache / "tiny" / "expert1" / "model.safetensors.index.json").is_file()


def test_the_builder_refuses_a_folder_it_did_not_write(tmp_path):
    """A rebuild replaces the expert folders under --out: a folder of someone else's is left alone."""
    import sys

    sys.path.insert(0, str(REPO / "bench" / "scale"))
    import build_experts

    out = tmp_path / "mine"
    (out / "expert0").mkdir(parents=True)
    canary = out / "expert0" / "canary.txt"
    canary.write_text("keep me")
    tokenizer = tmp_path / "tokenizer"
    tiny.make_tokenizer().save_pretrained(tokenizer)
    with pytest.raises(SystemExit, match="holds files this bench did not write"):
        build_experts.build(out, "tiny", 2, tokenizer)
    assert canary.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["expert0"]
    paths = build_experts.build(tmp_path / "new", "tiny", 2, tokenizer)  # a new folder is the bench's
    assert [p.name for p in paths] == ["expert0", "expert1"] and (paths[0] / "config.json").is_file()
