"""The training loop: Megatron-Core's pieces put together the way Megatron-LM's ``pretrain`` does.

Model chunks (one per virtual stage) -> Float16Module for bf16/fp16 -> Megatron-Core DDP -> Megatron
optimizer (AdamW; distributed optimizer on request; fp32 main params and loss scaling for fp16) ->
``OptimizerParamScheduler``. Each step runs ``get_forward_backward_func()`` (no pipelining, 1F1B, or
interleaved 1F1B when vpp > 1), steps the optimizer (which clips and returns the grad norm) and the
scheduler, and reports the DP-averaged loss. What this module adds on top is only the glue: data
position, eval with perplexity, metrics (progress bar, JSONL, TensorBoard, loss-curve PNG), checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from trainer import checkpoint as ckpt
from trainer import kernels
from trainer.config import TrainConfig, layout_of
from trainer.data import BatchPlan, pinned
from trainer.errors import TrainConfigError
from trainer.kernels import adamw, wgrad_first_write
from trainer.model import current_device
from trainer.optim import use_foreach_grad_ops, use_fused_adam
from trainer.step import GPTTrainStep


@dataclass
class TrainResult:
    """What a run reports back (identical on every rank)."""

    losses: list[float] = field(default_factory=list)  # per iteration, DP-averaged
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"iteration", "loss", "ppl"} (+ "acc", "sop_acc": encoders)
    iteration: int = 0
    consumed_samples: int = 0
    checkpoint: str | None = None
    tokens_per_s: float = 0.0
    tflops_per_gpu: float = 0.0
    mfu: float = 0.0
    peak_memory_gb: float = 0.0


def flops_per_token(tc, seq: int, vocab: int) -> float:
    """Model FLOPs per token for forward + backward (6 N + attention), Megatron-LM's accounting."""
    h, L = tc.hidden_size, tc.num_layers
    kv = (tc.num_query_groups or tc.num_attention_heads) * tc.kv_channels
    attn = h * (tc.num_attention_heads * tc.kv_channels + 2 * kv) + tc.num_attention_heads * tc.kv_channels * h
    mlp = h * tc.ffn_hidden_size * (3 if tc.gated_linear_unit else 2)
    return 6.0 * (L * (attn + mlp) + h * vocab) + 12.0 * L * h * seq


class Trainer:
    """One rank's view of a run. ``setup()`` builds everything; ``fit()`` trains; ``evaluate()`` evals.

    ``model_init(chunks)`` (optional) runs after the chunks are built and before DDP/optimizer wrap
    them (tests use it to give every layout the same weights). ``step`` is the (subclassable)
    :class:`GPTTrainStep`.
    """

    def __init__(self, cfg: TrainConfig, step: GPTTrainStep | None = None,
                 model_init: Callable | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.step = step  # None: the family's default step (trainer.steps.step_for), chosen in setup()
        self.model_init = model_init
        self.world_size = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        self._prefetched: tuple[int, list[dict]] | None = None  # (consumed samples, that step's micro-batches)
        self.prefetched_steps = 0  # steps that found their micro-batches gathered ahead (``pinned_batches``)

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from trainer.model import to_device
        from trainer.sources import build_model

        cfg = self.cfg
        self.layout = layout_of(cfg, self.world_size)
        self.built = build_model(cfg, self.world_size)
        if self.step is None:
            from trainer.steps import step_for

            self.step = step_for(self.built.model_config)
        if self.step.vocab_size is None:
            self.step.vocab_size = self.built.vocab_size
        chunks = self.built.chunks
        if self.model_init is not None:
            self.model_init(chunks)
        to_device(chunks)
        tc = self.built.config
        if cfg.mixed_precision in ("bf16", "fp16"):
            chunks = [Float16Module(tc, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(config=tc, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.gradient_clipping,
            bf16=cfg.mixed_precision == "bf16",
            fp16=cfg.mixed_precision == "fp16",
            params_dtype=tc.params_dtype,
            loss_scale=cfg.loss_scale,
            initial_loss_scale=2.0 ** 16 if cfg.mixed_precision == "fp16" else None,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        use_fused_adam(self.optimizer)  # torch's fused AdamW instead of the fallback's multi-tensor one
        use_foreach_grad_ops()  # grad norm / clipping in multi-tensor kernels instead of a host sync per tensor
        if kernels.adamw_kernel_on():
            # AdamW + clip scale + bf16 copy in one kernel per parameter (or per group of small ones)
            adamw.install(self.optimizer, multi_tensor=kernels.adamw_multi_tensor_on())
        decay = cfg.lr_decay_iters or cfg.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_iters,
            lr_decay_steps=max(decay, cfg.lr_warmup_iters + 1),
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.train_iters,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
            override_opt_param_scheduler=cfg.override_opt_param_scheduler,
        )
        tc.finalize_model_grads_func = finalize_model_grads
        if kernels.wgrad_first_write_on(tc) and all(wgrad_first_write.applies(m) for m in self.model):
            wgrad_first_write.install(self.model, tc)  # first fused wgrad GEMM writes; its range is not zeroed
        no_sync = [m.no_sync for m in self.model]
        tc.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if cfg.mixed_precision == "fp16":
            tc.grad_scale_func = self.optimizer.scale_loss
        self.tc = tc
        self.num_micro = cfg.micro_batches(self.world_size)
        self.plan = BatchPlan(cfg.micro_batch_size, self.num_micro, self.layout.dp,
                              parallel_state.get_data_parallel_rank())
        self.sources = self.step.build_sources(cfg, self.built, self.world_size)
        self.state = ckpt.TrainState()
        if cfg.load:
            resumed = ckpt.load(cfg, self.model, self.optimizer, self.scheduler, self._args())
            if resumed is not None:
                self.state = resumed
                use_fused_adam(self.optimizer)  # step counters of a checkpoint saved without it
        return self

    def _args(self):
        return ckpt.megatron_args(self.cfg, self.built, self.layout, self.state.iteration, self.state.consumed_samples)

    # ------------------------------------------------------------------ steps
    def _run_schedule(self, micro_batches: list[dict], forward_only: bool, step: GPTTrainStep | None = None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iters = [iter(micro_batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=(step or self.step).forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_sums(self, outputs: list[dict], keys: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        """``{key: (sum, micro-batches holding it)}`` over micro-batches and the DP group, on every rank."""
        from megatron.core import parallel_state

        total = torch.zeros(2 * len(keys), dtype=torch.float64, device=current_device())
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 and outputs:
            for i, key in enumerate(keys):
                held = [o[key] for o in outputs if key in o]
                total[2 * i] = float(sum(v.float().item() for v in held))
                total[2 * i + 1] = len(held)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return {key: (float(total[2 * i]), float(total[2 * i + 1])) for i, key in enumerate(keys)}

    def _reduce_loss(self, outputs: list[dict], key: str = "lm loss") -> float:
        """Mean over micro-batches and the DP group, delivered to every rank."""
        total, count = self._reduce_sums(outputs, (key,))[key]
        return total / count if count else float("nan")

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (loss, grad norm, lr)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = self._train_micro_batches(self.state.consumed_samples)
        outputs = self._run_schedule(micro, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        self.state.iteration += 1
        self.state.consumed_samples += self.plan.global_batch
        lr = self.optimizer.param_groups[0]["lr"]
        if kernels.pinned_batches_on() and self.state.iteration < self.cfg.train_iters:
            # the next step's samples gathered and pinned while the GPU finishes this step (the loss read below waits)
            self._prefetched = (self.state.consumed_samples, self._train_micro_batches(
                self.state.consumed_samples, pin=torch.cuda.is_available()))
        return self._reduce_loss(outputs, self.step.loss_key), float(grad_norm) if grad_norm is not None else float("nan"), lr

    def _train_micro_batches(self, consumed: int, pin: bool = False) -> list[dict]:
        """This rank's training micro-batches of the step starting at sample ``consumed`` (the prefetched ones when
        they are that step's), their tensors in pinned host memory when ``pin``."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == consumed:
            self.prefetched_steps += 1
            return prefetched[1]
        micro = self.plan.micro_batches(self.sources.train, consumed, wrap=len(self.sources.train))
        return [pinned(m) for m in micro] if pin else micro

    def evaluate(self) -> dict:
        """Forward-only loss over ``eval_iters`` global batches of the validation split, perplexity (of the
        ``lm loss`` metric when the step reports one: BERT's loss adds the binary head's) and, when the step
        counts them (:mod:`trainer.steps.accuracy`), masked-token accuracy ``acc`` and binary-head ``sop_acc``."""
        data = self.sources.valid
        if data is None or self.cfg.eval_iters < 1:
            return {}
        for m in self.model:
            m.eval()
        keys = (self.step.loss_key, "lm loss", "lm correct", "lm tokens", "sop correct", "sop samples")
        sums = {k: [0.0, 0.0] for k in keys}
        with torch.no_grad():
            for i in range(self.cfg.eval_iters):
                micro = self.plan.micro_batches(data, i * self.plan.global_batch, wrap=len(data))
                for key, (total, count) in self._reduce_sums(self._run_schedule(micro, forward_only=True), keys).items():
                    sums[key][0] += total
                    sums[key][1] += count
        for m in self.model:
            m.train()
        loss = sums[keys[0]][0] / sums[keys[0]][1]
        lm = sums["lm loss"][0] / sums["lm loss"][1] if sums["lm loss"][1] else loss
        out = {"iteration": self.state.iteration, "loss": loss, "ppl": math.exp(min(lm, 50.0))}
        for name, hits, seen in (("acc", "lm correct", "lm tokens"), ("sop_acc", "sop correct", "sop samples")):
            if sums[seen][0]:
                out[name] = sums[hits][0] / sums[seen][0]
        return out

    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits ``[b, s, vocab]`` of a batch on the last pipeline stage (None elsewhere),
        through ``interop.megatron_model.forward_logits`` (works at any TP/PP/VPP)."""
        from interop.megatron_model import forward_logits

        try:
            out = forward_logits(self.model, tokens, self.built.model_config)
        finally:
            for m in self.model:
                m.train()
        return None if out is None else out.cpu()

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult()
        main = (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0
        logger = MetricsLogger(cfg, main)
        tokens_per_iter = self.plan.global_batch * cfg.seq_length
        fpt = flops_per_token(self.tc, cfg.seq_length, self.built.padded_vocab_size)
        gpus = self.world_size if torch.cuda.is_available() else 0
        start_iter = self.state.iteration
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True)
        t_total, tokens_total = 0.0, 0
        while self.state.iteration < cfg.train_iters:
            t0 = time.perf_counter()
            loss, grad_norm, lr = self.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if self.state.iteration - start_iter > 1 or cfg.train_iters - start_iter == 1:  # skip warm-up step
                t_total += dt
                tokens_total += tokens_per_iter
            result.losses.append(loss)
            result.grad_norms.append(grad_norm)
            result.lrs.append(lr)
            it = self.state.iteration
            tps = tokens_per_iter / dt
            record = {"iteration": it, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tps, "consumed_samples": self.state.consumed_samples,
                      "memory_gb": peak_memory_gb()}
            if gpus:
                record["tflops_per_gpu"] = tps * fpt / gpus / 1e12
                record["mfu"] = record["tflops_per_gpu"] / cfg.peak_tflops
            if it % cfg.log_interval == 0 or it == cfg.train_iters:
                logger.log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.3f}", tok_s=f"{tps:.0f}")
            if cfg.eval_interval and it % cfg.eval_interval == 0:
                ev = self.evaluate()
                if ev:
                    result.evals.append(ev)
                    logger.log({"eval_" + k if k != "iteration" else k: v for k, v in ev.items()})
            if cfg.save and cfg.save_interval and it % cfg.save_interval == 0 and it != cfg.train_iters:
                result.checkpoint = self.save()
        if bar is not None:
            bar.close()
        if cfg.save and self.state.iteration > start_iter and result.checkpoint != ckpt.iter_dir(cfg.save, self.state.iteration):
            result.checkpoint = self.save()
        result.iteration = self.state.iteration
        result.consumed_samples = self.state.consumed_samples
        if t_total > 0:
            result.tokens_per_s = tokens_total / t_total
            if gpus:
                result.tflops_per_gpu = result.tokens_per_s * fpt / gpus / 1e12
                result.mfu = result.tflops_per_gpu / cfg.peak_tflops
        result.peak_memory_gb = peak_memory_gb()
        logger.close(result)
        return result

    def save(self) -> str:
        return ckpt.save(self.cfg, self.model, self.optimizer, self.scheduler, self.state, self._args(),
                         side_files=self.built.side_files)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard when asked) on the main rank, and a loss-curve PNG at the end."""

    def __init__(self, cfg: TrainConfig, main: bool):
        self.cfg, self.main = cfg, main
        self.dir = cfg.log_directory()
        self.fh = None
        self.tb = None
        if not main:
            return
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            self.fh = open(os.path.join(self.dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainConfigError("tensorboard_dir is set but the tensorboard package is not installed") from None
            self.tb = SummaryWriter(cfg.tensorboard_dir)
        self.rows: list[dict] = []

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.rows.append(record)
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        if self.tb:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("eval_", "eval/"), value, record["iteration"])

    def close(self, result: TrainResult) -> None:
        if not self.main:
            return
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()
        if self.dir and self.cfg.plot and result.losses:
            rows = self.rows
            if self.fh:  # the whole log: a resumed run's curve starts where the first run began
                with open(os.path.join(self.dir, "metrics.jsonl"), encoding="utf-8") as fh:
                    rows = [json.loads(line) for line in fh if line.strip()]
            plot_losses(rows, os.path.join(self.dir, "loss.png"))


def plot_losses(rows: list[dict], path: str) -> None:
    """Training (and eval) loss against iteration, written atomically (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        import sys

        print("note: matplotlib is not installed (pip install 'megatron-interop[plot]'): no loss.png",
              file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["iteration"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path + f".tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):  # a failed or interrupted write leaves no temporary behind
            os.remove(tmp)
