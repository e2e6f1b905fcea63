"""Benchmark: the peak memory of a whole run (search, baselines, mergekit write, card) per eval mode.

Runs ``mergekit-swarm`` on the demo recipe once per mode, each in its own
process, and samples its /proc status every 0.2 s: anonymous memory
(RssAnon: what runs a machine out of memory) and file-backed memory (RssFile:
pages of mapped files, which the kernel can drop; container limits may still
count them), split by stage from the run's log: the search (model load
included), the baselines (experts, uniform average, winner on dev and test),
the final write with mergekit (and the card). Prints one table. Asserts nothing.

    .venv/bin/python bench/whole_run_memory.py [--modes in-memory,one-model,streaming] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(mode: str, overrides, out_dir: Path, *, recipe: Path = REPO / "recipes" / "demo.yml",
            extra=()) -> dict:
    """One ``mergekit-swarm`` run in its own process: its wall time, the mode it ran, and per stage
    (search, baselines, write) the peak RssAnon / RssFile / VmRSS and the seconds the stage took."""
    cmd = [sys.executable, "-m", "swarm_merge.cli", str(recipe), "--out", str(out_dir),
           "--eval-mode", mode, "--no-progress", *extra, *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.perf_counter()
    stage = {"now": "search"}
    began = {"search": 0.0}
    peaks: dict = {}
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("evaluation:"):  # "evaluation: one-model on cpu"
                stage["mode"] = line.split()[1]
            elif line.startswith("scoring the experts"):
                stage["now"] = "baselines"
                began["baselines"] = time.perf_counter() - start
            elif line.startswith("writing the merge"):
                stage["now"] = "write"
                began["write"] = time.perf_counter() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        s = _status(proc.pid)
        if s:
            p = peaks.setdefault(stage["now"], {"RssAnon": 0, "RssFile": 0, "VmRSS": 0})
            for k, v in s.items():
                p[k] = max(p[k], v)
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{''.join(lines[-20:])}")
    ends = sorted(began.values())[1:] + [wall]
    seconds = {name: end - t for (name, t), end in zip(sorted(began.items(), key=lambda kv: kv[1]), ends)}
    return {"mode": mode, "ran": stage.get("mode", mode), "wall": wall, "peaks": peaks, "seconds": seconds,
            "log": "".join(lines)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="in-memory,one-model,streaming")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="recipe overrides, e.g. objective.type=loglik")
    args = p.parse_args()
    mib = 2**20
    print(f"# whole-run peak memory, recipes/demo.yml {' '.join(args.overrides)}; sampled every 0.2 s")
    stages = ("search", "baselines", "write")
    print("| mode | wall s | " + " | ".join(f"{st}: anon / file MiB" for st in stages) + " | whole run: RSS MiB |")
    print("|---|---|" + "---|" * (len(stages) + 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            r = measure(mode, args.overrides, Path(tmp) / mode)
            rows.append(r)
            cells = []
            for st in stages:
                v = r["peaks"].get(st)
                cells.append(f"{v['RssAnon'] / mib:,.0f} / {v['RssFile'] / mib:,.0f}" if v else "-")
            whole = max(v["VmRSS"] for v in r["peaks"].values())
            print(f"| {mode} | {r['wall']:.0f} | " + " | ".join(cells) + f" | {whole / mib:,.0f} |", flush=True)
    base = next((r for r in rows if r["mode"] == "in-memory"), None)
    if base:
        whole = {r["mode"]: max(v["VmRSS"] for v in r["peaks"].values()) for r in rows}
        anon = {r["mode"]: max(v["RssAnon"] for v in r["peaks"].values()) for r in rows}
        for mode in whole:
            print(f"{mode}: whole-run peak RSS {whole[mode] / whole['in-memory']:.2f} x in-memory's "
                  f"(anon {anon[mode] / anon['in-memory']:.2f} x)")


if __name__ == "__main__":
    main()
