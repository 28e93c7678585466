"""Issue 19, session 13 attempt (removed in the next commit): the scan forward with TMA loads and
stores, and the H100 run that timed it (bench/results/scan_forward_attempts_h100.md, section 3)."""
import triton
import triton.language as tl
from mmrec_ops.triton.scan import _tile_scan


@triton.jit(do_not_specialize=["T"])
def _scan_fwd_tma_kernel(g_desc, x_desc, o_desc, T, NCB,
                         HAS_X: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr, NT: tl.constexpr,
                         BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr, TMA_STORE: tl.constexpr,
                         o_ptr, o_sb, o_st, C):
    BLOCK_T: tl.constexpr = R * NT
    pid = tl.program_id(0)
    cb = pid % NCB
    b = pid // NCB
    c0 = cb * BLOCK_C
    n = tl.arange(0, NT)[:, None, None]
    r = tl.arange(0, R)[None, :, None]
    j = tl.arange(0, BLOCK_C)[None, None, :]
    k = n * R + r
    carry = tl.zeros([1, 1, BLOCK_C], ACC)
    o_base = o_ptr + tl.cast(b, tl.int64) * o_sb + c0
    o_off = k * o_st + j
    for s0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
        a = tl.permute(g_desc.load([b, 0, s0 // R, c0]).reshape(R, NT, BLOCK_C), (1, 0, 2))
        if HAS_X:
            xb = tl.permute(x_desc.load([b, 0, s0 // R, c0]).reshape(R, NT, BLOCK_C), (1, 0, 2))
        else:
            xb = a
        h, carry = _tile_scan(a.to(ACC), xb.to(ACC), carry, n, R, NT, HAS_X)
        if TMA_STORE:
            o_desc.store([b, 0, s0 // R, c0], tl.permute(h.to(o_desc.dtype), (1, 0, 2)).reshape(1, R, NT, BLOCK_C))
        else:
            tl.store(o_base + tl.cast(s0, tl.int64) * o_st + o_off, h.to(o_ptr.dtype.element_ty), mask=(k < T - s0) & (j < C - c0))


def descriptors(g, x, o, R, NT, BLOCK_C):
    """[B, T, C] contiguous (T % R == 0) seen as [B, R, T / R, C]: a tile [1, R, NT, C] holds
    steps m * R + r, m in a block of NT: permuted to [NT, R, C], the layout of the shipped scan."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, T, C = g.shape
    shape = [B, R, T // R, C]
    strides = [T * C, C, R * C, 1]
    block = [1, R, NT, BLOCK_C]
    return [TensorDescriptor(t, shape, strides, block) for t in (g, x, o)]


def scan_forward_tma(g, x, R, NT, BLOCK_C=64, num_warps=4, num_stages=3, tma_store=True, descs=None, o=None):
    import torch
    B, T = g.shape[:2]
    g3, x3 = g.reshape(B, T, -1), x.reshape(B, T, -1)
    C = g3.shape[2]
    assert T % R == 0 and g3.is_contiguous() and x3.is_contiguous()
    if o is None:
        o = torch.empty_like(g)
    o3 = o.view(B, T, C)
    if descs is None:
        descs = descriptors(g3, x3, o3, R, NT, BLOCK_C)
    ncb = triton.cdiv(C, BLOCK_C)
    acc = tl.float64 if g.dtype == torch.float64 else tl.float32
    _scan_fwd_tma_kernel[(B * ncb,)](*descs, T, ncb, HAS_X=True, ACC=acc, R=R, NT=NT, BLOCK_C=BLOCK_C,
                                     NUM_STAGES=num_stages, TMA_STORE=tma_store, o_ptr=o3, o_sb=T * C, o_st=C, C=C,
                                     num_warps=num_warps, num_stages=num_stages)
    return o


# --- the timing run (scratch/s13_tma_gpu2.py) ---
import torch
sys.path.insert(0, "."); sys.path.insert(0, "scratch")
from bench.common import paired_median_times_ms, graph_time_ms
from mmrec_ops.triton import scan as ts
import scan_tma

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "correct": [], "speed": []}
import triton; out["triton"] = triton.__version__
# correctness against the shipped forward (same arithmetic: expected bit-identical)
for shape in [(8, 4096, 16, 64)]:
    for dt, R, NT, W in [(torch.bfloat16, 8, 16, 4), (torch.float32, 4, 16, 8)]:
        g = torch.rand(shape, device="cuda", dtype=dt); x = torch.randn(shape, device="cuda", dtype=dt)
        ref = ts.scan_forward(g, x, None, False)
        for st in (True, False):
            o = torch.full_like(g, float("nan"))
            scan_tma.scan_forward_tma(g, x, R, NT, 64, W, 3, st, o=o)
            diff = (o.float() - ref.float()).abs().max().item()
            row = dict(shape=shape, dtype=str(dt), tma_store=st, max_diff=diff, nan=bool(o.isnan().any()))
            print(json.dumps(row), flush=True); out["correct"].append(row)
shape = (8, 4096, 16, 64)
configs = {torch.bfloat16: [(8, 16, 4, 3, 64), (8, 16, 2, 3, 32), (8, 16, 4, 3, 32), (8, 32, 4, 3, 32), (8, 16, 2, 4, 32),
                            (8, 32, 2, 3, 32), (8, 16, 8, 3, 128), (8, 8, 4, 3, 128), (16, 16, 4, 3, 64), (4, 32, 4, 3, 64)],
           torch.float32: [(4, 16, 8, 3, 64), (4, 16, 4, 3, 32), (4, 32, 4, 3, 32), (4, 16, 2, 3, 32), (4, 16, 4, 4, 32),
                           (4, 8, 8, 3, 128), (8, 16, 4, 3, 32)]}
try:
    from accelerated_scan.scalar import scan as acc_scan
except ImportError as e:
    acc_scan = None; print("no accelerated-scan", e)
for dt in (torch.bfloat16, torch.float32):
    g = torch.rand(shape, device="cuda", dtype=dt); x = torch.randn(shape, device="cuda", dtype=dt)
    y = torch.empty_like(x)
    fns = {"copy": lambda: torch.add(g, x, out=y), "shipped": lambda: ts.scan_forward(g, x, None, False)}
    if acc_scan is not None:
        g2 = g.reshape(8, 4096, 1024).transpose(1, 2).contiguous(); x2 = x.reshape(8, 4096, 1024).transpose(1, 2).contiguous()
        fns["accelerated-scan"] = lambda: acc_scan(g2, x2)
    for R, NT, W, S, BC in configs[dt]:
        for st in (True, False):
            o = torch.empty_like(g)
            try:
                descs = scan_tma.descriptors(g.view(8, 4096, 1024), x.view(8, 4096, 1024), o.view(8, 4096, 1024), R, NT, BC)
                f = (lambda R=R, NT=NT, W=W, S=S, st=st, o=o, descs=descs, BC=BC:
                     scan_tma.scan_forward_tma(g, x, R, NT, BC, W, S, st, descs=descs, o=o))
                ref = ts.scan_forward(g, x, None, False)
                diff = (f().float() - ref.float()).abs().max().item()
                assert diff < 0.01 * ref.float().abs().max().item(), diff
                f(); torch.cuda.synchronize()
                fns[f"tma R{R} NT{NT} w{W} s{S} C{BC} store{int(st)}"] = f
            except Exception as e:
                print("skip", R, NT, W, S, st, type(e).__name__, str(e)[:200], flush=True)
    eager = paired_median_times_ms(fns, "cuda", 3, 25)
    for name, fn in fns.items():
        row = dict(dtype=str(dt), kernel=name, eager_us=round(1e3 * eager[name], 1),
                   graph_us=round(1e3 * (graph_time_ms(fn, 25) or float("nan")), 1))
        print(json.dumps(row), flush=True); out["speed"].append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
