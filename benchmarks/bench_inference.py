"""Inference speed: start-up of `python inference.py one.jpg` and folder throughput against the forward ceiling.

    python benchmarks/bench_inference.py                       # trains a 1-epoch resnet50 (--weights none) first
    python benchmarks/bench_inference.py --model model.pth     # or uses a checkpoint you have
    python benchmarks/bench_inference.py --runs 3 --folder-n 64 --ceiling-seconds 5   # a quicker look

Rows of the table:
  bare import        python -c "import torch, torchvision"  (median of --runs fresh processes)
  one image          python inference.py one.jpg --model M  (median of --runs; the target is <= 1.5x bare import)
  folder             python inference.py FOLDER --model M   (--folder-n images; images / wall, start-up included)
  ONNX rows          the same on ONNX Runtime, the checkpoint exported by export.py (`--model model.onnx`, no
                     PyTorch imported; the target is one image <= 0.5x bare import); its folder loop is
                     inference.predict_onnx; the int8 row is export.py --int8's copy in the same loop
  folder loop        inference.predict over the same images in this process, the loop inference.py runs once the
                     model is loaded (DataLoader workers, BatchNorm folding, every batch): the folder throughput, measured
                     like train.py's extraction rate; this process keeps freed memory from here on, as inference.py does
  ceiling            the backbone forward alone, channels_last fp32, random input, same batch size: before and after
                     the folder runs (default allocator), and after the folder loop (freed memory kept)
The machine is shared and noisy: read the ratios of one run, not absolute numbers across runs.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, fmt, forward_ceiling, load_average, machine_lines, make_set, median, table, wait_for_quiet

import torch  # noqa: E402

import export  # noqa: E402
import inference  # noqa: E402
from onnx_model import OnnxModel  # noqa: E402
from utils import keep_freed_memory, resolve_workers, workers_arg  # noqa: E402
import train  # noqa: E402
from dataset import eval_transform  # noqa: E402
from model import load_checkpoint, model_from_checkpoint  # noqa: E402

# Run in a fresh process: where the start-up of `inference.py one.jpg` goes.
STAGES = r"""
import json, sys, time
t = [time.perf_counter()]
import torch, torchvision
t.append(time.perf_counter())
import inference
from dataset import eval_transform, load_image
from model import load_checkpoint, model_from_checkpoint
from utils import pick_device
t.append(time.perf_counter())
ckpt = load_checkpoint(sys.argv[1])
t.append(time.perf_counter())
model = model_from_checkpoint(ckpt, sys.argv[1]).to(memory_format=torch.channels_last)
t.append(time.perf_counter())
x = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])(load_image(sys.argv[2])).unsqueeze(0)
t.append(time.perf_counter())
with torch.inference_mode():
    torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last)))
t.append(time.perf_counter())
names = ["import torch, torchvision", "import inference (+ dataset, model, PIL)", "load_checkpoint",
         "model_from_checkpoint", "read + transform image", "forward (1 image)"]
print(json.dumps(dict(zip(names, [b - a for a, b in zip(t, t[1:])]))))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint to use (default: train a 1-epoch one on a small generated set)")
    p.add_argument("--backbone", default="resnet50", help="backbone of the generated checkpoint")
    p.add_argument("--image-size", type=int, default=224, help="image size of the generated checkpoint")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per start-up measurement (median)")
    p.add_argument("--folder-n", type=int, default=128, help="images in the folder run")
    p.add_argument("--folder-runs", type=int, default=2, help="folder runs (the best is reported)")
    p.add_argument("--batch-size", type=int, default=inference.BATCH_SIZE)
    p.add_argument("--num-workers", type=workers_arg, default=inference.NUM_WORKERS,
                   help="as inference.py's (auto: what it picks on this machine)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="first wait up to S seconds for the 1-minute load average to drop below 1")
    p.add_argument("--ceiling-seconds", type=float, default=15.0)
    return p.parse_args(argv)


def timed_run(cmd):
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def make_checkpoint(folder, args):
    """A resnet50 checkpoint in seconds: 1 epoch on 24 generated images, random weights."""
    labels, images = make_set(os.path.join(folder, "train_set"), 24, seed=7)
    out = os.path.join(folder, "model.pth")
    argv = ["--labels", labels, "--images", images, "--out", out, "--curve", os.path.join(folder, "curve.png"),
            "--weights", "none", "--backbone", args.backbone, "--image-size", str(args.image_size), "--epochs", "1",
            "--num-workers", "0", "--cache-dir", os.path.join(folder, "cache"), "--patience", "0",
            "--no-keep-freed-memory"]  # this process starts with glibc's defaults, for the first ceilings
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = train.main(argv)
    if rc != 0:
        raise SystemExit(f"train.main {' '.join(argv)} returned {rc}:\n{log.getvalue()}")
    return out


def predict_rate(model_path, paths, args, workers):
    ckpt = load_checkpoint(model_path)
    model = model_from_checkpoint(ckpt, model_path).to(memory_format=torch.channels_last)
    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    cpu = torch.device("cpu")
    list(inference.predict(model, paths[:args.batch_size], transform, device=cpu, batch_size=args.batch_size,
                           num_workers=0))  # warm-up
    started = time.perf_counter()
    results = list(inference.predict(model, paths, transform, device=cpu, batch_size=args.batch_size,
                                     num_workers=workers))
    elapsed = time.perf_counter() - started
    assert len(results) == len(paths) and all(e is None for _, _, e in results)
    return len(paths) / elapsed


def predict_onnx_rate(onnx_path, paths, args):
    model = OnnxModel(onnx_path, device="cpu")
    list(inference.predict_onnx(model, paths[:args.batch_size], args.batch_size))  # warm-up
    started = time.perf_counter()
    results = list(inference.predict_onnx(model, paths, args.batch_size))
    elapsed = time.perf_counter() - started
    assert len(results) == len(paths) and all(e is None for _, _, e in results)
    return len(paths) / elapsed


def export_onnx(model_path, folder, out):
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = export.main([model_path, "--out", out, "--images", folder, "--check-images", "4", "--int8"])
    if rc != 0:
        raise SystemExit(f"export.py failed: {log.getvalue()}")


def main(argv=None):
    args = parse_args(argv)
    args.num_workers = resolve_workers(args.num_workers, torch.device("cpu"))
    total_started = time.perf_counter()
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:.0f}s for a quiet machine: load {wait_for_quiet(args.wait_quiet):.2f}",
              flush=True)
    print("\n".join(machine_lines()), flush=True)
    python = sys.executable
    work = tempfile.mkdtemp(prefix="bench_inference-")
    try:
        if args.model:
            model_path = os.path.abspath(args.model)
        else:
            print(f"training a 1-epoch {args.backbone} checkpoint (--weights none) ...", flush=True)
            model_path = make_checkpoint(work, args)
        ckpt = load_checkpoint(model_path)
        image_size, backbone = ckpt["image_size"], ckpt["backbone"]
        size_mb = os.path.getsize(model_path) / 1e6
        del ckpt
        _, folder = make_set(os.path.join(work, "folder_set"), args.folder_n, seed=99)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        one = os.path.join(work, "one.jpg")
        shutil.copy(paths[0], one)
        onnx_path = os.path.join(work, "model.onnx")
        export_onnx(model_path, folder, onnx_path)

        print("ceiling ...", flush=True)
        ceiling_1, _ = forward_ceiling(args.batch_size, image_size, backbone, args.ceiling_seconds)
        print(f"    | {ceiling_1:.2f} images/s", flush=True)

        bare_cmd = [python, "-c", "import torch, torchvision"]
        one_cmd = [python, "inference.py", one, "--model", model_path]
        onnx_cmd = [python, "inference.py", one, "--model", onnx_path]
        print(f"start-up: {args.runs} x each, alternating ...", flush=True)
        timed_run(bare_cmd), timed_run(one_cmd), timed_run(onnx_cmd)  # warm the page cache; not counted
        bare, single, single_onnx = [], [], []
        for _ in range(args.runs):
            bare.append(timed_run(bare_cmd)[0])
            t, out = timed_run(one_cmd)
            single.append(t)
            t, out_onnx = timed_run(onnx_cmd)
            single_onnx.append(t)
        print(f"    | bare import {' '.join(f'{t:.2f}' for t in bare)} s; one image "
              f"{' '.join(f'{t:.2f}' for t in single)} s; output: {out.strip()}; ONNX "
              f"{' '.join(f'{t:.2f}' for t in single_onnx)} s; output: {out_onnx.strip()}", flush=True)
        stages = json.loads(timed_run([python, "-c", STAGES, model_path, one])[1])

        folder_cmd = [python, "inference.py", folder, "--model", model_path, "--batch-size", str(args.batch_size),
                      "--num-workers", str(args.num_workers)]
        print(f"folder of {len(paths)} images: {args.folder_runs} runs ...", flush=True)
        folder_walls = []
        for _ in range(args.folder_runs):
            t, out = timed_run(folder_cmd)
            assert out.count("Attributes present") == len(paths), out[-500:]
            folder_walls.append(t)
        print(f"    | {' '.join(f'{t:.1f}' for t in folder_walls)} s", flush=True)
        onnx_folder_walls = []
        for _ in range(args.folder_runs):
            t, out = timed_run([python, "inference.py", folder, "--model", onnx_path, "--batch-size",
                                str(args.batch_size)])
            assert out.count("Attributes present") == len(paths), out[-500:]
            onnx_folder_walls.append(t)
        print(f"    | ONNX {' '.join(f'{t:.1f}' for t in onnx_folder_walls)} s", flush=True)

        print("ceiling again, after the folder runs ...", flush=True)
        ceiling_2, _ = forward_ceiling(args.batch_size, image_size, backbone, args.ceiling_seconds)
        print(f"    | {ceiling_2:.2f} images/s", flush=True)

        # From here on this process runs as inference.py does: freed memory kept (it cannot be undone).
        kept = keep_freed_memory(torch.device("cpu"))
        print(f"predict() in this process{', freed memory kept' if kept else ''} ...", flush=True)
        rates = {}
        for workers in sorted({args.num_workers, 0, 2}, reverse=True):
            rates[workers] = predict_rate(model_path, paths, args, workers)
            print(f"    | {workers} workers: {rates[workers]:.2f} images/s", flush=True)
        onnx_rate = predict_onnx_rate(onnx_path, paths, args)
        print(f"    | ONNX Runtime, predict_onnx: {onnx_rate:.2f} images/s", flush=True)
        int8_rate = predict_onnx_rate(onnx_path.replace(".onnx", ".int8.onnx"), paths, args)
        print(f"    | ONNX Runtime, int8 (export.py --int8): {int8_rate:.2f} images/s", flush=True)

        print("ceiling, freed memory kept ...", flush=True)
        ceiling_3, _ = forward_ceiling(args.batch_size, image_size, backbone, args.ceiling_seconds)
        print(f"    | {ceiling_3:.2f} images/s", flush=True)
        ceiling = max(ceiling_1, ceiling_2, ceiling_3)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bare_s, single_s, folder_s = median(bare), median(single), min(folder_walls)
    onnx_s, onnx_folder_s = median(single_onnx), min(onnx_folder_walls)

    def pct(rate):
        return f"{100 * rate / ceiling:.0f}%"

    rows = [
        ['bare: python -c "import torch, torchvision"', fmt(bare_s, ".2f"), "-", "1.00x", "-"],
        ["one image: python inference.py one.jpg", fmt(single_s, ".2f"), "-", f"{single_s / bare_s:.2f}x", "-"],
        [f"folder: python inference.py FOLDER ({len(paths)} images, best of {len(folder_walls)}), start-up included",
         fmt(folder_s, ".2f"), fmt(len(paths) / folder_s, ".2f"), "-", pct(len(paths) / folder_s)],
        ["ONNX one image: python inference.py one.jpg --model model.onnx", fmt(onnx_s, ".2f"), "-",
         f"{onnx_s / bare_s:.2f}x", "-"],
        [f"ONNX folder: python inference.py FOLDER --model model.onnx (best of {len(onnx_folder_walls)})",
         fmt(onnx_folder_s, ".2f"), fmt(len(paths) / onnx_folder_s, ".2f"), "-", pct(len(paths) / onnx_folder_s)],
        [f"ONNX folder loop: predict_onnx() in process, batch {args.batch_size}", fmt(len(paths) / onnx_rate, ".2f"),
         fmt(onnx_rate, ".2f"), "-", pct(onnx_rate)],
        [f"ONNX int8 folder loop (export.py --int8): predict_onnx(), batch {args.batch_size}",
         fmt(len(paths) / int8_rate, ".2f"), fmt(int8_rate, ".2f"), "-", pct(int8_rate)],
    ]
    for workers, rate in rates.items():
        rows.append([f"folder loop: predict() in process, {workers} workers, batch {args.batch_size}",
                     fmt(len(paths) / rate, ".2f"), fmt(rate, ".2f"), "-", pct(rate)])
    rows.append([f"ceiling: {backbone} forward, channels_last fp32, batch {args.batch_size} (default allocator x2, "
                 f"kept)", fmt(args.ceiling_seconds, ".0f"), f"{ceiling_1:.2f} / {ceiling_2:.2f} / {ceiling_3:.2f}",
                 "-", "100%"])
    print()
    print("\n".join(machine_lines()))
    print(f"setup     checkpoint {backbone} {image_size}px ({size_mb:.0f} MB), {args.runs} start-up runs each (median), "
          f"folder batch {args.batch_size}, {args.num_workers} workers")
    print(table(["what", "wall s", "images/s", "vs bare import", "% ceiling"], rows))
    print("% ceiling: of the highest (PyTorch) ceiling. The folder row includes process start-up (imports, checkpoint); the "
          "folder loop rows do not.")
    print("\nwhere `python inference.py one.jpg` spends its time (one fresh process)")
    print(table(["stage", "seconds"], [[k, fmt(v, ".3f")] for k, v in stages.items()] +
                [["sum", fmt(sum(stages.values()), ".3f")]]))
    folder_rate = len(paths) / folder_s
    startup = folder_s - len(paths) / rates[args.num_workers]
    steady = rates[args.num_workers]
    print(f"\nfolder run = start-up + images / predict() rate: {folder_s:.2f}s = {startup:.2f}s + {len(paths)} / "
          f"{steady:.2f}; the bare import alone is {bare_s:.2f}s.")
    if steady > 0.85 * ceiling:
        need = 0.85 * ceiling * startup / (1 - 0.85 * ceiling / steady)
        print(f"with that start-up, 85% of the ceiling needs a folder of about {need:.0f} images or more.")
    else:
        print("predict() itself is below 85% of the ceiling: no folder size reaches it.")
    print("\ntargets")
    for what, value, ok in [
        ("python inference.py one.jpg <= 1.5x bare import torch, torchvision", f"{single_s / bare_s:.2f}x",
         single_s <= 1.5 * bare_s),
        (f"folder inference (the loop, {args.num_workers} workers) >= 85% of the forward ceiling", pct(steady),
         steady >= 0.85 * ceiling),
        ("python inference.py one.jpg --model model.onnx <= 0.5x bare import torch, torchvision",
         f"{onnx_s / bare_s:.2f}x", onnx_s <= 0.5 * bare_s),
    ]:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    print(f"  info  the whole `python inference.py FOLDER` of {len(paths)} images, start-up included: "
          f"{pct(folder_rate)}")
    print(f"  info  folder throughput, ONNX Runtime / PyTorch: the loop {onnx_rate / steady:.2f}x, the whole command "
          f"{folder_s / onnx_folder_s:.2f}x; int8 / float ONNX loop {int8_rate / onnx_rate:.2f}x")
    print(f"\ntotal benchmark time {time.perf_counter() - total_started:.0f}s; load avg at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
