"""Skill experts: a LoRA trained on one skill, kept as an adapter and merged.

Each expert trains a LoRA (same settings for every skill, see
``spec.ExpertSpec``) on its skill's training pool, with the answers, each
ending in EOS, as the only targets.  It then writes two folders (see
``layout``): the LoRA as a PEFT adapter folder, and the base with the LoRA
merged in (``merge_and_unload``) as a full model folder of the base's dtype
and layout.  Training is deterministic (fixed seeds, deterministic torch
algorithms set by the entry point), so the outputs are bit-identical from run
to run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import cache, layout
from .skills import SKILLS
from .spec import BaseSpec, ExpertSpec

SHIPPED = Path(__file__).resolve().parents[1] / "adapters"
"""recipes/demo/adapters/<skill>/: the four LoRA adapters as this builder trained them (float32, 3.6 MB
each), committed so that a first ``make demo`` merges them instead of training (about 2 minutes on 2
cores). Used only where their build_info.json records this spec and this base spec; ``--train`` ignores
them; ``--ship`` rewrites them from a build."""


def expert_status(out: Path, spec: ExpertSpec) -> str:
    """'ok' when the merged expert and its adapter are both built with this spec."""
    merged = cache.status(layout.expert_dir(out, spec.skill), spec, layout.MODEL_FILES)
    if merged != "ok":
        return merged
    adapter = cache.status(layout.adapter_dir(out, spec.skill), spec, layout.ADAPTER_FILES)
    return "ok" if adapter == "ok" else f"adapter {adapter}"


def shipped_adapter(spec: ExpertSpec, base_spec: BaseSpec):
    """The committed adapter of ``spec.skill`` when it was trained with ``spec`` on a base built with
    ``base_spec`` (its build_info.json says so), else None."""
    folder = SHIPPED / spec.skill
    if not all((folder / f).is_file() for f in (*layout.ADAPTER_FILES, cache.BUILD_INFO)):
        return None
    info = json.loads((folder / cache.BUILD_INFO).read_text())
    if info.get("build_spec") != spec.key() or info.get("base_build_spec") != base_spec.key():
        return None
    return folder


def build_expert(out: Path, spec: ExpertSpec, forbidden: set, *, shipped: Path = None) -> dict:
    """Train the skill's LoRA on ``<out>/base`` (or load the ``shipped`` adapter trained so); write its
    adapter and merged expert folders. Training is deterministic, so both give the same bits."""
    base = layout.base_dir(out)
    if shipped is not None:
        model, tok, extra = load_shipped(base, shipped)
        losses = [extra["first_loss"], extra["last_loss"]]
    else:
        model, tok, losses = train_lora(base, spec, forbidden)
        extra = {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
    save_adapter(model, layout.adapter_dir(out, spec.skill), base, spec, extra)
    merged = model.merge_and_unload()
    merged.eval()
    what = f", with a LoRA trained on the '{spec.skill}' skill merged in"
    layout.save_model_folder(merged, tok, layout.expert_dir(out, spec.skill), spec, extra, what)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def train_lora(base: Path, spec: ExpertSpec, forbidden: set):
    """(peft model, tokenizer, losses): ``spec.steps`` AdamW steps on fresh batches.

    Batches are drawn from the skill's training pool, skipping any prompt in
    ``forbidden`` (the dev and test prompts).
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, spec.dtype))
    torch.manual_seed(spec.seed)  # LoRA A init
    cfg = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=0.0,
        target_modules=list(spec.lora.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    losses = []
    for step, examples in enumerate(training_batches(spec, forbidden)):
        ids, mask, pos, targets = make_batch(tok, examples)
        for g in opt.param_groups:
            g["lr"] = spec.lr * lr_scale(step, spec.steps, spec.warmup)
        k = targets.shape[1]
        # logits at positions -k-1 .. -2 predict the last k tokens
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=k + 1
        ).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, tok, losses


def training_batches(spec: ExpertSpec, forbidden: set):
    """The ``spec.steps`` batches of (prompt, answer) that :func:`train_lora` trains on, drawn from the skill's
    training pool with the spec's seed, skipping any prompt in ``forbidden`` (the same batches every time: a
    bench that draws more evaluation rows leaves these prompts out, bench/demo200/build.py)."""
    rng = random.Random(f"train-{spec.skill}-{spec.seed}")
    make = SKILLS[spec.skill]
    for _ in range(spec.steps):
        examples = []
        while len(examples) < spec.batch_size:
            prompt, answer = make(rng, "train")
            if prompt not in forbidden:
                examples.append((prompt, answer))
        yield examples


def load_shipped(base: Path, shipped: Path):
    """(peft model, tokenizer, the training's losses) from a committed adapter folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((shipped / cache.BUILD_INFO).read_text())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, info["build_spec"]["dtype"]))
    model = PeftModel.from_pretrained(model, shipped)
    return model, tok, {"first_loss": info["first_loss"], "last_loss": info["last_loss"]}


def ship(out: Path, spec: ExpertSpec, base_spec: BaseSpec) -> Path:
    """Copy the built adapter of ``spec.skill`` into :data:`SHIPPED`, with the base's spec recorded."""
    import shutil

    built = layout.adapter_dir(out, spec.skill)
    info = json.loads((built / cache.BUILD_INFO).read_text())
    if info.get("build_spec") != spec.key():
        raise RuntimeError(f"{built} was not built with this spec; build it first")
    final = SHIPPED / spec.skill
    final.mkdir(parents=True, exist_ok=True)
    for name in layout.ADAPTER_FILES:
        shutil.copyfile(built / name, final / name)
    (final / cache.BUILD_INFO).write_text(json.dumps({**info, "base_build_spec": base_spec.key()}, indent=2) + "\n")
    return final


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)


def make_batch(tok, examples):
    """Left-padded batch of prompt+answer+eos; answers end at the last position.

    Returns input_ids, attention_mask, position_ids, targets (-100 = ignore)
    for the last K positions only, K = longest answer + eos.
    """
    import torch

    seqs, answers = [], []
    for prompt, answer in examples:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs.append(p + a)
        answers.append(a)
    width = max(map(len, seqs))
    k = max(map(len, answers))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), k), -100, dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, answers, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
        targets[i, k - len(a) :] = torch.tensor(a)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, targets


def save_adapter(model, final: Path, base: Path, spec: ExpertSpec, extra: dict) -> None:
    """Write the trained LoRA as a PEFT adapter folder (before merging: merging removes it)."""
    ref = layout.base_ref(final, base)
    model.peft_config["default"].base_model_name_or_path = ref  # not the absolute path it was loaded from
    with cache.staged(final) as tmp:
        # save_embedding_layers=False: we never train embeddings; "auto" would look the
        # (relative) base up, on the Hub if it is not a folder from here.
        model.save_pretrained(tmp, save_embedding_layers=False)
        _sort_target_modules(tmp / "adapter_config.json")
        cache.write_build_info(tmp, spec, {"base_model_name_or_path": ref, **extra})
        what = f": a LoRA adapter (PEFT) trained on the '{spec.skill}' skill; its base is the folder {ref}"
        layout.write_card(tmp, f"{spec.skill} (LoRA adapter)", what)  # replaces PEFT's card (absolute paths)
        missing = [f for f in layout.ADAPTER_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained did not write {tmp / missing[0]}")


def _sort_target_modules(config: Path) -> None:
    """PEFT holds target_modules as a set and saves it in hash order, which varies
    from run to run (PYTHONHASHSEED); sort it so the file is the same every build."""
    cfg = json.loads(config.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
