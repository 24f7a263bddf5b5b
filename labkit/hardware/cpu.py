"""What this machine's processor can do fast, read before measuring (lab 09).

:func:`cpu_info` reads the CPU's model name and the instruction-set flags that decide whether
bfloat16 arithmetic is fast (``/proc/cpuinfo`` on Linux; on other systems, what torch reports):
``avx2``, ``avx512f``, ``avx512_bf16`` (AVX512-BF16: ``vdpbf16ps``, a bf16 dot product into fp32)
and ``amx_bf16`` / ``amx_tile`` (Intel AMX tile matrix units), plus
``torch.backends.cpu.get_cpu_capability()`` (the widest kernel set torch dispatches to here).

:func:`predict_bf16` turns those flags into a prediction that the lab then checks by measuring:

- ``"fast"`` with AMX or AVX512-BF16: oneDNN has native bf16 kernels, so bf16 convolutions and
  matrix products do the same work on half the bytes;
- ``"slow"`` with AVX2 only: every bf16 value is converted to fp32 and back around fp32 kernels;
  pytorch/pytorch#86270 reports BERT inference over 2x slower under CPU bf16 autocast, and
  pytorch/pytorch#146508 bf16 matrix products 44x to 499x slower on an AVX2-only CPU (the warning
  in the autocast docs came with PR #86550);
- ``"unknown"`` otherwise (no flags readable, or another architecture).

The prediction follows the instruction sets torch may use, not only those the chip has: oneDNN (the library behind
torch's CPU convolutions and matrix products) reads ``ONEDNN_MAX_CPU_ISA`` and uses nothing above it, so
``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX512-BF16 machine behaves as an AVX2-only one. The lab uses that to measure both
cases on one machine (:func:`labkit.hardware.bf16_by_isa`).

:func:`gpu_info` says what the GPU is (name, compute capability, bf16 support, TF32 state), or
``None`` without one.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["CpuInfo", "cpu_info", "predict_bf16", "gpu_info", "FLAGS", "ONEDNN_ISAS"]

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
#: oneDNN's ``ONEDNN_MAX_CPU_ISA`` levels, oldest first, and the flags each one gives up to (its documentation,
#: "CPU dispatcher control"); a level not listed here is newer and keeps every flag.
ONEDNN_ISAS = {"SSE41": (), "AVX": (), "AVX2": ("avx2",), "AVX2_VNNI": ("avx2",), "AVX512_CORE": ("avx2", "avx512f"),
               "AVX512_CORE_VNNI": ("avx2", "avx512f"), "AVX512_CORE_BF16": ("avx2", "avx512f", "avx512_bf16")}


@dataclass
class CpuInfo:
    """The processor as far as bf16 speed is concerned."""

    model: str
    capability: str                     # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    flags: dict = field(default_factory=dict)  # flag -> True/False; None when it could not be read
    source: str = "/proc/cpuinfo"       # where the flags came from
    cores: int | None = None
    max_isa: str | None = None          # ONEDNN_MAX_CPU_ISA, when set: oneDNN uses no instruction set above it

    def usable(self) -> dict:
        """The flags oneDNN may use: the chip's, less those above ``ONEDNN_MAX_CPU_ISA``."""
        keep = ONEDNN_ISAS.get((self.max_isa or "").upper())
        if keep is None:
            return dict(self.flags)
        return {f: (v and f in keep) if v is not None else None for f, v in self.flags.items()}

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: model, torch's capability and the flags present."""
        have = [f for f in FLAGS if self.flags.get(f)]
        unread = [f for f in FLAGS if self.flags.get(f) is None]
        tail = f"; unread: {', '.join(unread)}" if unread else ""
        cap = f"; oneDNN limited to {self.max_isa} (ONEDNN_MAX_CPU_ISA)" if self.max_isa else ""
        return (f"{self.model} ({self.cores} logical CPUs); torch capability {self.capability}; "
                f"flags: {', '.join(have) or 'none of ' + '/'.join(FLAGS)} (from {self.source}{tail}){cap}")


def _read_proc_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:  # x86 "flags", ARM "Features"
            flags = set(value.split())
    return model, flags


def cpu_info(proc_path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU: model name, torch's capability and the bf16-relevant flags."""
    import os

    capability = torch.backends.cpu.get_cpu_capability()
    model, flags = _read_proc_cpuinfo(proc_path)
    if flags is not None:
        got = {f: f in flags for f in FLAGS}
        source = proc_path
    else:
        # No /proc/cpuinfo (macOS, Windows): torch's capability says AVX2 / AVX512 at least;
        # the bf16 extensions themselves cannot be read, so they stay None ("unknown").
        cap = capability.upper()
        got = {"avx2": cap.startswith("AVX"), "avx512f": cap.startswith("AVX512"),
               "avx512_bf16": None, "amx_bf16": None, "amx_tile": None}
        if cap in ("DEFAULT", "") or platform.machine().lower() in ("arm64", "aarch64"):
            got = {f: None for f in FLAGS}
        source = "torch.backends.cpu.get_cpu_capability()"
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown CPU",
                   capability=capability, flags=got, source=source, cores=os.cpu_count(),
                   max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None)


def predict_bf16(info: CpuInfo | dict) -> tuple[str, str]:
    """``(verdict, reason)``: ``"fast"``, ``"slow"`` or ``"unknown"`` for bf16 autocast on this CPU.

    ``info`` is a :class:`CpuInfo` or a dict of flags (``{"avx2": True, ...}``)."""
    from .._validate import ArgumentError

    if isinstance(info, CpuInfo):
        flags = info.usable()
    elif isinstance(info, dict):
        flags = info
    else:
        raise ArgumentError(f"info must be a CpuInfo (labkit.hardware.cpu_info()) or a dict of flags, "
                            f"got {type(info).__name__}")
    if flags.get("amx_bf16"):
        return "fast", "AMX tiles: native bf16 matrix units, oneDNN uses them for bf16 convolutions and matmuls"
    if flags.get("avx512_bf16"):
        return "fast", ("AVX512-BF16 (vdpbf16ps): native bf16 dot products into fp32, so bf16 kernels move half "
                        "the bytes of fp32 ones")
    if flags.get("avx2") or flags.get("avx512f"):
        have = "AVX512F without its BF16 extension" if flags.get("avx512f") else "AVX2 only"
        return "slow", (f"{have}: bf16 is converted to fp32 around fp32 kernels; reported 2x slower "
                        f"(pytorch/pytorch#86270) to 44-499x slower for matmuls (pytorch/pytorch#146508)")
    return "unknown", "no AVX2/AVX512/AMX flags could be read: measure it"


def gpu_info() -> dict | None:
    """The first CUDA GPU: name, compute capability, bf16 support and TF32 state; ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    props = torch.cuda.get_device_properties(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "memory_GB": props.total_memory / 1e9,
        "bf16": bool(torch.cuda.is_bf16_supported()),
        "tensor_cores": major >= 7,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
