"""train.py under torchrun on 1, 2, ... processes: feature extraction images/s (cached path) and full-loop images/s.

    python benchmarks/bench_distributed.py                         # CPU: 1 and 2 processes (a few minutes, 2 cores)
    python benchmarks/bench_distributed.py --device cuda --nproc 1,2,4,8 --images 4096 --num-workers 6

Each run is the user's command on a generated set: 1 process is a plain `python train.py`, N processes are
`torchrun --standalone --nproc-per-node N train.py`. Extraction: the cached path into an empty feature cache
(--folds 0 --epochs 1), the rate of its "extracted in" line (2 forwards per training image, 1 per validation
image) in images/s. Full loop: --augment strong, 2 epochs, the img/s of the second epoch's line (all ranks'
images; the first epoch pays the start-up). On a CPU each process gets cores / N threads (OMP_NUM_THREADS), so
N processes share the same cores: expect no gain over 1 process with all the threads; on a shared, busy machine
spinning OpenMP threads can make the many-thread row far slower (measured: 2 threads 10x slower than 1), which
is why 1 process with each thread count is measured too.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, machine_lines, make_set, table  # noqa: E402


def train(world, flags, *, device, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launcher = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    done = subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *flags, "--device", device], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train.py on {world} process(es) failed:\n{done.stderr[-3000:]}")
    return done.stdout


def configurations(args, cores):
    """(processes, threads each): on a CPU each process count shares the cores, and 1 process also runs with
    each of those thread counts (first), the baseline of the efficiency; on GPUs one process per GPU."""
    worlds = [int(w) for w in args.nproc.split(",")]
    if args.device == "cuda":
        threads = max(cores // max(worlds) // 2, 1)
        return [(w, threads) for w in worlds]
    each = [(w, max(cores // w, 1)) for w in worlds]
    ones = sorted({(1, t) for _, t in each}, reverse=True)
    return ones + [c for c in each if c[0] > 1]


def extraction_rate(output, images, val_images):
    seconds = float(re.search(r"extracted in ([\d.]+)s", output).group(1))
    return images / seconds, (2 * (images - val_images) + val_images) / seconds


def full_loop_rate(output):
    return float(re.findall(r"epoch +2/2 .* (\d+) img/s", output)[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16, help="the global batch (each rank: its share)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    cores = os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        labels, images = make_set(tmp, args.images)
        common = ["--labels", labels, "--images", images, "--backbone", args.backbone, "--weights", "none",
                  "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--num-workers",
                  str(args.num_workers), "--folds", "0", "--no-report"]
        val_images = round(0.2 * args.images)
        base = {}  # threads each -> the 1-process rates with that many threads
        for world, threads in configurations(args, cores):
            out = os.path.join(tmp, f"run{world}x{threads}")
            cached = train(world, common + ["--epochs", "1", "--out", f"{out}/x/model.pth", "--curve",
                                            f"{out}/x/c.png", "--cache-dir", f"{out}/cache"],
                           device=args.device, threads=threads)
            images_s, forwards_s = extraction_rate(cached, args.images, val_images)
            full = train(world, common + ["--augment", "strong", "--epochs", "2", "--out", f"{out}/y/model.pth",
                                          "--curve", f"{out}/y/c.png"], device=args.device, threads=threads)
            loop_s = full_loop_rate(full)
            one = base.setdefault(threads, (images_s, loop_s))
            rows.append([str(world), str(threads), f"{images_s:.1f}", f"{forwards_s:.1f}",
                         f"{images_s / one[0] / world:.0%}", f"{loop_s:.0f}", f"{loop_s / one[1] / world:.0%}"])
    print("\n".join(machine_lines()))
    print(f"set       {args.images} generated images ({val_images} validation), {args.backbone} (random weights) at "
          f"{args.image_size} px, global batch {args.batch_size}, {args.num_workers} loader workers per process, "
          f"device {args.device}")
    print(table(["processes", "threads each", "extract img/s", "forwards/s", "efficiency", "full loop img/s",
                 "efficiency"], rows))
    print("efficiency: the rate / (processes x the rate of 1 process with as many threads); 100% is perfect")


if __name__ == "__main__":
    main()
