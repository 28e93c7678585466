"""What the Triton kernels of the ops share: the device helper cast_out, and
the host layer that launches them (one for both ops).

Host layer. A launch costs host time on every call of an op, and on a GPU it
can exceed the kernel's own time. kernel[grid](...) (JITFunction.run) binds
and specializes every argument again on each call, several times the host
time of a cached plan launched directly. So a launcher builds, once per key of shapes,
strides, dtype and flags (functools.lru_cache), a Plan: the grid, num_warps and
every argument that follows the tensors. Plan.launch then
- runs under a guard for the tensors' device: Triton launches on the current
  CUDA device, and the dispatcher sets no device for a kernel registered from
  Python, so a tensor on another GPU than the current one would be launched
  on the wrong one;
- calls the compiled kernel's launcher directly (DIRECT_LAUNCH: Triton 3.6 to
  3.9, whose calling convention was checked in their sources), or else, and
  always under the interpreter, goes through JITFunction.run.
`launch_path()` names the path this process takes (python -m mmrec_ops.check
prints it).

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# TRITON_INTERPRET=1: the kernels run in Triton's interpreter, on CPU tensors
# (the triton tests on machines without a GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def cast_out(v, ptr, SOFT_BF16: tl.constexpr):
    """v cast to the element type of ptr, for a store.

    SOFT_BF16 (the interpreter only, whose float32 -> bfloat16 cast truncates)
    rounds to nearest even by hand, as the GPU's conversion does.
    """
    if SOFT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


def soft_bf16(dtype: torch.dtype) -> bool:
    """The SOFT_BF16 argument of cast_out for a storage dtype."""
    return INTERPRET and dtype == torch.bfloat16


_STORAGE = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def kernel_dtypes(dtype: torch.dtype):
    """(storage, accumulation) Triton dtypes of a torch storage dtype: the
    kernels accumulate in float32, in float64 for float64."""
    return _STORAGE[dtype], tl.float64 if dtype == torch.float64 else tl.float32


# triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.6,
# several microseconds each when called from the host.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The kernels index elements with int32 offsets from each tensor's data pointer.
OFFSET_LIMIT = 2**31


def tensor_span(shape, strides) -> int:
    """Elements from a tensor's first element to its last: sum (n - 1) |stride|."""
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides))


def check_offsets_fit(op: str, spans: dict[str, int], remedy: str) -> None:
    """Refuses a tensor (name -> ``tensor_span``) whose last element lies ``OFFSET_LIMIT``
    elements or more past its first: the int32 offsets of ``op``'s kernels would overflow."""
    for name, span in spans.items():
        if span >= OFFSET_LIMIT:
            raise ValueError(
                f"{op} on CUDA: {name} spans {span + 1} elements, beyond the kernels' "
                f"int32 offsets (at most {OFFSET_LIMIT}); {remedy}"
            )


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: Tensor) -> int:
    """Streaming multiprocessors of t's GPU; 132 (an H100's) for a CPU tensor,
    under the interpreter."""
    index = t.get_device()
    return _sm_count(index) if index >= 0 else 132


def triton_version(version: str = triton.__version__) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def direct_launch_supported(version: tuple[int, int], interpret: bool) -> bool:
    """Whether Plan.launch may call compiled kernels directly: with the calling
    convention of CompiledKernel.run that JITFunction.run uses in Triton 3.6
    to 3.9 (grid, stream, function, packed metadata, launch metadata, the
    launch hooks, then every kernel parameter, constexprs included), and not
    under the interpreter, which compiles nothing."""
    return not interpret and (3, 6) <= version < (3, 10)


DIRECT_LAUNCH = direct_launch_supported(triton_version(), INTERPRET)
if DIRECT_LAUNCH:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver


def launch_path() -> str:
    """The launch path of this process, in words."""
    if DIRECT_LAUNCH:
        return f"cached plans, compiled kernels launched directly (Triton {triton.__version__})"
    why = "the interpreter" if INTERPRET else f"Triton {triton.__version__} is outside 3.6-3.9"
    return f"cached plans through JITFunction.run ({why})"


def _active(hook) -> bool:
    # Launch hooks are HookChains in Triton 3.6-3.9: active when they hold a call.
    return hook is not None and bool(getattr(hook, "calls", True))


def device_guard(index: int):
    """Makes GPU `index` current for a launch (a seam the tests replace)."""
    return torch.cuda.device(index)


class Plan:
    """One launch configuration of a kernel: grid, num_warps and the kernel
    arguments that follow the tensors (integers, then constexprs), all fixed
    by the plan's cache key; and the compiled kernels it has launched.

    Triton specializes a compiled kernel on the dtypes of the pointers (fixed
    by the plan), on the integer arguments (fixed by the plan) and on the
    16-byte alignment of each pointer; the compiled kernels are therefore kept
    by (device, alignment of each tensor). The first launch of a key goes
    through JITFunction.run, which compiles or finds the kernel; later ones
    call its launcher directly, with the launch hooks (profilers) when any is
    set.
    """

    __slots__ = ("fn", "grid", "args", "num_warps", "kernels")

    def __init__(self, fn, grid, ints, constexprs, num_warps):
        self.fn = fn
        self.grid = (*grid, *(1,) * (3 - len(grid)))  # (x, y, z), as the launcher takes it
        self.args = (*ints, *constexprs)
        self.num_warps = num_warps
        self.kernels = {}

    def launch(self, *tensors: Tensor) -> None:
        """Runs the kernel on `tensors` (its pointer arguments, in order), on
        their device (the first tensor's)."""
        index = tensors[0].get_device()
        # The check costs less than entering a guard (< 0: CPU tensors, the interpreter).
        if index < 0 or index == torch.cuda.current_device():
            self._launch(index, tensors)
            return
        with device_guard(index):
            self._launch(index, tensors)

    def _launch(self, device: int, tensors) -> None:
        if not DIRECT_LAUNCH:
            self.fn[self.grid](*tensors, *self.args, num_warps=self.num_warps)
            return
        key = (device, *[t.data_ptr() % 16 == 0 for t in tensors])
        compiled = self.kernels.get(key)
        if compiled is None:
            kernel = self.fn[self.grid](*tensors, *self.args, num_warps=self.num_warps)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            self.kernels[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata)
            return
        kernel, run, function, packed_metadata = compiled
        stream = _driver.active.get_current_stream(device)
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if _active(enter) or _active(leave):
            meta = kernel.launch_metadata(self.grid, stream, *tensors, *self.args)
        else:
            meta = enter = leave = None
        run(*self.grid, stream, function, packed_metadata, meta, enter, leave, *tensors, *self.args)
