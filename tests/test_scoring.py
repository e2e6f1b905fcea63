"""The numbers the swarm optimises, checked against independent references.

Every reference below is written with plain transformers calls (one unpadded
row per forward, ``model(input_ids).logits``, log_softmax, gather; a greedy
argmax loop for generation) and shares no code with swarm_merge.objectives, so
a wrong index, a padding leak, a wrong normalisation or a wrong pooling in the
batched scorers shows up as a wrong number here.

Runs on one tiny 2-layer Llama (tests/tiny.py), loaded once per module.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

import tiny
from swarm_merge import objectives
from swarm_merge.evaluate import load_tokenizer
from swarm_merge.objectives import Example, Score
from swarm_merge.recipe import Objective

DEVICE = torch.device("cpu")
LONG_PROMPT = "the quick brown fox jumps over the lazy dog. " * 3 + "upper: cat ->"  # ~150 tokens


def load_lm(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return SimpleNamespace(
        model=model,
        tok=load_tokenizer(path),  # what the swarm uses: left padding, pad token set
        ref_tok=AutoTokenizer.from_pretrained(str(path)),  # the references never pad
        eos=model.config.eos_token_id,
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The tiny Llama (rotary positions)."""
    return load_lm(tiny.make_experts(tmp_path_factory.mktemp("scoring"), 1)[0])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2: absolute position embeddings, so a left-padded row scored
    at shifted positions gives other numbers (rotary Llama cannot tell)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny.make_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return load_lm(path)


def objective(kind: str, **kw) -> Objective:
    return Objective(type=kind, dev="x.jsonl", **kw)


# ------------------------------------------------------------------ references


@torch.inference_mode()
def ref_logprob(lm, context: str, continuation: str) -> Tuple[float, int]:
    """Sum of log p(continuation tokens | everything before), one unpadded forward.

    The documented token convention: the context is tokenized as a prompt, the
    continuation without special tokens; a bare text (empty context) scores
    every token after its first.
    """
    tok = lm.ref_tok
    if context:
        ctx = tok(context)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(continuation, add_special_tokens=False)["input_ids"]
        ctx, cont = ids[:1], ids[1:]
    if not cont:
        return 0.0, 0
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
    # The logit at position t predicts token t + 1.
    targets = torch.tensor(cont).unsqueeze(1)
    picked = logprobs[len(ctx) - 1 : len(ctx) - 1 + len(cont)].gather(1, targets).squeeze(1)
    return math.fsum(picked.double().tolist()), len(cont)


@torch.inference_mode()
def ref_greedy(lm, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding, one token per full unpadded forward, stopping at EOS."""
    ids = lm.ref_tok(prompt)["input_ids"]
    new: List[int] = []
    for _ in range(max_new_tokens):
        token = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == lm.eos:
            break
        new.append(token)
    return lm.ref_tok.decode(new, skip_special_tokens=True)


def first_line(text: str) -> str:
    """The documented comparison unit: the first non-blank line, stripped."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def pooled(values: Sequence[Tuple[float, int]], groups: Sequence[Optional[str]]):
    """Token-pooled mean log-likelihood, overall and per group (by hand, no aggregate)."""
    total_lp = sum(lp for lp, _ in values)
    total_n = sum(n for _, n in values)
    per_group = {}
    for g in sorted({g for g in groups if g is not None}):
        lp = sum(v[0] for v, gg in zip(values, groups) if gg == g)
        n = sum(v[1] for v, gg in zip(values, groups) if gg == g)
        if n:
            per_group[g] = lp / n
    return total_lp / total_n, per_group


def mean_by_group(hits: Sequence[float], groups: Sequence[Optional[str]]):
    out = {}
    for g in sorted({g for g in groups if g is not None}):
        row = [h for h, gg in zip(hits, groups) if gg == g]
        out[g] = sum(row) / len(row)
    return sum(hits) / len(hits), out


def assert_score(result: Score, utility: float, groups: dict, n: int, tol: float = 0.0) -> None:
    assert result.n == n
    assert result.utility == pytest.approx(utility, abs=tol, rel=0), (result.utility, utility)
    assert sorted(result.groups) == sorted(groups)
    for g, v in groups.items():
        assert result.groups[g] == pytest.approx(v, abs=tol, rel=0), (g, result.groups[g], v)


# -------------------------------------------------------------- 1. log-likelihoods

# Both row forms in one batch, contexts from 1 to ~150 tokens, continuations
# from 0 to ~26 scored tokens.
LOGLIK_ROWS = [
    Example(prompt="1+1=", answer="2", group="math"),
    Example(prompt=LONG_PROMPT, answer=" CAT", group="words"),
    Example(prompt="", answer="reverse: abc -> cba", group="words"),  # {"text"} form
    Example(prompt="7", answer="+8=15, then 9+9=18 and 3+4=7", group="math"),
    Example(prompt="", answer="12+13=25", group=None),  # {"text"}, no group
    Example(prompt="é", answer="ü 中 ok", group="unicode"),
    Example(prompt="", answer="5", group="math"),  # a one-token text: nothing to score
    Example(prompt="", answer=LONG_PROMPT + " CAT", group="words"),  # a long text
]
BATCH_SIZES = [1, 3, len(LOGLIK_ROWS)]


@pytest.fixture(scope="module")
def loglik_ref(lm):
    return [ref_logprob(lm, ex.prompt, ex.answer) for ex in LOGLIK_ROWS]


def test_reference_rows_cover_the_cases(lm, loglik_ref):
    counts = [n for _, n in loglik_ref]
    assert 0 in counts, "a row with nothing to score (one-token text)"
    contexts = [len(lm.ref_tok(ex.prompt)["input_ids"]) for ex in LOGLIK_ROWS if ex.prompt]
    assert min(contexts) == 1 and max(contexts) > 100, "prompts of very different lengths"
    assert max(counts) > 20 and min(c for c in counts if c) == 1


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_continuation_logprobs_equal_unpadded_forwards(lm, loglik_ref, batch_size):
    pairs = [(ex.prompt, ex.answer) for ex in LOGLIK_ROWS]
    with torch.inference_mode():
        got = objectives.likelihood.continuation_logprobs(lm.model, lm.tok, pairs, batch_size, DEVICE)
    assert len(got) == len(pairs)
    for (lp, n), (ref_lp, ref_n), pair in zip(got, loglik_ref, pairs):
        assert n == ref_n, pair
        # 1e-5 per token (float32 sums of up to ~50 terms), and 1e-5 absolute on short ones.
        assert lp == pytest.approx(ref_lp, abs=1e-5 * max(1, n), rel=0), (pair, lp, ref_lp)
        if n:
            assert lp / n == pytest.approx(ref_lp / ref_n, abs=1e-5, rel=0), pair


def test_continuation_logprobs_do_not_depend_on_batch_neighbours(lm):
    """The same short pair scored alone and next to a very long one."""
    short = ("1+1=", "2")
    with torch.inference_mode():
        alone = objectives.likelihood.continuation_logprobs(lm.model, lm.tok, [short], 8, DEVICE)[0]
        mixed = objectives.likelihood.continuation_logprobs(
            lm.model, lm.tok, [("", LONG_PROMPT), short, (LONG_PROMPT, " CAT CAT CAT")], 8, DEVICE
        )[1]
    assert mixed[1] == alone[1] == 1
    assert mixed[0] == pytest.approx(alone[0], abs=1e-5, rel=0)
    assert alone[0] == pytest.approx(ref_logprob(lm, *short)[0], abs=1e-5, rel=0)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_loglik_utility_is_minus_token_pooled_nll(lm, loglik_ref, batch_size):
    utility, groups = pooled(loglik_ref, [ex.group for ex in LOGLIK_ROWS])
    assert utility < 0
    result = objectives.score_loglik(lm.model, lm.tok, LOGLIK_ROWS, objective("loglik"), DEVICE,
                                     batch_size=batch_size)
    assert_score(result, utility, groups, n=len(LOGLIK_ROWS), tol=1e-5)
    # Pooled over tokens, not a mean of per-row means: the two differ here.
    row_means = [lp / n for lp, n in loglik_ref if n]
    assert abs(sum(row_means) / len(row_means) - utility) > 1e-3


def test_loglik_through_score_uses_objective_batch_size(lm, loglik_ref):
    utility, groups = pooled(loglik_ref, [ex.group for ex in LOGLIK_ROWS])
    result = objectives.score(lm.model, lm.tok, LOGLIK_ROWS, objective("loglik", batch_size=3), DEVICE)
    assert_score(result, utility, groups, n=len(LOGLIK_ROWS), tol=1e-5)


def test_loglik_group_by_is_pooled_per_group(lm):
    rows = [
        Example(prompt="1", answer="+1=2", group="a"),
        Example(prompt="", answer="the quick brown fox jumps over the lazy dog", group="a"),
        Example(prompt="2+", answer="2=4", group="b"),
    ]
    ref = [ref_logprob(lm, ex.prompt, ex.answer) for ex in rows]
    result = objectives.score_loglik(lm.model, lm.tok, rows, objective("loglik"), DEVICE, batch_size=2)
    a_lp, a_n = ref[0][0] + ref[1][0], ref[0][1] + ref[1][1]
    assert result.groups["a"] == pytest.approx(a_lp / a_n, abs=1e-5, rel=0)
    assert result.groups["b"] == pytest.approx(ref[2][0] / ref[2][1], abs=1e-5, rel=0)
    assert result.utility == pytest.approx((a_lp + ref[2][0]) / (a_n + ref[2][1]), abs=1e-5, rel=0)


# ------------------------------------------------------------ multiple choice

MC_ROWS = [
    ("2+2=", ["4", "5", "22", "4 and some more words after it"], "math"),
    (LONG_PROMPT, [" CAT", " cat", " DOG", "CAT CAT"], "words"),
    ("reverse: abc ->", [" cba", " abc"], "words"),
    ("x", ["the quick brown fox", "y", "z z z z"], None),
    ("1", ["0", "+1=2", "+29=30", "11"], "math"),
    ("é", ["ü", "中文", "ok"], "unicode"),
]


@pytest.fixture(scope="module")
def mc_ref(lm):
    """Per row: the reference's length-normalised scores and their argmax."""
    out = []
    for prompt, choices, _ in MC_ROWS:
        scored = [ref_logprob(lm, prompt, c) for c in choices]
        means = [lp / n for lp, n in scored]
        sums = [lp for lp, _ in scored]
        pick = max(range(len(choices)), key=means.__getitem__)
        out.append(SimpleNamespace(means=means, sums=sums, pick=pick))
    return out


def mc_examples(answers: Sequence[int]) -> List[Example]:
    return [Example(prompt=p, answer=a, choices=tuple(c), group=g) for (p, c, g), a in zip(MC_ROWS, answers)]


def test_multiple_choice_reference_is_discriminating(mc_ref):
    for r in mc_ref:
        ranked = sorted(r.means, reverse=True)
        assert ranked[0] - ranked[1] > 1e-4, "no near-tie: float noise cannot flip a pick"
    # Length normalisation changes at least one pick, and not every pick is choice 0.
    assert any(max(range(len(r.sums)), key=r.sums.__getitem__) != r.pick for r in mc_ref)
    assert len({r.pick for r in mc_ref}) > 1


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_multiple_choice_picks_equal_reference_argmax(lm, mc_ref, batch_size):
    obj = objective("multiple_choice")
    picks = [r.pick for r in mc_ref]
    # Every row right.
    result = objectives.score_multiple_choice(lm.model, lm.tok, mc_examples(picks), obj, DEVICE, batch_size=batch_size)
    assert_score(result, 1.0, {"math": 1.0, "words": 1.0, "unicode": 1.0}, n=len(MC_ROWS))
    # Every row wrong.
    wrong = [(p + 1) % len(c) for p, (_, c, _) in zip(picks, MC_ROWS)]
    result = objectives.score_multiple_choice(lm.model, lm.tok, mc_examples(wrong), obj, DEVICE, batch_size=batch_size)
    assert_score(result, 0.0, {"math": 0.0, "words": 0.0, "unicode": 0.0}, n=len(MC_ROWS))
    # Mixed: rows 0, 3 and 4 right; the rest wrong.
    mixed = [p if i in (0, 3, 4) else w for i, (p, w) in enumerate(zip(picks, wrong))]
    hits = [float(i in (0, 3, 4)) for i in range(len(MC_ROWS))]
    utility, groups = mean_by_group(hits, [g for _, _, g in MC_ROWS])
    assert (utility, groups) == (0.5, {"math": 1.0, "unicode": 0.0, "words": 0.0})
    result = objectives.score_multiple_choice(lm.model, lm.tok, mc_examples(mixed), obj, DEVICE, batch_size=batch_size)
    assert_score(result, utility, groups, n=len(MC_ROWS))


# ----------------------------------------------------------------- 2. generation

MAX_NEW = 6
# Candidate prompts; the fixture keeps the ones whose reference completions
# exercise each case (chosen from the model, so a retrained tiny model still works).
EM_POOL = ["D", "`", "ad", "ce", "ft", "jn", "jt", "ln", "mf", "nx", "tn", "ud", "ue", "29+28="] + [
    f"{a}+{b}=" for a in range(20, 30) for b in range(20, 30)
]
EM_FIXED = [LONG_PROMPT, "12+13=", "1", "é ü 中", "reverse: abc ->"]


@pytest.fixture(scope="module")
def em_rows(lm):
    """(prompt, reference completion) rows: fixed prompts of very different
    lengths plus, from the pool, one completion with a newline after text, one
    whose first line is blank, one that ends at EOS."""
    completions = {}

    def completion(prompt):
        if prompt not in completions:
            completions[prompt] = ref_greedy(lm, prompt, MAX_NEW)
        return completions[prompt]

    wanted = {
        "newline after text": lambda c: "\n" in c.lstrip() and c.lstrip().split("\n", 1)[0].strip() != "",
        "blank first line": lambda c: c.split("\n", 1)[0].strip() == "" and "\n" in c and first_line(c) != "",
        "ended at EOS": lambda c: len(lm.ref_tok(c, add_special_tokens=False)["input_ids"]) < MAX_NEW,
    }
    picked = []
    for name, test in wanted.items():
        prompt = next((p for p in EM_POOL if p not in picked and test(completion(p))), None)
        assert prompt is not None, f"no pool prompt gives a completion with {name}; widen EM_POOL"
        picked.append(prompt)
    prompts = EM_FIXED + picked
    rows = [(p, completion(p)) for p in prompts]
    assert all(first_line(c) for _, c in rows), "every reference completion has a non-blank line"
    return rows


def em_examples(rows, answers, groups=None) -> List[Example]:
    groups = groups or ["g%d" % (i % 3) for i in range(len(rows))]
    return [Example(prompt=p, answer=a, group=g) for (p, _), a, g in zip(rows, answers, groups)]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_exact_match_completions_equal_per_row_greedy(lm, em_rows, batch_size):
    """The completion exact_match generates (until every row's first line ends) is the reference's, row by row."""
    got = objectives.generation.greedy(lm.model, lm.tok, em_examples(em_rows, ["@"] * len(em_rows)),
                             objective("exact_match", max_new_tokens=MAX_NEW), DEVICE, batch_size, one_line=True)
    for (prompt, ref), text in zip(em_rows, got):
        assert first_line(text) == first_line(ref), (prompt, text, ref)


@pytest.mark.parametrize("how", ["exact", "prefix", "contains"])
def test_exact_match_stops_a_row_once_decided_and_scores_as_the_whole_completion(lm, em_rows, how):
    """Generation stops for a row once its match is decided (the answer covered, or departed from):
    every row scores as its whole reference completion does, for answers that match, depart at the
    first or a later character, or run past the line; rows that depart early generate fewer tokens."""
    rows, answers = [], []
    for prompt, ref in em_rows:
        line = first_line(ref)
        for answer in {line, line[:1], line[: max(1, len(line) // 2)], line[:1] + "\u2603", "\u2603",
                       line[: max(1, len(line) // 2)] + "\u2603", line + "x"}:
            rows.append((prompt, ref))
            answers.append(answer)
    examples = [Example(prompt=p, answer=a, group=f"r{i}") for i, ((p, _), a) in enumerate(zip(rows, answers))]
    obj = objective("exact_match", max_new_tokens=MAX_NEW, match=how)
    result = objectives.score_exact_match(lm.model, lm.tok, examples, obj, DEVICE, batch_size=7)
    for i, ((prompt, ref), answer) in enumerate(zip(rows, answers)):
        assert result.groups[f"r{i}"] == float(objectives.generation._matches(ref, answer, how)), (prompt, ref, answer, how)
    cut = objectives.generation.greedy(lm.model, lm.tok, examples, obj, DEVICE, 7, one_line=True, until_decided=True)
    whole = objectives.generation.greedy(lm.model, lm.tok, examples, obj, DEVICE, 7, one_line=True)
    if how != "contains":  # contains decides only at the line's end
        assert sum(map(len, cut)) < sum(map(len, whole))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_exact_match_result_against_reference_answers(lm, em_rows, batch_size):
    n = len(em_rows)
    lines = [first_line(c) for _, c in em_rows]
    groups = ["g%d" % (i % 3) for i in range(n)]

    def run(answers, how):
        obj = objective("exact_match", max_new_tokens=MAX_NEW, match=how, batch_size=batch_size)
        return objectives.score(lm.model, lm.tok, em_examples(em_rows, answers, groups), obj, DEVICE)

    everyone = {g: 1.0 for g in groups}
    nobody = {g: 0.0 for g in groups}
    # The reference's own first lines: every row must match, under every rule.
    for how in ("exact", "prefix", "contains"):
        assert_score(run(lines, how), 1.0, everyone, n)
    # Strictly longer than what was generated: no row may match.
    for how in ("exact", "prefix", "contains"):
        assert_score(run([line + "\u2603" for line in lines], how), 0.0, nobody, n)
    # A strict prefix of the line: a hit for prefix/contains, a miss for exact.
    prefixes = [line[:-1] if len(line) > 1 else None for line in lines]
    usable = [i for i, p in enumerate(prefixes) if p and p.strip()]
    assert usable
    answers = [prefixes[i] if i in usable else lines[i] + "\u2603" for i in range(n)]
    hits_prefix = [float(i in usable) for i in range(n)]
    for how in ("prefix", "contains"):
        assert_score(run(answers, how), *mean_by_group(hits_prefix, groups), n)
    assert_score(run(answers, "exact"), 0.0, nobody, n)
    # Another row's line: a hit only where the two lines happen to be equal.
    rotated = lines[1:] + lines[:1]
    hits = [float(a == b) for a, b in zip(rotated, lines)]
    assert sum(hits) < n
    assert_score(run(rotated, "exact"), *mean_by_group(hits, groups), n)


# ------------------------------------------- absolute positions (tiny GPT-2)


@pytest.mark.parametrize("batch_size", [3, len(LOGLIK_ROWS)])
def test_absolute_position_model_loglik(gpt2, batch_size):
    ref = [ref_logprob(gpt2, ex.prompt, ex.answer) for ex in LOGLIK_ROWS]
    with torch.inference_mode():
        got = objectives.likelihood.continuation_logprobs(gpt2.model, gpt2.tok, [(ex.prompt, ex.answer) for ex in LOGLIK_ROWS],
                                                batch_size, DEVICE)
    for (lp, n), (ref_lp, ref_n), ex in zip(got, ref, LOGLIK_ROWS):
        assert n == ref_n
        assert lp == pytest.approx(ref_lp, abs=1e-5 * max(1, n), rel=0), (ex, lp, ref_lp)
    utility, groups = pooled(ref, [ex.group for ex in LOGLIK_ROWS])
    result = objectives.score_loglik(gpt2.model, gpt2.tok, LOGLIK_ROWS, objective("loglik"), DEVICE,
                                     batch_size=batch_size)
    assert_score(result, utility, groups, n=len(LOGLIK_ROWS), tol=1e-5)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_absolute_position_model_generation(gpt2, batch_size):
    refs = [ref_greedy(gpt2, p, MAX_NEW) for p in EM_FIXED]
    lines = [first_line(c) for c in refs]
    assert all(lines) and len(set(lines)) > 1
    obj = objective("exact_match", max_new_tokens=MAX_NEW, match="exact")
    examples = [Example(prompt=p, answer=a, group="g") for p, a in zip(EM_FIXED, lines)]
    result = objectives.score_exact_match(gpt2.model, gpt2.tok, examples, obj, DEVICE, batch_size=batch_size)
    assert_score(result, 1.0, {"g": 1.0}, n=len(EM_FIXED))
    rotated = lines[1:] + lines[:1]
    hits = [float(a == b) for a, b in zip(rotated, lines)]
    examples = [Example(prompt=p, answer=a, group="g") for p, a in zip(EM_FIXED, rotated)]
    result = objectives.score_exact_match(gpt2.model, gpt2.tok, examples, obj, DEVICE, batch_size=batch_size)
    assert_score(result, *mean_by_group(hits, ["g"] * len(EM_FIXED)), n=len(EM_FIXED))


# ------------------------------------------------------------- 3. match rules

MATCH_CASES = [
    # (completion, answer, how, expected, why)
    ("\n\n42\nmore", "42", "exact", True, "leading blank lines are skipped"),
    ("\n \t \n42", "42", "exact", True, "a whitespace-only first line is blank too"),
    ("  42  ", " 42 ", "exact", True, "both sides are stripped"),
    ("42\r\nmore", "42", "exact", True, "CRLF: the \\r is stripped"),
    ("\t42 apples\n43", "42", "prefix", True, "prefix of the first line"),
    ("\t42 apples\n43", "42", "exact", False, "exact needs the whole line"),
    ("I think 42 here", "42", "contains", True, "contains: anywhere in the first line"),
    ("I think 42 here", "42", "prefix", False, "prefix: at the start only"),
    ("I think\n42", "42", "contains", False, "only the first non-blank line counts"),
    ("foo\n42", "42", "prefix", False, "only the first non-blank line counts"),
    ("New York", "New York", "exact", True, "inner spaces kept"),
    ("New  York", "New York", "exact", False, "inner spaces are not collapsed"),
    ("New York City", "New York", "prefix", True, "prefix with inner spaces"),
    ("New York City", " New York ", "exact", False, "stripped answer, still not the whole line"),
    ("", "42", "exact", False, "empty completion"),
    ("", "42", "prefix", False, "empty completion"),
    ("", "42", "contains", False, "empty completion"),
    ("\n  \n\n", "42", "prefix", False, "a blank completion is empty"),
    # Documented behaviour: prefix has no word boundary, so "111" counts as a hit
    # for the answer "11" (use match: exact for numeric answers).
    ("111", "11", "prefix", True, "prefix has no word boundary"),
    ("111", "11", "exact", False, "exact tells 11 from 111"),
    ("111", "11", "contains", True, "contains has no boundary either"),
    ("11", "111", "prefix", False, "a shorter completion is no hit"),
    ("42.", "42", "exact", False, "trailing punctuation is not stripped"),
    ("cat", "CAT", "exact", False, "case sensitive"),
    ("Ünïcödé 中文 ok", "Ünïcödé 中文", "prefix", True, "unicode prefix"),
    ("\u00a0中文\u3000", "中文", "exact", True, "unicode spaces (NBSP, ideographic) are stripped"),
    ("caf\u00e9", "cafe\u0301", "exact", False, "no unicode normalisation: NFC != NFD"),
]


@pytest.mark.parametrize("completion,answer,how,expected,why", MATCH_CASES,
                         ids=[f"{c[2]}:{c[4]}" for c in MATCH_CASES])
def test_matches(completion, answer, how, expected, why):
    assert objectives.generation._matches(completion, answer, how) is expected, why


# ------------------------------------------------------------ 4. aggregation


def test_aggregate_hand_computed():
    examples = [Example("p", group=g) for g in ["a", "b", "a", None, "c", "b"]]
    values = [1.0, 0.0, 0.5, 0.25, 3.0, -1.0]
    weights = [1.0, 2.0, 3.0, 4.0, 0.0, 2.0]
    result = objectives.aggregate(values, weights, examples)
    # total: 1 + 0 + 1.5 + 1 + 0 - 2 = 1.5 over mass 12.
    assert result.utility == pytest.approx(1.5 / 12)
    # a: (1 + 1.5) / 4; b: (0 - 2) / 4; c has zero weight: left out; None: no group.
    assert result.groups == pytest.approx({"a": 2.5 / 4, "b": -0.5})
    assert list(result.groups) == ["a", "b"]
    assert result.n == 6
    assert result.to_dict() == {"utility": result.utility, "groups": result.groups, "n": 6}


def test_aggregate_unweighted_is_accuracy():
    examples = [Example("p", group=g) for g in ["x", "x", "y", "y", "y"]]
    result = objectives.aggregate([1.0, 0.0, 1.0, 1.0, 0.0], [1.0] * 5, examples)
    assert result.utility == pytest.approx(0.6)
    assert result.groups == pytest.approx({"x": 0.5, "y": 2 / 3})


def test_aggregate_zero_mass_is_nan():
    result = objectives.aggregate([0.0, 0.0], [0.0, 0.0], [Example("p", group="a")] * 2)
    assert math.isnan(result.utility)
    assert result.groups == {}
    assert result.n == 2


# ------------------------------------------------------- shared prompt prefixes

FEW_SHOT = "".join(f"{a}+{b}={a + b}\n" for a, b in [(3, 4), (12, 7), (20, 5), (8, 8), (14, 9)])  # a 5-shot prefix
FEW_SHOT_ROWS = [(FEW_SHOT + q, a) for q, a in [("1+2=", "3"), ("17+11=", "28"), ("9+9=", "18"),
                                                 ("25+4=", "29 and more"), ("6+", "0=6")]]


@pytest.mark.parametrize("batch_size", [2, len(FEW_SHOT_ROWS)])
def test_a_shared_prefix_is_computed_once_and_scores_the_same(lm, batch_size, monkeypatch):
    """Few-shot rows: the common prefix runs once per batch (its keys and values
    reused), and every row's log-likelihood still equals the unpadded reference."""
    calls = []
    real = objectives.likelihood._forward_with_shared_prefix

    def counted(model, rows, shared, *args, **kwargs):
        calls.append(shared)
        return real(model, rows, shared, *args, **kwargs)

    monkeypatch.setattr(objectives.likelihood, "_forward_with_shared_prefix", counted)
    got = objectives.likelihood.continuation_logprobs(lm.model, lm.tok, FEW_SHOT_ROWS, batch_size, DEVICE)
    assert calls and min(calls) >= objectives.likelihood.MIN_SHARED_PREFIX  # the prefix path ran
    plain = objectives.likelihood.continuation_logprobs(lm.model, lm.tok, FEW_SHOT_ROWS, batch_size, DEVICE, share_prefix=False)
    for (context, continuation), (lp, n), (lp0, n0) in zip(FEW_SHOT_ROWS, got, plain):
        want, count = ref_logprob(lm, context, continuation)
        assert n == n0 == count
        assert lp == pytest.approx(want, abs=1e-5 * count) and lp == pytest.approx(lp0, abs=1e-5 * count)


def test_multiple_choice_with_a_shared_prefix_picks_the_same(lm):
    rows = [Example(prompt=FEW_SHOT + q, choices=(" 3", " 4", " 30"), answer=i % 3) for i, q in
            enumerate(["1+2=", "2+2=", "10+20="])]
    mc = objective("multiple_choice", batch_size=9)
    shared = objectives.score(lm.model, lm.tok, rows, mc, DEVICE)
    plain = objectives.score(lm.model, lm.tok, rows, mc, DEVICE, share_prefix=False)
    assert shared == plain


def test_every_recipe_objective_type_is_in_the_registry():
    # One place per type (objectives.OBJECTIVES): the recipe's types, less custom code (its own class).
    from swarm_merge import objectives, recipe

    assert set(objectives.OBJECTIVES) == set(recipe.OBJECTIVE_TYPES) - {"custom"}
    races = {t for t, kind in objectives.OBJECTIVES.items() if kind.per_row}
    assert races == {"exact_match", "multiple_choice", "loglik", "reward", "judge"}
