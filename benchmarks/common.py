"""Shared pieces of the benchmark scripts: machine description, the forward ceiling, tables, a generated set.

Not a benchmark itself; bench_train.py and bench_inference.py import it.
"""
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16")):
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "?"
    return " ".join(w for w in wanted if w in flags) or "none of " + ",".join(wanted)


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def wait_for_quiet(max_seconds, below=1.0):
    """Wait (up to max_seconds) until the 1-minute load average drops below `below`; other work skews timings."""
    started = time.time()
    while max_seconds > 0 and os.getloadavg()[0] >= below and time.time() - started < max_seconds:
        time.sleep(5)
    return os.getloadavg()[0]


def machine_lines():
    import torchvision

    return [
        f"date      {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine   nproc {os.cpu_count()}, {cpu_model()} ({cpu_flags()}), torch threads {torch.get_num_threads()}",
        f"software  python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}",
        f"load avg  {load_average()} (other processes on this machine skew every number below)",
    ] + [f"env       {k}={v}" for k, v in sorted(os.environ.items())
         if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_", "DNNL_", "ONEDNN_")) or k == "LD_PRELOAD"]


def make_set(folder, n, seed=1234, na_rate=0.09):
    """n generated garment images in folder/images and their labels in folder/labels.txt."""
    import make_sample

    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels.txt")
    make_sample.generate(n, images, labels, seed, na_rate)
    return labels, images


def backbone_module(name="resnet50", image_size=224):
    """The product's backbone (pooled features, no classifier), random weights, eval mode."""
    from model import build_model

    torch.manual_seed(0)
    return build_model(name, 4, "none", "none", image_size).backbone.eval()


def forward_ceiling(batch_size, image_size=224, backbone="resnet50", seconds=15.0, amp=False, net=None,
                    channels_last=True, fold=False):
    """Images/s of backbone forwards on random input: channels_last (or NCHW) fp32 (or bf16 autocast with amp),
    eval, inference_mode, one warm-up batch, then timed batches until `seconds` have passed (at least 2).
    fold: the product's model.fold_batchnorm copy. Returns (images per second, batches timed)."""
    from model import fold_batchnorm

    net = net or backbone_module(backbone, image_size)
    net = fold_batchnorm(net) if fold else net
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt_)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt_)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        net(x)  # warm-up: oneDNN picks its kernels and the allocator grows
        batches, started = 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - started < seconds:
            net(x)
            batches += 1
        elapsed = time.perf_counter() - started
    return batches * batch_size / elapsed, batches


def cpu_seconds():
    """CPU time of this process and its finished children (DataLoader workers): unlike wall time it barely grows
    when other processes compete for the cores, so ratios of it survive a busy machine better."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def median(values):
    return statistics.median(values)


def table(headers, rows, aligns=None):
    """Plain fixed-width table; numbers arrive already formatted as strings."""
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, aligns, widths))  # noqa: E731
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def fmt(x, spec=".1f", missing="-"):
    if x is None or (isinstance(x, float) and x != x):
        return missing
    return format(x, spec)
