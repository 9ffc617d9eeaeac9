"""Block-size sweep of the memory-bound Triton kernels on this GPU (where the defaults come from).

    python -m bench.tune_blocks [--what all|l1|lora|host] [--profile]

Times each kernel alone (triton.testing.do_bench) over a grid of tile shapes, warps and stages,
and prints the best configurations with their effective bandwidth, at the shapes of the issue
targets: grouped LoRA at N=8192, 4096->4096, r=16, D=32, bf16; hidden_l1 on [8192, 4096] bf16.
``--profile`` also prints the CUDA kernels of one grouped_lora fwd+bwd call.
"""
from __future__ import annotations

import argparse
import itertools

import torch


def _sweep(name, bytes_moved, configs, launch, top=4):
    from triton.testing import do_bench

    res = []
    for cfg in configs:
        try:
            ms = do_bench(lambda: launch(**cfg), warmup=10, rep=40)
        except Exception as e:  # a tile shape the compiler rejects (too many registers / smem)
            print(f"  {name} {cfg}: {type(e).__name__}")
            continue
        res.append((ms, cfg))
    res.sort(key=lambda t: t[0])
    print(f"{name}: {bytes_moved / 1e6:.1f} MB moved")
    for ms, cfg in res[:top]:
        print(f"  {ms * 1e3:8.1f} us  {bytes_moved / ms / 1e6:7.0f} GB/s  {cfg}")
    return res


def lora(profile: bool):
    from kmkernels import grouped_lora
    from kmkernels import lora as L

    N, din, dout, r, D = 8192, 4096, 4096, 16, 32
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, din, device="cuda", generator=g).to(dt)
    A = (torch.randn(D, r, din, device="cuda", generator=g) / 64).to(dt)
    B = (torch.randn(D, dout, r, device="cuda", generator=g) / 64).to(dt)
    ids = torch.randint(0, D, (N // 128,), device="cuda", generator=g).repeat_interleave(128)
    scale = torch.ones(D, device="cuda")
    h = torch.empty(N, r, device="cuda", dtype=dt)
    y = torch.empty(N, dout, device="cuda", dtype=dt)
    segs = {bm: L.build_segments(ids, D, bm) for bm in (16, 32, 64, 128)}

    def gemm(xx, w, strides, n_out, k, out, sc, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages):
        seg = segs[BLOCK_M]
        grid = (seg.tile_seg.numel(), (n_out + BLOCK_N - 1) // BLOCK_N)
        L._seg_gemm_kernel[grid](xx, w, out, seg.order, seg.tile_seg, seg.tile_r0, seg.tile_r1,
                                 sc if sc is not None else xx, n_out, k, D, xx.stride(0), xx.stride(1), *strides,
                                 out.stride(0), out.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                 HAS_SCALE=sc is not None, UPCAST=False, num_warps=num_warps, num_stages=num_stages)

    a_str = (A.stride(0), A.stride(1), A.stride(2))
    shrink = [dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=bk, num_warps=w, num_stages=s)
              for bm, bk, w, s in itertools.product((32, 64, 128), (128, 256), (4, 8), (2, 3))]
    _sweep("shrink x@A^T", x.numel() * 2 + h.numel() * 2,
           shrink, lambda **c: gemm(x, A, a_str, r, din, h, None, **c))
    b_str = (B.stride(0), B.stride(1), B.stride(2))
    expand = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, num_warps=w, num_stages=s)
              for bm, bn, w, s in itertools.product((32, 64, 128), (128, 256), (4, 8), (1,))]
    _sweep("expand h@B^T", y.numel() * 2 + h.numel() * 2,
           expand, lambda **c: gemm(h, B, b_str, dout, r, y, scale, **c))

    dA = torch.empty_like(A)
    dB = torch.empty_like(B)

    def outer(lm, rm, out, sc, BLOCK_M, BLOCK_P, BLOCK_Q, num_warps, num_stages):
        seg = segs[32]
        Dd, P, Q = out.shape
        grid = (Dd, (P + BLOCK_P - 1) // BLOCK_P, (Q + BLOCK_Q - 1) // BLOCK_Q)
        L._seg_outer_kernel[grid](lm, rm, out, seg.order, seg.seg_start, seg.seg_count, sc if sc is not None else lm,
                                  P, Q, lm.stride(0), lm.stride(1), rm.stride(0), rm.stride(1),
                                  out.stride(0), out.stride(1), out.stride(2), BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P,
                                  BLOCK_Q=BLOCK_Q, HAS_SCALE=sc is not None, UPCAST=False,
                                  num_warps=num_warps, num_stages=num_stages)

    da_cfg = [dict(BLOCK_M=bm, BLOCK_P=16, BLOCK_Q=bq, num_warps=w, num_stages=s)
              for bm, bq, w, s in itertools.product((64, 128), (128, 256), (4, 8), (2,))]
    _sweep("dA = dh^T x", x.numel() * 2 + h.numel() * 2 + dA.numel() * 2,
           da_cfg, lambda **c: outer(h, x, dA, None, **c))
    db_cfg = [dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=16, num_warps=w, num_stages=s)
              for bm, bp, w, s in itertools.product((64, 128), (128, 256), (4, 8), (2,))]
    _sweep("dB = dy^T h", y.numel() * 2 + h.numel() * 2 + dB.numel() * 2,
           db_cfg, lambda **c: outer(y, h, dB, scale, **c))

    if profile:
        xg = x.clone().requires_grad_()
        Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
        dy = torch.randn_like(y)
        for _ in range(3):
            torch.autograd.grad(grouped_lora(xg, Ag, Bg, ids, 1.0, backend="triton", check_ids=False), (xg, Ag, Bg), dy)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(grouped_lora(xg, Ag, Bg, ids, 1.0, backend="triton", check_ids=False),
                                    (xg, Ag, Bg), dy)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))


def l1():
    import importlib

    M = importlib.import_module("kmkernels.hidden_l1")  # the module; the package exports a function of that name

    N, H = 8192, 4096
    s = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    t = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    gbuf = torch.empty_like(s)
    sc = torch.ones(1, device="cuda")

    def fwd(BLOCK_N, BLOCK_H, num_warps):
        nblk = (N + BLOCK_N - 1) // BLOCK_N
        d = torch.empty(nblk, device="cuda")
        z = torch.empty(nblk, device="cuda")
        M._l1_partial_kernel[(nblk,)](s, t, s, d, z, N, H, s.stride(0), t.stride(0), BLOCK_N=BLOCK_N,
                                      BLOCK_H=BLOCK_H, HAS_MASK=False, num_warps=num_warps)

    def bwd(BLOCK_N, BLOCK_H, num_warps):
        M._l1_grad_kernel[((N + BLOCK_N - 1) // BLOCK_N, (H + BLOCK_H - 1) // BLOCK_H)](
            s, t, s, gbuf, sc, N, H, s.stride(0), t.stride(0), gbuf.stride(0), BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
            HAS_MASK=False, num_warps=num_warps)

    grid = [dict(BLOCK_N=bn, BLOCK_H=bh, num_warps=w)
            for bn, bh, w in itertools.product((1, 2, 4, 8, 16), (512, 1024, 2048), (4, 8))
            if bn * bh <= 32768]
    _sweep("hidden_l1 fwd (one layer)", 2 * s.numel() * 2, grid, fwd)
    _sweep("hidden_l1 bwd (one layer)", 3 * s.numel() * 2, grid, bwd)


def host():
    """Where the host time of one grouped_lora fwd+bwd goes (the GPU work is ~0.36 ms at this shape)."""
    import cProfile
    import pstats

    from kmkernels import grouped_lora

    N, din, dout, r, D = 8192, 4096, 4096, 16, 32
    x = torch.randn(N, din, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(D, r, din, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(D, dout, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, D, (N // 128,), device="cuda").repeat_interleave(128)
    dy = torch.randn(N, dout, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(grouped_lora(x, A, B, ids, 1.0, backend="triton", check_ids=False), (x, A, B), dy)  # noqa: E731
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--what", choices=("all", "l1", "lora", "host"), default="all")
    a = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__)
    if a.what in ("all", "l1"):
        l1()
    if a.what in ("all", "lora"):
        lora(a.profile)
    if a.what in ("all", "host"):
        host()


if __name__ == "__main__":
    main()
