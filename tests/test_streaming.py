"""Streaming evaluation: same scores as in-memory, weights held at once bounded
to one module, expert tensors read once per forward."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from swarm_merge import evaluate, experts as experts_mod, objectives, space, weights
from swarm_merge.errors import EvaluationError
from swarm_merge.recipe import ExpertRef, Objective

COEFFS = [np.array([[0.2, 0.5, 0.3]]), np.array([[1.4, -0.6, 0.2]]), np.array([[1 / 3, 1 / 3, 1 / 3]])]


def build(paths, dtype="float32", granularity="model"):
    experts = [experts_mod.pull_expert(ExpertRef(model=str(p))) for p in paths]
    experts_mod.check_compatible(experts)
    groups, labels = space.tensor_groups(sorted(experts[0].tensors), granularity=granularity)
    cpu = torch.device("cpu")
    return (
        experts, groups, labels,
        evaluate.InMemoryEvaluator(experts, groups, dtype=dtype, device=cpu),
        evaluate.StreamingEvaluator(experts, groups, dtype=dtype, device=cpu),
    )


def data(tmp_path, kind):
    rows = tiny.arithmetic_rows(10)
    if kind == "multiple_choice":
        rows = [{"prompt": r["prompt"], "choices": [r["answer"], str(int(r["answer"]) + 1), "0"], "answer": i % 3,
                 "task": r["task"]} for i, r in enumerate(rows)]
    path = tiny.write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    return objectives.load_examples(str(path), kind), Objective(type=kind, dev=str(path), batch_size=4, max_new_tokens=3)


@pytest.fixture
def two_threads():
    """At least two torch threads, so the combiner runs two reader threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tie, chunk", [(False, None), (True, None), (True, 700)])
def test_streaming_scores_equal_in_memory(tmp_path, tie, chunk, monkeypatch, two_threads):
    if chunk:  # several chunks a tensor: the reader threads build inside the forward's inference mode
        monkeypatch.setattr(weights, "CHUNK", chunk)
    paths = tiny.make_experts(tmp_path / "e", 3, tie=tie)
    experts, groups, labels, mem, stream = build(paths)
    for kind in ("loglik", "exact_match", "multiple_choice"):
        rows, objective = data(tmp_path, kind)
        for c in COEFFS:
            a = mem.evaluate(c, rows, objective)
            b = stream.evaluate(c, rows, objective)
            # Same weights bit for bit (one combine function); BLAS may round a
            # forward differently by memory layout, so log-likelihoods agree to 1e-6.
            assert a.utility == pytest.approx(b.utility, abs=1e-6), (kind, c)
            if kind != "loglik":
                assert a.utility == b.utility and a.groups == b.groups
    # The weights themselves are identical.
    mem.build(COEFFS[1])
    stream.build(COEFFS[1])
    state = mem.model.state_dict()
    for name in experts[0].tensors:
        assert torch.equal(stream.weights[name], state[name])
    if tie:
        assert "lm_head.weight" in stream.weights.aliases
    assert stream.weights.combiner.workers >= 2


def test_bfloat16_parity_and_layer_groups(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, stream = build(paths, dtype="bfloat16", granularity="layer")
    rows, objective = data(tmp_path, "loglik")
    c = np.array([[0.2, 0.5, 0.3], [1.2, -0.4, 0.2]])
    assert len(labels) == 2
    assert mem.evaluate(c, rows, objective).utility == pytest.approx(stream.evaluate(c, rows, objective).utility, abs=1e-5)
    mem.build(c)
    assert mem.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_weights_held_at_once_stay_one_module(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3, layers=4)
    experts, groups, labels, mem, stream = build(paths)
    model = stream.model
    live = []

    def total_materialised():
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")

    for module in model.modules():
        if hasattr(module, "_old_forward"):
            inner = module._old_forward

            def wrapped(*args, __inner=inner, **kwargs):
                live.append(total_materialised())
                return __inner(*args, **kwargs)

            module._old_forward = wrapped
    largest_module = max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    whole = sum(e.numel * 4 for e in experts[0].tensors.values())
    for kind in ("loglik", "exact_match"):
        rows, objective = data(tmp_path, kind)
        live.clear()
        stream.evaluate(COEFFS[1], rows, objective)
        assert live, "the hooks ran"
        assert max(live) <= largest_module < whole / 4
    assert total_materialised() == 0  # nothing stays after the forward


def test_expert_tensors_are_read_once_per_forward(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, stream = build(paths)
    rows, objective = data(tmp_path, "loglik")
    before = stream.weights.bytes_read
    stream.evaluate(COEFFS[0], rows, objective)
    per_model = sum(e.nbytes for e in experts)
    # The whole dev set is one batch: one forward reads each expert tensor once.
    assert stream.weights.bytes_read - before == per_model


def test_a_set_larger_than_the_dev_set_is_scored_in_dev_sized_forwards(tmp_path):
    """max_rows (the pipeline sets the dev set's rows) bounds the rows of one forward, so
    scoring a larger test set does not grow the activations; each chunk costs one rebuild."""
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, stream = build(paths)
    rows, objective = data(tmp_path, "loglik")  # 10 rows
    whole = stream.evaluate(COEFFS[0], rows, objective)
    stream.max_rows = 4
    forwards = []
    hook = stream.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    before = stream.weights.bytes_read
    chunked = stream.evaluate(COEFFS[0], rows, objective)
    hook.remove()
    assert forwards == [4, 4, 2]
    assert stream.weights.bytes_read - before == 3 * sum(e.nbytes for e in experts)
    assert chunked.utility == pytest.approx(whole.utility, abs=1e-6)
    assert chunked.utility == pytest.approx(mem.evaluate(COEFFS[0], rows, objective).utility, abs=1e-6)


def test_streaming_gives_freed_heap_back_after_every_evaluation(tmp_path, monkeypatch):
    """glibc keeps freed heap memory: without a trim per evaluation streaming's RSS grows."""
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, stream = build(paths)
    rows, objective = data(tmp_path, "loglik")
    calls = []
    monkeypatch.setattr(evaluate, "trim_heap", lambda: calls.append(1))
    for c in COEFFS:
        stream.evaluate(c, rows, objective)
        mem.evaluate(c, rows, objective)
    assert len(calls) == len(COEFFS)  # streaming only: in-memory keeps its heap warm


def test_auto_mode_picks_by_budget(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts = [experts_mod.pull_expert(ExpertRef(model=str(p))) for p in paths]
    est = evaluate.memory_estimate(experts, "float32")
    assert est["streaming"] < est["in-memory"]
    assert est["streaming"] < est["one-model"] < est["in-memory"]
    assert evaluate.choose_mode("auto", est, est["in-memory"]) == "in-memory"
    assert evaluate.choose_mode("auto", est, est["in-memory"] - 1) == "one-model"
    assert evaluate.choose_mode("auto", est, est["one-model"]) == "one-model"
    assert evaluate.choose_mode("auto", est, est["one-model"] - 1) == "streaming"
    assert evaluate.choose_mode("auto", est, 1) == "streaming"  # the last resort
    assert evaluate.choose_mode("streaming", est, 10**12) == "streaming"
    with pytest.raises(Exception, match="not one of"):
        evaluate.choose_mode("fast", est, 1)
    assert evaluate.parse_bytes("2GiB") == 2 * 1024**3 and evaluate.parse_bytes("500MB") == 500 * 10**6


def test_cli_eval_mode_flags(tiny_recipe, capsys):
    from swarm_merge.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(tiny_recipe()), "--eval-mode", "fast"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([str(tiny_recipe()), "--max-memory", "lots"])
    assert info.value.code == 2
    assert main([str(tiny_recipe()), "--dry-run", "--max-memory", "1KiB"]) == 0
    assert "eval mode: streaming (auto)" in capsys.readouterr().out


def test_chunked_reads_build_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 1000)  # several chunks a tensor
    paths = tiny.make_experts(tmp_path / "e", 3, tie=True)
    experts, groups, labels, mem, stream = build(paths)
    assert stream.weights.combiner.chunk == 1000
    for c in COEFFS:
        mem.build(c)
        stream.build(c)
        state = mem.model.state_dict()
        for name in experts[0].tensors:
            assert torch.equal(stream.weights[name], state[name]), name


# ------------------------------------------------------------------ one-model


@pytest.mark.parametrize("tie, dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16")])
def test_one_model_builds_the_same_weights_and_scores_as_in_memory(tmp_path, tie, dtype, monkeypatch, two_threads):
    monkeypatch.setattr(weights, "CHUNK", 1000)  # several chunks a tensor
    paths = tiny.make_experts(tmp_path / "e", 3, tie=tie)
    experts, groups, labels, mem, _ = build(paths, dtype=dtype)
    one = evaluate.OneModelEvaluator(experts, groups, dtype=dtype, device=torch.device("cpu"))
    for c in COEFFS:
        mem.build(c)
        one.build(c)
        a, b = mem.model.state_dict(), one.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), c
    if tie:
        assert one.model.lm_head.weight.data_ptr() == one.model.model.embed_tokens.weight.data_ptr()
    for kind in ("loglik", "exact_match", "multiple_choice"):
        rows, objective = data(tmp_path, kind)
        for c in COEFFS[:2]:
            x, y = mem.evaluate(c, rows, objective), one.evaluate(c, rows, objective)
            assert x.utility == y.utility and x.groups == y.groups, (kind, c)


@pytest.mark.parametrize("workers", [1, 3])
def test_chunks_shared_among_reader_threads_build_the_same_weights(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(weights, "CHUNK", 700)  # many chunks a tensor, some short
    paths = tiny.make_experts(tmp_path / "e", 3, tie=True)
    experts, groups, labels, mem, _ = build(paths)
    from safetensors.torch import load_file

    files = [load_file(str(p / "model.safetensors")) for p in paths]
    combiner = weights.ChunkedCombiner(experts, dtype=torch.float32, device=torch.device("cpu"), workers=workers)
    threads = torch.get_num_threads()
    for c in COEFFS:
        mem.build(c)
        rows = weights.coefficient_rows(c, "cpu")
        outs = {n: torch.full((experts[0].tensors[n].numel,), float("nan")) for n in mem.targets}
        combiner.combine_all([(n, rows[groups[n]], out) for n, out in outs.items()])
        for name, target in mem.targets.items():
            assert torch.equal(outs[name], target.data.view(-1)), (name, c)
            # and both equal the sum written out, so a chunk lost or misplaced in both would show
            want = sum(float(a) * f[name].double().view(-1) for a, f in zip(c[0], files))
            assert torch.allclose(outs[name].double(), want, atol=1e-6), (name, c)
        assert torch.get_num_threads() == threads  # single-threaded torch only while the readers run
    assert len(combiner.scratch) == workers  # one buffer per reader, taken in turn
    combiner.close()


def test_builds_from_two_threads_at_once_stay_right_and_restore_torch_threads(tmp_path, monkeypatch, two_threads):
    import threading

    monkeypatch.setattr(weights, "CHUNK", 700)
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, _ = build(paths)
    threads = torch.get_num_threads()
    expected = {}
    for i, c in enumerate(COEFFS[:2]):
        mem.build(c)
        expected[i] = {n: t.detach().clone().view(-1) for n, t in mem.targets.items()}
    got, errors = {}, []

    def run(i):
        try:
            combiner = weights.ChunkedCombiner(experts, dtype=torch.float32, device=torch.device("cpu"), workers=2)
            rows = weights.coefficient_rows(COEFFS[i], "cpu")
            for _ in range(5):
                outs = {n: torch.empty(experts[0].tensors[n].numel) for n in mem.targets}
                combiner.combine_all([(n, rows[groups[n]], out) for n, out in outs.items()])
                got.setdefault(i, []).append(outs)
        except Exception as exc:  # reported below
            errors.append(exc)

    runners = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    assert not errors
    for i in range(2):
        assert all(torch.equal(outs[n], expected[i][n]) for outs in got[i] for n in outs)
    assert torch.get_num_threads() == threads  # never left at 1 by interleaved set/restore


def test_a_failing_read_in_a_reader_thread_stops_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 700)
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, *_ = build(paths)
    combiner = weights.ChunkedCombiner(experts, dtype=torch.float32, device=torch.device("cpu"), workers=2)
    name = max(experts[0].tensors, key=lambda n: experts[0].tensors[n].numel)
    path = experts[1].tensors[name].file
    begin, _ = weights.TensorReader().header(path)[name]["data_offsets"]
    with open(path, "r+b") as fh:  # cut expert 1's file a few chunks into that tensor
        fh.truncate(8 + struct.unpack("<Q", fh.read(8))[0] + begin + 4 * 2000)
    threads = torch.get_num_threads()
    out = torch.empty(experts[0].tensors[name].numel)
    with pytest.raises(EvaluationError, match="truncated"):
        combiner.combine_all([(name, torch.tensor([0.2, 0.3, 0.5]), out)])
    assert torch.get_num_threads() == threads
    combiner.close()


def test_one_model_reads_each_expert_tensor_once_per_evaluation(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, _, _ = build(paths)
    one = evaluate.OneModelEvaluator(experts, groups, dtype="float32", device=torch.device("cpu"))
    per_model = sum(e.nbytes for e in experts)
    for i, kind in enumerate(("loglik", "exact_match")):  # generation too: the weights are built once, not per token
        rows, objective = data(tmp_path, kind)
        before = one.combiner.bytes_read
        one.evaluate(COEFFS[1 + i], rows, objective)
        assert one.combiner.bytes_read - before == per_model
        # The same particle again (a race's next stage): the model holds its weights, nothing is read.
        before = one.combiner.bytes_read
        one.evaluate(COEFFS[1 + i].copy(), rows, objective)
        assert one.combiner.bytes_read == before
    # What it holds besides the model: K chunks of buffer per reader thread, never a second copy of a tensor.
    assert 1 <= one.combiner.workers <= torch.get_num_threads()
    assert len(one.combiner.scratch) == one.combiner.workers
    assert all(b.numel() == len(experts) * one.combiner.chunk for b in one.combiner.scratch)


def test_a_remembered_build_is_skipped_only_while_the_model_holds_it(tmp_path):
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, _, _ = build(paths)
    ev = evaluate.InMemoryEvaluator(experts, groups, dtype="float32", device=torch.device("cpu"))
    rows, objective = data(tmp_path, "loglik")
    first = ev.evaluate(COEFFS[0], rows, objective).utility
    ev.evaluate(COEFFS[1], rows, objective)
    assert ev.evaluate(COEFFS[0], rows, objective).utility == first  # built again: the model held COEFFS[1]
    ev.build(COEFFS[2])  # a direct build is remembered too
    assert ev.evaluate(COEFFS[0], rows, objective).utility == first
    other = {n: t.detach().clone() * 0.5 for n, t in ev.targets.items()}
    ev.load(lambda name: other[name])  # weights from outside the search: nothing is remembered
    assert ev._built is None
    assert ev.evaluate(COEFFS[0], rows, objective).utility == first


def test_one_model_from_the_cli_writes_the_same_merge(tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    from swarm_merge.cli import main

    recipe = tiny_recipe()
    assert main([str(recipe), "--eval-mode", "one-model", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert main([str(recipe), "--eval-mode", "in-memory", "--out", str(tmp_path / "mem"), "--no-progress"]) == 0
    from swarm_merge.report import read

    a, b = read(tmp_path / "one" / "swarm.json"), read(tmp_path / "mem" / "swarm.json")
    assert a.coefficients == b.coefficients and a.scores.rows == b.scores.rows
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def _open_files_under(folders) -> list:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if any(target.startswith(str(f)) for f in folders):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("mode", ["one-model", "streaming"])
def test_a_run_closes_the_expert_files_it_read(mode, tiny_recipe, tiny_experts, tmp_path):
    """One-model and streaming read the experts with pread on open descriptors: a run (library use,
    `ci run` over several recipes, the test process) must not keep them open after it returns,
    nor after it fails."""
    from swarm_merge.cli import main

    folders = [Path(p).resolve() for p in tiny_experts]
    before = _open_files_under(folders)
    assert main([str(tiny_recipe()), "--eval-mode", mode, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert _open_files_under(folders) == before
    # A search that fails mid-way (a custom objective raising) closes them too.
    code = tmp_path / "bad.py"
    code.write_text("def score(model, tokenizer, rows, device):\n    raise RuntimeError('boom')\n")
    bad = tiny_recipe(objective="custom")
    assert main([str(bad), "--eval-mode", mode, "--out", str(tmp_path / "b"), "--no-progress",
                 "--objective-code", f"{code}:score"]) == 1
    assert _open_files_under(folders) == before


@pytest.mark.parametrize("stored, dtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16")])
def test_16_bit_experts_build_the_weights_mergekit_writes(tmp_path, stored, dtype, monkeypatch):
    """Experts stored in 16 bits combine in float32 (term by term, as mergekit's linear does) in
    every mode, and the written merge holds the very weights the search scored; float32 experts
    searched in bfloat16 too (mergekit reads its inputs in the recipe's dtype, as the search does)."""
    from safetensors.torch import load_file

    from swarm_merge.publish import merge

    monkeypatch.setattr(weights, "CHUNK", 700)  # several chunks a tensor

    paths = tiny.make_experts(tmp_path / "e", 3, dtype=weights.torch_dtype(stored))
    experts, groups, labels, mem, stream = build(paths, dtype=dtype, granularity="layer")
    one = evaluate.OneModelEvaluator(experts, groups, dtype=dtype, device=torch.device("cpu"))
    c = np.array([[0.7, 0.5, -0.2], [1.3, -0.6, 0.3]])
    for ev in (mem, one):
        ev.build(c)
    stream.build(c)
    out = tmp_path / "written"
    merge.write_merge(merge.mergekit_config(experts, c, groups, dtype=dtype, portable=False), out)
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(str(shard)))
    state_mem, state_one = mem.model.state_dict(), one.model.state_dict()
    for name in experts[0].tensors:
        assert written[name].dtype == weights.torch_dtype(dtype)
        assert torch.equal(state_mem[name], written[name]), name
        assert torch.equal(state_one[name], written[name]), name
        assert torch.equal(stream.weights[name], written[name]), name
    one.close()
    stream.close()


def test_a_16_bit_combine_never_reads_a_coefficient_back_to_the_host(monkeypatch):
    """On a GPU, reading a coefficient back (float(c[k]), .item()) waits for the device; the
    combine of 16-bit chunks keeps them on the device."""
    stacked = torch.randn(3, 1000).to(torch.bfloat16)
    c = torch.tensor([0.5, 0.7, -0.2])
    expected = (stacked.float() * c[:, None]).sum(0)

    def host_read(self, *args):
        raise AssertionError("a coefficient was read back to the host")

    for name in ("__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    result = weights.combine(stacked, c)
    monkeypatch.undo()
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected)


def test_the_lm_head_gets_a_contiguous_input_in_every_mode(tmp_path, monkeypatch):
    """transformers slices the hidden states for logits_to_keep; torch's CPU bfloat16 linear on that
    strided input is 40x slower (bench/RESULTS.md). Scoring hands the head a contiguous copy."""
    paths = tiny.make_experts(tmp_path / "e", 3, dtype=torch.bfloat16)
    experts, groups, labels, mem, stream = build(paths, dtype="bfloat16")
    rows, objective = data(tmp_path, "loglik")
    vocab = experts[0].tensors["lm_head.weight"].shape[0]
    seen = []
    linear = torch.nn.functional.linear

    def watch(x, w, b=None):
        if w.shape[0] == vocab:
            seen.append(x.is_contiguous())
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", watch)
    for ev in (mem, stream):
        ev.evaluate(COEFFS[0], rows, objective)
    assert seen and all(seen), seen
    stream.close()


def test_the_first_build_learns_each_experts_largest_value_per_tensor(tmp_path, monkeypatch):
    """Learnt chunk by chunk as a running maximum updated in place (one array per tensor, not one
    per chunk: those fragmented the heap by GBs at 1B), and equal to each expert's true max |value|."""
    from safetensors.torch import load_file

    monkeypatch.setattr(weights, "CHUNK", 700)  # many chunks a tensor
    paths = tiny.make_experts(tmp_path / "e", 3)
    experts, groups, labels, mem, stream = build(paths)
    one = evaluate.OneModelEvaluator(experts, groups, dtype="float32", device=torch.device("cpu"))
    one.build(COEFFS[0])
    files = [load_file(str(p / "model.safetensors")) for p in paths]
    peaks = one.combiner.peaks
    assert set(peaks) == set(one.targets)
    for name, got in peaks.items():
        want = np.array([float(f[name].abs().max()) for f in files])
        np.testing.assert_array_equal(got, want)
    one.close()
    stream.close()
