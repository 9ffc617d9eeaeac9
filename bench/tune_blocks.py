"""Block-size sweep of the memory-bound Triton kernels on this GPU (where the defaults come from).

    python -m bench.tune_blocks [--what all|l1|lora|host] [--profile]

Times each kernel through its production launch helper (triton.testing.do_bench; the helper's tile
choice is swapped for each candidate) over a grid of tile shapes, warps and stages,
and prints the best configurations with their effective bandwidth, at the shapes of the issue
targets: grouped LoRA at N=8192, 4096->4096, r=16, D=32, bf16; hidden_l1 on [8192, 4096] bf16.
``--profile`` also prints the CUDA kernels of one grouped_lora fwd+bwd call. The hidden_l1 rows time
one layer, so the helper's small host ops (partials buffer, address tables) weigh more than at 32 layers.
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
            ms = do_bench(lambda: launch(cfg), warmup=10, rep=40)
        except Exception as e:  # a tile shape the compiler rejects (too many registers / smem)
            print(f"  {name} {cfg}: {type(e).__name__}")
            continue
        res.append((ms, cfg))
    res.sort(key=lambda t: t[0])
    print(f"{name}: {bytes_moved / 1e6:.1f} MB moved")
    for ms, cfg in res[:top]:
        print(f"  {ms * 1e3:8.1f} us  {bytes_moved / ms / 1e6:7.0f} GB/s  {cfg}")
    return res


def _patched(module, name, value):
    """Context manager: module.<name> = value for the duration (the production launch helpers
    read their tile choice from these functions, so the sweep times the real launch path)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, old)
    return cm()


def lora(profile: bool):
    import importlib

    from kmkernels import grouped_lora

    L = importlib.import_module("kmkernels.lora")
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
    segs = {bm: L.build_segments(ids, D, bm) for bm in (32, 64, 128)}

    def gemm(xx, w, strides, n_out, k, out, sc):
        def launch(c):  # c = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
            with _patched(L, "_gemm_config", lambda *_: c[1:]):
                L._seg_gemm(xx, w, strides, n_out, k, segs[c[0]], sc, out)
        return launch

    a_str = (A.stride(0), A.stride(1), A.stride(2))
    _sweep("shrink x@A^T (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)", x.numel() * 2 + h.numel() * 2,
           list(itertools.product((32, 64, 128), (16,), (128, 256), (4, 8), (2, 3))),
           gemm(x, A, a_str, r, din, h, None))
    b_str = (B.stride(0), B.stride(1), B.stride(2))
    _sweep("expand h@B^T (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)", y.numel() * 2 + h.numel() * 2,
           list(itertools.product((32, 64, 128), (128, 256), (16,), (4, 8), (1,))),
           gemm(h, B, b_str, dout, r, y, scale))

    dA, dB = torch.empty_like(A), torch.empty_like(B)

    def outer(lm, rm, out, sc):
        def launch(c):  # c = (BLOCK_M, BLOCK_P, BLOCK_Q)
            with _patched(L, "_outer_config", lambda *_: c):
                L._seg_outer([(lm, rm, sc, out)], segs[64])
        return launch

    _sweep("dA = dh^T x (BLOCK_M, BLOCK_P, BLOCK_Q)", x.numel() * 2 + h.numel() * 2 + dA.numel() * 2,
           list(itertools.product((64, 128), (16,), (128, 256))), outer(h, x, dA, None))
    _sweep("dB = dy^T h (BLOCK_M, BLOCK_P, BLOCK_Q)", y.numel() * 2 + h.numel() * 2 + dB.numel() * 2,
           list(itertools.product((64, 128), (128, 256), (16,))), outer(y, h, dB, scale))

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
    scales = torch.ones(1, device="cuda")
    grid = [c for c in itertools.product((1, 2, 4, 8, 16), (512, 1024, 2048), (4, 8)) if c[0] * c[1] <= 32768]

    def fwd(c):  # c = (BLOCK_N, BLOCK_H, num_warps)
        with _patched(M, "_blocks", lambda *_: c):
            M._layer_sums([s], [t], None, "triton")

    def bwd(c):
        with _patched(M, "_blocks", lambda *_: c):
            M._layer_grads([s], [t], None, scales, "triton", [True])

    _sweep("hidden_l1 fwd, one layer (BLOCK_N, BLOCK_H, warps)", 2 * s.numel() * 2, grid, fwd)
    _sweep("hidden_l1 bwd, one layer (BLOCK_N, BLOCK_H, warps)", 3 * s.numel() * 2, grid, bwd)


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
