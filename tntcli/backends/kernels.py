"""A C++ CPU kernel for attention over many tiny sequences (TNT's inner transformer), built on first use.

`csrc/tiny_attention.cpp` registers `torch.ops.tnt.tiny_attention(qkv, heads, scale) -> (out, stats)` and its
backward; this module compiles it with `torch.utils.cpp_extension` for the CPU's vector ISA (once per machine:
35-45 s on 2 cores, most of it parsing ATen's headers; cached under `~/.cache/torch_extensions` or
`$TORCH_EXTENSIONS_DIR`), and gives the op a fake implementation (so `torch.compile` traces it as one opaque
call) and an autograd formula.

Without a C++ compiler `available()` is False and the CPU backend keeps aten's attention.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# (words per sequence, head dim) pairs compiled: TNT's 4x4 words with the head dims of TNT-Ti/S (6), TNT-B (10)
# and of other inner head counts; 2x2 words are the tests' tiny models.
SHAPES = tuple((words, dim) for words in (4, 16) for dim in (4, 6, 8, 10, 12))
_SOURCE = Path(__file__).with_name("csrc") / "tiny_attention.cpp"
# Vector flags per ATen CPU capability, as torch's inductor builds its CPU kernels.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}
_STALE_LOCK_SECONDS = 600           # a build takes 35-45 s on 2 cores
_LINK_SETTLE_SECONDS = 30
_state: bool | None = None          # None: not tried yet


def supports(words: int, head_dim: int) -> bool:
    return (words, head_dim) in SHAPES


def available() -> bool:
    """Whether the kernel is loaded, building it on the first call (the CPU backend asks when it is applied)."""
    global _state
    if _state is None:
        _state = _load()
    return bool(_state)


def tiny_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, from fused qkv rows (sequences, words, 3 * dim; q, k, v each heads x
    head_dim) to (sequences, words, dim), heads side by side: what the `qkv` linear gives and `proj` reads."""
    return torch.ops.tnt.tiny_attention(qkv, heads, scale)[0]


def _load() -> bool:
    try:
        _build()
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a build error: keep the aten path
        log.warning("building the CPU attention kernel failed, using aten's: %s",
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        return False
    return True


def _build_root() -> Path:
    # torch.utils.cpp_extension's default, without importing it: that import logs a CUDA_HOME warning on machines
    # without CUDA, and is only needed when the kernel is actually compiled.
    from torch._appdirs import user_cache_dir

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(user_cache_dir(appname="torch_extensions")))


def _build() -> None:
    isa = torch.backends.cpu.get_cpu_capability()
    flags = _ISA_FLAGS.get(isa, [])
    capability = isa if flags else "DEFAULT"
    shapes = " ".join(f"X({w}, {d})" for w, d in SHAPES)
    source = f"#define TNT_TINY_SHAPES(X) {shapes}\n" + _SOURCE.read_text()
    cflags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", *flags]
    # The name keys the build on what it depends on, so a built library loads directly, without the ~2 s of
    # cpp_extension's up-to-date check in every process (and venvs with the same torch share one build).
    key = hashlib.sha256("\0".join([source, *cflags, torch.__version__]).encode()).hexdigest()[:12]
    name = f"tnt_tiny_attention_{capability.lower()}_{key}"
    build_dir = _build_root() / name
    library = build_dir / f"{name}.so"
    if library.is_file() and not _build_in_progress(build_dir / "lock", library):
        torch.ops.load_library(str(library))
    else:
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:          # the `ninja` wheel puts it beside this interpreter
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        log.info("building the CPU attention kernel for %s (once per machine)", capability)
        build_dir.mkdir(parents=True, exist_ok=True)
        load_inline(name, cpp_sources=[source], is_python_module=False, extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
    _register()


def _build_in_progress(lock: Path, library: Path) -> bool:
    """cpp_extension holds `lock` while it builds; a build killed midway leaves it behind for good, which would send
    every later process through cpp_extension's slow path. The lock is stale once the library was linked a while
    ago (the builder removes it right after linking), or when it is older than any build."""
    if not lock.exists():
        return False
    now = time.time()
    linked_long_ago = library.is_file() and now - library.stat().st_mtime > _LINK_SETTLE_SECONDS
    if not linked_long_ago and now - lock.stat().st_mtime < _STALE_LOCK_SECONDS:
        return True
    lock.unlink(missing_ok=True)
    return False


@functools.cache                    # once a process, however often the build is retried
def _register() -> None:
    @torch.library.register_fake("tnt::tiny_attention")
    def _(qkv, heads, scale):
        n, words, dim3 = qkv.shape
        return qkv.new_empty(n, words, dim3 // 3), qkv.new_empty(n, heads, 2, words)

    @torch.library.register_fake("tnt::tiny_attention_backward")
    def _(grad, qkv, stats, heads, scale):
        return torch.empty_like(qkv)

    def setup_context(ctx, inputs, output):
        qkv, ctx.heads, ctx.scale = inputs
        ctx.save_for_backward(qkv, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_stats):
        qkv, stats = ctx.saved_tensors
        return torch.ops.tnt.tiny_attention_backward(grad, qkv, stats, ctx.heads, ctx.scale), None, None

    torch.library.register_autograd("tnt::tiny_attention", backward, setup_context=setup_context)
