"""Session 12: the chained-tile scan forward on the GPU: correctness (against float64,
repeated for races), then speed beside the shipped forward, a copy and accelerated-scan."""
import itertools, json, sys, time
import torch
sys.path.insert(0, "."); sys.path.insert(0, "scratch")
import mmrec_ops
from bench.common import median_time_ms, graph_time_ms, paired_median_times_ms
from mmrec_ops.triton import scan as triton_scan
from mmrec_ops.triton.scan import _Tuning
from mmrec_ops.triton.scan_chained_attempt import scan_forward_chained

out = {"check": [], "speed": []}
torch.manual_seed(0)
t_start = time.time()
fails = 0
for (B, T, H, d), dtype, has_x, has_h0, rev, span in itertools.product(
        [(2, 1, 3, 5), (2, 37, 2, 24), (1, 1031, 3, 40), (3, 4099, 2, 64), (8, 4096, 16, 64)],
        [torch.float32, torch.float64, torch.bfloat16], [True, False], [True, False], [False, True], [1, 4]):
    if (B, T) == (8, 4096) and (dtype == torch.float64 or not has_x or has_h0):
        continue
    dev = "cuda"
    gamma = torch.rand(B, T, H, d, dtype=dtype, device=dev)
    x = torch.randn(B, T, H, d, dtype=dtype, device=dev) if has_x else None
    h0 = torch.randn(B, H, d, dtype=dtype, device=dev) if has_h0 else None
    ref = torch.ops.mmrec.scan(gamma.double().cpu(), None if x is None else x.double().cpu(),
                               None if h0 is None else h0.double().cpu(), rev)
    shipped = triton_scan.scan_forward(gamma, x, h0, rev).double().cpu()
    outs = [scan_forward_chained(gamma, x, h0, rev, span) for _ in range(5)]
    same = all(torch.equal(o, outs[0]) for o in outs)
    o = outs[0].double().cpu()
    scale = ref.abs().max().item() + 1e-30
    err, err_shipped = (o - ref).abs().max().item() / scale, (shipped - ref).abs().max().item() / scale
    ok = same and err <= max(2 * err_shipped, {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 4e-3}[dtype])
    fails += not ok
    row = dict(shape=[B, T, H, d], dtype=str(dtype), has_x=has_x, has_h0=has_h0, reverse=rev, span=span,
               err=err, err_shipped=err_shipped, deterministic=same, ok=ok)
    out["check"].append(row)
    if not ok:
        print("FAIL", json.dumps(row), flush=True)
print(f"check: {len(out['check'])} cases, {fails} failed, {time.time() - t_start:.0f} s", flush=True)

shape = (8, 4096, 16, 64)
for dtype in (torch.bfloat16, torch.float32):
    gamma = torch.rand(shape, device="cuda", dtype=dtype)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    y = torch.empty_like(x)
    fns = {"copy": lambda: torch.add(gamma, x, out=y), "shipped": lambda: triton_scan.scan_forward(gamma, x, None, False)}
    try:
        from accelerated_scan.triton import scan as acc_scan
        g2 = gamma.reshape(8, 4096, 1024).transpose(1, 2).contiguous()
        x2 = x.reshape(8, 4096, 1024).transpose(1, 2).contiguous()
        fns["accelerated-scan"] = lambda: acc_scan(g2, x2)
    except ImportError as e:
        print("no accelerated-scan", e)
    base = triton_scan._FWD_TUNING[dtype.itemsize]
    variants = []
    for span in (2, 4, 8):
        for rows, warps, tile in ((base.rows, base.num_warps, base.tile), (base.rows, base.num_warps, base.tile // 2),
                                  (base.rows, 8, base.tile * 2), (4, 4, base.tile // 2), (base.rows, 2, base.tile // 4)):
            variants.append((span, rows, warps, tile))
    for span, rows, warps, tile in variants:
        tun = _Tuning(rows, warps, tile, 0)
        name = f"chained span={span} R={rows} warps={warps} tile={tile}"
        try:
            scan_forward_chained(gamma, x, None, False, span, tun)
        except Exception as e:
            print(name, "ERROR", str(e)[:200]); continue
        fns[name] = (lambda s=span, t=tun: scan_forward_chained(gamma, x, None, False, s, t))
    times = paired_median_times_ms(fns, "cuda", 3, 25)
    for name, ms in times.items():
        row = dict(dtype=str(dtype), name=name, us=round(1e3 * ms, 1))
        out["speed"].append(row)
        print(json.dumps(row), flush=True)
    for name in ("copy", "shipped", "accelerated-scan", min((n for n in times if n.startswith("chained")), key=times.get)):
        if name in fns:
            g = graph_time_ms(fns[name], 25)
            row = dict(dtype=str(dtype), name=name, graph_us=round(1e3 * g, 1) if g else None)
            out["speed"].append(row)
            print(json.dumps(row), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
