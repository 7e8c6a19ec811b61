"""
The command lines' shared vocabulary: one parser whose errors are one line and whose --help shows
every default, the argument types (thresholds, comma lists, bounded numbers), the flags every
script spells the same way, the device and its precision, run_cli, which turns a problem the user
can fix into one `error:` line, and a run's processes (torchrun, Ctrl-C, peak memory).
"""

import argparse
import contextlib
import math
import os
import platform
import re
import signal
import sys
import threading

import torch
import torch.distributed as dist

from eemini import EEminiError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's commands kept as written; a flag's default shown as one would type it (1,2 for
    a list), unless its help already tells it or there is none (an unset value, an off switch)."""

    def _get_help_string(self, action):
        text, d = action.help or "", action.default
        unset = d is None or d is False or (isinstance(d, (str, list)) and d in ("", [], argparse.SUPPRESS))
        if (not action.option_strings and action.nargs != "?") or "default:" in text or unset:
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump): `train.py: error: ... (see --help)`."""

    def __init__(self, doc, **kwargs):
        super().__init__(description=doc.strip(), formatter_class=HelpFormatter, **kwargs)
        # a value that starts like a negative number (-0.1, or a list such as -0.1,0.5) is a value, so
        # that its own check can say what is wrong with it; argparse would take "-0.1,0.5" for a flag
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, parse_args):
    """Run a script's main(); a problem the user can fix ends in one `error:` line, exit code 1.
    Output is line-buffered, so progress lines reach a log file or a pipe as they are printed."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        return main(parse_args())
    except EEminiError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# argument types: each refuses bad input with a message that names the rule


def number(kind=float, lo=None, hi=None, hi_open=False):
    """argparse type: a finite number of `kind` in [lo, hi] (or [lo, hi) with hi_open)."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants {'an integer' if kind is int else 'a number'}, got '{s}'") from None
        if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and (x >= hi if hi_open else x > hi)):
            bound = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{s} is outside {bound}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def threshold(s):
    """argparse type: a confidence threshold in [0, 1]."""
    try:
        return number(float, 0.0, 1.0)(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"threshold {s} is outside [0, 1] (or not a number); "
                                         f"0 sends every token out early, 1 none") from None


def comma_list(item, empty=True):
    """argparse type: 'a,b,c' -> [item(a), item(b), item(c)]; an empty string is an empty list, or
    with empty=False refused."""
    def parse(s):
        if not s.strip() and not empty:
            raise argparse.ArgumentTypeError("is empty; give at least one value")
        return [item(x.strip()) for x in s.split(",")] if s.strip() else []
    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}s"
    return parse


# ----------------------------------------------------------------------------------------------
# the flags every script spells the same way


def add_checkpoint(p, help="checkpoint written by train.py"):
    p.add_argument("checkpoint", nargs="?", default="ckpt.pt", help=help)


def add_data(p, from_checkpoint=False, val_chars=50_000, split=True):
    """--data, --val-chars and (where the script evaluates on a choice of split) --split."""
    g = p.add_argument_group("data")
    if from_checkpoint:
        g.add_argument("--data", default=None, help="WikiText folder (wiki.{train,valid,test}.raw) or one text "
                       "file; default: the one the checkpoint was trained on")
    else:
        g.add_argument("--data", default="", help="WikiText folder (wiki.{train,valid,test}.raw) or one text "
                       "file; empty = download wikitext-2-raw-v1 once into ~/.cache/eemini")
    g.add_argument("--val-chars", type=number(int, 0), default=None if from_checkpoint else val_chars,
                   help="characters of the evaluation split to use (0 = all of it)"
                   + ("; default: the checkpoint's" if from_checkpoint else ""))
    if split:
        g.add_argument("--split", default="valid", choices=["valid", "test"], help="split to evaluate on")
    return g


def add_device(g):
    g.add_argument("--device", default="", help="cuda, mps, cpu ... (empty = autodetect cuda -> mps -> cpu)")
    g.add_argument("--threads", type=number(int, 0), default=0, help="CPU threads for torch (0 = torch's "
                   "default); figures are exact to the last digit only at the same thread count")


def add_eval_batch_size(g):
    g.add_argument("--eval-batch-size", type=number(int, 1), default=64, help="windows per evaluation batch")


# ----------------------------------------------------------------------------------------------
# device and precision


def pick_device(name="", threads=0):
    """--device: empty = the best there is, cuda -> mps -> cpu. --threads: torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    if not name:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        raise EEminiError(f"device '{name}' is not usable here ({str(e)[:80]}); try --device cpu") from None
    return name


def autocast(device):
    """bf16 autocast on CUDA where the GPU supports it; full fp32 everywhere else."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device):
    """Wait for the GPU before reading a clock (CUDA work is asynchronous)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device="cpu"):
    """The processor, cores, torch threads, GPU and torch version: what a figure's last digits depend on."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}, {platform.system()}, "
            f"torch {torch.__version__}")


def width(cfg):
    """'n_embd 256' for a model's header line, and its K/V heads where grouped-query attention shares them."""
    kv = cfg.kv_heads
    return f"n_embd {cfg.n_embd}" + (f", {kv} K/V head{'s' * (kv > 1)} for {cfg.n_head} query heads" if kv < cfg.n_head else "")


def fmt_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ----------------------------------------------------------------------------------------------
# processes: torchrun, Ctrl-C, memory


def setup_distributed():
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def setup_device(name, threads, world, local_rank):
    """pick_device, then under torchrun one GPU a process."""
    device = pick_device(name, threads)
    if world > 1 and device.startswith("cuda"):  # one GPU a process
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def peak_memory(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    try:
        import resource  # Unix only
    except ImportError:
        return "n/a"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"


class CtrlC:
    """The first Ctrl-C (or SIGTERM, what a scheduler sends before it stops a job) asks the loop to stop
    after the step it is in and save; a second one stops at once (KeyboardInterrupt, as usual; a
    second SIGTERM ends the process). Only in a single process's main thread: under torchrun the
    processes must stop at the same step, so there Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, active):
        self.active, self.requested = active and threading.current_thread() is threading.main_thread(), False

    def __enter__(self):
        if self.active:
            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}
        return self

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __exit__(self, *exc):
        if self.active:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
