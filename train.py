"""
Train one early-exit GPT with one loss scheme, evaluate it, print the seeds' tables, save ckpt.pt.

Tiny CPU run (about 2 minutes on 2 quiet cores, downloads WikiText-2 once; offline, add --data FOLDER):
    python train.py --loss asym --alpha 0.7
Seed 002's 4-layer setting (exit after layer 2, weights 0 / 0.7 / 0 / 0.3):
    python train.py --n-layer 4 --exit-layer 2 --n-embd 32 --n-head 2 --layer-weights 0,0.7,0,0.3
Bigger, on a GPU (bf16 autocast), or on N GPUs with data parallelism:
    python train.py --n-layer 6 --n-embd 256 --n-head 8 --block-size 256 --max-iters 5000 --compile
    torchrun --standalone --nproc_per_node=4 train.py --n-layer 6 --n-embd 256 --grad-accum 1
Continue a run for more steps:
    python train.py --resume --max-iters 4000
"""

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eemini as ee

TABLE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # seed 000's Threshold Analysis rows
RESUME_KEEPS = ("max_iters", "eval_interval", "log_interval", "device", "compile", "out", "resume", "overwrite")


def parse_args(argv=None):
    p = ee.Parser(description=__doc__.split("\n\n")[0], formatter_class=ee.argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="", help="WikiText folder (wiki.{train,valid,test}.raw) or one text file; "
                   "empty = download wikitext-2-raw-v1 once into ~/.cache/eemini")
    g.add_argument("--train-chars", type=int, default=500_000, help="characters of the train split to use")
    g.add_argument("--val-chars", type=int, default=50_000, help="characters of the valid split to evaluate on")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=3, help="transformer layers")
    g.add_argument("--n-embd", type=int, default=64, help="width of the residual stream")
    g.add_argument("--n-head", type=int, default=4, help="attention heads")
    g.add_argument("--ffn-dim", type=int, default=0, help="MLP hidden width (0 = 4 * n-embd)")
    g.add_argument("--block-size", type=int, default=128, help="context length in characters")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout rate")
    g = p.add_argument_group("early exit")
    g.add_argument("--exit-layer", type=int, default=1, help="tokens may exit after this layer (1..n_layer-1; "
                   "0 = a plain GPT without an exit, e.g. seed 000's Standard 1L: --n-layer 1 --exit-layer 0 "
                   "--loss final)")
    g.add_argument("--loss", default="asym", choices=sorted(ee.LOSSES), help="loss scheme (see README)")
    g.add_argument("--alpha", type=float, default=0.7, help="weight of the exit's CE in asym / asym_deepsup")
    g.add_argument("--layer-weights", default="", help="comma list, one weight a layer (e.g. 0,0.7,0,0.3); "
                   "overrides --loss")
    g.add_argument("--threshold", type=float, default=0.9, help="confidence threshold for the routed eval")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (keeps the global batch "
                   "the same when the number of processes changes)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warmup, cosine decay)")
    g.add_argument("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-iters", type=int, default=100, help="linear warmup steps")
    g.add_argument("--max-iters", type=int, default=2000, help="total optimisation steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (init and batches)")
    g = p.add_argument_group("eval / io")
    g.add_argument("--eval-interval", type=int, default=500, help="evaluate (and save) every N steps")
    g.add_argument("--log-interval", type=int, default=100, help="print a training line every N steps")
    g.add_argument("--eval-batch-size", type=int, default=64, help="windows per evaluation batch")
    g.add_argument("--out", default="ckpt.pt", help="checkpoint to write")
    g.add_argument("--resume", action="store_true", help="continue training from --out")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out (by default train.py "
                   "refuses, so a trained model is never lost)")
    g.add_argument("--device", default="", help="cuda, mps, cpu ... (empty = autodetect cuda -> mps -> cpu)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha {args.alpha} is outside [0, 1]")
    if not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold} is outside [0, 1]")
    if not 0 <= args.exit_layer < args.n_layer:
        p.error(f"--exit-layer {args.exit_layer} must be between 1 and --n-layer - 1 = {args.n_layer - 1} "
                f"(or 0 for a plain model)")
    if args.exit_layer == 0 and args.loss in ("aux", "asym", "asym_deepsup") and not args.layer_weights:
        p.error(f"--loss {args.loss} supervises an exit head: give --exit-layer >= 1")
    for name in ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "max_iters", "grad_accum",
                 "eval_interval", "log_interval", "train_chars", "val_chars", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.dropout < 1.0 or args.ffn_dim < 0:
        p.error("--dropout must be in [0, 1) and --ffn-dim at least 0")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.data:  # recorded in the checkpoint: sweep.py finds it again from any directory
        args.data = str(Path(args.data).resolve())
    if args.layer_weights:
        try:
            args.layer_weights = [float(w) for w in args.layer_weights.split(",")]
        except ValueError:
            p.error(f"--layer-weights wants comma-separated numbers, got '{args.layer_weights}'")
        if not all(math.isfinite(w) for w in args.layer_weights):
            p.error(f"--layer-weights must be finite numbers, got {args.layer_weights}")
        if len(args.layer_weights) != args.n_layer:
            p.error(f"--layer-weights has {len(args.layer_weights)} entries; --n-layer is {args.n_layer}")


# ----------------------------------------------------------------------------------------------


def get_batch(data, block_size, batch_size, generator, device):
    """batch_size random windows of data: inputs and next-character targets, (B, T) each."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def get_lr(it, args):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    ratio = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def evaluate(model, val, args, device, thresholds):
    """Per-head val PPL and the masked router's row at each threshold, from one pass."""
    with ee.autocast(device):
        stats = ee.token_stats(model, val, args.eval_batch_size, device)
    rows = [ee.routed_metrics(stats, t, model.config) for t in thresholds]
    return ee.layer_ppl(stats), rows


def save_checkpoint(path, model, vocab, optimizer, args, step, best_val, metrics):
    ee.save_checkpoint(path, model, vocab, args=vars(args), step=step, best_val=best_val, metrics=metrics,
                       optimizer=optimizer.state_dict(), seed=args.seed)


def load_for_resume(args):
    """The checkpoint at --out and the args to go on with: its own, except the RESUME_KEEPS flags."""
    ckpt = ee.load_checkpoint(args.out)
    if "optimizer" not in ckpt:
        raise ee.EEminiError(f"{args.out} holds no optimizer state, so it cannot be resumed")
    merged = dict(ckpt["args"])
    merged.update({k: getattr(args, k) for k in RESUME_KEEPS})
    return ckpt, ee.argparse.Namespace(**merged)


def setup_distributed():
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def peak_memory(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    try:
        import resource  # Unix only
    except ImportError:
        return "n/a"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"


def print_tables(layers, rows, full, shallow, exit_row, cfg):
    """Seed 000's Results and Threshold Analysis tables, measured on this run's model."""
    L, k, tau = cfg.n_layer, cfg.exit_layer, exit_row["threshold"]
    print(f"\n## Results (validation, masked routing at threshold {tau})\n")
    print("| Model | PPL | Shallow% | Compute% | FLOPs% |\n|---|---|---|---|---|")
    named = [(f"Early exit (threshold {tau})", exit_row), (f"Full depth ({L}L)", full), (f"Exit only ({k}L)", shallow)]
    for name, r in named if k else named[1:2]:  # a plain model (no exit) has one row
        print(f"| {name} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | {r['flops']:.1f}% |")
    if not k:
        return
    print("\n## Threshold Analysis\n")
    print("| Threshold | PPL | Shallow% | Compute% | FLOPs% |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']:.2f} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | {r['flops']:.1f}% |")
    print("\nper-layer val PPL: " + "  ".join(f"L{k} {p:.3f}" for k, p in layers.items()))
    print("FLOPs% = forward FLOPs under true early exit vs a plain GPT with one head "
          "(counts exit heads and exited tokens' K/V)")


# ----------------------------------------------------------------------------------------------


def main(args):
    if not (args.resume or args.overwrite) and Path(args.out).exists():
        raise ee.EEminiError(f"{args.out} already exists; --resume to continue it, --out NEW.pt to keep it, "
                             f"or --overwrite to replace it")
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    ckpt = None
    if args.resume:
        ckpt, args = load_for_resume(args)
    device = ee.pick_device(args.device)
    if world > 1 and device.startswith("cuda"):  # one GPU a process
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)

    if world > 1 and not master:
        dist.barrier()  # rank 0 reads (and, the first time, downloads) the data first
    vocab, train_data, val = ee.load_data(args.data, args.train_chars, args.val_chars, verbose=master)
    if world > 1 and master:
        dist.barrier()
    if ckpt is not None and vocab.itos != ckpt["vocab"]:
        raise ee.EEminiError(f"the training text's characters differ from those of {args.out}; "
                             f"resume with the same --data and --train-chars")
    if len(train_data) <= args.block_size + 1:
        raise ee.EEminiError(f"the training text ({len(train_data)} chars) is shorter than one window of "
                             f"{args.block_size + 1}; use more --train-chars or a smaller --block-size")
    weights = ee.layer_weights(args.loss, args.n_layer, args.exit_layer, args.alpha, args.layer_weights or None)
    cfg = ee.GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, ffn_dim=args.ffn_dim, dropout=args.dropout,
                       exit_layer=args.exit_layer, head_layers=[k for k in weights if k < args.n_layer])
    model = ee.GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        log(f"resuming from step {step} of {args.out}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:  # a head no loss reaches (the exit head under --loss final) has no gradient
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None,
                    find_unused_parameters=set(weights) != set(cfg.head_layers) | {cfg.n_layer})
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    log(f"device {device} | {world} process(es) | {raw_model.num_params():,} parameters | "
        f"{tokens_per_step:,} tokens/step | loss {args.loss if not args.layer_weights else 'layer-weights'} "
        f"weights " + ", ".join(f"L{k}={w:g}" for k, w in weights.items()))

    def eval_and_save(step):
        nonlocal best_val
        layers, rows = evaluate(raw_model, val, args, device, [args.threshold])
        r = rows[0]
        best_val = min(best_val, math.log(layers[cfg.n_layer]))
        log(f"eval {step:6d} | val ppl " + " ".join(f"L{k} {p:.3f}" for k, p in layers.items())
            + f" | routed@{args.threshold:.2f} ppl {r['ppl']:.3f} shallow {r['shallow']:5.1f}% "
            f"compute {r['compute']:5.1f}% flops {r['flops']:5.1f}%")
        save_checkpoint(args.out, raw_model, vocab, optimizer, args, step, best_val,
                        {"val_ppl": {str(k): v for k, v in layers.items()}, "routed": r})
        raw_model.train()  # evaluation switched dropout off

    gen = torch.Generator()
    t0 = time.time()
    first_step = t_step = step  # timing starts after this run's first step (warm-up, compilation)
    while step < args.max_iters:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # batches and dropout masks are a function of (seed, step, rank): a resumed run continues
        # exactly as an uninterrupted one would, and never replays the batches it has seen
        step_seed = args.seed * 1_000_003 + step * world + rank
        gen.manual_seed(step_seed)
        torch.manual_seed(step_seed + 500_009)
        for micro in range(args.grad_accum):
            x, y = get_batch(train_data, args.block_size, args.batch_size, gen, device)
            sync = micro == args.grad_accum - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()), ee.autocast(device):
                _, loss, ce = model(x, y, weights)
            (loss / args.grad_accum).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == first_step + 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t_log, t_step = time.time(), step
        if step % args.log_interval == 0 or step == args.max_iters:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            now, n = time.time(), step - t_step
            speed = (f"{1000 * (now - t_log) / n:7.1f} ms | {tokens_per_step * n / (now - t_log):9,.0f} tok/s | "
                     f"ETA {ee.fmt_time((args.max_iters - step) * (now - t_log) / n)}") if n and now > t_log \
                else "warm-up step, not timed"
            t_log, t_step = now, step
            per_layer = " ".join(f"L{k} {v.item():.4f}" for k, v in ce.items())
            log(f"step {step:6d}/{args.max_iters} | loss {loss.item():.4f} | ce {per_layer} | lr {lr:.2e} | {speed}")
        if master and (step % args.eval_interval == 0 or step == args.max_iters):
            eval_and_save(step)

    if master:
        if step == first_step:
            log(f"nothing to train: the checkpoint is at step {step} of --max-iters {args.max_iters}")
        layers, rows = evaluate(raw_model, val, args, device, [*TABLE_THRESHOLDS, args.threshold, 1.0, 0.0])
        *table, exit_row, full, shallow = rows
        print_tables(layers, table, full, shallow, exit_row, cfg)
        with ee.autocast(device):  # the same precision as the masked figures beside it
            true_exit = ee.exit_metrics(raw_model, val, args.threshold, args.eval_batch_size, device)
        if cfg.exits:
            log(f"true early exit at threshold {args.threshold}: PPL {true_exit['ppl']:.3f} "
                f"(masked {exit_row['ppl']:.3f}), shallow {true_exit['shallow']:.1f}%")
        metrics = {"val_ppl": {str(k): v for k, v in layers.items()}, "routed": exit_row, "full": full,
                   "exit_only": shallow, "thresholds": table, "true_exit": true_exit}
        save_checkpoint(args.out, raw_model, vocab, optimizer, args, step, best_val, metrics)
        log(f"done: {step} steps in {ee.fmt_time(time.time() - t0)} | best val PPL (full depth) "
            f"{math.exp(best_val):.3f} | peak memory {peak_memory(device)} | saved {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    ee.run_cli(main, parse_args)
