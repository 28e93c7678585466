"""Triton helpers shared by the kernels of several operators."""

import triton
import triton.language as tl


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
