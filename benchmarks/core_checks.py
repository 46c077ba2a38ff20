"""Question: is jvpgraph's Jv right on models the tests never see? (issue "Core", what it must show)

* ResNet-18 in train mode vs the double-backward reference: max rel err <= 1e-4 (float32), <= 1e-9
  (float64); parameters, running statistics and num_batches_tracked unchanged afterwards.
* A small CNN with sigmoid + BatchNorm in train mode, float64: bn="batch" vs the full Jacobian (jacrev)
  times v; bn="frozen" vs the Jacobian with the batch statistics held constant.
* torchvision's VisionTransformer at 32x32, train and eval mode, vs double-backward (math attention).

    python benchmarks/core_checks.py          # exit status 1 if any check fails
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import jvpgraph
from jvpgraph import testing


def check(rows, name, model, x, ref_fn, tol, bn="batch"):
    v = torch.randn_like(x)
    before = testing.ModelState(model)
    t0 = time.perf_counter()
    jv = jvpgraph.jvp(model, (x,), (v,), bn=bn)[1]
    t = time.perf_counter() - t0
    ref = ref_fn(model, x, v)
    err = testing.max_rel_err(jv, ref)
    same = not before.changes(model)
    ok = err <= tol and same
    rows.append(dict(check=name, dtype=str(x.dtype).replace("torch.", ""), max_rel_err=err, tol=tol,
                     state_unchanged=same, seconds_incl_trace=t, ok=ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} {rows[-1]['dtype']:8s} rel err {err:.1e} (tol {tol:.0e}) "
          f"state unchanged: {same}  [{t:.1f} s incl. trace]")


class SigmoidBN(nn.Sequential):  # not the demo's or the tests' model
    def __init__(self):
        super().__init__(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.Sigmoid(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Sigmoid(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def main():
    torch.manual_seed(0)
    rows = []
    r18 = torchvision.models.resnet18(num_classes=10).train()
    check(rows, "ResNet-18 train vs double-backward", r18, torch.randn(4, 3, 64, 64), testing.double_backward, 1e-4)
    check(rows, "ResNet-18 train vs double-backward", r18.double(), torch.randn(4, 3, 64, 64, dtype=torch.double),
          testing.double_backward, 1e-9)
    cnn = SigmoidBN().double().train()
    xs = torch.randn(6, 3, 12, 12, dtype=torch.double)
    check(rows, 'sigmoid+BN CNN train, bn="batch" vs jacrev @ v', cnn, xs, testing.jacobian_times, 1e-9)
    check(rows, 'sigmoid+BN CNN train, bn="frozen" vs stats-held Jacobian', cnn, xs,
          testing.frozen_batchnorm_jvp, 1e-9, bn="frozen")
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                               hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision initializes the head to zero
    for mode in ("train", "eval"):
        vit.train(mode == "train")
        check(rows, f"VisionTransformer {mode} vs double-backward", vit, torch.randn(2, 3, 32, 32),
              testing.double_backward, 1e-4)
        check(rows, f"VisionTransformer {mode} vs double-backward", vit.double(),
              torch.randn(2, 3, 32, 32, dtype=torch.double), testing.double_backward, 1e-9)
        vit.float()
    out = Path(__file__).parent / "results" / "core_checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=2))
    n_ok = sum(r["ok"] for r in rows)
    print(f"{n_ok}/{len(rows)} checks passed")
    return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
