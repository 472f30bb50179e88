"""Run-time helpers shared by the scripts: errors and warnings, progress, Ctrl-C, atomic writes, device,
seeding, and the command-line flags every script has. Importing it does not import torch (the ONNX
Runtime path of inference.py runs without PyTorch)."""
import argparse
import contextlib
import errno
import json
import os
import random
import signal
import sys
import time
from collections import Counter


class UserError(Exception):
    """An error the user can fix (bad file, bad option). Scripts print it as one `error:` line."""


def run_cli(run, args):
    """Run a script's run(args): a UserError becomes one `error:` line and exit code 2 (a traceback with --debug)."""
    try:
        return run(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


class Report:
    """Collects warnings (printed as they happen, counted by reason); under strict the first one is an error."""

    def __init__(self, strict=False, stream=None, info_stream=None):
        self.strict = strict
        self.stream = stream
        self.info_stream = info_stream
        self.counts = Counter()
        self.messages = []  # kept for the run's summary file: warnings scroll away on a big data set
        self.infos = []

    def warn(self, reason, message, fatal=True, count=1):
        """fatal=False for problems of our own making (a damaged cache), which --strict does not stop on. count: how
        many problems the one message stands for (a grouped line: `N x bad value (Attr3), the first ...`)."""
        if self.strict and fatal:
            raise UserError(f"{message} (--strict turns warnings into errors)")
        self.counts[reason] += count
        self.messages.append(message)
        print(f"warning: {message}", file=self.stream or sys.stderr)

    def info(self, message):
        """A line about the input that is no warning (what a labels file was read as): on stderr, before the
        warnings it explains, so that a script's stdout (its log, --json) is unchanged."""
        self.infos.append(message)
        print(message, file=self.info_stream or sys.stdout, flush=True)  # a log line, as log()'s

    @property
    def total(self):
        return sum(self.counts.values())

    def summary(self):
        return ", ".join(f"{n} {reason}" for reason, n in self.counts.items())


def log(message=""):
    print(message, flush=True)


class Progress:
    """A progress bar on a terminal; elsewhere (logs, CI) a line at most every 30 seconds."""

    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.started = self.shown = time.time()
        self.tty = sys.stderr.isatty()

    def __call__(self, n=1, note=""):
        self.done += n
        now = time.time()
        finished = self.done >= self.total
        if self.tty and (now - self.shown > 0.2 or finished):
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.started, 1e-9)
            print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                  f"{rate:.1f}/s {note}", end="\n" if finished else "", file=sys.stderr, flush=True)
            self.shown = now
        elif not self.tty and now - self.shown > 30 and not finished:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)
            self.shown = now

    def close(self):
        """End the bar's line where the count fell short of the total (skipped images)."""
        if self.tty and self.done < self.total:
            print(file=sys.stderr, flush=True)


class StopFlag:
    """First Ctrl-C asks the loop to stop at the next step and save; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.pid = os.getpid()
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        # DataLoader workers are forked with this handler and get the terminal's Ctrl-C too: only the main
        # process speaks and decides; it stops the workers itself.
        if os.getpid() != self.pid:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: finishing the step, then saving (Ctrl-C again to quit at once)", file=sys.stderr)

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


OUTPUT_HINT = "choose another output path"


def check_writable(paths, *, hint=OUTPUT_HINT):
    """Fail before training, not after it: every output folder must exist (or be creatable) and be writable."""
    for path in paths:
        check_folder(os.path.dirname(os.path.abspath(path)), f"{path}: the folder", hint=hint)
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            raise UserError(f"{path}: is a folder; give a file path")


def check_folder(folder, what, *, hint=OUTPUT_HINT):
    """folder exists (or can be created) and is writable; the error starts with `what` (e.g. "the feature cache
    folder") and names the folder."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {folder} cannot be created ({e.strerror}); {hint}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{what} {folder} is not writable; {hint}")


def size_text(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def free_space(path):
    """Bytes an unprivileged writer may still use on the filesystem of path (or of its nearest existing folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_error(path, error, *, needed=None, hint=OUTPUT_HINT):
    """The one message for a failed write: a full disk, a quota, a read-only or forbidden folder become a
    UserError naming path (with, when the space ran out, the bytes needed and the bytes free); any other OSError
    is returned as it is (a bug or a failing disk: its traceback is worth seeing)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        free = free_space(path)
        sizes = [f"{size_text(needed)} needed" if needed is not None else "",
                 f"{size_text(free)} free" if free is not None else ""]
        sizes = ", ".join(s for s in sizes if s)
        return UserError(f"{path}: cannot write it: {what}{f' ({sizes})' if sizes else ''}; "
                         f"free some space or {hint}")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{path}: cannot write it: {error.strerror}; {hint}")
    return error


WRITE_FILES = True  # False on every torchrun rank but 0 (distributed.py): one process writes the outputs


def atomic_write(path, content, *, size=None, hint=OUTPUT_HINT):
    """Write content to path through a temporary file beside it, synced and renamed, so that path holds the old
    file or the new one, never half of one, and no temporary file stays behind. content: bytes (or anything with
    the buffer protocol), str (UTF-8), or write(tmp_path) for writers that need a file name (size: about how
    many bytes it writes, for the error message). Every file the project writes comes through here, so a full
    disk, a quota, a read-only or forbidden folder end in one `error:` line (disk_error) wherever they happen."""
    if not WRITE_FILES:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the bytes on disk before the rename, so a power cut leaves the old file whole
            finally:
                os.close(fd)
        else:
            data = content.encode() if isinstance(content, str) else memoryview(content).cast("B")
            size = len(data)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        error = disk_error(path, e, needed=size, hint=hint)
        if error is e:
            raise
        raise error from e
    finally:
        try:
            os.remove(tmp)
        except OSError:  # renamed (the usual case), never created, or the folder is gone
            pass


def file_sha256(path):
    """The sha256 of a file's bytes (hex); a file that cannot be read is a UserError naming it."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    return h.hexdigest()


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


# ---- device and memory ----

def pick_device(choice="auto"):
    import torch

    if choice != "auto":
        if choice == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is available; use --device auto")
        if choice == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but MPS is not available; use --device auto")
        if choice not in ("cpu", "cuda", "mps"):
            raise UserError(f"unknown device {choice!r}; use auto, cpu, cuda or mps")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_context(device, enabled):
    """bf16 autocast for the backbone where the device supports it; a no-op context otherwise."""
    import torch

    if enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def bf16_is_native(device):
    """Whether bf16 has matrix units here (where --amp auto turns autocast on): a CUDA GPU that supports bf16, or a
    CPU with AMX. Elsewhere bf16 is emulated and slower than fp32 (measured: docs/speed.md)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:  # not Linux: no way to tell cheaply, and fp32 is never wrong
        return False


@contextlib.contextmanager
def small_matmuls(enabled=True):
    """Settings for training a head on cached features, where every op is a 32 x D matrix product: one torch
    thread (as fast as two on an idle CPU, 30x faster on a shared one, where the second OpenMP thread spins
    waiting for a core: 3.4 s vs 102 s for 30 epochs at load 11) and denormal floats flushed to zero (Adam's
    second moments of near-zero gradients underflow into denormals, which this CPU handles ~20x slower; the
    results do not change)."""
    import torch

    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)


def keep_freed_memory(device):
    """On a CPU under glibc (Linux): big blocks come from the heap and freed memory stays there for reuse, for the
    rest of this process and the DataLoader workers it starts. By default glibc maps every large activation afresh
    and unmaps it when freed, so each backbone forward page-faults its memory in again (tens of thousands of
    faults per image): ResNet50 forwards ran 1.1-1.7x faster on a 2-core CPU this way, for up to 0.7 GB more
    peak memory (docs/speed.md). Elsewhere it does nothing. Returns whether it was applied."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # an int parameter: a bigger value would wrap around
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        return False


def workers_arg(value):
    """argparse type of --num-workers: auto or a number."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is neither auto nor a number of 0 or more")
    return number


def resolve_workers(num_workers, device):
    """auto: 2 DataLoader workers, or none on a CPU with 2 cores or fewer. There the workers take cores from the
    forward itself, and decoding in the main process is faster (measured: benchmarks/bench_train.py --sweep)."""
    if num_workers != "auto":
        return num_workers
    return 0 if device.type == "cpu" and (os.cpu_count() or 1) <= 2 else 2


def add_runtime_flags(parser, *, batch_size=32, num_workers="auto", device="auto", keep_freed=True):
    """The flags every script shares: batch size, loader workers, device, the allocator setting, --debug."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per batch")
    parser.add_argument("--num-workers", type=workers_arg, default=num_workers,
                        help="DataLoader worker processes: auto (2, or 0 on a CPU with <= 2 cores) or a number")
    parser.add_argument("--device", default=device, choices=["auto", "cpu", "cuda", "mps"],
                        help="auto: cuda, then mps, then cpu")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=keep_freed,
                        help="cpu, Linux: reuse freed memory instead of unmapping it (faster forwards, more RAM)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def check_batch_size(args):
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")


# ---- seeding ----

def seed_everything(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id):
    # Each DataLoader worker gets a different seed derived from the loader's generator, so runs repeat exactly.
    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state():
    """Every random generator's state as plain tensors and strings (loads with weights_only=True)."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, key, gauss = json.loads(state["python"])
    random.setstate((version, tuple(key), gauss))
