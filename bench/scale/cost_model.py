"""The cost model: seconds per evaluation and memory per eval mode, from a few measured rates.

An evaluation is a forward over the dev rows plus the mode's rebuild of the merged weights:

    floor      = c_fwd * P * T                       (P parameters, T tokens scored)
    in-memory  = floor + K * P * e / B_mem           (combine from the experts held in memory)
    one-model  = floor + K * P * e / B_one           (pread every expert tensor, combine into the model)
    streaming  = floor + F * K * P * e / B_stream    (the same, per forward; F forwards per evaluation)

with e bytes per element. Where the K experts do not fit in the page cache, every read is
cold: B_one and B_stream are capped by the cold read rate. Memory (anonymous) is the
tool's own estimate per mode (swarm_merge.evaluate.memory_estimate) plus the process's
fixed cost (interpreter, torch, transformers: measured as the floor's peak less its model),
and the final write holds, per output tensor, the K inputs, a float32 result and one
output shard (mergekit).

``calibrate`` reads the rates off one measured configuration (the largest size, the
smallest K: the rebuild is largest against the fixed costs there); ``report`` predicts
every other measured configuration from them (the check: within 25%), then extrapolates
to 7B and 70B on this machine and on one GPU. GPU figures use datasheet rates (stated in
GPUS), not measurements, unless a lent GPU's are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

GIB = 2**30
MODES = ("in-memory", "one-model", "streaming")


@dataclass(frozen=True)
class Shape:
    name: str
    params: float
    largest: float  # elements of the largest tensor (the embeddings or the head)


# Llama-2 7B and 70B (untied head, vocabulary 32000), the shapes most merges are made of.
TARGETS = (Shape("7B", 6.74e9, 32000 * 4096), Shape("70B", 68.98e9, 32000 * 8192))


@dataclass(frozen=True)
class Rates:
    c_fwd: float  # seconds per parameter per token scored
    mem: float  # expert bytes combined per second from memory (in-memory)
    one: float  # expert bytes read and combined per second (one-model, page cache hot)
    stream: float  # the same per forward (streaming)
    cold: float  # expert bytes per second read from disk
    hot: float  # expert bytes per second read from the page cache (pread, no combine)
    overhead: float  # anonymous bytes of a process with torch and transformers loaded, no model
    ram: float  # the machine's memory (bytes)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float
    flops: float  # dense bf16 tensor FLOP/s at the utilisation a forward reaches
    hbm: float  # device memory bytes/s a combine reaches
    h2d: float  # host-to-device bytes/s from pinned memory


# Datasheet figures (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s; H200: 141 GB, 4.8 TB/s), at 40%
# of the FLOP/s and 80% of the bandwidth; PCIe 5 x16 at 25 GB/s pinned. Not measured here.
GPUS = (Gpu("H100 80GB", 80e9, 0.4 * 989e12, 0.8 * 3.35e12, 25e9),
        Gpu("H200 141GB", 141e9, 0.4 * 989e12, 0.8 * 4.8e12, 25e9))


def estimate(params: float, largest: float, k: int, e: int) -> Dict[str, float]:
    """Weight bytes each mode holds: swarm_merge.evaluate.memory_estimate, for a shape not on disk
    (one build thread; its chunk buffers are a few MiB)."""
    chunk = min(256 * 1024, largest)
    return {"model": params * e, "in-memory": (k + 1) * params * e,
            "one-model": params * e + k * chunk * e + chunk * 4,
            "streaming": k * chunk * e + largest * 4 + largest * e}


def auto_mode(est: Dict[str, float], budget: float) -> str:
    """swarm_merge.evaluate.choose_mode's pick: the first of MODES whose estimate fits."""
    return next((m for m in MODES if est[m] <= budget), "streaming")


def write_peak(params: float, largest: float, k: int, e: int, mode: str, est: Dict[str, float]) -> float:
    """The final write's weights: K input tensors in the config's dtype (``e``), a float32
    result, and an output shard (the pipeline's shard size: the mode's estimate, 5 GB in memory)."""
    shard = 5e9 if mode == "in-memory" else max(est[mode], 256 * 2**20)
    return k * largest * e + largest * 4 + min(shard, params * e)


def predict_cpu(rates: Rates, params: float, largest: float, k: int, e: int, tokens: int, mode: str,
                forwards: int = 1) -> Dict[str, float]:
    est = estimate(params, largest, k, e)
    floor = rates.c_fwd * params * tokens
    expert_bytes = k * params * e
    hot = expert_bytes + est[mode] + rates.overhead < rates.ram  # the experts stay in the page cache
    if mode == "in-memory":
        seconds = floor + expert_bytes / rates.mem
    elif mode == "one-model":
        seconds = floor + expert_bytes / (rates.one if hot else min(rates.one, rates.cold))
    else:
        seconds = floor + forwards * expert_bytes / (rates.stream if hot else min(rates.stream, rates.cold))
    return {"seconds": seconds, "floor": floor, "anon": est[mode] + rates.overhead,
            "write": write_peak(params, largest, k, e, mode, est) + rates.overhead}


def predict_gpu(gpu: Gpu, rates: Rates, params: float, largest: float, k: int, e: int, tokens: int,
                mode: str, forwards: int = 1) -> Dict[str, float]:
    """On one GPU: the forward at the roofline (FLOPs or one read of the weights, whichever is
    slower); in-memory combines in device memory; the others read on the host (this machine's
    pread rates, hot or cold) and copy to the device, overlapped (the slower of the two)."""
    floor = max(2 * params * tokens / gpu.flops, params * e / gpu.hbm)
    expert_bytes = k * params * e
    host = rates.hot if expert_bytes < rates.ram else rates.cold  # the GPU host's RAM taken as this machine's
    if mode == "in-memory":
        build = (expert_bytes + params * e) / gpu.hbm
    else:
        build = (forwards if mode == "streaming" else 1) * expert_bytes / min(host, gpu.h2d)
    return {"seconds": floor + build, "floor": floor}


def calibrate(res: dict) -> Rates:
    """The rates of one measured configuration (bench_scale.py's result for one size and K)."""
    w = res["workers"]
    e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
    params, k = res["params"], res["k"]
    floor = w["floor"]["median_s"]
    expert_bytes = k * params * e
    mem = expert_bytes / w["in-memory"]["build_s"] if "in-memory" in w else float("nan")
    one = expert_bytes / w["one-model"]["build_s"]
    stream = w["streaming"]["bytes_read"] / max(w["streaming"]["median_s"] - floor, 1e-9)
    overhead = w["floor"]["peak"]["RssAnon"] - params * e
    import psutil

    return Rates(c_fwd=floor / (params * w["floor"]["tokens"]), mem=mem, one=one, stream=stream,
                 cold=res["bandwidth"]["cold_Bps"], hot=res["bandwidth"]["hot_Bps"], overhead=overhead, ram=psutil.virtual_memory().total)


def _check_rows(rates: Rates, results: List[dict], reference: dict) -> List[str]:
    rows = []
    for res in results:
        e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
        tag = "(calibration)" if res is reference else ""
        tokens = res["workers"]["floor"]["tokens"]
        for mode, w in res["workers"].items():
            if mode == "floor":
                predicted = rates.c_fwd * res["params"] * tokens
                anon = rates.overhead + res["params"] * e
            else:
                p = predict_cpu(rates, res["params"], res["largest"], res["k"], e, tokens, mode)
                predicted, anon = p["seconds"], p["anon"]
            measured = w["median_s"]
            rows.append(f"| {res['size']} K={res['k']} {tag} | {mode} | {predicted:.2f} | {measured:.2f} | "
                        f"{predicted / measured:.2f} | {anon / GIB:.2f} | {w['peak']['RssAnon'] / GIB:.2f} | "
                        f"{anon / w['peak']['RssAnon']:.2f} |")
    return rows


def report(results: List[dict], tokens: int = 2000, gpus=GPUS) -> Optional[Rates]:
    """Print the cost model's check against ``results`` and its extrapolation (``tokens`` per evaluation)."""
    usable = [r for r in results if {"floor", "one-model", "streaming"} <= set(r["workers"])]
    if not usable:
        return None
    with_mem = [r for r in usable if "in-memory" in r["workers"]] or usable
    reference = max(with_mem, key=lambda r: (r["params"], -r["k"]))
    rates = calibrate(reference)
    print(f"\n## The cost model (bench/scale/cost_model.py), calibrated on {reference['size']} K={reference['k']}\n")
    print(f"c_fwd {rates.c_fwd:.3g} s per parameter-token; in-memory combine {rates.mem / 1e9:.2f} GB/s, one-model "
          f"{rates.one / 1e9:.2f} GB/s, streaming {rates.stream / 1e9:.2f} GB/s of expert bytes; cold reads "
          f"{rates.cold / 1e9:.2f} GB/s; fixed anonymous memory {rates.overhead / GIB:.2f} GiB.\n")
    print("| configuration | strategy | predicted s / eval | measured | predicted / measured | predicted anon GiB "
          "| measured worker peak anon GiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(_check_rows(rates, usable, reference)))
    print(f"\n### Extrapolated: {tokens} tokens scored per evaluation, bfloat16 experts\n")
    print("| model | K | where | mode | s / eval | x floor | weights GiB held | fits | auto takes |")
    print("|---|---|---|---|---|---|---|---|---|")
    budget_cpu = 0.7 * rates.ram - rates.overhead
    for shape in TARGETS:
        for k in (4, 10):
            est = estimate(shape.params, shape.largest, k, 2)
            auto = auto_mode(est, budget_cpu)
            for mode in MODES:
                p = predict_cpu(rates, shape.params, shape.largest, k, 2, tokens, mode)
                fits = est[mode] <= budget_cpu
                print(f"| {shape.name} | {k} | this CPU ({rates.ram / GIB:.0f} GiB) | {mode} | {p['seconds']:,.1f} | "
                      f"{p['seconds'] / p['floor']:.2f} | {est[mode] / GIB:,.1f} | {'yes' if fits else 'no'} | "
                      f"{'**auto**' if mode == auto else ''} |")
            for gpu in gpus:
                auto = auto_mode(est, 0.8 * gpu.memory)
                for mode in MODES:
                    p = predict_gpu(gpu, rates, shape.params, shape.largest, k, 2, tokens, mode)
                    fits = est[mode] <= 0.8 * gpu.memory
                    print(f"| {shape.name} | {k} | {gpu.name} | {mode} | {p['seconds']:,.2f} | "
                          f"{p['seconds'] / p['floor']:.2f} | {est[mode] / GIB:,.1f} | {'yes' if fits else 'no'} | "
                          f"{'**auto**' if mode == auto else ''} |")
    return rates
