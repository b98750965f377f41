"""A few small CUDA steps through every kernel path (plain, first step, momentum, nesterov, fp16,
bf16, fp64, statistics on rows / cols / all, AMP skip), for compute-sanitizer in gpu_check.sh."""

import torch

import nm_optim

assert torch.cuda.is_available(), "needs a CUDA device"
shapes = [(1,), (7,), (33, 17), (5, 3, 3, 3), (1000,), (3, 0), (129, 300)]
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for hyper in (dict(), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True)):
        ps = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
        tracks = [(p, a) for p in ps for a in (("rows", "cols", "all") if p.dim() >= 2 else ("rows", "all"))]
        opt = nm_optim.SGD(ps, lr=0.1, backend="cuda", track=tracks, **hyper)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            if step == 2:
                opt.grad_scale, opt.found_inf = torch.ones((), device="cuda"), torch.ones((), device="cuda")
            opt.step()
        torch.cuda.synchronize()
        assert all(s.isnan().all() for s in opt.last_stats()), "the skipped step left NaN statistics"
print("sanitize_step: ok")
