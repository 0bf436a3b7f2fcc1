"""Training the encoder-decoder on synthetic sequence tasks (copy, reverse, sort), with
checkpoints that resume to the same loss curve, a loss plot, greedy-decoding accuracy,
and DistributedDataParallel when started under torchrun (gloo on CPU, nccl on GPU).

Context parallelism (``context_parallel = N``, N processes under torchrun): every rank takes
the same batch and its zigzag slice of the source and target positions
(fused_attn.distributed), every attention runs as ring attention over the N ranks, each rank's
loss is its tokens' share of the batch's and DistributedDataParallel sums the gradients: the
loss curve is the single-process run's up to float rounding.

Batches are a pure function of (seed, rank, step): random lengths, right-padded. A resumed
run regenerates exactly the batches and dropout draws the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .bench import output_dir_problem
from ..models import make_model

PAD, BOS, EOS = 0, 1, 2
TASKS = ("copy", "reverse", "sort")


class TrainError(Exception):
    """A user-facing problem (bad option, incompatible checkpoint, unwritable folder)."""


@dataclass
class TrainConfig:
    task: str = "copy"
    vocab: int = 16  # includes PAD, BOS, EOS
    min_len: int = 4
    max_len: int = 12
    N: int = 2
    d_model: int = 128
    d_ff: int = 256
    h: int = 4
    dropout: float = 0.0
    batch_size: int = 64
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 100
    label_smoothing: float = 0.0
    seed: int = 0
    backend: str = "auto"
    eval_size: int = 512
    context_parallel: int = 1
    packed: bool = False

    def model_config(self) -> dict:
        return {k: getattr(self, k) for k in ("task", "vocab", "N", "d_model", "d_ff", "h", "max_len")}

    def check(self) -> None:
        if self.task not in TASKS:
            raise TrainError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.vocab < 4:
            raise TrainError(f"--vocab must be >= 4 (PAD, BOS, EOS and at least one symbol), got {self.vocab}")
        if not 1 <= self.min_len <= self.max_len:
            raise TrainError(f"need 1 <= --min-len <= --max-len, got {self.min_len} and {self.max_len}")
        if self.d_model % self.h:
            raise TrainError(f"--d-model ({self.d_model}) must be a multiple of --heads ({self.h})")
        for name in ("N", "d_model", "d_ff", "h", "batch_size", "steps", "eval_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise TrainError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.packed and (self.context_parallel > 1 or self.dropout > 0):
            raise TrainError("--packed runs every attention as varlen_attention, which has neither context "
                             "parallelism nor dropout: use --context-parallel 1 and --dropout 0 with it")
        if self.context_parallel < 1:
            raise TrainError(f"--context-parallel must be >= 1, got {self.context_parallel}")
        if self.context_parallel > 1 and self.dropout > 0:
            raise TrainError("--context-parallel needs --dropout 0: ring attention does not support dropout, and "
                             "dropout elsewhere would draw differently from the single-process run")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.context_parallel > 1 and world != self.context_parallel:
            raise TrainError(f"--context-parallel {self.context_parallel} needs exactly {self.context_parallel} "
                             f"processes (torchrun --nproc-per-node {self.context_parallel}), got {world}")


def make_batch(cfg: TrainConfig, batch_size: int, generator: torch.Generator, device) -> tuple:
    """src (B, max_len) and tgt (B, max_len + 2) = BOS, answer, EOS; right-padded with PAD."""
    lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (batch_size,), generator=generator)
    symbols = torch.randint(3, cfg.vocab, (batch_size, cfg.max_len), generator=generator)
    positions = torch.arange(cfg.max_len)[None, :]
    real = positions < lengths[:, None]
    src = symbols.masked_fill(~real, PAD)
    if cfg.task == "copy":
        answer = src
    elif cfg.task == "reverse":
        idx = (lengths[:, None] - 1 - positions).clamp_min(0)
        answer = torch.gather(src, 1, idx).masked_fill(~real, PAD)
    else:  # sort: padding (0) sorts first, so sort with it pushed to the end
        answer = src.masked_fill(~real, cfg.vocab).sort(dim=1).values.masked_fill(~real, PAD)
    tgt = torch.full((batch_size, cfg.max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    tgt[:, 1:cfg.max_len + 1] = answer
    tgt[torch.arange(batch_size), lengths + 1] = EOS
    return src.to(device), tgt.to(device)


def batch_generator(cfg: TrainConfig, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then inverse square root decay (the paper's schedule shape)."""
    step = max(step, 1)
    return cfg.lr * min(step / cfg.warmup, math.sqrt(cfg.warmup / step))


@torch.no_grad()
def accuracy(model, cfg: TrainConfig, device, n: Optional[int] = None, seed: int = 12345) -> float:
    """Exact-sequence accuracy of greedy decoding on fresh examples (answer up to EOS)."""
    model.eval()
    n = n or cfg.eval_size
    src, tgt = make_batch(cfg, n, torch.Generator().manual_seed(seed), device)
    out = model.greedy_decode(src, cfg.max_len + 2, BOS, EOS)
    correct = 0
    for i in range(n):
        want = tgt[i, 1:].tolist()
        want = want[: want.index(EOS) + 1]
        got = out[i, 1:].tolist()
        correct += got[: len(want)] == want
    model.train()
    return correct / n


def state_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter, bit for bit (replicas must agree)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _distributed():
    """(rank, world_size, device) under torchrun, initialising the process group; else (0, 1, None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def save_checkpoint(path: str, model, opt, cfg: TrainConfig, step: int, history: list) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg),
                    "step": step, "history": history, "torch_rng": torch.get_rng_state()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise TrainError(f"cannot write checkpoint {path}: {e.strerror}") from None


def load_checkpoint(path: str, cfg: TrainConfig) -> dict:
    if not os.path.exists(path):
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"{path} is not a fused-attn checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise TrainError(f"{path} is not a fused-attn checkpoint")
    saved = {k: ckpt["config"].get(k) for k in cfg.model_config()}
    if saved != cfg.model_config():
        diff = ", ".join(f"{k}={saved[k]} (this run: {v})" for k, v in cfg.model_config().items() if saved[k] != v)
        raise TrainError(f"checkpoint {path} belongs to another model: {diff}")
    return ckpt


def train(cfg: TrainConfig, *, checkpoint: Optional[str] = None, resume: Optional[str] = None,
          save_every: int = 0, out_dir: Optional[str] = None, device: Optional[torch.device] = None,
          progress: Optional[Callable[[int, dict], None]] = None, evaluate: bool = True) -> dict:
    """Train; returns a summary (losses, accuracy, tokens/s, time, parameter digest)."""
    cfg.check()
    rank, world, dist_device = _distributed()
    device = dist_device or device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = output_dir_problem(out_dir) if out_dir else None
    if problem:
        raise TrainError(problem)
    torch.manual_seed(cfg.seed)
    cp = cfg.context_parallel
    # context parallelism pads the sequences to a multiple of 2 * cp (zigzag_shard)
    model = make_model(cfg.vocab, cfg.vocab, cfg.N, cfg.d_model, cfg.d_ff, cfg.h, cfg.dropout, pad_id=PAD,
                       backend=cfg.backend, max_len=cfg.max_len + 2 + (2 * cp if cp > 1 else 0)).to(device)
    cp_group = None
    if cp > 1:
        import torch.distributed as dist

        cp_group = dist.new_group(list(range(world)))  # its own group: the ring's messages never meet DDP's
        model.context_parallel(cp_group)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    start, history = 0, []
    if resume:
        ckpt = load_checkpoint(resume, cfg)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["step"], list(ckpt["history"])
        torch.set_rng_state(ckpt["torch_rng"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model.train()
    tokens = 0
    t0 = time.time()
    for step in range(start, cfg.steps):
        # context-parallel ranks share one batch (data rank 0); data-parallel ranks each draw theirs
        src, tgt = make_batch(cfg, cfg.batch_size, batch_generator(cfg, rank if cp == 1 else 0, step), device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step + 1)
        count = (tgt[:, 1:] != PAD).sum()
        if cp > 1:
            logp, target = _context_parallel_forward(net, src, tgt, cp_group)
        elif cfg.packed:
            logp, target = _packed_forward(net, src, tgt)
        else:
            logp, target = net(src, tgt[:, :-1]), tgt[:, 1:]
        total = _loss_sum(cfg, logp, target)
        opt.zero_grad(set_to_none=True)
        # DDP averages the gradients over the ranks: with context parallelism each rank holds
        # its tokens' share of the batch's loss, so scale it by cp to get their sum
        (total / count * cp).backward()
        opt.step()
        tokens += int(count) * world // cp
        if cp > 1:
            total = total.detach().clone()
            dist.all_reduce(total, group=cp_group)
        history.append(float(total.detach() / count))
        if progress and rank == 0:
            progress(step + 1, {"loss": history[-1], "tokens_per_s": tokens / max(time.time() - t0, 1e-9)})
        if checkpoint and rank == 0 and save_every and (step + 1) % save_every == 0:
            save_checkpoint(checkpoint, model, opt, cfg, step + 1, history)
    elapsed = time.time() - t0
    if checkpoint and rank == 0:
        save_checkpoint(checkpoint, model, opt, cfg, cfg.steps, history)
    summary = {"steps": cfg.steps, "final_loss": history[-1] if history else None, "losses": history,
               "tokens_per_s": tokens / max(elapsed, 1e-9), "seconds": elapsed, "world_size": world,
               "digest": state_digest(model), "rank": rank}
    if evaluate and rank == 0:
        model.context_parallel(enabled=False)  # decoding runs on rank 0 alone
        summary["accuracy"] = accuracy(model, cfg, device)
    if out_dir and rank == 0:
        _write_outputs(out_dir, cfg, summary)
    if out_dir and world > 1:  # every replica's parameters, to show they stayed identical
        with open(os.path.join(out_dir, f"digest_rank{rank}.txt"), "w") as f:
            f.write(summary["digest"] + "\n")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _loss_sum(cfg: TrainConfig, logp, target):
    """The summed loss over the non-padding targets (its mean is the loss the run reports)."""
    logp, target = logp.reshape(-1, logp.size(-1)), target.reshape(-1)
    if cfg.label_smoothing == 0:
        return F.nll_loss(logp, target, ignore_index=PAD, reduction="sum")
    return F.cross_entropy(logp, target, ignore_index=PAD, label_smoothing=cfg.label_smoothing, reduction="sum")


def _packed_forward(net, src, tgt):
    """The batch without its padding: every example's real tokens end to end, each sequence
    attending only to itself (varlen_attention) -> (log-probs (Tt, V), targets (Tt,))."""
    src_lengths = (src != PAD).sum(1)
    tgt_lengths = src_lengths + 1  # BOS + answer in, answer + EOS out (tgt is BOS, answer, EOS, PAD...)
    real = torch.arange(tgt.size(1) - 1, device=tgt.device)[None, :] < tgt_lengths[:, None]
    return (net(src[src != PAD], tgt[:, :-1][real], src_lengths=src_lengths, tgt_lengths=tgt_lengths),
            tgt[:, 1:][real])


def _context_parallel_forward(net, src, tgt, group):
    """This rank's zigzag slices of the batch through the model -> (log-probs, targets) of its positions."""
    from .. import distributed as cpd

    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    shard = [cpd.zigzag_shard(t, dim=1, group=group, pad_value=PAD) for t in (src, tgt_in, tgt_out)]
    positions = [cpd.zigzag_positions(t.size(1), group=group, device=t.device) for t in (src, tgt_in)]
    return net(shard[0], shard[1], src_positions=positions[0], tgt_positions=positions[1]), shard[2]


def _write_outputs(out_dir: str, cfg: TrainConfig, summary: dict) -> None:
    with open(os.path.join(out_dir, "train_summary.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), **summary}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(summary["losses"]) + 1), summary["losses"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    acc = summary.get("accuracy")
    ax.set_title(f"{cfg.task} task" + (f", exact-sequence accuracy {acc:.1%}" if acc is not None else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "train_loss.png"), dpi=110)
    plt.close(fig)
