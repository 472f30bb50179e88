"""What one head of the cross-validation costs: one fold of 30 epochs on cached features, before and after.

    python benchmarks/bench_heads.py                         # ../shared/realdev/train's EfficientNet-Lite0 features
    python benchmarks/bench_heads.py --dim 2048 --rows 480   # random features of ResNet50's width

One fold = train.py's head (MLP, dropout, masked BCE with pos_weight) trained 30 epochs on 4/5 of the rows through
engine.train_one_epoch, scoring the held-out fifth with flip TTA after each epoch, as engine.out_of_fold runs it.
  before  AdamW with torch's default implementation (foreach) and torch's nn.Dropout, as train.py had them
  after   AdamW(fused=True) and model.Dropout (masks from torch.rand, a generator per head), as now
  floor   the same steps' arithmetic alone: forward + backward of the two matrix products and one fused AdamW
          step on preallocated tensors, no loss, no batching, no Python loop around it beyond the step
All under utils.small_matmuls (one thread), as train.py runs the heads. Then the whole cross-validation of
train.py's defaults (--repeats 2 x 5 folds, 30 epochs) through engine.out_of_fold: its heads one after the
other (workers 1) and side by side, one a core (what train.py does), with the scores checked equal.
"""
import argparse
import os
import sys
import time

import numpy as np

from common import machine_lines, table

import torch  # noqa: E402

import engine  # noqa: E402
import train  # noqa: E402
from data_loader import FeatureBatches  # noqa: E402
from model import build_head, flip_tta  # noqa: E402
from utils import small_matmuls  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", help="an .npy of (n, 2, D) features (default: realdev's Lite0, via bench_audit)")
    p.add_argument("--dim", type=int, help="random features of this width instead")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--cache-dir", default=train.CACHE_DIR)
    p.add_argument("--repeat", type=int, default=3, help="timings per variant (the best is shown)")
    return p.parse_args(argv)


def one_fold(x, y, args, *, fused):
    n = len(y)
    rows = np.arange(n)
    train_rows, held = rows[n // 5:], rows[:n // 5]
    torch.manual_seed(0)
    head = build_head(args.head, x.shape[-1], y.shape[1], hidden=args.hidden, dropout=args.dropout)
    if not fused:  # before: torch's own dropout too, as the head was built then
        head = torch.nn.Sequential(*[torch.nn.Dropout(m.p) if isinstance(m, torch.nn.Dropout) else m for m in head])
    optimizer = engine.make_optimizer(head, args)
    if not fused:
        optimizer = torch.optim.AdamW([{"params": list(head.parameters()), "base_lr": args.lr, "lr": args.lr}],
                                      weight_decay=args.weight_decay)
    batches = FeatureBatches(x, rows, train_rows, y, batch_size=args.batch_size, shuffle=True, seed=0)
    held_batches = FeatureBatches(x, rows, held, y, batch_size=args.batch_size, shuffle=False, seed=0,
                                  both_views=True)
    loss_fn = engine.make_loss_for(args, y[train_rows])
    started = time.perf_counter()
    for epoch in range(args.epochs):
        batches.set_epoch(epoch)
        head.train()
        engine.train_one_epoch(head, batches, loss_fn=loss_fn, optimizer=optimizer, lr_at=lambda s: 1.0,
                               first_step=0, device=torch.device("cpu"))
        head.eval()
        engine.evaluate(flip_tta(head, features=True), held_batches, device=torch.device("cpu"))
    return time.perf_counter() - started, len(batches) * args.epochs


def floor(dim, k, args, steps):
    x = torch.randn(args.batch_size, dim)
    w1 = torch.randn(dim, args.hidden, requires_grad=True)
    w2 = torch.randn(args.hidden, k, requires_grad=True)
    optimizer = torch.optim.AdamW([w1, w2], lr=1e-3, fused=True)
    started = time.perf_counter()
    for _ in range(steps):
        out = torch.nn.functional.gelu(x @ w1) @ w2
        optimizer.zero_grad(set_to_none=True)
        out.sum().backward()
        optimizer.step()
    return time.perf_counter() - started


def main(argv=None):
    options = parse_args(argv)
    args = train.parse_args([])
    args.epochs = options.epochs
    if options.dim:
        g = np.random.default_rng(0)
        x = g.normal(size=(options.rows, 2, options.dim)).astype(np.float32)
        y = torch.from_numpy((g.random((options.rows, 4)) < 0.3).astype(np.int8))
        source = f"random features, {options.rows} x {options.dim}"
    else:
        import bench_audit
        from dataset import load_dataset
        from utils import Report

        labels = os.path.join(bench_audit.REALDEV, "labels.txt")
        _, paths, y = load_dataset(labels, os.path.join(bench_audit.REALDEV, "images"), Report())
        x = bench_audit.features_of("efficientnet_lite0", paths, options.cache_dir)
        source = f"realdev train, {len(paths)} photos, efficientnet_lite0 features ({x.shape[-1]})"
    rows = []
    with small_matmuls():
        results = {}
        for name, fused in (("before: AdamW (foreach)", False), ("after: AdamW(fused=True)", True)):
            times = [one_fold(x, y, args, fused=fused) for _ in range(options.repeat)]
            results[name] = min(t for t, _ in times), times[0][1]
        steps = results["after: AdamW(fused=True)"][1]
        results["floor: the arithmetic of those steps"] = (min(floor(x.shape[-1], y.shape[1], args, steps)
                                                               for _ in range(options.repeat)), steps)
        whole = {}
        for workers in (1, os.cpu_count() or 1):
            state = engine.start_out_of_fold(y.numpy(), folds=args.folds, repeats=args.repeats, epochs=args.epochs,
                                             seed=0)
            rows_all = np.arange(len(y))

            def batches(idx, shuffle, seed):
                return FeatureBatches(x, rows_all, idx, y, batch_size=args.batch_size, shuffle=shuffle, seed=seed,
                                      both_views=not shuffle)

            started, epochs = time.perf_counter(), []
            assert engine.out_of_fold(batches, rows_all, y, args=args, feature_dim=x.shape[-1],
                                      device=torch.device("cpu"), state=state, workers=workers,
                                      every_epoch=lambda epoch, logits: epochs.append(logits))
            whole[workers] = (time.perf_counter() - started, np.stack(epochs, 1))
        assert all(np.array_equal(s, whole[1][1]) for _, s in whole.values()), "side by side changed the scores"
    base = results["before: AdamW (foreach)"][0]
    for name, (seconds, steps) in results.items():
        rows.append([name, f"{seconds:.2f}", str(steps), f"{1000 * seconds / steps:.2f}", f"{base / seconds:.2f}x"])
    print("\n".join(machine_lines()))
    print(f"one fold: {options.epochs} epochs, batch {args.batch_size}, {args.head} head ({args.hidden} hidden), "
          f"held-out fifth scored with TTA each epoch; {source}; 1 thread")
    print(table(["variant", "seconds", "steps", "ms / step", "vs before"], rows, ["<", ">", ">", ">", ">"]))
    heads = args.repeats * args.folds
    print(f"\nthe cross-validation: {args.repeats} x {args.folds} folds = {heads} heads of {args.epochs} epochs "
          "(scores equal bit for bit)")
    print(table(["heads", "seconds", "vs one after the other"],
                [[f"{'one after the other' if w == 1 else f'side by side, {w} threads'}", f"{t:.2f}",
                  f"{whole[1][0] / t:.2f}x"] for w, (t, _) in whole.items()], ["<", ">", ">"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
