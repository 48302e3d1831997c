"""The GPU check: every figure the first GPU session needs, in one run, into one Markdown file (see gpu-check.sh).

Sections: (1) SDPA probe at TNT's inner-attention shapes across SDPA's kernels, our chunked SDPA and the explicit
path, bf16 and fp32, across the 65,535-sequence grid edge; (2) `tnt bench` of TNT-S and DeiT-S against timm in
bf16, eager and compiled, batch 128 and 256; (3) the augmentation stage alone on the device; (4) synthetic JPEGs ->
`tnt data write` (when FFCV imports) -> 20 training steps -> `tnt eval` -> `--resume`, the training steps under
`torch.cuda.set_sync_debug_mode("warn")` (every host sync they make is counted). `--cpu --quick` runs the same
sections tiny on the CPU, so CI keeps the script alive.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (CI)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and models, a few steps")
    ap.add_argument("--out", type=Path, default=Path("gpu-check.md"))
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device; use --cpu --quick for the CPU smoke run")
    report = Report(args.out, device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for title, section in [("SDPA probe: the inner attention's shapes", sdpa_probe),
                               ("tnt bench vs timm", bench),
                               ("Augmentation stage alone", augmentation),
                               ("Train 20 steps -> eval -> resume", train_eval_resume)]:
            report.section(title, lambda s=section: s(device, args.quick, Path(tmp), report))
    print(f"wrote {args.out}")
    sys.exit(1 if report.failed else 0)


class Report:
    """Markdown written after every section, so a run cut short still leaves what it measured."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.failed = path, []
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        self.lines = [f"# gpu-check on {name}", "",
                      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
                      f"python {platform.python_version()}; TF32 matmul "
                      f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}", ""]

    def section(self, title: str, run) -> None:
        self.lines += [f"## {title}", ""]
        start = time.perf_counter()
        try:
            run()
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
            self.failed.append(title)
            self.lines += ["**failed:**", "```", traceback.format_exc(limit=6).strip(), "```"]
        self.lines += ["", f"_{time.perf_counter() - start:.0f} s_", ""]
        self.path.write_text("\n".join(self.lines) + "\n")
        print(f"[gpu-check] {title}: {time.perf_counter() - start:.0f} s", flush=True)

    def table(self, header: list[str], rows: list[list]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]

    def text(self, *lines: str) -> None:
        self.lines += list(lines)


def _time(fn, device: torch.device, reps: int) -> float:
    """Milliseconds a call."""
    from tntcli.backends.cuda import seconds_per_call

    return seconds_per_call(fn, device, reps) * 1e3


# ------------------------------------------------------------------------------------------- 1. SDPA probe
def sdpa_probe(device: torch.device, quick: bool, tmp: Path, report: Report) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tntcli.backends import common, cuda
    from tntcli.models.layers import TransformerLayer

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if device.type == "cpu":
        kernels = {"math": SDPBackend.MATH}
    # TNT-S / TNT-B inner layers: 4 heads of 6 / 10 over 16 words; B*196 sequences, 334 -> 65,464, 335 -> 65,660
    batches = [2] if quick else [128, 334, 335]
    limit = 5 if quick else cuda.MAX_GRID_Y                    # quick: the chunking is exercised at a lowered limit
    rows = []
    for head_dim in (6, 10):
        for dtype in (torch.bfloat16, torch.float32):
            for batch in batches:
                seqs = batch * (4 if quick else 196)
                layer = TransformerLayer(4 * head_dim, 4).to(device)
                x = torch.randn(seqs, 16, 4 * head_dim, device=device, requires_grad=True)
                q, k, v = (torch.randn(seqs, 4, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                for name, kernel in kernels.items():
                    rows.append([head_dim, str(dtype)[6:], seqs, f"SDPA {name}", _probe(
                        lambda kernel=kernel: _sdpa_step(q, k, v, kernel, sdpa_kernel), device)])
                for label, cls in [("chunked SDPA", cuda.ChunkedAttention), ("explicit", common.ExplicitAttention)]:
                    candidate = TransformerLayer(4 * head_dim, 4).to(device)
                    candidate.load_state_dict(layer.state_dict())
                    common.become(candidate.attn, cls)
                    if cls is cuda.ChunkedAttention:
                        candidate.attn.max_batch = limit
                    rows.append([head_dim, str(dtype)[6:], seqs, f"layer, {label}",
                                 _probe(lambda c=candidate: _layer_step(c, x, dtype, device), device)])
    report.table(["head dim", "dtype", "sequences", "path (forward + backward)", "ms or error"], rows)


def _sdpa_step(q, k, v, kernel, sdpa_kernel) -> None:
    with sdpa_kernel(kernel):
        F.scaled_dot_product_attention(q, k, v).float().sum().backward()


def _layer_step(layer, x, dtype, device) -> None:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        layer(x).float().sum().backward()


def _probe(fn, device: torch.device) -> str:
    try:
        return f"{_time(fn, device, 3):.2f}"
    except RuntimeError as err:
        return "error: " + str(err).strip().splitlines()[0][:90]


# ------------------------------------------------------------------------------------------- 2. bench
def bench(device: torch.device, quick: bool, tmp: Path, report: Report) -> None:
    runs = []
    for compile_ in ((False,) if quick else (False, True)):   # on a CPU, compiling costs minutes and proves little
        for batch in ([2] if quick else [128, 256]):
            args = ["bench", "-m", "tnt-s", "-m", "deit-s", "--vs", "timm", "-b", str(batch),
                    "--device", device.type, "--results", str(tmp / "bench"),
                    "--compile" if compile_ else "--no-compile"]
            args += (["--depth", "1", "--reps", "1", "--warmup", "1", "--gemm-size", "64", "--precision", "fp32",
                      "--no-memory"] if quick else ["--precision", "bf16", "--reps", "5"])
            runs.append(args)
    for args in runs:
        done = _tnt(args)
        report.text(f"`tnt {' '.join(args)}`: exit {done.returncode}")
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
    import pandas as pd

    df = pd.read_csv(tmp / "bench" / "bench.csv")
    keep = [c for c in ["model", "impl", "mode", "batch", "precision", "compile", "img_per_s", "peak_mem_mb",
                        "vs_timm", "frac_of_gemm"] if c in df.columns]
    report.text("", df[keep].to_markdown(index=False), "")
    ours = df[df.impl == "tntcli"]
    for (batch, compiled, mode), group in ours.groupby(["batch", "compile", "mode"]):
        rate = group.set_index("model").img_per_s
        if {"tnt-s", "deit-s"} <= set(rate.index):
            report.text(f"- TNT-S/DeiT-S throughput, {mode}, batch {batch}, compile {compiled}: "
                        f"{rate['tnt-s'] / rate['deit-s']:.2f} (target >= 0.7)")


def _tnt(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntcli.cli", *args], capture_output=True, text=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------- 3. augmentation
def augmentation(device: torch.device, quick: bool, tmp: Path, report: Report) -> None:
    from tntcli.config import build_config, load_recipe
    from tntcli.data.augment import BatchAugment, ImagePipeline

    cfg = build_config(load_recipe("tnt-s-imagenet"), {"data.data": "digits"})
    batch, size = (8, 32) if quick else (128, 224)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    pipeline = ImagePipeline(cfg.aug, mean=(0.5,) * 3, std=(0.5,) * 3)          # RandAugment, normalise, erasing
    mix = BatchAugment(cfg.aug, num_classes=1000, seed=0)                         # Mixup / CutMix
    steps = iter(range(10**6))

    def stage() -> None:
        mix.set_epoch(0, next(steps))
        mix(pipeline(images, seed=next(steps)), labels)

    ms = _time(stage, device, 3 if quick else 20)
    report.text(f"full tnt-s-imagenet augmentation (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, "
                f"Mixup 0.8 / CutMix 1.0) of a uint8 batch of {batch} at {size}px on {device.type}: "
                f"{ms:.2f} ms a batch, {batch / ms * 1e3:,.0f} img/s")


# ------------------------------------------------------------------------------------------- 4. train, eval, resume
def train_eval_resume(device: torch.device, quick: bool, tmp: Path, report: Report) -> None:
    from tntcli.config import build_config
    from tntcli.data.beton import ffcv_available
    from tntcli.engine.train import train

    size, per_class, batch = (32, 8, 8) if quick else (224, 160, 64)
    data = _synthetic_jpegs(tmp / "jpegs", classes=10, per_class=per_class, size=size)
    if ffcv_available():
        done = _tnt(["data", "write", str(data), str(tmp / "synth.beton")])
        report.text(f"`tnt data write`: exit {done.returncode}")
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        data = tmp / "synth.beton"
    else:
        report.text("FFCV is not importable here: the ImageFolder loader is used.")
    arch = ({"depth": 1, "patch_size": 8, "dim": 48, "heads": 2, "word_dim": 12, "inner_heads": 2} if quick else {})
    overrides = {"model.name": "tnt-s", "model.img_size": size, "model.arch": arch, "data.data": str(data),
                 "data.batch_size": batch, "data.workers": 2, "train.epochs": 2, "train.max_steps": 2 if quick else 10,
                 "train.amp": "off" if device.type == "cpu" else "bf16", "train.seed": 0}
    run = tmp / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _sync_debug(device):
            start = time.perf_counter()
            summary = train(build_config(None, {**overrides, "train.epochs": 1}), out=run)
            seconds = time.perf_counter() - start
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    report.text(f"trained {summary['epochs_done']} epoch(s) in {seconds:.1f} s on {summary['device']}: "
                f"final top-1 {summary['final_top1']:.2f}%; host syncs reported by the sync debug mode: {len(syncs)}"
                + (f" (first: {str(syncs[0].message).splitlines()[0][:100]})" if syncs else ""))
    done = _tnt(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--json",
                 "--results", str(tmp / "eval")])
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    report.text(f"`tnt eval`: top-1 {record['top1']:.2f}% at {record['img_per_s']:.0f} img/s")
    resumed = train(build_config(None, overrides), resume=run)
    report.text(f"`--resume` to epoch 2: status {resumed['status']}, final top-1 {resumed['final_top1']:.2f}%")


@contextlib.contextmanager
def _sync_debug(device: torch.device):
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _synthetic_jpegs(root: Path, classes: int, per_class: int, size: int) -> Path:
    """ImageFolder train/ and val/ of random JPEGs whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array([c * 25, 255 - c * 25, (c * 70) % 256], dtype=np.float32)
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


if __name__ == "__main__":
    main()
