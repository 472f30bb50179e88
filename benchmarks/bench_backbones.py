"""Feature extraction speed of timm backbones against the built-in ResNet50 and EfficientNet-Lite0, on this CPU.

    python benchmarks/bench_backbones.py                      # 32 images each, every backbone at its default size
    python benchmarks/bench_backbones.py --images 64 --backbones timm:convnext_tiny resnet50

What train.py's cached path runs (feature_cache.extract): generated garment images decoded, resized and normalized
in the main process (no loader workers, as --num-workers auto picks on 2 cores), the backbone folded
(model.fold_batchnorm) and channels_last, batches of --batch-size, the first view only (train.py runs two per
training image, so its forwards/s are these images/s). Random weights (--weights none): speed does not depend on
them, and pretrained timm weights cannot be fetched offline. One warm-up batch first; the best of --repeat passes.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt, machine_lines, make_set, table  # noqa: E402

import torch  # noqa: E402

BACKBONES = ["resnet50", "efficientnet_lite0", "timm:resnet18", "timm:convnext_atto", "timm:vit_tiny_patch16_224",
             "timm:mobilenetv4_conv_small"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--images", type=int, default=32, help="images extracted per backbone and pass")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2, help="passes per backbone; the best is kept")
    return p.parse_args(argv)


def measure(backbone, paths, *, batch_size, repeat):
    """(images/s of the extraction, feature size, image size, parameters in millions, (BatchNorms left after
    folding, before))."""
    from feature_cache import extract, folded_backbone
    from model import backbone_spec, build_model

    spec = backbone_spec(backbone)
    torch.manual_seed(0)
    model = build_model(backbone, 4, "none", "none", spec.size)
    folded = folded_backbone(model)
    settings = dict(image_size=spec.size, mean=spec.norm[0], std=spec.norm[1], batch_size=batch_size,
                    num_workers=0, device=torch.device("cpu"), amp=False, views=(0,), backbone=folded)
    for _ in extract(model, paths[:batch_size], **settings):  # warm-up: oneDNN picks its kernels
        pass
    best = 0.0
    for _ in range(repeat):
        started, n = time.perf_counter(), 0
        for indices, features, _ in extract(model, paths, **settings):
            n += len(indices)
            assert features.shape[-1] == spec.features
        best = max(best, n / (time.perf_counter() - started))
    return best, spec.features, spec.size, sum(p.numel() for p in model.backbone.parameters()) / 1e6, \
        (batchnorms(folded), batchnorms(model.backbone))


def batchnorms(net):
    """BatchNorms a forward of net runs: modules, and in a torch.fx graph the functional calls it traced into
    (timm's BatchNormAct2d is traced through, not folded)."""
    count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if isinstance(net, torch.fx.GraphModule):
        count += sum(node.op == "call_function" and node.target is torch.nn.functional.batch_norm
                     for node in net.graph.nodes)
    return count


def main(argv=None):
    args = parse_args(argv)
    from utils import keep_freed_memory

    keep_freed_memory(torch.device("cpu"))  # as train.py does on a Linux CPU
    for line in machine_lines():
        print(line)
    print(f"set       {args.images} generated images, batch {args.batch_size}, 0 loader workers, fp32, "
          f"random weights, best of {args.repeat}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        _, images = make_set(folder, args.images)
        paths = sorted(os.path.join(images, n) for n in os.listdir(images))
        for backbone in args.backbones:
            rate, features, size, params, (left, total) = measure(backbone, paths, batch_size=args.batch_size,
                                                                    repeat=args.repeat)
            rows.append([backbone, str(size), str(features), fmt(params), fmt(rate), f"{total - left}/{total}"])
            print(f"  {backbone}: {rate:.1f} images/s", flush=True)
    reference = float(rows[0][4]) if rows else 1.0
    for row in rows:
        row.append(f"{float(row[4]) / reference:.2f}x")
    print(table(["backbone", "size px", "features", "params M", "images/s", "BN folded", f"vs {rows[0][0]}"], rows))


if __name__ == "__main__":
    main()
