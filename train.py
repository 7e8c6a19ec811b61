"""
Train one early-exit GPT with one loss scheme, evaluate it, print the seeds' tables, save ckpt.pt.

Quick start (3 to 4 minutes on 2 CPU cores; downloads WikiText-2 once; offline, add --data FOLDER):
    python train.py --loss asym --alpha 0.7
Seed 002's 4-layer setting (exit after layer 2, weights 0 / 0.7 / 0 / 0.3):
    python train.py --n-layer 4 --exit-layers 2 --n-embd 32 --n-head 2 --layer-weights 0,0.7,0,0.3
Bigger, on a GPU (bf16 autocast), or on N GPUs with data parallelism:
    python train.py --n-layer 6 --n-embd 256 --n-head 8 --block-size 256 --max-iters 5000 --compile
    torchrun --standalone --nproc_per_node=4 train.py --n-layer 6 --n-embd 256 --grad-accum 1
Continue a run for more steps (Ctrl-C saves the run first; a second Ctrl-C stops at once):
    python train.py --resume --max-iters 4000
"""

import argparse
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint as ck
import cli
import eemini as ee
import optim
import report
import routers
from data import get_batch, load_data
from measure import exit_metrics, layer_ppl, routed_metrics, token_stats

TABLE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # seed 000's Threshold Analysis rows
GPT2 = {"pos": "learned", "norm": "layer", "mlp": "gelu", "qk_norm": False, "optimizer": "adamw",  # --gpt2
        "exit_dropout": 0.0}
RESUME_KEEPS = ("max_iters", "eval_interval", "log_interval", "device", "threads", "compile", "out", "resume",
                "overwrite", "restart_schedule")  # a resumed run takes these from its command line
RESUME_MAY_CHANGE = ("data", "eval_batch_size", "grad_accum")  # and these where given: a moved folder, less memory,
# fewer processes (the vocabulary is checked against the checkpoint's)


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    g = cli.add_data(p, split=False)
    g.add_argument("--train-chars", type=cli.number(int, 0), default=1_000_000, help="characters of the train split "
                   "to train on, 0 = all (the recipe: 2,000 steps of 4,096 characters are 8 passes over 1,000,000)")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=cli.number(int, 1), default=3, help="transformer layers")
    g.add_argument("--n-embd", type=cli.number(int, 1), default=64, help="width of the residual stream")
    g.add_argument("--n-head", type=cli.number(int, 1), default=4, help="attention heads")
    g.add_argument("--n-kv-head", type=cli.number(int, 0), default=0, help="key/value heads, each shared by "
                   "n-head / n-kv-head query heads (grouped-query attention; 1 = multi-query); 0 = n-head")
    g.add_argument("--ffn-dim", type=cli.number(int, 0), default=0, help="MLP hidden width (0 = 4 * n-embd)")
    g.add_argument("--block-size", type=cli.number(int, 1), default=128, help="context length in characters")
    g.add_argument("--dropout", type=cli.number(float, 0.0, 1.0, hi_open=True), default=0.0, help="dropout rate")
    g.add_argument("--pos", default="rope", choices=ee.ROPE, help="rotary positions, or GPT-2's learned embedding")
    g.add_argument("--norm", default="rms", choices=sorted(ee.NORMS), help="RMSNorm, or GPT-2's LayerNorm")
    g.add_argument("--mlp", default="relu2", choices=sorted(ee.MLPS), help="the MLP's nonlinearity")
    g.add_argument("--qk-norm", action="store_true", help="RMS-normalise queries and keys")
    g.add_argument("--gpt2", action="store_true", help="start from eemini's first recipe, GPT-2's layout and "
                   "optimiser (--pos learned --norm layer --mlp gelu --optimizer adamw --exit-dropout 0), for "
                   "comparison; flags given beside it still count")
    g = p.add_argument_group("early exit")
    g.add_argument("--exit-layers", type=cli.comma_list(cli.number(int, 0)), default=[1],
                   help="exit points, comma list, each in 1..n_layer-1 (0 = a plain GPT without an exit, e.g. "
                   "seed 000's Standard 1L: --n-layer 1 --exit-layers 0 --loss final)")
    g.add_argument("--loss", default="asym", choices=sorted(ee.LOSSES), help="loss scheme (see README)")
    g.add_argument("--alpha", type=cli.number(float, 0.0, 1.0), default=0.7,
                   help="weight of the exit's CE in asym / asym_deepsup")
    g.add_argument("--layer-weights", type=cli.comma_list(cli.number(float, 0.0)), default=[],
                   help="one loss weight a layer, comma list (e.g. 0,0.7,0,0.3); overrides --loss")
    g.add_argument("--exit-dropout", type=cli.number(float, 0.0, 1.0, hi_open=True), default=0.2,
                   help="training: freeze this share of the tokens at the trained exits (split evenly among them), so "
                   "that the deep layers learn to read frozen states, as they must under true early exit")
    g.add_argument("--layer-dropout", type=cli.number(float, 0.0, 1.0, hi_open=True), default=0.0,
                   help="training: LayerSkip's layer dropout, the rate at which a sequence skips the last layer; "
                   "layer k is skipped at a rate rising from 0 at layer 1 to this at the last (exits that agree "
                   "with the last layer draft better for self-speculative decoding)")
    g.add_argument("--exit-curriculum", default="none", choices=optim.CURRICULA, help="training: LayerSkip's early-exit "
                   "loss curriculum: each exit's loss in turn (rotational), or switched on from the deepest exit "
                   "down over the first half of the learning-rate schedule (gradual: a --restart-schedule resume "
                   "starts it again); the last layer always trains")
    g.add_argument("--curriculum-freeze", default="trained", choices=["trained", "all"], help="with a curriculum, "
                   "where exit dropout freezes tokens: at the exits a step trains, or at every exit (a token frozen "
                   "at a resting exit is then scored by no head that step: the drafts agree more, full depth is worse)")
    g.add_argument("--rotate-every", type=cli.number(int, 1), default=2, help="rotational curriculum: the exit "
                   "after layer k trains at steps t with (k - t) %% N == 0")
    g.add_argument("--threshold", type=cli.threshold, default=0.9, help="confidence threshold for the routed eval")
    g.add_argument("--router-chars", type=cli.number(int, 0), default=40_000, help="held-out training characters "
                   "(after --train-chars) to fit the learned routers on at the end (0 = no routers); router-gain "
                   "needs 600,000 or more (README: Routers that approach the oracle)")
    g.add_argument("--router-epsilon", type=cli.number(float, 0.0), default=0.1, help="the loss router's label: the "
                   "exit's CE within this many nats of the last layer's")
    g = p.add_argument_group("optimisation")
    optim.add_arguments(g)
    g.add_argument("--batch-size", type=cli.number(int, 1), default=32, help="sequences per step per process")
    g.add_argument("--grad-accum", type=cli.number(int, 1), default=1, help="micro-batches per step (keeps "
                   "the global batch when the number of processes changes)")
    g.add_argument("--max-iters", type=cli.number(int, 1), default=2000, help="total optimisation steps")
    g.add_argument("--grad-clip", type=cli.number(float, 0.0), default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (init and batches)")
    g = p.add_argument_group("eval / io")
    g.add_argument("--eval-interval", type=cli.number(int, 1), default=500, help="evaluate (and save) every N steps")
    g.add_argument("--log-interval", type=cli.number(int, 1), default=100, help="print a training line every N steps")
    cli.add_eval_batch_size(g)
    g.add_argument("--out", default="ckpt.pt", help="checkpoint to write")
    g.add_argument("--resume", action="store_true", help="continue training from --out, with the settings it was "
                   "trained with: a flag given beside it that would change them is refused, not ignored")
    g.add_argument("--restart-schedule", action="store_true", help="with --resume and a larger --max-iters: run "
                   "the cosine again from step 0 to --max-iters (a warm restart); without it the schedule keeps "
                   "its end and the added steps run at --min-lr")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out (by default train.py "
                   "refuses, so a trained model is never lost)")
    cli.add_device(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    if args.gpt2:  # GPT-2's choices become the defaults, so that e.g. --gpt2 --optimizer muon means what it says
        p.set_defaults(**GPT2)
        args = p.parse_args(argv)
    check_args(p, args)
    if args.resume:  # which flags the command line gave (a resumed run keeps the checkpoint's own)
        probe = argparse.Namespace(**{k: None for k in vars(args)})  # argparse fills in defaults only where unset
        given = p.parse_args(argv, probe)
        args.given = sorted(k for k, v in vars(given).items() if v is not None)
    return args


def check_args(p, args):
    if 0 in args.exit_layers and len(set(args.exit_layers)) > 1:
        p.error(f"--exit-layers {','.join(map(str, args.exit_layers))}: 0 means a plain model without an exit; "
                f"give 0 alone, or exit layers from 1 up")
    args.exit_layers = sorted(set(args.exit_layers) - {0})
    if not all(k < args.n_layer for k in args.exit_layers):
        p.error(f"--exit-layers {','.join(map(str, args.exit_layers))} must each be between 1 and --n-layer - 1 = "
                f"{args.n_layer - 1} (or 0 for a plain model)")
    if not args.exit_layers and args.loss in ee.NEEDS_EXIT and not args.layer_weights:
        p.error(f"--loss {args.loss} supervises an exit head: give --exit-layers 1 or more")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    elif args.pos == "rope" and (args.n_embd // args.n_head) % 2:
        p.error(f"rotary positions need an even head size, and --n-embd {args.n_embd} / --n-head {args.n_head} is "
                f"{args.n_embd // args.n_head}: change either, or use --pos learned")
    if args.n_kv_head and args.n_head % args.n_kv_head:
        p.error(f"--n-kv-head {args.n_kv_head} does not divide --n-head {args.n_head}")
    if args.layer_weights and len(args.layer_weights) != args.n_layer:
        p.error(f"--layer-weights has {len(args.layer_weights)} entries; --n-layer is {args.n_layer}")
    if args.layer_weights and not sum(args.layer_weights) > 0:
        p.error("--layer-weights are all zero: nothing would be trained")
    if args.data:  # recorded in the checkpoint: sweep.py finds it again from any directory
        args.data = str(Path(args.data).resolve())
    args.schedule_iters = args.max_iters  # where the cosine ends; a resumed run keeps its own


# ----------------------------------------------------------------------------------------------
# the steps of a run


@dataclass
class Run:
    """What a training run carries from step to step."""
    args: object
    raw: ee.GPT  # the model itself: evaluated and saved
    model: torch.nn.Module  # what the loop calls: raw, maybe compiled and DDP-wrapped
    optimizers: list  # optim.configure_optimizers: [Muon, AdamW] or [AdamW]
    vocab: object
    device: str
    rank: int = 0
    world: int = 1
    step: int = 0
    best_val: float = float("inf")
    history: list = field(default_factory=list)  # [{'step': n, 'val_ppl': {layer: ppl}}] at every evaluation
    routers: dict = None  # learned routers, fitted at the end (routers.to_checkpoint)

    def log(self, *a, **k):  # rank 0 speaks for every process
        if self.rank == 0:
            print(*a, **k)

    def leave_at(self):
        """Where exit dropout freezes tokens: None = the exits the step's table trains."""
        return self.raw.config.trained_exits if self.args.curriculum_freeze == "all" else None

    def weights(self, step):
        """The loss table of this step: the config's, or the early-exit curriculum's share of it."""
        a, cfg = self.args, self.raw.config
        return optim.curriculum(cfg.loss_weights, cfg.n_layer, a.exit_curriculum, step, a.schedule_iters, a.rotate_every)


def load_text(args, ckpt, rank, world):
    """The vocabulary, training ids and validation ids; rank 0 reads (and downloads) first."""
    if world > 1 and rank > 0:
        dist.barrier()
    vocab, train_data, val = load_data(args.data, args.train_chars, args.val_chars, verbose=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    if ckpt is not None and vocab.itos != ckpt["vocab"]:
        raise ee.EEminiError(f"the training text's characters differ from those of {args.out}; "
                             f"resume with the text it was trained on (--data, and the same --train-chars)")
    for name, ids, flag in (("training", train_data, "--train-chars"), ("validation", val, "--val-chars")):
        if len(ids) <= args.block_size + 1:  # found now, not after the first steps
            raise ee.EEminiError(f"the {name} text ({len(ids)} chars) is shorter than one window of "
                                 f"{args.block_size + 1}; use more {flag} (or other --data) or a smaller --block-size")
    return vocab, train_data, val


def build_model(args, vocab):
    weights = ee.layer_weights(args.loss, args.n_layer, args.exit_layers, args.alpha, args.layer_weights or None)
    if args.exit_curriculum != "none" and (args.n_layer not in weights or len(weights) < 2):
        raise ee.EEminiError(f"--exit-curriculum {args.exit_curriculum} schedules exit losses beside the last layer's, "
                             f"but this run trains {', '.join(f'L{k}' for k in weights)}: give --exit-layers and a loss "
                             "that weighs both (e.g. --layer-weights with a weight on the last layer)")
    return ee.GPT(ee.GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                               ffn_dim=args.ffn_dim, dropout=args.dropout,
                               exits=args.exit_layers, loss_weights=weights, pos=args.pos, norm=args.norm,
                               mlp=args.mlp, qk_norm=args.qk_norm, exit_dropout=args.exit_dropout,
                               layer_dropout=args.layer_dropout))


def train_step(run, train_data, gen):
    """One optimisation step (grad-accum micro-batches). Batches and dropout masks are a function of
    (seed, step, rank), so a resumed run continues exactly as an uninterrupted one would."""
    args, lr = run.args, optim.get_lr(run.step, run.args)
    optim.set_lr(run.optimizers, lr)
    step_seed = args.seed * 1_000_003 + run.step * run.world + run.rank
    gen.manual_seed(step_seed)
    torch.manual_seed(step_seed + 500_009)
    for micro in range(args.grad_accum):
        x, y = get_batch(train_data, args.block_size, args.batch_size, gen, run.device)
        sync = micro == args.grad_accum - 1 or run.world == 1
        with (nullcontext() if sync else run.model.no_sync()), cli.autocast(run.device):
            logits, loss = run.model(x, y, run.weights(run.step), run.leave_at())
        (loss / args.grad_accum).backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    for opt in run.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    run.step += 1
    return lr, loss, logits, y


def evaluate(run, val, thresholds):
    """Per-head val PPL and the masked router's row at each threshold, from one pass."""
    with cli.autocast(run.device):
        stats = token_stats(run.raw, val, run.args.eval_batch_size, run.device)
    rows = [routed_metrics(stats, t, run.raw.config) for t in thresholds]
    run.raw.train()  # evaluation switched dropout off
    return layer_ppl(stats), rows


def save(run, metrics):
    ck.save_checkpoint(run.args.out, run.raw, run.vocab, args=vars(run.args), step=run.step, best_val=run.best_val,
                       history=run.history, **({"routers": run.routers} if run.routers else {}),
                       metrics=metrics, optimizer=[o.state_dict() for o in run.optimizers], seed=run.args.seed)


def eval_and_save(run, val):
    layers, (r,) = evaluate(run, val, [run.args.threshold])
    run.best_val = min(run.best_val, math.log(layers[run.raw.config.n_layer]))
    run.history.append({"step": run.step, "val_ppl": layers})
    run.log(f"eval {run.step:6d} | val ppl " + " ".join(f"L{k} {p:.3f}" for k, p in layers.items())
            + f" | routed@{run.args.threshold:.2f} ppl {r['ppl']:.3f} shallow {r['shallow']:5.1f}% "
            f"compute {r['compute']:5.1f}% flops {r['flops']:5.1f}%")
    save(run, {"val_ppl": {str(k): v for k, v in layers.items()}, "routed": r})


def log_step(run, lr, loss, logits, y, timer):
    """One fixed-width line: step, loss, CE per weighted head, lr, ms/step, tok/s, ETA."""
    cli.synchronize(run.device)
    now, n = time.time(), run.step - timer["step"]
    tokens = run.args.batch_size * run.args.block_size * run.args.grad_accum * run.world
    speed = (f"{1000 * (now - timer['t']) / n:7.1f} ms | {tokens * n / (now - timer['t']):9,.0f} tok/s | "
             f"ETA {cli.fmt_time((run.args.max_iters - run.step) * (now - timer['t']) / n)}") if n and now > timer["t"] \
        else "warm-up step, not timed"
    timer.update(t=now, step=run.step)
    with torch.no_grad():
        ce = " ".join(f"L{k} {F.cross_entropy(lg.float().flatten(0, 1), y.flatten()).item():.4f}" for k, lg in logits.items())
    run.log(f"step {run.step:6d}/{run.args.max_iters} | loss {loss.item():.4f} | ce {ce} | lr {lr:.2e} | {speed}")


def train_loop(run, train_data, val):
    """Steps until max_iters; a log line every log_interval, evaluate + save every eval_interval;
    on Ctrl-C, save and stop. Timing starts after this run's first step (warm-up, compilation)."""
    gen, first, timer = torch.Generator(), run.step, {}
    with cli.CtrlC(run.world == 1) as ctrl_c:
        while run.step < run.args.max_iters:
            step_once(run, train_data, val, gen, first, timer)
            if ctrl_c.requested:
                save(run, {"interrupted_at": run.step})
                run.log(f"interrupted at step {run.step}: saved {run.args.out} (continue it with --resume)")
                raise KeyboardInterrupt
    if run.step == first:
        run.log(f"nothing to train: the checkpoint is at step {run.step} of --max-iters {run.args.max_iters}")


def step_once(run, train_data, val, gen, first, timer):
    """One training step, then its log line and evaluation where they fall due."""
    lr, loss, logits, y = train_step(run, train_data, gen)
    if run.step == first + 1:
        cli.synchronize(run.device)
        timer.update(t=time.time(), step=run.step)
    if run.step % run.args.log_interval == 0 or run.step == run.args.max_iters:
        log_step(run, lr, loss, logits, y, timer)
    if run.rank == 0 and (run.step % run.args.eval_interval == 0 or run.step == run.args.max_iters):
        eval_and_save(run, val)


def final_report(run, val, t0, first):
    """The seeds' tables at the end of training, the true-exit figure beside them, and the save."""
    cfg = run.raw.config
    layers, rows = evaluate(run, val, [*TABLE_THRESHOLDS, run.args.threshold, 1.0, 0.0])
    *table, exit_row, full, shallow = rows
    report.seed_tables(layers, table, full, shallow, exit_row, cfg)
    with cli.autocast(run.device):  # the same precision as the masked figures beside it
        true_exit = exit_metrics(run.raw, val, run.args.threshold, run.args.eval_batch_size, run.device)
    if cfg.exits:
        run.log(f"true early exit at threshold {run.args.threshold}: PPL {true_exit['ppl']:.3f} "
                f"(masked {exit_row['ppl']:.3f}), shallow {true_exit['shallow']:.1f}%")
    add_routers(run)
    save(run, {"val_ppl": {str(k): v for k, v in layers.items()}, "routed": exit_row, "full": full,
               "exit_only": shallow, "thresholds": table, "true_exit": true_exit})
    this_run = f" ({run.step - first} in this run)" if first else ""
    run.log(f"done: {run.step} steps{this_run} in {cli.fmt_time(time.time() - t0)} | best val PPL (full depth) "
            f"{math.exp(run.best_val):.3f} | peak memory {cli.peak_memory(run.device)} | saved {run.args.out}")


def add_routers(run):
    """Learned routers for every trained exit, on held-out training text, into the checkpoint."""
    a = run.args
    if a.router_chars and run.raw.config.trained_exits:
        run.routers = routers.fit_held_out(run.raw, a.data, a.train_chars, a.router_chars, run.vocab, a.router_epsilon,
                                           run.device)


# ----------------------------------------------------------------------------------------------


def main(args):
    rank, world, local_rank = cli.setup_distributed()
    ck.refuse_folder(args.out, "--out", "ckpt.pt")
    with ck.exclusive(args.out) if rank == 0 else nullcontext():  # one writer per checkpoint
        ck.refuse_existing(args.out, args.resume or args.overwrite, "--resume to continue it, ")
        ckpt, args = ck.resume_point(args, RESUME_KEEPS, RESUME_MAY_CHANGE) if args.resume else (None, args)
        device = cli.setup_device(args.device, args.threads, world, local_rank)
        torch.manual_seed(args.seed)
        vocab, train_data, val = load_text(args, ckpt, rank, world)
        raw = build_model(args, vocab).to(device)
        run = Run(args, raw, raw, optim.configure_optimizers(raw, args), vocab, device, rank, world)
        if ckpt is not None:
            resume(run, ckpt)
        if args.compile:
            run.model = torch.compile(run.model)
        cfg = raw.config
        if world > 1:  # a head no loss reaches (the exit head under --loss final) has no gradient
            run.model = DDP(run.model, device_ids=[local_rank] if device.startswith("cuda") else None,
                            find_unused_parameters=set(cfg.loss_weights) != {*cfg.head_layers, cfg.n_layer}
                            or args.exit_curriculum != "none")
        run.log(f"device {device} | {world} process(es) | {raw.num_params():,} parameters | "
                f"{args.batch_size * args.block_size * args.grad_accum * world:,} tokens/step | loss "
                f"{'layer-weights' if args.layer_weights else args.loss} weights "
                + ", ".join(f"L{k}={w:g}" for k, w in cfg.loss_weights.items())
                + (f" | {args.exit_curriculum} exit curriculum" if args.exit_curriculum != "none" else ""))
        t0, first = time.time(), run.step
        train_loop(run, train_data, val)
        if rank == 0:
            final_report(run, val, t0, first)
    if world > 1:
        dist.destroy_process_group()
    return raw


def resume(run, ckpt):
    """Weights, optimizer state, step and best val from the checkpoint; say where the schedule goes."""
    run.step, run.best_val, run.history = ck.restore(run.raw, run.optimizers, ckpt, run.args.out)
    a = run.args
    if a.max_iters < run.step:  # it would be saved again, recording a run that ended before it began
        raise ee.EEminiError(f"{a.out} is at step {run.step}, past --max-iters {a.max_iters}; give --max-iters above "
                             f"{run.step} to train on (the checkpoint is left as it is)")
    run.log(f"resuming from step {run.step} of {a.out} | " + (
        f"the learning-rate schedule restarts: cosine from step 0 to {a.schedule_iters}" if a.restart_schedule else
        f"the learning-rate schedule ends at step {a.schedule_iters}" + (
            f", then --min-lr {a.min_lr:g} to step {a.max_iters} (--restart-schedule stretches the cosine instead)"
            if a.max_iters > a.schedule_iters else "")))


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
