"""A short tour of torch.ops.mmrec.scan: what it computes, its gradients, and its speed.

python examples/scan_demo.py
"""

import time

import torch

import mmrec_ops
from mmrec_ops.reference import scan_reference


def best_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main():
    torch.manual_seed(0)
    B, T, H, d = 2, 1024, 8, 64
    gamma = torch.rand(B, T, H, d)  # decay in (0, 1)
    x = torch.randn(B, T, H, d)
    h0 = torch.randn(B, H, d)

    # h_t = gamma_t * h_{t-1} + x_t, one fused pass over time.
    h = mmrec_ops.scan(gamma, x, h0)
    ref = scan_reference(gamma.double(), x.double(), h0.double())
    print(f"scan [B, T, H, d] = {list(h.shape)}: relative error vs float64 loop {((h - ref).norm() / ref.norm()):.2e}")

    # Without x it is the cumulative product; reverse=True runs from the end.
    p = mmrec_ops.cumprod(gamma)
    print(f"cumprod == torch.cumprod: max abs diff {(p - torch.cumprod(gamma, 1)).abs().max():.2e}")

    # Gradients flow to gamma, x and h0 through mmrec::scan_backward.
    leaves = [t.clone().requires_grad_() for t in (gamma, x, h0)]
    mmrec_ops.scan(*leaves).square().mean().backward()
    print("gradient norms (gamma, x, h0):", [f"{t.grad.norm():.2e}" for t in leaves])

    # torch.compile sees through the op: one graph, no break.
    compiled = torch.compile(lambda g, u: mmrec_ops.scan(g, u).sum(), fullgraph=True)
    eager = mmrec_ops.scan(gamma, x).sum()
    print(f"torch.compile(fullgraph=True) matches eager: {torch.allclose(compiled(gamma, x), eager, rtol=1e-5)}")

    print(f"\ntimes at [{B}, {T}, {H}, {d}] float32 on {torch.get_num_threads()} CPU threads:")
    print(f"  mmrec.scan          {best_ms(lambda: mmrec_ops.scan(gamma, x)):8.2f} ms")
    print(f"  torch.cumprod       {best_ms(lambda: torch.cumprod(gamma, 1)):8.2f} ms  (x omitted)")
    print(f"  Python loop over t  {best_ms(lambda: scan_reference(gamma, x), repeats=2):8.2f} ms")


if __name__ == "__main__":
    main()
