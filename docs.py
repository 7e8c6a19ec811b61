"""
Re-run every command whose output README.md quotes, and say which quoted blocks differ from what the
code prints now (or, with --write, put the new output in their place).

A quoted block is a fenced block right after a `<!-- output: NAME -->` line. Inside it, `$ python ...`
lines are commands, run in order in one scratch folder (so `sweep.py ckpt.pt` finds the checkpoint the
block before it trained), and the lines after each are its output. A line `...` stands for lines left
out: the part after it starts at the output line whose text up to its first ` | ` is the same (a
last `...` leaves the rest out). What
changes from run to run is masked before comparing: timings, tokens/s, memory, where the data lives.
`<!-- output: NAME timing -->` marks a block of timings (benchmarks): run only with --timing, and
never counted as differing; `slow` marks one that takes long (several trainings): run only with
--slow; in those a training whose checkpoint is already beside the README is not run again. The
figures are exact only on the machine and thread count they were made with; the README says which.

    python docs.py --cheap                 # seconds: every README command parses, quoted tables agree
    python docs.py                         # minutes: re-run each quoted block, report which differ
    python docs.py --only sweep --write    # re-run some blocks and write their output into README.md
"""

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkpoint as ck
import cli
from eemini import EEminiError

ROOT = Path(__file__).resolve().parent
MARK = re.compile(r"<!-- output: (\S+)((?: (?:timing|slow))*) -->")
VOLATILE = [  # (pattern, replacement): what differs between two runs of the same code
    (re.compile(r" +[\d.]+ ms\b"), " # ms"), (re.compile(r" +[\d,]+ tok/s"), " # tok/s"),
    (re.compile(r"\b(ETA|in|elapsed) \d+m\d\ds"), r"\1 #"), (re.compile(r"\bin [\d.]+ ?s\b"), "in #s"),
    (re.compile(r", [\d.]+ s$"), ", # s"), (re.compile(r"\d+ MiB (RSS|GPU)"), r"# MiB \1"),
    (re.compile(r"/\S*/(wikitext-2[^\s|]*)"), r".../\1"), (re.compile(r"\S*eemini-docs-\w+/"), ""),
]


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="the Markdown file whose blocks to check")
    p.add_argument("--only", type=cli.comma_list(str), default=[], help="block names to run, comma list (default: "
                   "all but the timing and slow ones)")
    p.add_argument("--cheap", action="store_true", help="run nothing: check that every command in the file parses "
                   "and that its tables agree with RESULTS.md")
    p.add_argument("--timing", action="store_true", help="also re-run the blocks of timings (benchmarks)")
    p.add_argument("--slow", action="store_true", help="also re-run the blocks marked slow (several trainings)")
    p.add_argument("--write", action="store_true", help="write each re-run block's new output into the file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# blocks: where they are in the file, what they run, what they expect


def find_blocks(lines):
    """[(name, {'timing', 'slow'} flags, first line, end line)] of every marked fenced block (the
    lines inside the fence)."""
    blocks = []
    for i, line in enumerate(lines):
        m = MARK.fullmatch(line.strip())
        if m:
            start = i + 2  # the fence opens on the next line
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            blocks.append((m.group(1), set(m.group(2).split()), start, end))
    return blocks


def commands(block_lines):
    """[(command, expected output lines)] of one block."""
    out = []
    for line in block_lines:
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def mask(line):
    for pattern, repl in VOLATILE:
        line = pattern.sub(repl, line)
    return line.rstrip()


def anchor(line):
    return mask(line.split(" | ")[0])


def excerpt(expected, actual):
    """The lines of actual that the expected excerpt quotes, segment by segment (a `...` line
    skips ahead to the line with the next segment's anchor); None where a segment is not found."""
    segments, seg = [], []
    for line in expected:
        if line.strip() == "...":
            segments.append(seg)
            seg = []
        else:
            seg.append(line)
    segments.append(seg)
    out, pos = [], 0
    for k, seg in enumerate(segments):
        if k > 0 and not seg:  # a block that ends in `...`: the rest of the output is left out
            return [*out, "..."]
        if k > 0:
            found = [j for j in range(pos, len(actual)) if seg and anchor(actual[j]) == anchor(seg[0])]
            if not found:
                return None
            pos = found[0]
            out.append("...")
        last = k == len(segments) - 1
        take = actual[pos:] if last else actual[pos : pos + len(seg)]
        out += take
        pos += len(take)
    return out


def kernels(exact):
    """The environment a command runs in. The README's exact figures were made with PyTorch's AVX2
    kernels; on a CPU with AVX-512 PyTorch picks others, which round differently (the quick start's
    full-depth PPL comes out 5.055 instead of 5.064), so a block that must match is run with AVX2's,
    unless ATEN_CPU_CAPABILITY is set already. Timings keep the machine's own kernels."""
    env = dict(os.environ)
    if exact and "ATEN_CPU_CAPABILITY" not in env and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    return env


def run_command(command, cwd, keep=False, exact=True):
    """Run one README command (python SCRIPT ARGS) in cwd: relative paths that exist beside this
    file, and not in cwd, are taken from here (a file named plainly, such as ckpt.pt, is linked into
    cwd, so that the output names it as the README does). With keep (a slow block), a training whose
    --out checkpoint exists beside this file is not run again: the checkpoint is used as it is.
    exact: a block whose figures must match (see kernels). Returns its output lines."""
    argv = shlex.split(command)
    if argv[0] != "python":
        raise EEminiError(f"a quoted command must start with python: {command}")
    out = argv[argv.index("--out") + 1] if argv[1] == "train.py" and "--out" in argv[:-1] else None
    if keep and out and "/" not in out and (ROOT / out).is_file() and not (cwd / out).exists():
        (cwd / out).symlink_to(ROOT / out)
        print(f"  kept {out}, trained before (delete it to train it again)")
        return []
    args = []
    for a in argv[2:]:
        here = ROOT / a
        if Path(a).is_absolute() or (cwd / a).exists() or not here.exists():
            args.append(a)
        elif here.is_file() and "/" not in a:
            (cwd / a).symlink_to(here)
            args.append(a)
        else:
            args.append(os.path.normpath(here))  # ../shared, not /work/main/../shared, in what it prints
    argv = [sys.executable, str(ROOT / argv[1]), *args]
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=kernels(exact))
    if r.returncode:
        raise EEminiError(f"`{command}` failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout.rstrip("\n").split("\n")


# ----------------------------------------------------------------------------------------------
# the cheap checks: nothing is trained


def readme_commands(lines):
    """Every `python SCRIPT ...` command line in the file's fenced blocks (torchrun's too), as argv."""
    found, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            continue
        text = line[2:] if line.startswith("$ ") else line
        if not (fenced and text.startswith(("python ", "torchrun "))):
            continue
        words = shlex.split(text.split("  #")[0])  # a comment after two spaces is not part of it
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is not None and (ROOT / words[script]).exists():
            found.append((words[script], words[script + 1 :]))
    return found


def load(script):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cheap_checks(lines):
    """Problems found without running anything: commands the scripts no longer accept, and quoted
    tables that disagree with RESULTS.md's."""
    problems = []
    for script, argv in readme_commands(lines):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                load(script).parse_args(argv)
        except SystemExit:
            why = err.getvalue().strip().split(": error: ")[-1]
            problems.append(f"`{script} {shlex.join(argv)}` is not accepted by {script}: {why}")
    results = ROOT / "RESULTS.md"
    if results.exists():
        theirs = results.read_text(encoding="utf-8").split("\n")
        for name, table in quoted_tables(lines).items():
            if name in quoted_tables(theirs) and quoted_tables(theirs)[name] != table:
                problems.append(f"the README's '{name}' table differs from RESULTS.md's")
    return problems


def quoted_tables(lines):
    """{heading: table lines} of the tables under each `## ` / `### ` heading that holds one."""
    tables, heading = {}, None
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and heading:
            tables.setdefault(heading, []).append(line.rstrip())
    return tables


# ----------------------------------------------------------------------------------------------


def main(args):
    path = Path(args.readme)
    if not path.is_file():
        raise EEminiError(f"no file at {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise EEminiError(f"{path} is not UTF-8 text; give --readme a Markdown file") from None
    known = [b[0] for b in find_blocks(lines)]
    if not known:
        raise EEminiError(f"{path} quotes no output (no `<!-- output: NAME -->` line before a fenced block)")
    unknown = [n for n in args.only if n not in known]
    if unknown:
        raise EEminiError(f"--only {','.join(unknown)}: no such block in {path}; its blocks: {', '.join(known)}")
    problems = cheap_checks(lines)
    for p in problems:
        print(f"problem: {p}")
    if args.cheap:
        print(f"{len(readme_commands(lines))} commands parse" if not problems else f"{len(problems)} problem(s)")
        return problems
    blocks = [b for b in find_blocks(lines) if wanted(b, args)]
    avx2 = kernels(True).get("ATEN_CPU_CAPABILITY") == "avx2" and "ATEN_CPU_CAPABILITY" not in os.environ
    print(f"{path.name}: re-running {len(blocks)} quoted block(s) | {cli.machine()}"
          + (" | AVX2 kernels for all but the timings, as the figures were made" if avx2 else ""))
    differ, rewritten = [], []
    with tempfile.TemporaryDirectory(prefix="eemini-docs-") as scratch:
        for name, flags, start, end in blocks:  # in file order: a block may use what an earlier one wrote
            t0, written, timing = time.time(), [], "timing" in flags
            for command, expected in commands(lines[start:end]):
                actual = excerpt(expected, run_command(command, Path(scratch), keep="slow" in flags, exact=not timing))
                same = actual is not None and [mask(a) for a in actual] == [mask(e) for e in expected]
                if not same and not timing:
                    differ.append(name)
                    show_difference(name, command, expected, actual)
                written += [f"$ {command}", *(actual or expected)]
            print(f"{name}: {'timings re-run' if timing else 'differs' if name in differ else 'matches'} "
                  f"({cli.fmt_time(time.time() - t0)})")
            rewritten.append((start, end, written))
    if args.write:
        for start, end, written in reversed(rewritten):  # from the end, so earlier line numbers hold
            lines[start:end] = written
        ck.write_text(path, "\n".join(lines))
        print(f"wrote {path}")
    print(f"{len(set(differ))} of {len(blocks)} block(s) differ" + (f": {', '.join(dict.fromkeys(differ))}" if differ else ""))
    return problems + differ


def wanted(block, args):
    """--only names blocks outright; otherwise timing and slow blocks only when asked for."""
    name, flags, _, _ = block
    if args.only:
        return name in args.only
    return (args.timing or "timing" not in flags) and (args.slow or "slow" not in flags)


def show_difference(name, command, expected, actual):
    print(f"\n{name}: `{command}`")
    if actual is None:
        print("  the output no longer has the lines this block quotes")
        return
    for e, a in zip(expected, actual):
        if mask(e) != mask(a):
            print(f"  README: {e}\n  now:    {a}")
    if len(expected) != len(actual):
        print(f"  README quotes {len(expected)} lines here, the output has {len(actual)}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
