"""
eemini: confidence-routed early exit for a character-level GPT, in one file.

Easy characters leave the network at a shallow exit layer; hard ones go through every layer.
Read top to bottom: errors and data -> model -> exits and routing -> losses -> compute
accounting -> evaluation -> checkpoints.

References
[1] Teerapittayanon et al. 2016, BranchyNet: fast inference via early exiting. arXiv:1709.01686
[2] Elbayad et al. 2020, Depth-Adaptive Transformer (auxiliary exit losses). arXiv:1910.10073
[3] Schuster et al. 2022, CALM: Confident Adaptive Language Modeling. arXiv:2207.07061
[4] Lee et al. 2015, Deeply-Supervised Nets. arXiv:1409.5185
[5] Elhoushi et al. 2024, LayerSkip: early exit inference and self-speculative decoding. arXiv:2404.16710
[6] Merity et al. 2016, Pointer Sentinel Mixture Models (the WikiText data sets). arXiv:1609.07843
"""

import argparse
import contextlib
import hashlib
import math
import os
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


class EEminiError(Exception):
    """A problem the user can fix (bad data path, bad flag, foreign checkpoint): printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump): `train.py: error: ... (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, parse_args):
    """Run a script's main(); a problem the user can fix ends in one `error:` line, exit code 1."""
    try:
        return main(parse_args())
    except EEminiError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def fmt_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def pick_device(name=""):
    """--device: empty = the best there is, cuda -> mps -> cpu."""
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


# ----------------------------------------------------------------------------------------------
# data: character-level WikiText-2 from plain text [6]

WIKITEXT_URL = "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
WIKITEXT_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
CACHE_DIR = Path(os.environ.get("EEMINI_CACHE", Path.home() / ".cache" / "eemini"))
UNK = "\ufffd"  # id 0: every character the training text never showed


def download_wikitext(cache_dir=CACHE_DIR):
    """Fetch wikitext-2-raw-v1.zip once, check its sha256, unpack it; returns the split folder."""
    folder = Path(cache_dir) / "wikitext-2-raw"
    if (folder / "wiki.train.raw").exists():
        return folder
    print(f"downloading WikiText-2 (4.7 MB) from {WIKITEXT_URL} into {cache_dir}")
    try:
        with urllib.request.urlopen(WIKITEXT_URL, timeout=30) as r:
            blob = r.read()
    except OSError as e:
        raise EEminiError(f"could not download WikiText-2 ({e}); fetch wikitext-2-raw-v1.zip by hand, "
                          f"unzip it and pass --data path/to/wikitext-2-raw") from None
    if hashlib.sha256(blob).hexdigest() != WIKITEXT_SHA256:
        raise EEminiError(f"the download from {WIKITEXT_URL} failed its sha256 check; try again or pass --data")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # unpack beside, then rename: never half a folder
        zip_path = Path(tmp) / "wikitext-2-raw-v1.zip"
        zip_path.write_bytes(blob)
        zipfile.ZipFile(zip_path).extractall(tmp)
        os.replace(Path(tmp) / "wikitext-2-raw", folder)
    return folder


def read_split(data, split):
    """(text, source) of one split ('train', 'valid', 'test') from a WikiText folder or one text file.

    A folder may hold wiki.{split}.raw or .tokens; where it has both, the raw variant is taken for
    every split (mixing them inflates validation PPL: .tokens writes rare words as <unk>).
    A single file is cut 90/10 into train and valid; it has no test split.
    """
    path = Path(data) if data else download_wikitext()
    if path.is_dir():
        raw = all((path / f"wiki.{s}.raw").exists() for s in ("train", "valid"))
        file = path / f"wiki.{split}.{'raw' if raw else 'tokens'}"
        if not file.exists():
            raise EEminiError(f"{path} has no wiki.{split}.raw (nor .tokens); --data wants a folder with "
                              f"wiki.{{train,valid,test}}.raw (or .tokens) or a single text file")
        text, source = file.read_text(encoding="utf-8", errors="replace"), str(file)
    elif path.is_file():
        if split == "test":
            raise EEminiError(f"{path} is a single text file, which has no test split; use --split valid")
        text = path.read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        text, source = (text[:cut], f"{path} [:90%]") if split == "train" else (text[cut:], f"{path} [90%:]")
    else:
        raise EEminiError(f"no data at {path}; pass --data a WikiText-2 folder or a text file "
                          f"(or no --data, to download WikiText-2 once)")
    if not text.strip():
        raise EEminiError(f"the {split} text from {path} is empty; point --data at real text")
    return text, source


class Vocab:
    """Characters of the training text, id 0 reserved for characters it never showed."""

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text):
        return cls([UNK] + sorted(set(text) - {UNK}))

    def encode(self, text):
        return torch.tensor([self.stoi.get(ch, 0) for ch in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def __len__(self):
        return len(self.itos)


def load_data(data, train_chars=500_000, val_chars=50_000, split="valid", verbose=True):
    """(vocab, train ids, eval ids) for the first train_chars / val_chars characters of each split."""
    (train, train_src), (held, held_src) = read_split(data, "train"), read_split(data, split)
    train, held = train[:train_chars], held[:val_chars]
    vocab = Vocab.from_text(train)
    unseen = sum(ch not in vocab.stoi for ch in held)
    if verbose:
        print(f"data: {len(train):,} chars of {train_src} | {len(held):,} chars of {held_src} | vocab {len(vocab)} "
              f"| {unseen} {split} chars unseen in train -> unknown id")
    return vocab, vocab.encode(train), vocab.encode(held)


# ----------------------------------------------------------------------------------------------
# model: a pre-norm GPT (nanoGPT layout) whose attention can skip the queries of exited tokens


class KVCache:
    """Keys and values of one layer, preallocated to the context; appendable and truncatable.

    truncate() is what self-speculative decoding [5] needs: the exit layer drafts, the full model
    verifies, and the rejected drafts' entries are cut back. `pending` holds the frozen states of
    exited tokens whose K/V this layer has not written yet: computing it lazily, for a run of easy
    tokens at once when the next deep token arrives, gives the same numbers with far fewer steps.
    """

    def __init__(self):
        self.k = self.v = self.pending = None
        self.length = 0  # tokens whose K/V is written (pending ones come after them)

    def append(self, k, v, block_size):  # k, v: (B, H, T, D) -> all keys and values so far
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, block_size, D)
            self.v = v.new_empty(B, H, block_size, D)
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def defer(self, x):  # x: (B, T, C) frozen states of tokens that skip this layer
        self.pending = x if self.pending is None else torch.cat([self.pending, x], dim=1)

    def truncate(self, length):
        if self.pending is not None:
            keep = length - self.length
            self.pending = self.pending[:, :keep] if keep > 0 else None
        self.length = min(self.length, length)


def new_cache(n_layer):
    return [KVCache() for _ in range(n_layer)]


def gather_tokens(x, idx):  # x: (B, T, C), idx: (B, Tq) -> (B, Tq, C)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.block_size, self.dropout = cfg.n_head, cfg.block_size, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, t):  # (B, T, C) -> (B, nh, T, hs)
        return t.view(t.size(0), t.size(1), self.n_head, -1).transpose(1, 2)

    def project(self, x, part):  # part: slice of c_attn's output rows (queries 0:C, keys+values C:3C)
        b = self.c_attn.bias
        return F.linear(x, self.c_attn.weight[part], None if b is None else b[part])

    def write_kv(self, x, cache):
        """K/V of every new token (an exited one too: later tokens attend to it), appended to the
        cache; returns all keys and values so far, (B, nh, S, hs) each."""
        C = x.size(-1)
        k, v = (self.heads(t) for t in self.project(x, slice(C, None)).split(C, dim=2))
        return cache.append(k, v, self.block_size) if cache is not None else (k, v)

    def forward(self, x, cache=None, rows=None, q_idx=None, prefix=None):
        """x: (B, T, C) normed states of T new tokens. Queries come from all of them, or with
        rows (R,) and q_idx (R, Tq) from x[rows] gathered at q_idx (the tokens still going deep).
        prefix: (B, P, C) normed states of earlier exited tokens whose K/V is still to be written;
        it shares this call's qkv projection (one step instead of two) and asks no queries."""
        B, T, C = x.size()
        start = cache.length if cache is not None else 0
        if q_idx is None:
            both = x if prefix is None else torch.cat([prefix, x], dim=1)
            q, k, v = (self.heads(t) for t in self.c_attn(both).split(C, dim=2))
            if prefix is not None:
                q, start = q[:, :, -T:], start + prefix.size(1)
            if cache is not None:
                k, v = cache.append(k, v, self.block_size)  # (B, nh, start + T, hs)
        else:  # true early exit: K/V for every token, a query only for the deep ones
            k, v = self.write_kv(x, cache)
            k, v = k[rows], v[rows]
            q = self.heads(self.project(gather_tokens(x[rows], q_idx), slice(0, C)))
        if q_idx is None and start == 0:
            mask = "causal"
        elif q_idx is None and T == 1:
            mask = None  # one new token sees every key
        else:  # queries at arbitrary positions: key j is visible to the query at position p iff j <= p
            qpos = start + (torch.arange(T, device=x.device).expand(B, T) if q_idx is None else q_idx)
            mask = (torch.arange(k.size(2), device=x.device) <= qpos.unsqueeze(-1)).unsqueeze(1)  # (R, 1, Tq, S)
        return self.resid_dropout(self.c_proj(self.attend(q, k, v, mask, C)))

    def attend(self, q, k, v, mask, C):  # mask: "causal", None (see all keys) or a bool mask
        drop = self.dropout if self.training else 0.0
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return y.transpose(1, 2).reshape(q.size(0), -1, C)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim or 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_dim or 4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, deep=None, cache=None):
        """deep: (B, T) bool, the tokens this layer updates (None = all). The others keep their
        state, frozen at the layer they exited, and only lend it as K/V (state propagation [3])."""
        if deep is not None and not deep.any():  # all have exited: their K/V, for later tokens,
            if cache is not None:                # is written when the next deep token needs it
                cache.defer(x)
            return x
        pending = None
        if cache is not None and cache.pending is not None:
            pending, cache.pending = self.ln_1(cache.pending), None
        if deep is None or deep.all():
            x = x + self.attn(self.ln_1(x), cache, prefix=pending)
            return x + self.mlp(self.ln_2(x))
        if pending is not None:
            self.attn.write_kv(pending, cache)
        # the work that is left: rows with a deep token, and in each its deep positions, in order,
        # then padding (a stable sort on "exited?"); the padding is computed but never written
        n_deep = deep.sum(1)
        rows = n_deep.nonzero().squeeze(1)  # (R,)
        T = deep.size(1)
        order = torch.argsort((~deep[rows]).long() * T + torch.arange(T, device=x.device), dim=1)
        q_idx = order[:, : int(n_deep.max())]  # (R, Tq)
        x_rows = x[rows]
        x_deep = gather_tokens(x_rows, q_idx)  # (R, Tq, C)
        h = x_deep + self.attn(self.ln_1(x), cache, rows, q_idx)
        h = h + self.mlp(self.ln_2(h))
        real = torch.arange(q_idx.size(1), device=x.device) < n_deep[rows].unsqueeze(1)
        h = torch.where(real.unsqueeze(-1), h, x_deep)
        return x.index_copy(0, rows, x_rows.scatter(1, q_idx.unsqueeze(-1).expand_as(h), h))


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # context length in characters
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 64
    ffn_dim: int = 0  # MLP hidden width; 0 means 4 * n_embd
    dropout: float = 0.0
    bias: bool = False
    exit_layer: int = 1  # the exit point: a token may leave after this layer (1..n_layer-1); 0 = none
    # middle layers with a head of their own: the exit layer, plus any a loss supervises
    # (deepsup puts one on every layer). The last layer's head is ln_f + lm_head.
    head_layers: list = field(default_factory=list)

    def __post_init__(self):
        self.head_layers = sorted(set(self.head_layers) | set(self.exits))
        if not 0 <= self.exit_layer < self.n_layer:
            raise EEminiError(f"exit layer {self.exit_layer} must be between 1 and n_layer-1 = {self.n_layer - 1} "
                              f"(or 0 for a plain model without an exit)")
        if self.n_embd % self.n_head:
            raise EEminiError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not all(1 <= k < self.n_layer for k in self.head_layers):
            raise EEminiError(f"head layers {self.head_layers} must lie in 1..{self.n_layer - 1}")

    @property
    def exits(self):
        """Exit points in depth order. One today; routing and accounting loop over this list."""
        return [self.exit_layer] if self.exit_layer else []


class ExitHead(nn.Module):
    """Norm + linear to the vocabulary, read off a middle layer (BranchyNet's side branch [1])."""

    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x):
        return self.head(self.ln(x))


def init_weights(module):
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.exit_heads = nn.ModuleDict({str(k): ExitHead(cfg) for k in cfg.head_layers})
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def head(self, layer, x):
        """Logits read off the state after `layer` (1-based); the last layer uses ln_f + lm_head."""
        if layer == self.config.n_layer:
            return self.lm_head(self.transformer.ln_f(x))
        return self.exit_heads[str(layer)](x)

    def embed(self, idx, start=0):
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise EEminiError(f"a sequence of {start + T} characters is longer than the model's context "
                              f"({self.config.block_size}); use shorter windows or train with a larger --block-size")
        pos = torch.arange(start, start + T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)

    def forward(self, idx, targets=None, layer_weights=None):
        """Logits at every layer with a head ({layer: (B, T, V)}), and, given targets and
        {layer: weight}, the weighted loss and each weighted layer's CE. Training calls this."""
        x = self.embed(idx)
        logits = {}  # training reads only the weighted layers' heads; evaluation reads them all
        wanted = set(layer_weights) if layer_weights else {*self.config.head_layers, self.config.n_layer}
        for k, block in enumerate(self.transformer.h, 1):
            x = block(x)
            if k in wanted:
                logits[k] = self.head(k, x)
        if targets is None:
            return logits, None, None
        ce = {k: F.cross_entropy(logits[k].flatten(0, 1), targets.flatten()) for k in layer_weights}
        return logits, weighted_loss(ce, layer_weights), ce

    def forward_all_layers(self, idx):
        """{layer: logits} after every layer that has a head (deep supervision reads these)."""
        return self(idx)[0]

    def forward_train(self, idx):
        """(shallow, deep) logits: the exit head's and the last layer's."""
        logits = self(idx)[0]
        return logits[self.config.exit_layer], logits[self.config.n_layer]

    @torch.no_grad()
    def forward_exit(self, idx, threshold, confidence="softmax", cache=None):
        """True early exit [3]: a token whose confidence at an exit point reaches the threshold
        stops there; the deep layers skip its attention query and MLP and compute only its K/V,
        from its frozen state. With a cache (one KVCache a layer), idx continues the cached text.
        threshold None runs the plain model without exit checks (the honest speed baseline).
        Returns logits (B, T, V), the layer each token left at (B, T), the confidence at the
        first exit point (B, T; None without exit checks)."""
        cfg = self.config
        x = self.embed(idx, cache[0].length if cache else 0)
        depth = torch.full(idx.shape, cfg.n_layer, device=idx.device)
        logits = first_conf = deep = None  # deep: tokens still in flight (None = all of them)
        for k, block in enumerate(self.transformer.h, 1):
            x = block(x, deep, cache[k - 1] if cache else None)
            if threshold is None or k not in cfg.exits or (deep is not None and not deep.any()):
                continue
            exit_logits = self.head(k, x)
            conf = CONFIDENCE[confidence](exit_logits)
            first_conf = conf if first_conf is None else first_conf
            leave = exit_mask(conf, threshold) if deep is None else deep & exit_mask(conf, threshold)
            if not leave.any():  # the common case while decoding a hard token: nothing to record
                continue
            logits = exit_logits if logits is None else torch.where(leave.unsqueeze(-1), exit_logits, logits)
            depth = depth.masked_fill(leave, k)
            deep = ~leave if deep is None else deep & ~leave
        if deep is None:
            return self.head(cfg.n_layer, x), depth, first_conf
        if deep.any():  # the last head, for the deep tokens only
            logits[deep] = self.head(cfg.n_layer, x[deep]).to(logits.dtype)
        return logits, depth, first_conf

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, threshold=1.0, temperature=1.0, top_k=None,
                 confidence="softmax", generator=None):
        """Sample max_new_tokens after idx (B, T) with a KV cache and true early exit; temperature
        0 is greedy. Returns the ids (B, T + new) and, per new token, the layer that produced it
        (B, new). When the context is full, the cache is rebuilt from the last half of the text."""
        block_size, cache, depths = self.config.block_size, None, []
        for _ in range(max_new_tokens):
            if cache is None or cache[0].length >= block_size:  # (re)fill the cache from the text
                cache = new_cache(self.config.n_layer)
                step_in = idx[:, -(block_size if not depths else max(1, block_size // 2)):]
            logits, depth, _ = self.forward_exit(step_in, threshold, confidence, cache)
            logits = logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            depths.append(depth[:, -1])
            idx = torch.cat([idx, nxt], dim=1)
            step_in = nxt
        return idx, torch.stack(depths, 1) if depths else idx.new_zeros(idx.size(0), 0)


# ----------------------------------------------------------------------------------------------
# exits and routing: a token leaves at the first exit point where its confidence >= threshold [1][3]


def conf_softmax(logits):
    """Max softmax probability (the seeds' confidence, CALM's 'softmax response' [3])."""
    return F.softmax(logits.float(), dim=-1).max(-1).values


def conf_margin(logits):
    """Top-1 minus top-2 softmax probability."""
    top2 = torch.topk(F.softmax(logits.float(), dim=-1), 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def conf_entropy(logits):
    """Negative entropy, rescaled to [0, 1]: 1 - H(p) / log V (1 = one-hot, 0 = uniform)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (1.0 + (logp.exp() * logp).sum(-1) / math.log(logits.size(-1))).clamp(0.0, 1.0)  # rounding


CONFIDENCE = {"softmax": conf_softmax, "margin": conf_margin, "entropy": conf_entropy}


def check_threshold(threshold):
    if not 0.0 <= threshold <= 1.0:
        raise EEminiError(f"threshold {threshold} is outside [0, 1]; 0 sends every token out early, 1 none")
    return threshold


def exit_mask(conf, threshold):
    """conf >= threshold, except that threshold 1.0 means no exit at all (float softmax can round
    a near-certain prediction to exactly 1.0, and 1.0 is the 'full depth' end of every sweep)."""
    check_threshold(threshold)
    if threshold >= 1.0:
        return torch.zeros_like(conf, dtype=torch.bool)
    return conf >= threshold


def exit_depth(conf_by_exit, threshold, n_layer, shape=None):
    """Layer each token leaves at: the first exit point (in depth order) whose confidence clears
    the threshold, else n_layer. conf_by_exit: {exit layer: confidence}; shape is needed only
    when there is no exit point."""
    depth = torch.full(shape or next(iter(conf_by_exit.values())).shape, n_layer, dtype=torch.long)
    for k in sorted(conf_by_exit, reverse=True):  # deepest first, so a shallower exit overrides
        depth = torch.where(exit_mask(conf_by_exit[k], threshold), k, depth.to(conf_by_exit[k].device))
    return depth


def pick_by_depth(by_layer, depth):
    """Per token, the entry of by_layer ({layer: (…) or (…, V)}) at the layer it left at."""
    out = by_layer[max(by_layer)]
    for k in sorted(by_layer)[:-1]:
        d = depth.unsqueeze(-1) if out.dim() > depth.dim() else depth
        out = torch.where(d == k, by_layer[k], out)
    return out


def route(logits_by_layer, threshold, exits, confidence="softmax"):
    """Masked routing (what the seeds measured): every layer ran for every token; each token's
    output is taken from the exit it left at or the last layer. Returns (logits, depth, conf),
    conf at the first exit point; depth < n_layer marks the tokens that exited."""
    n_layer = max(logits_by_layer)
    confs = {k: CONFIDENCE[confidence](logits_by_layer[k]) for k in exits}
    depth = exit_depth(confs, threshold, n_layer, logits_by_layer[n_layer].shape[:-1])
    picked = pick_by_depth({k: logits_by_layer[k] for k in [*exits, n_layer]}, depth)
    return picked, depth, confs[exits[0]] if exits else None


# ----------------------------------------------------------------------------------------------
# loss schemes: each one a table {layer: weight}; the loss is sum_k weight_k * CE(layer k)


def loss_final(n_layer, exit_layer, alpha):
    """Seed 000 'Standard': CE of the last layer only (with n_layer=1, 'Standard 1L')."""
    return {n_layer: 1.0}


def loss_aux(n_layer, exit_layer, alpha):
    """Seeds 000/001 Exp 3, Depth-Adaptive Transformer [2]: 0.5 CE(exit) + 0.5 CE(final)."""
    return {exit_layer: 0.5, n_layer: 0.5}


def loss_deepsup(n_layer, exit_layer, alpha):
    """Seeds 000/001 Exp 4, Deeply-Supervised Nets [4] (the seeds' 'LPT'): mean CE over all layers."""
    return {k: 1.0 / n_layer for k in range(1, n_layer + 1)}


def loss_asym(n_layer, exit_layer, alpha):
    """Seed 003 Exp 5 and seed 002: alpha CE(exit) + (1-alpha) CE(final), middle layers unsupervised."""
    return {exit_layer: alpha, n_layer: 1.0 - alpha}


def loss_asym_deepsup(n_layer, exit_layer, alpha):
    """Seed 003 Exp 6: alpha CE(exit) + 1.0 CE(every other middle layer) + (1-alpha) CE(final)."""
    return {k: alpha if k == exit_layer else 1.0 - alpha if k == n_layer else 1.0 for k in range(1, n_layer + 1)}


LOSSES = {"final": loss_final, "aux": loss_aux, "deepsup": loss_deepsup,
          "asym": loss_asym, "asym_deepsup": loss_asym_deepsup}


def layer_weights(loss, n_layer, exit_layer, alpha=0.5, weights=None):
    """The {layer: weight} table of a scheme, or of an explicit per-layer list such as seed 002's
    [0, 0.7, 0, 0.3]. Layers of weight 0 are dropped (they get no head and no loss)."""
    if not 0.0 <= alpha <= 1.0:
        raise EEminiError(f"alpha {alpha} is outside [0, 1]; it weighs the exit's loss against the final's")
    if weights is not None:
        if len(weights) != n_layer or min(weights) < 0 or sum(weights) <= 0:
            raise EEminiError(f"--layer-weights needs {n_layer} non-negative numbers, one a layer, "
                              f"not all zero (got {weights})")
        table = dict(enumerate(weights, 1))
    else:
        table = LOSSES[loss](n_layer, exit_layer, alpha)
    return {k: float(w) for k, w in table.items() if w > 0}


def weighted_loss(ce_by_layer, weights):
    return sum(weights[k] * ce_by_layer[k] for k in weights)


def untrained_exit(ckpt):
    """Why a checkpoint's exit head cannot be trusted to route (no exit point, or no loss ever
    reached it, as under --loss final), or None if it can."""
    a, cfg = ckpt.get("args") or {}, ckpt["config"]
    if not cfg.get("exit_layer"):
        return "is a plain model without an exit point (--exit-layer 0)"
    if a.get("loss") in LOSSES:
        w = layer_weights(a["loss"], cfg["n_layer"], cfg["exit_layer"], a.get("alpha", 0.5),
                          a.get("layer_weights") or None)
        if cfg["exit_layer"] not in w:
            how = f"--layer-weights {a['layer_weights']}" if a.get("layer_weights") else f"--loss {a['loss']}"
            return f"was trained with {how}: its exit head (after layer {cfg['exit_layer']}) was never trained"
    return None


# ----------------------------------------------------------------------------------------------
# compute accounting


def compute_percent(depth, n_layer):
    """The seeds' Compute%: mean layers run per token / n_layer (shallow*k/L + (1-shallow)*1)."""
    return 100.0 * depth.float().mean().item() / n_layer


def flops_per_token(cfg, context=None):
    """Forward FLOPs of one token (2 per multiply-add): one layer, one head, one layer's K/V
    projection. Attention is counted over `context` keys (default: half the block, the mean)."""
    C, Fd, V = cfg.n_embd, cfg.ffn_dim or 4 * cfg.n_embd, cfg.vocab_size
    ctx = cfg.block_size / 2 if context is None else context
    layer = 2 * 4 * C * C + 2 * 2 * ctx * C + 2 * 2 * C * Fd  # qkv + proj, scores + mix, MLP
    return layer, 2 * C * V, 2 * 2 * C * C


def flops_percent(depth, cfg, context=None):
    """FLOPs of this routing under true early exit, as % of a plain n_layer GPT with one head.
    Counts what Compute% hides: every exit head a token reaches, and the K/V an exited token
    still computes in each layer above its exit."""
    layer, head, kv = flops_per_token(cfg, context)
    L, d = cfg.n_layer, depth.double()
    heads = sum((d >= k).double() for k in cfg.exits) + (d == L).double()
    cost = d * layer + heads * head + (L - d) * kv
    return 100.0 * cost.mean().item() / (L * layer + head)


# ----------------------------------------------------------------------------------------------
# evaluation: one pass gathers per-token CE and confidences; every threshold is read from them


def eval_windows(data, block_size, batch_size):
    """Non-overlapping (x, y) windows covering data, batch_size windows at a time."""
    n = (len(data) - 1) // block_size
    if n == 0:
        raise EEminiError(f"the evaluation text ({len(data)} chars) is shorter than one window of "
                          f"{block_size + 1} (the model's context + 1); use more --val-chars")
    x = data[: n * block_size].view(n, block_size)
    y = data[1 : n * block_size + 1].view(n, block_size)
    for i in range(0, n, batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def token_stats(model, data, batch_size=64, device="cpu"):
    """One masked forward over data: per token, CE at every head and each confidence measure at
    each exit point. {'ce': {layer: (N,)}, 'conf': {measure: {exit: (N,)}}, 'correct': {layer: (N,)}}."""
    model.eval()
    cfg = model.config
    ce, correct, conf = {}, {}, {m: {} for m in CONFIDENCE}
    for x, y in eval_windows(data, cfg.block_size, batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)[0]
        for k, lg in logits.items():
            lg = lg.float()
            ce.setdefault(k, []).append(F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none").cpu())
            correct.setdefault(k, []).append((lg.argmax(-1) == y).flatten().cpu())
            if k in cfg.exits:
                for m, fn in CONFIDENCE.items():
                    conf[m].setdefault(k, []).append(fn(lg).flatten().cpu())
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return {"ce": cat(ce), "correct": cat(correct), "conf": {m: cat(c) for m, c in conf.items()}}


def routed_metrics(stats, threshold, cfg, confidence="softmax"):
    """PPL, Shallow%, Compute%, FLOPs% of the masked router at one threshold, from token_stats."""
    depth = exit_depth(stats["conf"][confidence], threshold, cfg.n_layer, stats["ce"][cfg.n_layer].shape)
    ce = pick_by_depth({k: stats["ce"][k] for k in [*cfg.exits, cfg.n_layer]}, depth)
    return summarize(ce, depth, cfg, threshold)


def summarize(ce, depth, cfg, threshold):
    """One row of a results table from per-token CE and exit depth."""
    return {"threshold": threshold, "ppl": math.exp(ce.double().mean().item()),
            "shallow": 100.0 * (depth < cfg.n_layer).float().mean().item(),
            "compute": compute_percent(depth, cfg.n_layer), "flops": flops_percent(depth, cfg)}


@torch.no_grad()
def exit_metrics(model, data, threshold, batch_size=64, device="cpu", confidence="softmax"):
    """The same figures as routed_metrics, measured with true early exit (one pass a threshold:
    which states the deep layers see depends on who exited)."""
    model.eval()
    ce, depth = [], []
    for x, y in eval_windows(data, model.config.block_size, batch_size):
        logits, d, _ = model.forward_exit(x.to(device), threshold, confidence)
        ce.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").cpu())
        depth.append(d.flatten().cpu())
    return summarize(torch.cat(ce), torch.cat(depth), model.config, threshold)


def layer_ppl(stats):
    """{layer: PPL} of each head alone."""
    return {k: math.exp(v.double().mean().item()) for k, v in stats["ce"].items()}


# ----------------------------------------------------------------------------------------------
# checkpoints: one file, plain tensors and Python values only (torch.load(weights_only=True))

CKPT_FORMAT = "eemini-1"


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Write to a temp file beside path and rename it over path only once all is written, so an
    interrupted write never spoils what was there. Yields the open file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path, model, vocab, **extra):
    """Write config, state dict, vocab and extra (args, step, metrics, optimizer...) atomically:
    to a temp file beside path, then rename, so an interrupted save never spoils the old file."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps; DDP callers pass .module
    ckpt = {"format": CKPT_FORMAT, "kind": "gpt", "config": asdict(raw.config), "model": raw.state_dict(),
            "vocab": vocab.itos, **extra}  # extra may set another kind (exit_classifier.py: "cascade")
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or one clear EEminiError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise EEminiError(f"no checkpoint at {path}; train one with `python train.py` (or pass its path)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip, a text file, pickled code that weights_only refuses ...
        raise EEminiError(f"{path} is not a readable checkpoint (corrupt, truncated, or not written by "
                          f"eemini: {type(e).__name__}); re-train or re-copy it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise EEminiError(f"{path} is not an eemini checkpoint (no '{CKPT_FORMAT}' format tag); "
                          f"pass a file written by train.py")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """(model in eval mode, vocab) from a checkpoint dict."""
    if ckpt.get("kind", "gpt") != "gpt":
        raise EEminiError(f"this is a {ckpt['kind']} checkpoint, not a train.py model; "
                          f"use the script that wrote it (exit_classifier.py for cascades)")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        vocab = Vocab(ckpt["vocab"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise EEminiError(f"the checkpoint's model does not match its config ({str(e)[:120]}); "
                          f"it is damaged or from another version") from None
    return model.to(device).eval(), vocab
