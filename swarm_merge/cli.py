"""Command line: parse, validate, call one library function.

``mergekit-swarm RECIPE.yml [flags]`` runs a search; ``mergekit-swarm compare
RECIPE.yml [flags]`` runs it with the baselines (``--baselines``); ``mergekit-swarm push
OUT_DIR --repo org/name`` pushes a finished run again; ``mergekit-swarm ci
changed|plan|run`` finds the recipes a git change touches and plans or runs them
(the GitHub workflows' entry point); ``mergekit-swarm-yaml``
is mergekit's own ``mergekit-yaml`` with the ``swarm`` method registered.

Exit codes: 0 success, 2 bad input (recipe, experts, data, output folder),
1 failure at run time, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from typing import List, Optional

from swarm_merge.errors import InputError, SwarmMergeError
from swarm_merge.options import OneLineParser

LOG = logging.getLogger("swarm_merge")


def _run_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="mergekit-swarm",
        description="Search merges of expert models with Model Swarms and write the best one with mergekit. "
        "`mergekit-swarm push OUT_DIR --repo org/name` pushes a finished run.",
    )
    p.add_argument("recipe", help="the recipe YAML file")
    p.add_argument("--out", metavar="DIR", help="output folder (overrides output.dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value before validation, e.g. --set swarm.max_iterations=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint in the out dir")
    p.add_argument("--force", action="store_true",
                   help="start over in an out dir that holds an earlier run (deletes only the files that run wrote)")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; write nothing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--seed", type=int, help="override swarm.seed")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="push the result to this Hub repo (overrides output.push_to_hub)")
    p.add_argument("--cache-dir", help="Hub download cache (default: the Hugging Face cache)")
    p.add_argument("--eval-mode", default="auto", choices=["auto", "in-memory", "one-model", "streaming"],
                   help="in-memory: experts held in memory, weights rebuilt in place per evaluation; one-model: "
                   "one model held, each expert tensor read from its file once per evaluation into it; streaming: "
                   "each module's weights built from the experts' files per forward (memory of about one layer); "
                   "auto (default): the first of these that fits --max-memory")
    p.add_argument("--max-memory", metavar="SIZE", type=_size,
                   help="memory the evaluation may use, e.g. 16GiB (default: 70%% of available RAM, 80%% of free GPU memory)")
    p.add_argument("--baselines", action="store_true",
                   help="also run random search and CMA-ES over the same coefficients at the swarm's budget "
                   "(what `mergekit-swarm compare` does)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="with --baselines: run the swarm and every baseline with N seeds (swarm.seed, +1, ...)")
    p.add_argument("--objective-code", metavar="PATH.py:FUNCTION",
                   help="the utility of `type: custom` objectives: FUNCTION(model, tokenizer, rows, device) -> float "
                   "(runs this code; a recipe can never name code)")
    p.add_argument("--allow-task-code", action="store_true",
                   help="let lm_eval task YAML files under an objective's include_path run their Python hooks "
                   "(`!function`, `class`, dataset scripts); refused by default, since a recipe's task folder "
                   "comes with the recipe")
    p.add_argument("--allow-benchmark-tasks", action="store_true",
                   help="let an lm_eval objective search on a public benchmark (a task of lm-evaluation-harness's "
                   "own, or its dataset and split): refused by default, since its scores would then not be held "
                   "out; the card says the search saw it")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="spread the evaluations over N processes on this machine (one per GPU, or CPU processes): "
                   "runs `accelerate launch` for you; the result equals one process's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    return p


def _launch(argv: List[str], n: int, args: argparse.Namespace) -> int:
    """``--num-processes N``: the same command under ``accelerate launch`` (N > 1).

    Bad input is found here first, by a quiet dry run in this one process: otherwise
    every rank would report it, with the launcher's own error lines around them."""
    import subprocess

    from swarm_merge import distributed

    if n < 1:
        raise InputError(f"--num-processes {n}: give 1 or more")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--num-processes inside a launched run: drop it (the launcher already started the processes)")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    if n == 1:
        return main(rest)
    if not args.dry_run:
        import io

        from swarm_merge.pipeline import run

        recipe, options = _recipe_and_options(args)
        run(recipe, dataclasses.replace(options, dry_run=True, progress=False), out=io.StringIO())
    code = subprocess.call(distributed.launch_command(n, rest))
    if code != 0:
        print(f"mergekit-swarm: error: a process of the {n}-process run failed (exit {code}; its own error is above); "
              "fix it and run again with --resume to continue from the last checkpoint", file=sys.stderr)
    return code


def _size(text: str) -> int:
    from swarm_merge.evaluate import parse_bytes

    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:  # 0 used to mean "no limit given" downstream: never silently
        raise argparse.ArgumentTypeError(f"{text!r} is no memory at all; give a size such as 16GiB, or drop the flag")
    return size


def _push_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mergekit-swarm push", description="Push a finished run's output folder to the Hub.")
    p.add_argument("out_dir", help="the output folder of a finished run (holds swarm.json)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repo to push to")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repo private (default: the run's output.private)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # The tool's own lines (swarm_merge.*) and warnings from the rest: mergekit logs "Skipping optional
        # weight ..." on the root logger at INFO, the libraries below chat at INFO and WARNING.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("swarm_merge").setLevel(logging.INFO)
        for noisy in ("transformers", "mergekit", "huggingface_hub", "accelerate", "httpx", "httpx2", "filelock",
                      "urllib3", "lm_eval", "lm-eval"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    _setup_logging(verbose)
    # A CI cancel sends SIGTERM: stop like Ctrl-C (the checkpoint is already on disk).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if argv and argv[0] == "push":
            return _push(_push_parser().parse_args(argv[1:]))
        if argv and argv[0] == "ci":  # what the GitHub workflows call (ci.py)
            from swarm_merge import ci

            return ci.main(argv[1:], run=main)
        if argv and argv[0] == "compare":  # a run with the baselines at the swarm's budget
            args = _run_parser().parse_args(argv[1:])
            args.baselines = True
        else:
            args = _run_parser().parse_args(argv)
        if args.num_processes is not None:
            return _launch(argv, args.num_processes, args)
        return _run(args)
    except InputError as exc:
        _fail(exc, verbose)
        return 2
    except KeyboardInterrupt:
        print("mergekit-swarm: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    except SwarmMergeError as exc:
        _fail(exc, verbose)
        return 1
    except Exception as exc:  # an unexpected failure: one line, the traceback with -v
        _fail(exc, verbose, prefix=f"{type(exc).__name__}: ")
        if not verbose:
            print("mergekit-swarm: run with -v for the traceback", file=sys.stderr)
        return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(exc: BaseException, verbose: bool, prefix: str = "") -> None:
    if verbose:
        LOG.exception("failed")
    message = " ".join(str(exc).split())  # one line
    print(f"mergekit-swarm: error: {prefix}{message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from swarm_merge import distributed
    from swarm_merge.pipeline import run

    recipe, options = _recipe_and_options(args)
    if not args.verbose:
        _quiet_bars()
    try:
        run(recipe, options)
    finally:
        distributed.reset()
    return 0


def _quiet_bars() -> None:
    """One progress bar, the search's (and the Hub's while pulling): not transformers' "Loading weights"
    and "Writing model shards" (its switch turns the Hub's off too, so they are turned back on)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enable_progress_bars()


def _recipe_and_options(args: argparse.Namespace):
    """The recipe (overrides applied) and the RunOptions the flags say, validated."""
    from swarm_merge.options import RunOptions
    from swarm_merge.recipe import load_recipe

    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: give 1 or more")
    if args.seeds > 1 and not args.baselines:
        raise InputError("--seeds runs every method at several seeds, which needs --baselines "
                         "(or `mergekit-swarm compare RECIPE`)")
    if args.out is not None and not args.out.strip():
        raise InputError("--out is empty; give the output folder, or drop --out to use the recipe's output.dir")
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"swarm.seed={args.seed}")
    recipe = load_recipe(args.recipe, overrides)
    options = RunOptions(
        out_dir=args.out,
        resume=args.resume,
        force=args.force,
        dry_run=args.dry_run,
        device=args.device,
        cache_dir=args.cache_dir,
        push_to_hub=args.push_to_hub,
        eval_mode=args.eval_mode,
        max_memory=args.max_memory,
        baselines=args.baselines,
        seeds=args.seeds,
        objective_code=args.objective_code,
        allow_task_code=args.allow_task_code,
        allow_benchmark_tasks=args.allow_benchmark_tasks,
        # Bars on a terminal (or when asked); one log line per iteration otherwise.
        progress=not args.no_progress and (sys.stderr.isatty() or os.environ.get("SWARM_MERGE_PROGRESS") == "1"),
    )
    return recipe, options


def _push(args: argparse.Namespace) -> int:
    from swarm_merge.publish import push

    url = push.push_folder(args.out_dir, args.repo, private=args.private)
    print(f"pushed {args.out_dir} to {args.repo}: {url}")
    return 0


def mergekit_yaml() -> None:
    """mergekit's ``mergekit-yaml`` with ``merge_method: swarm`` available."""
    from mergekit.scripts.run_yaml import main as run_yaml

    from swarm_merge.publish.merge import register

    register()
    run_yaml()


if __name__ == "__main__":
    sys.exit(main())
