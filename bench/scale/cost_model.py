"""The cost model: seconds per evaluation and memory per eval mode, from measured rates.

An evaluation is a forward over the dev rows plus the mode's rebuild of the merged weights
(P parameters, e bytes each, K experts, T tokens scored, F forwards per evaluation):

    floor      = c_fwd * P * T                                  (the forward alone)
    in-memory  = floor + K P e / B_comb                 (combine the experts held in memory)
    one-model  = floor + K P e / B_build                (pread each expert tensor and combine it, on
                                                          every build thread: reads and combines overlap)
    streaming  = floor + F * (K P e / B_build + s_hook * P)

B_build is capped by the pread rate from disk where the K experts do not fit in the page
cache; s_hook is streaming's own cost per parameter per forward (accelerate's hooks and the
fresh memory each module's weights are built into). Memory (anonymous): the tool's estimate
per mode (swarm_merge.evaluate.memory_estimate) plus the process's fixed cost (interpreter,
torch, transformers and the tokenizer, measured before a model loads); streaming holds more
than its estimate: its working set, w times the largest tensor's bytes, is measured.

Where each rate comes from (``calibrate``, one configuration: the largest size, the smallest
K): the pread rates from a read of every expert file (cold: evicted from the page cache
first); B_comb from the in-memory build; B_build from the one-model build; s_hook and w from
the streaming evaluation; c_fwd from the floor. ``report`` then predicts every measured configuration, each with its own measured
floor (the forward's cost is an input; its extrapolation by P is checked on its own line),
prints predicted against measured (the goal: within 25%), and extrapolates to 7B and 70B
on this machine and on one GPU. GPU figures use datasheet rates (GPUS), not measurements.
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
    layers: int = 0


# Llama-2 7B and 70B (untied head, vocabulary 32000), the shapes most merges are made of.
TARGETS = (Shape("7B", 6.74e9, 32000 * 4096, 32), Shape("70B", 68.98e9, 32000 * 8192, 80))


@dataclass(frozen=True)
class Rates:
    c_fwd: float  # seconds per parameter per token scored (the floor)
    comb: float  # expert bytes combined per second, from memory
    build: float  # expert bytes read and combined per second (one-model's build, page cache hot)
    hot: float  # expert bytes read per second with pread from the page cache
    cold: float  # the same from disk (evicted from the page cache)
    hook: float  # streaming's seconds per parameter per forward beyond reading and combining
    stream_ws: float  # streaming's anonymous working set, in multiples of the largest tensor's bytes
    overhead: float  # anonymous bytes of a process with torch and transformers loaded, no model
    ram: float  # the machine's memory (bytes)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float
    flops: float  # dense bf16 tensor FLOP/s at the utilisation a forward reaches
    hbm: float  # device memory bytes/s a combine reaches
    h2d: float  # host-to-device bytes/s from pinned memory
    host_ram: float  # the GPU machine's memory: the page cache that holds the experts
    # Measured on a lent GPU (calibrate_gpu); the datasheet rows leave them unset:
    layer_s: float = 0.0  # a forward's fixed seconds per decoder layer (kernel launches, Python), any batch
    comb: Optional[float] = None  # in-memory's build: (K + 1) x model bytes per second
    host_build: Optional[float] = None  # one-model's build: expert bytes read, copied and combined per second
    stream_s: Optional[float] = None  # streaming's seconds per parameter per forward beyond one-model's build


# Datasheet figures (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s; H200: 141 GB, 4.8 TB/s), at 40%
# of the FLOP/s and 80% of the bandwidth; PCIe 5 x16 at 25 GB/s pinned; a host of 1 TB of memory.
# Not measured here; pread runs at this machine's measured rates (2 cores: a lower bound).
GPUS = (Gpu("H100 80GB", 80e9, 0.4 * 989e12, 0.8 * 3.35e12, 25e9, 1e12),
        Gpu("H200 141GB", 141e9, 0.4 * 989e12, 0.8 * 4.8e12, 25e9, 1e12))


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


def _read_rate(rates: Rates, expert_bytes: float, held: float, ram: Optional[float] = None) -> float:
    """pread's rate: from the page cache where the K experts fit in what the process leaves free."""
    return rates.hot if expert_bytes + held + rates.overhead < 0.9 * (ram or rates.ram) else rates.cold


def predict_cpu(rates: Rates, params: float, largest: float, k: int, e: int, tokens: int, mode: str,
                forwards: int = 1, floor: Optional[float] = None) -> Dict[str, float]:
    est = estimate(params, largest, k, e)
    floor = rates.c_fwd * params * tokens if floor is None else floor
    expert_bytes = k * params * e
    hot = _read_rate(rates, expert_bytes, est[mode]) == rates.hot
    build = expert_bytes / (rates.build if hot else min(rates.build, rates.cold))
    anon = est[mode] + rates.overhead
    if mode == "in-memory":
        seconds = floor + expert_bytes / rates.comb
    elif mode == "one-model":
        seconds = floor + build
    else:
        seconds = floor + forwards * (build + rates.hook * params)
        anon = max(est[mode], rates.stream_ws * largest * e) + rates.overhead
    return {"seconds": seconds, "floor": floor, "anon": anon,
            "write": write_peak(params, largest, k, e, mode, est) + rates.overhead}


def predict_gpu(gpu: Gpu, rates: Rates, params: float, largest: float, k: int, e: int, tokens: int,
                mode: str, forwards: int = 1, layers: int = 0) -> Dict[str, float]:
    """On one GPU: the forward at the roofline (FLOPs, or one read of the weights, whichever is
    slower) plus its fixed cost per layer where measured; in-memory combines in device memory;
    one-model and streaming read on the host (this machine's pread rates, the page cache of
    ``gpu.host_ram``) and copy to the device, overlapped (the slower of the two), or at the rate
    measured on a GPU machine; streaming's hooks as measured on the CPU, or on the GPU."""
    floor = max(2 * params * tokens / gpu.flops, params * e / gpu.hbm) + gpu.layer_s * layers
    expert_bytes = k * params * e
    if mode == "in-memory":
        build = (expert_bytes + params * e) / (gpu.comb or gpu.hbm)
    else:
        host = gpu.host_build or min(_read_rate(rates, expert_bytes, 0, gpu.host_ram), gpu.h2d)
        build = expert_bytes / host
        if mode == "streaming":
            build = forwards * (build + (rates.hook if gpu.stream_s is None else gpu.stream_s) * params)
    return {"seconds": floor + build, "floor": floor}


def calibrate_gpu(res: dict, layers: int, datasheet: Gpu) -> Gpu:
    """``datasheet`` with the rates one GPU run of bench_scale.py measured (one size and K)."""
    w = res["workers"]
    e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
    params, k = res["params"], res["k"]
    roofline = max(2 * params * w["floor"]["tokens"] / datasheet.flops, params * e / datasheet.hbm)
    layer_s = max(w["floor"]["median_s"] - roofline, 0.0) / layers
    host_build = k * params * e / w["one-model"]["build_s"]
    stream = (w["streaming"]["median_s"] - w["floor"]["median_s"] - k * params * e / host_build) / params
    return Gpu(f"{datasheet.name}, measured", datasheet.memory, datasheet.flops, datasheet.hbm, datasheet.h2d,
               datasheet.host_ram, layer_s=layer_s, comb=(k + 1) * params * e / w["in-memory"]["build_s"],
               host_build=host_build, stream_s=max(stream, 0.0))


def calibrate(res: dict) -> Rates:
    """The rates of one measured configuration (bench_scale.py's result for one size and K,
    with an in-memory evaluation)."""
    import psutil

    w = res["workers"]
    e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
    params, k = res["params"], res["k"]
    floor = w["floor"]["median_s"]
    expert_bytes = k * params * e
    comb = expert_bytes / w["in-memory"]["build_s"]
    hot, cold = res["bandwidth"]["hot_Bps"], res["bandwidth"]["cold_Bps"]
    ram = psutil.virtual_memory().total
    build = expert_bytes / w["one-model"]["build_s"]
    hook = (w["streaming"]["median_s"] - floor - expert_bytes / build) / params
    overhead = w["floor"]["base_anon"]
    return Rates(c_fwd=floor / (params * w["floor"]["tokens"]), comb=comb, build=build, hot=hot, cold=cold,
                 hook=max(hook, 0.0),
                 stream_ws=(w["streaming"]["peak"]["RssAnon"] - overhead) / (res["largest"] * e), overhead=overhead,
                 ram=ram)


def _check_rows(rates: Rates, results: List[dict], reference: dict) -> List[str]:
    rows = []
    for res in results:
        e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
        tag = "(calibration)" if res is reference else ""
        tokens = res["workers"]["floor"]["tokens"]
        for mode, w in res["workers"].items():
            measured = w["median_s"]
            if mode == "floor":  # not a mode of the tool; its weights are memory-mapped (file-backed)
                predicted = rates.c_fwd * res["params"] * tokens
                rows.append(f"| {res['size']} K={res['k']} {tag} | floor | {predicted:.2f} | {measured:.2f} | "
                            f"{predicted / measured:.2f} | - | - | - |")
                continue
            p = predict_cpu(rates, res["params"], res["largest"], res["k"], e, tokens, mode,
                            floor=res["workers"]["floor"]["median_s"])
            anon = w["peak"]["RssAnon"]
            rows.append(f"| {res['size']} K={res['k']} {tag} | {mode} | {p['seconds']:.2f} | {measured:.2f} | "
                        f"{p['seconds'] / measured:.2f} | {p['anon'] / GIB:.2f} | {anon / GIB:.2f} | "
                        f"{p['anon'] / anon:.2f} |")
    return rows


def report(results: List[dict], tokens: int = 2000, gpus=GPUS) -> Optional[Rates]:
    """Print the cost model's check against ``results`` and its extrapolation (``tokens`` per evaluation)."""
    usable = [r for r in results if {"floor", "one-model", "streaming"} <= set(r["workers"])]
    with_mem = [r for r in usable if "in-memory" in r["workers"]]
    if not with_mem:
        return None
    reference = max(with_mem, key=lambda r: (r["params"], -r["k"]))
    rates = calibrate(reference)
    print(f"\n## The cost model (bench/scale/cost_model.py), calibrated on {reference['size']} K={reference['k']}\n")
    print(f"c_fwd {rates.c_fwd:.3g} s per parameter-token; combine {rates.comb / 1e9:.2f} GB/s of expert bytes, "
          f"read and combine (one-model) {rates.build / 1e9:.2f} GB/s; pread "
          f"{rates.hot / 1e9:.2f} GB/s from the page cache, {rates.cold / 1e9:.2f} GB/s from disk; streaming's hooks "
          f"{rates.hook * 1e9:.2f} s per 1e9 parameters per forward, its working set {rates.stream_ws:.1f} x the "
          f"largest tensor; fixed anonymous memory {rates.overhead / GIB:.2f} GiB.\n")
    print("| configuration | strategy | predicted s / eval | measured | predicted / measured | predicted anon GiB "
          "| measured worker peak anon GiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(_check_rows(rates, usable, reference)))
    print("\n| whole run | mode | predicted search anon GiB | measured | predicted write anon GiB | measured |")
    print("|---|---|---|---|---|---|")
    for res in usable:
        e = 2 if res["dtype"] in ("bfloat16", "float16") else 4
        for run in res["runs"]:
            p = predict_cpu(rates, res["params"], res["largest"], res["k"], e, 0, run["ran"])
            search, write = run["peaks"].get("search"), run["peaks"].get("write")
            print(f"| {res['size']} K={res['k']} | {run['ran']} | {p['anon'] / GIB:.2f} | "
                  f"{search['RssAnon'] / GIB if search else float('nan'):.2f} | {p['write'] / GIB:.2f} | "
                  f"{write['RssAnon'] / GIB if write else float('nan'):.2f} |")
    print(f"\n### Extrapolated: {tokens} tokens scored per evaluation, bfloat16 experts\n")
    print("The tool's weight estimate decides what fits (auto: the first of in-memory, one-model, streaming "
          "within 70% of the CPU's free memory or 80% of the GPU's); memory is the process's anonymous peak on the "
          "CPU, the weights held on the GPU.\n")
    print("| model | K | where | mode | s / eval | x floor | memory GiB | fits | auto takes |")
    print("|---|---|---|---|---|---|---|---|---|")
    budget_cpu = 0.7 * rates.ram - rates.overhead
    for shape in TARGETS:
        for k in (4, 10):
            est = estimate(shape.params, shape.largest, k, 2)
            rows = [(f"this CPU ({rates.ram / GIB:.0f} GiB)", budget_cpu,
                     lambda mode, shape=shape, k=k: predict_cpu(rates, shape.params, shape.largest, k, 2, tokens, mode))]
            rows += [(gpu.name, 0.8 * gpu.memory,
                      lambda mode, gpu=gpu, shape=shape, k=k: predict_gpu(gpu, rates, shape.params, shape.largest, k, 2,
                                                                          tokens, mode, layers=shape.layers))
                     for gpu in gpus]
            for where, budget, predict in rows:
                auto = auto_mode(est, budget)
                for mode in MODES:
                    p = predict(mode)
                    held = p.get("anon", max(est[mode], rates.stream_ws * shape.largest * 2)
                                 if mode == "streaming" else est[mode])
                    print(f"| {shape.name} | {k} | {where} | {mode} | {p['seconds']:,.2f} | "
                          f"{p['seconds'] / p['floor']:.2f} | {held / GIB:,.1f} | "
                          f"{'yes' if est[mode] <= budget else 'no'} | {'**auto**' if mode == auto else ''} |")
    return rates


def report_gpu(results: List[dict], layers: int, datasheet: Gpu = GPUS[1], tokens: int = 2000) -> Gpu:
    """The GPU rows again, from a GPU run of bench_scale.py (one size, ``layers`` decoder layers):
    calibrated on its smallest K, checked on the others, extrapolated to 7B and 70B."""
    usable = sorted((r for r in results if {"floor", "in-memory", "one-model", "streaming"} <= set(r["workers"])),
                    key=lambda r: r["k"])
    reference = usable[0]
    gpu = calibrate_gpu(reference, layers, datasheet)
    print(f"\n## The cost model on {gpu.name}, calibrated on {reference['size']} K={reference['k']}\n")
    print(f"a forward's fixed cost {gpu.layer_s * 1e3:.2f} ms per layer; in-memory's build {gpu.comb / 1e12:.2f} TB/s "
          f"of (K + 1) x model bytes; one-model's build {gpu.host_build / 1e9:.2f} GB/s of expert bytes; streaming "
          f"{gpu.stream_s * 1e9:.3f} s per 1e9 parameters per forward beyond that.\n")
    print("| configuration | mode | predicted s / eval | measured | predicted / measured |")
    print("|---|---|---|---|---|")
    for res in usable:
        tok = res["workers"]["floor"]["tokens"]
        for mode in ("floor",) + MODES:
            p = predict_gpu(gpu, None, res["params"], res["largest"], res["k"], 2, tok,
                            "in-memory" if mode == "floor" else mode, layers=layers)
            pred = p["floor"] if mode == "floor" else p["seconds"]
            meas = res["workers"][mode]["median_s"]
            print(f"| {res['size']} K={res['k']}{' (calibration)' if res is reference else ''} | {mode} | "
                  f"{pred:.3f} | {meas:.3f} | {pred / meas:.2f} |")
    print(f"\n### Extrapolated on {gpu.name}: {tokens} tokens scored per evaluation\n")
    print("| model | K | mode | s / eval | x floor | weights on the GPU GiB | fits | auto takes |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in TARGETS:
        for k in (4, 10):
            est = estimate(shape.params, shape.largest, k, 2)
            auto = auto_mode(est, 0.8 * gpu.memory)
            for mode in MODES:
                p = predict_gpu(gpu, None, shape.params, shape.largest, k, 2, tokens, mode, layers=shape.layers)
                print(f"| {shape.name} | {k} | {mode} | {p['seconds']:,.2f} | {p['seconds'] / p['floor']:.2f} | "
                      f"{est[mode] / GIB:,.1f} | {'yes' if est[mode] <= 0.8 * gpu.memory else 'no'} | "
                      f"{'**auto**' if mode == auto else ''} |")
    return gpu
