"""Throughput benchmark: images/s and peak memory of inference and training steps, optionally against timm.

Contestants (ours; with `--vs timm` timm's counterpart with our weights loaded, so both compute the same function;
with `--vs reference` our plain model, with no backend applied) are timed in the same
process (with `--isolate`, each repetition in a fresh one), alternating repetition by repetition, on identical
inputs; a large GEMM is timed in the same loop as the machine's reference matrix-multiply rate. Medians and
min-max spreads are reported, because a shared machine's timings drift. Rows go to a rich table and are appended
to `results/bench.csv`.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tntcli.engine.runtime import autocast, count_gmacs, device_name, resolve_device, synchronize, timed
from tntcli.engine.step import TrainStep, adamw
from tntcli.errors import TntError
from tntcli.backends import apply_backend
from tntcli.backends.cpu import ONEDNN_LINEAR, onednn_linear
from tntcli.models.registry import create_model, get_spec
from tntcli.results import atomic_write_text, locked

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train")
TIMM_NAMES = {"tnt-s": "tnt_s_patch16_224", "tnt-b": "tnt_b_patch16_224", "tnt-s-legacy": "tnt_s_legacy_patch16_224",
              "deit-ti": "deit_tiny_patch16_224", "deit-s": "deit_small_patch16_224", "deit-b": "deit_base_patch16_224"}
GEMM_SIZES = {"cpu": 2048, "cuda": 8192}   # reference matmul side per device: big enough to reach the peak rate
MIN_REP_SECONDS = 0.2                 # fast steps (GPU) repeat within a rep so each timing is well above timer noise
MAX_ITERS = 100                       # ...but a call timed cold (or on a loaded machine) must not run for minutes
TRAIN_MAC_FACTOR = 3                  # forward + backward ~ 3x the forward MACs (backward computes two products)


@dataclass
class BenchOptions:
    models: list[str]
    batch_size: int = 32
    precision: str = "fp32"
    modes: tuple[str, ...] = MODES
    compile: bool = False
    threads: int | None = None
    reps: int = 5
    warmup: int = 3                   # CPU training: the first steps page-fault while glibc's heap grows
    device: str = "auto"
    vs_timm: bool = False
    vs_reference: bool = False
    grad_checkpointing: bool = False
    measure_memory: bool = True
    isolate: bool = False             # time each repetition in a fresh process (_isolated_steps)
    gemm_size: int | None = None      # None: GEMM_SIZES for the device
    min_rep_seconds: float = MIN_REP_SECONDS
    arch: dict[str, Any] = field(default_factory=dict)   # e.g. {"depth": 1}: reduced models for tests
    drop_path: float = 0.1            # the paper recipe's stochastic depth (it changes what training compiles)


@dataclass
class Contestant:
    model: str                        # our registry name
    impl: str                         # "tntcli", "timm" or "reference"
    module: nn.Module
    max_abs_diff: float | None = None  # logits vs ours: proves both compute the same function


# ----------------------------------------------------------------------------------------------- environment
def precision_autocast(device: torch.device, precision: str):
    return autocast(device, PRECISIONS[precision])


# ----------------------------------------------------------------------------------------------- contestants
def _import_timm():
    try:
        import timm
    except ImportError:
        raise TntError("--vs timm needs the timm package, which is not installed (pip install timm)") from None
    return timm


def with_backend(model: nn.Module, mode: str, opts: BenchOptions, device: torch.device) -> nn.Module:
    """A copy of our plain model with the speed paths the engine would give it for `mode` on `device`."""
    fast = copy.deepcopy(model).to(device)
    dtype = None if opts.precision == "fp32" else PRECISIONS[opts.precision]
    apply_backend(fast, device=device, dtype=dtype, training=mode == "train", batch_size=opts.batch_size)
    return fast


def _max_logit_diff(ours: nn.Module, other: nn.Module) -> float:
    """Max |logit difference| between our model with its CPU inference paths and `other`, in fp32."""
    x = torch.randn(2, 3, ours.cfg.img_size, ours.cfg.img_size, generator=torch.Generator().manual_seed(0))
    fast = copy.deepcopy(ours)
    apply_backend(fast, device="cpu", training=False)
    with torch.no_grad():
        return (fast.eval()(x) - other.eval()(x)).abs().max().item()


def reference_counterpart(name: str, ours: nn.Module) -> Contestant:
    """Our model with no backend applied: the plain aten reference."""
    ref = copy.deepcopy(ours)
    return Contestant(name, "reference", ref, _max_logit_diff(ours, ref))


def _timm_model(name: str, arch: dict[str, Any]) -> nn.Module:
    return _import_timm().create_model(TIMM_NAMES[name], pretrained=False, **arch)


def timm_counterpart(name: str, ours: nn.Module, arch: dict[str, Any]) -> Contestant:
    """timm's model of the same architecture with our weights, and the max |logit difference| to ours."""
    if name not in TIMM_NAMES:
        raise TntError(f"{name} has no timm counterpart; --vs timm works for {', '.join(TIMM_NAMES)}")
    unsupported = sorted(set(arch) - {"depth"})
    if unsupported:
        raise TntError(f"--vs timm can only reduce depth, not {', '.join(unsupported)}")
    from tntcli.models.weights import export_timm

    ref = _timm_model(name, {**arch, "drop_path_rate": ours.cfg.drop_path_rate})
    ref.load_state_dict(export_timm(ours))
    return Contestant(name, "timm", ref, _max_logit_diff(ours, ref))


def build_contestants(opts: BenchOptions) -> list[Contestant]:
    out = []
    for name in opts.models:
        get_spec(name)
        ours = create_model(name, **{"drop_path_rate": opts.drop_path, **opts.arch})
        out.append(Contestant(name, "tntcli", ours))
        if opts.vs_reference:
            out.append(reference_counterpart(name, ours))
        if opts.vs_timm:
            out.append(timm_counterpart(name, ours, opts.arch))
    return out


# ----------------------------------------------------------------------------------------------- steps
def make_step(c: Contestant, mode: str, opts: BenchOptions, device: torch.device, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], None]:
    """One inference forward or one training step (forward, cross-entropy, backward, AdamW) of a contestant."""
    module = with_backend(c.module, mode, opts, device) if c.impl == "tntcli" else c.module.to(device)
    if opts.grad_checkpointing:
        if not hasattr(module, "set_grad_checkpointing"):
            raise TntError(f"{c.model} ({c.impl}) has no activation checkpointing")
        module.set_grad_checkpointing(True)
    model = torch.compile(module) if opts.compile else module
    if mode == "infer":
        module.eval()

        def infer() -> None:
            with torch.inference_mode(), precision_autocast(device, opts.precision):
                model(x)
        return infer

    module.train()
    step = TrainStep(model, module, adamw(module.parameters(), device, lr=1e-4),
                     autocast=lambda: precision_autocast(device, opts.precision))

    def train() -> None:
        step(x, y)
    return train


def gemm_steps(device: torch.device, precision: str, size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The reference matmul on each library that can run it. On CPU fp32 that is aten's mm (MKL) and oneDNN, which
    ran it 2.4x faster on an AMD AVX-512 EPYC (MKL takes its AVX2 code there); the faster one is the machine's rate."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=g, dtype=PRECISIONS[precision]) for _ in range(2))
    steps = {"aten": lambda: torch.mm(a, b)}
    if device.type == "cpu" and precision == "fp32" and ONEDNN_LINEAR:
        b_rows = b.t().contiguous()                 # a linear layer's weight: a @ b_rows.T is a @ b
        steps["oneDNN"] = lambda: onednn_linear(a, b_rows, None)
    return steps


def _iters_per_rep(fn: Callable[[], None], device: torch.device, min_seconds: float) -> int:
    if min_seconds <= 0:
        return 1
    return min(MAX_ITERS, max(1, math.ceil(min_seconds / timed(fn, device))))


def _warm_up(step: Callable[[], None], device: torch.device, opts: BenchOptions) -> int:
    """Run the warm-up steps (compilation happens here); return the calls per timed repetition."""
    for _ in range(opts.warmup):
        step()
    return _iters_per_rep(step, device, opts.min_rep_seconds)


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    """Peak tensor memory (MiB) during one call of `fn`, everything already allocated included, and its source.

    GPU: the CUDA allocator's max_memory_allocated. CPU: PyTorch's profiler memory timeline (tensor allocations,
    not process RSS, which glibc's caching makes unattributable between contestants); n/a if it is unavailable.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    # Kineto logs its start/stop and, on a machine without a GPU, a harmless "gpuGetDeviceCount failed" ERROR line
    # to stderr; level 6 keeps it quiet (a KINETO_LOG_LEVEL the user set wins). Read at the profiler's first use.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return max(sum(s) for s in sizes) / 2 ** 20, "profiler memory timeline"
    except Exception:                                        # private API: report n/a rather than guess
        return None, "n/a"


# ----------------------------------------------------------------------------------------------- the run
def run_bench(opts: BenchOptions, console: Console | None = None) -> list[dict[str, Any]]:
    """Time every (model, impl) for each mode, alternating; return one record per (model, impl, mode)."""
    if opts.precision not in PRECISIONS:
        raise TntError(f"unknown precision '{opts.precision}'; choose fp32, bf16 or fp16")
    bad = [m for m in opts.modes if m not in MODES]
    if bad or not opts.modes:
        raise TntError(f"unknown mode {bad or opts.modes}; choose infer, train or both")
    if opts.reps < 1 or opts.batch_size < 1 or opts.warmup < 0:
        raise TntError("--reps and --batch-size must be at least 1, --warmup at least 0")
    device = resolve_device(opts.device)
    if opts.gemm_size is None:
        opts = dataclasses.replace(opts, gemm_size=GEMM_SIZES[device.type])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    contestants = build_contestants(opts)
    macs = _gmacs_per_image(contestants)
    records = []
    for mode in opts.modes:
        records += _run_mode(mode, contestants, macs, opts, device, console)
    return records


def _gmacs_per_image(contestants: list[Contestant]) -> dict[str, float | None]:
    """fvcore forward GMACs of one image through our model (timm's counterpart computes the same function)."""
    out = {}
    for c in contestants:
        if c.impl == "tntcli":
            try:
                out[c.model] = count_gmacs(c.module.cfg)
            except Exception:                                # a tracer failure costs a column, not the run
                out[c.model] = None
    return out


def _run_mode(mode: str, contestants: list[Contestant], macs: dict[str, float | None], opts: BenchOptions,
              device: torch.device, console: Console | None) -> list[dict[str, Any]]:
    img = contestants[0].module.cfg.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(opts.batch_size, 3, img, img, generator=g).to(device)
    y = torch.randint(0, contestants[0].module.cfg.num_classes, (opts.batch_size,), generator=g).to(device)
    gemms = gemm_steps(device, opts.precision, opts.gemm_size)
    for gemm in gemms.values():
        gemm()
    gemm_iters = {lib: _iters_per_rep(gemm, device, opts.min_rep_seconds) for lib, gemm in gemms.items()}
    times: dict[int, list[float]] = {id(c): [] for c in contestants}
    gemm_times: dict[str, list[float]] = {lib: [] for lib in gemms}
    steps = {}
    with tempfile.TemporaryDirectory(prefix="tnt-bench-") as folder:     # holds the --isolate children's inputs
        if opts.isolate:
            rep_times = _isolated_steps(contestants, mode, opts, device, x, y, Path(folder))
        else:
            steps = {id(c): make_step(c, mode, opts, device, x, y) for c in contestants}
            iters = {id(c): _warm_up(steps[id(c)], device, opts) for c in contestants}
            rep_times = {id(c): lambda c=c: timed(steps[id(c)], device, iters[id(c)]) for c in contestants}
        for rep in range(opts.reps):                         # alternate: a drifting machine load hits all alike
            if console:
                console.print(f"[dim]{mode}: rep {rep + 1}/{opts.reps}[/]", highlight=False)
            for c in contestants:
                times[id(c)].append(rep_times[id(c)]())
            for lib, gemm in gemms.items():
                gemm_times[lib].append(timed(gemm, device, gemm_iters[lib]))
    gemm_lib = min(gemm_times, key=lambda lib: statistics.median(gemm_times[lib]))
    gemm_gmacs = opts.gemm_size ** 3 / statistics.median(gemm_times[gemm_lib]) / 1e9
    if console:
        rates = ", ".join(f"{lib} {opts.gemm_size ** 3 / statistics.median(t) / 1e9:.1f}" for lib, t in gemm_times.items())
        console.print(f"[dim]GEMM reference {mode}: {rates} GMAC/s; the rate is {gemm_lib}'s[/]", highlight=False)
    steps.clear()                                            # frees the timed steps' optimiser states
    records = []
    for c in contestants:
        peak, source = _peak_memory_alone(c, contestants, mode, opts, device, x, y) if opts.measure_memory \
            else (None, "off")
        records.append(_record(c, mode, times[id(c)], peak, source, macs.get(c.model), gemm_gmacs, opts, device))
    for c in contestants:
        c.module.cpu()                                       # free the device for the next mode's contestants
    _add_ratios(records)
    return records


def _peak_memory_alone(c: Contestant, contestants: list[Contestant], mode: str, opts: BenchOptions,
                       device: torch.device, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, str]:
    """Peak memory of one step of `c` with only `c` on the device: the other contestants' weights, gradients and
    optimiser states are moved off or freed first. One untimed step first, so the optimiser state exists as in
    the timed steps."""
    for other in contestants:
        if other is not c:
            other.module.cpu()
            for p in other.module.parameters():
                p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = make_step(c, mode, opts, device, x, y)
    step()
    return peak_memory_mb(step, device)


def _isolated_steps(contestants: list[Contestant], mode: str, opts: BenchOptions, device: torch.device,
                    x: torch.Tensor, y: torch.Tensor, folder: Path) -> dict[int, Callable[[], float]]:
    """For each contestant, a function that times one repetition in a fresh Python process.

    In one process the contestants share the allocator: on CPU, glibc's heap and its page faults carry over from
    one contestant's step to the next and shifted training ratios by several percent in our measurements. Each
    process builds the contestant afresh with the run's weights, runs the warm-up steps and one timed repetition."""
    paths = {}
    for i, c in enumerate(contestants):
        paths[id(c)] = folder / f"contestant{i}.pt"
        torch.save({"model": c.model, "impl": c.impl, "state_dict": c.module.state_dict(), "mode": mode,
                    "opts": opts, "device": str(device), "x": x.cpu(), "y": y.cpu(),
                    "threads": torch.get_num_threads()}, paths[id(c)])

    def run(c: Contestant) -> float:
        code = "import sys; from tntcli.bench import isolated_rep; isolated_rep(sys.argv[1])"
        done = subprocess.run([sys.executable, "-c", code, str(paths[id(c)])], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise TntError(f"isolated run of {c.model} ({c.impl}) failed: {lines[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return {id(c): lambda c=c: run(c) for c in contestants}


def isolated_rep(spec_path: str) -> None:
    """Child side of `--isolate`: warm up one contestant, time one repetition, print {"seconds": s} as JSON."""
    spec = torch.load(spec_path, weights_only=False)
    opts, device = spec["opts"], torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    name, arch = spec["model"], opts.arch
    drop_path = {"drop_path_rate": opts.drop_path}
    module = (_timm_model(name, {**arch, **drop_path}) if spec["impl"] == "timm"
              else create_model(name, **{**drop_path, **arch}))
    module.load_state_dict(spec["state_dict"])
    contestant = Contestant(spec["model"], spec["impl"], module)
    step = make_step(contestant, spec["mode"], opts, device, spec["x"].to(device), spec["y"].to(device))
    iters = _warm_up(step, device, opts)
    print(json.dumps({"seconds": timed(step, device, iters)}))


def _record(c: Contestant, mode: str, seconds: list[float], peak: float | None, mem_source: str,
            gmacs: float | None, gemm_gmacs: float, opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    rates = sorted(opts.batch_size / s for s in seconds)
    median = statistics.median(rates)
    achieved = None if gmacs is None else gmacs * median * (TRAIN_MAC_FACTOR if mode == "train" else 1)
    return {
        "time": dt.datetime.now().isoformat(timespec="seconds"), "model": c.model, "impl": c.impl, "mode": mode,
        "batch": opts.batch_size, "precision": opts.precision, "compile": opts.compile, "isolate": opts.isolate,
        "grad_checkpointing": opts.grad_checkpointing, "arch": ",".join(f"{k}={v}" for k, v in opts.arch.items()),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "reps": len(seconds), "img_per_s": round(median, 3),
        "img_per_s_min": round(rates[0], 3), "img_per_s_max": round(rates[-1], 3),
        "spread": round((rates[-1] - rates[0]) / median, 3), "vs_timm": None, "vs_reference": None,
        "peak_mem_mb": None if peak is None else round(peak, 1), "mem_source": mem_source,
        "gmacs_per_img": None if gmacs is None else float(f"{gmacs:.6g}"),
        "achieved_gmacs_per_s": None if achieved is None else float(f"{achieved:.4g}"),
        "gemm_size": opts.gemm_size, "gemm_gmacs_per_s": float(f"{gemm_gmacs:.4g}"),
        "frac_of_gemm": None if achieved is None else float(f"{achieved / gemm_gmacs:.4g}"),
        "max_abs_diff_vs_ours": c.max_abs_diff,
        "tf32": tf32_state(device), "drop_path": opts.drop_path,
    }


def tf32_state(device: torch.device) -> str:
    """Whether fp32 matmuls and convolutions may run in TF32 on the GPU ("n/a" on a CPU): it moves fp32 figures
    by several times on Ampere and later."""
    if device.type != "cuda":
        return "n/a"
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return f"matmul {'on' if matmul else 'off'}, cudnn {'on' if cudnn else 'off'}"


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """Ours / timm and ours / reference throughput for each model that has them (same mode, same run)."""
    for impl in ("timm", "reference"):
        rate = {r["model"]: r["img_per_s"] for r in records if r["impl"] == impl}
        for r in records:
            if r["impl"] == "tntcli" and r["model"] in rate:
                r[f"vs_{impl}"] = round(r["img_per_s"] / rate[r["model"]], 3)


# ----------------------------------------------------------------------------------------------- output
def append_csv(records: list[dict[str, Any]], folder: str | os.PathLike, name: str = "bench.csv") -> Path:
    """Append rows to folder/bench.csv under the folder lock, rewriting atomically (new columns are merged)."""
    path = Path(folder) / name
    with locked(folder):
        old = pd.read_csv(path) if path.exists() else pd.DataFrame()
        df = pd.concat([old, pd.DataFrame(records)], ignore_index=True)
        return atomic_write_text(path, df.to_csv(index=False))


def _fmt(value, spec: str = "", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_table(records: list[dict[str, Any]], console: Console) -> None:
    first = records[0]
    table = Table(title=f"{first['device_name']}, torch {first['torch']}, batch {first['batch']}, "
                        f"{first['precision']}, compile {'on' if first['compile'] else 'off'}, "
                        f"{first['threads']} threads, median of {first['reps']} reps"
                        f"{', each in a fresh process' if first['isolate'] else ''}")
    for col in ("model", "impl", "mode", "img/s", "min-max", "x timm", "x ref", "peak MiB", "GMAC/s", "of GEMM",
                "Δ logits"):
        table.add_column(col, justify="left" if col in ("model", "impl", "mode") else "right")
    for r in records:
        table.add_row(r["model"], r["impl"], r["mode"], f"{r['img_per_s']:.2f}",
                      f"{r['img_per_s_min']:.2f}-{r['img_per_s_max']:.2f}", _fmt(r["vs_timm"], ".2f", "–"),
                      _fmt(r["vs_reference"], ".2f", "–"),
                      _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["achieved_gmacs_per_s"], ".1f"),
                      _fmt(r["frac_of_gemm"], ".1%"), _fmt(r["max_abs_diff_vs_ours"], ".1e", "–"))
    console.print(table)
    console.print(f"GEMM {first['gemm_size']}^3 {first['precision']}: {first['gemm_gmacs_per_s']:.1f} GMAC/s in the "
                  f"same run. Train GMAC/s counts {TRAIN_MAC_FACTOR}x the forward MACs. Peak memory: {first['mem_source']}, "
                  f"each contestant alone on the device. TF32: {first['tf32']}.")
