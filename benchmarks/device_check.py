"""Question: does jvpgraph give the right Jv, and leave the model alone, on an accelerator?

One short script for a lent GPU machine (a few minutes): for a sigmoid+BatchNorm CNN in train mode, ResNet-18
in train mode and a small ViT in eval mode, on ``--device`` (default cuda), float64 and float32:

* jvpgraph's Jv against double-backward (and torch.func.jvp where it runs), max relative error;
* a SpectralRegularizer step: penalty and parameter gradients against the same step on the CPU;
* the model's state (parameters, buffers, flags) unchanged by trace / jvp / spectral_norm;
* the time of one Jv against torch.func.jvp or double-backward (medians, after warm-up).

Prints one line per check and exits 1 if any check fails. Runs on the CPU too (``--device cpu``), which is
how it was tested here; the GPU run is for a session that has one.

    python benchmarks/device_check.py                 # cuda
    python benchmarks/device_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
import torch.nn as nn

import jvpgraph
from jvpgraph import testing
from jvpgraph.experiments.models import SigmoidBNCNN


def _models(quick: bool):
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initializes the head: Jv would be 0
    out = [("sigmoid_bn_cnn train", SigmoidBNCNN(in_channels=3, width=8).train(), (8, 3, 16, 16)),
           ("vit eval", vit.eval(), (4, 3, 32, 32))]
    if not quick:
        out.insert(1, ("resnet18 train", torchvision.models.resnet18(num_classes=10).train(), (4, 3, 32, 32)))
    return out


def _median_time(fn, device, repeats=10):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="two models, float64 only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA device here (use --device cpu to check the script)")
        return 2
    print(f"device_check: torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    failures = 0

    def report(name, ok, detail):
        nonlocal failures
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    warnings.simplefilter("ignore")
    for name, model, shape in _models(args.quick):
        for dtype in (torch.float64,) if args.quick else (torch.float64, torch.float32):
            net = copy.deepcopy(model).to(device=device, dtype=dtype)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(shape, generator=g, dtype=dtype).to(device)
            v = torch.randn(shape, generator=g, dtype=dtype).to(device)
            tol = 1e-9 if dtype == torch.float64 else 1e-3  # float32 on a GPU: TF32 convolutions round ~1e-3
            tag = f"{name} {str(dtype)[6:]}"
            state = testing.ModelState(net)
            torch.manual_seed(0)
            traced = jvpgraph.trace(net, x)
            torch.manual_seed(0)
            _, jv = traced.jvp(x, v)
            torch.manual_seed(0)
            ref = testing.double_backward(net, x, v)
            err = testing.max_rel_err(jv, ref) if bool(ref.abs().max() > 0) else float("inf")
            report(f"{tag}: Jv vs double-backward", err <= tol, f"max rel err {err:.1e} (tol {tol:.0e})")
            sigma = jvpgraph.spectral_norm(net, x, n_iter=5).sigma
            report(f"{tag}: spectral_norm", bool(torch.isfinite(sigma).all()), f"σ {sigma.float().mean():.3g}")
            report(f"{tag}: model unchanged", not state.changes(net), str(state.changes(net) or "yes"))
            if dtype == torch.float64:  # the regularizer's step here and on the CPU: same penalty and gradients
                steps = []
                for dev in (device, torch.device("cpu")):
                    m = copy.deepcopy(model).to(device=dev, dtype=dtype)
                    reg = jvpgraph.SpectralRegularizer(m, n_iter=2, generator=torch.Generator(dev).manual_seed(0))
                    torch.manual_seed(0)
                    _, pen = reg(x.to(dev), index=torch.arange(shape[0]))
                    pen.mean().backward()
                    steps.append((pen.detach().cpu(), torch.cat([p.grad.flatten().cpu() for p in m.parameters()
                                                                 if p.grad is not None])))
                (p1, g1), (p2, g2) = steps
                err = max(testing.max_rel_err(p1, p2), testing.max_rel_err(g1, g2))
                report(f"{tag}: regularizer step vs CPU", err <= 1e-6, f"max rel err {err:.1e}")
            else:  # timing, float32
                t_ours = _median_time(lambda: traced.jvp(x, v), device)
                try:
                    torch.func.jvp(net, (x,), (v,))
                    base, t_base = "torch.func.jvp", _median_time(lambda: torch.func.jvp(net, (x,), (v,)), device)
                except Exception:  # noqa: BLE001 - train-mode BatchNorm, attention kernels
                    base, t_base = "double-backward", _median_time(lambda: testing.double_backward(net, x, v),
                                                                   device)
                report(f"{tag}: time", True, f"jvpgraph {1e3 * t_ours:.2f} ms, {base} {1e3 * t_base:.2f} ms "
                                             f"({t_ours / t_base:.2f}x)")
    print(f"device_check: {'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
