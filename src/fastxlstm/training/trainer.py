"""The training loop: pretraining and fine-tuning on one device or many (torchrun + FSDP2)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import XLSTMConfig, preset
from . import checkpointing
from .chat_data import is_chat_data, load_documents
from .config import TrainConfig
from .data import TokenShards
from .distributed import DistEnv, all_reduce_max, all_reduce_mean, barrier, cleanup, model_blocks, setup, shard
from .export import export
from .flops import flops_per_token, peak_flops
from .llama import LlamaConfig, build_llama
from .loader import IGNORE_INDEX, DocumentSampler, WindowSampler, eval_batches, eval_documents
from .optim import build_optimizer, lr_at

METRICS_FIELDS = ["step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "elapsed_s"]
EVAL_FIELDS = ["step", "tokens", "val_loss", "val_ppl"]
LONG_RUN_S = 3600  # warn when the measured step time puts the rest of the run above this


def model_config(cfg: TrainConfig, data: TokenShards) -> tuple[XLSTMConfig, Any]:
    """The xLSTM config to train (from a preset or a fine-tuning directory) and, for the
    Llama baseline, the matching Llama config."""
    mc = cfg.model
    if mc.init_from:
        xcfg = XLSTMConfig.from_json(Path(mc.init_from) / "config.json")
        if mc.overrides:
            raise ValueError("model.overrides cannot be combined with model.init_from (the architecture is fixed)")
    else:
        overrides = dict(mc.overrides)
        overrides.setdefault("vocab_size", data.vocab_size)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if data.meta.get(key) is not None:
                overrides.setdefault(key, data.meta[key])
        # A preset plus overrides, or (preset: null) the XLSTMConfig defaults plus overrides.
        xcfg = preset(mc.preset, **overrides) if mc.preset else XLSTMConfig(**overrides)
    if data.vocab_size > xcfg.vocab_size:
        raise ValueError(f"data was tokenised with {data.vocab_size} tokens but the model has vocab_size "
                         f"{xcfg.vocab_size}")
    if mc.arch == "xlstm":
        return xcfg, xcfg
    if mc.arch == "llama":
        if mc.init_from:
            raise ValueError("model.init_from loads xLSTM directories; the llama baseline trains from scratch")
        return xcfg, LlamaConfig.matching(xcfg)
    raise ValueError(f"model.arch must be xlstm or llama, got {mc.arch!r}")


def build(cfg: TrainConfig, arch_cfg: Any, device: torch.device, base_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model to train. With ``model.lora.r > 0``: the base in ``base_dtype`` (the 'single'
    layout), frozen, with float32 LoRA weights on the target projections."""
    from ..model import build_model
    from ..model.lora import LoRAConfig, apply_lora

    seed, lora = cfg.train.seed, cfg.model.lora
    if isinstance(arch_cfg, LlamaConfig):
        if lora.r:
            raise ValueError("model.lora applies to xLSTM models; the llama baseline trains every parameter")
        return build_llama(arch_cfg, device=device, seed=seed)
    dtype = base_dtype if lora.r else torch.float32
    if cfg.model.init_from:
        from ..checkpoint import load

        model = load(cfg.model.init_from, device=device, dtype=dtype, weight_mode="single" if lora.r else None)
    else:
        model = build_model(arch_cfg.replace(weight_mode="single") if lora.r else arch_cfg, device=device,
                            dtype=dtype, seed=seed)
    if lora.r:
        apply_lora(model, LoRAConfig(**dataclasses.asdict(lora)), seed=seed)
    model.train()
    return model


class CSVLog:
    """Append-only CSV. On resume the rows up to the checkpoint's step stay as they are (never rewritten)
    and new rows are appended after them: the rows of steps that will be run again, and a half-written
    last line, are cut off by truncating the file. A fresh run, or a file with other columns (moved to
    ``<name>.old``), starts a new file."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path, self.fields = path, fields
        keep = self._rows_end(resume_step) if resume_step is not None and path.exists() else None
        if keep is not None:
            os.truncate(path, keep)
            return
        if path.exists() and resume_step is not None:
            os.replace(path, path.with_name(path.name + ".old"))
            tqdm.write(f"{path} has other columns; moved to {path.name}.old")
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writeheader()
        os.replace(tmp, path)

    def _rows_end(self, step: int) -> int | None:
        """Byte offset after the last complete row with ``step`` <= the given one (None: other header)."""
        with self.path.open("rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        if not lines or next(csv.reader([lines[0].decode(errors="replace")]), []) != self.fields:
            return None
        end = len(lines[0])
        for line in lines[1:]:
            row = next(csv.reader([line.decode(errors="replace")]), [])
            if not line.endswith(b"\n") or len(row) != len(self.fields) or not row[0].isdigit() or int(row[0]) > step:
                break
            end += len(line)
        return end

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerows(rows)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.env: DistEnv = setup(cfg.train.device)
        env = self.env
        if not cfg.data.path:
            raise ValueError("data.path is not set (a directory written by `fastxlstm data prepare`)")
        self.data = TokenShards(cfg.data.path)
        self.xcfg, self.arch_cfg = model_config(cfg, self.data)
        prec = cfg.train.precision
        if prec not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, got {prec!r}")
        self.bf16 = prec == "bf16" or (prec == "auto" and env.device.type == "cuda")
        self.out = Path(cfg.out_dir)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
        barrier()

        model = build(cfg, self.arch_cfg, torch.device("cpu") if env.distributed else env.device,
                      torch.bfloat16 if self.bf16 else torch.float32)
        model.set_backend(cfg.model.backend)
        # Token ids are validated once against the data's vocabulary (model_config); skip the
        # per-forward check, which would synchronise host and device at every micro-step.
        if hasattr(model, "check_input_ids"):
            model.check_input_ids = lambda ids: None  # type: ignore[method-assign]
        model.gradient_checkpointing = cfg.train.activation_checkpointing
        self.n_params = model.num_parameters()
        self.n_trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        # dropout (LoRA's) draws from torch's RNG: seeded per micro-step so that resume stays exact
        self.reseed = cfg.model.lora.r > 0 and cfg.model.lora.dropout > 0
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len)
        if cfg.train.compile:
            for block in model_blocks(model):
                block.compile()
        if env.distributed:
            model = shard(model, env, self.bf16)
        self.model = model
        self.optimizer = build_optimizer(
            model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), cfg.optim.eps,
            fused=True if (env.device.type == "cuda" and not env.distributed) else None,
        )
        self.chat = is_chat_data(self.data)  # chat/instruct documents with loss masks, else plain windows
        self.pad_id = self.data.meta.get("pad_token_id") or 0
        batching = (cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum, env.world_size, env.rank,
                    cfg.train.seed)
        self.sampler = (DocumentSampler(load_documents(self.data, cfg.data.train_split), *batching, pad_id=self.pad_id)
                        if self.chat else WindowSampler(self.data.split(cfg.data.train_split), *batching))
        self.peak = peak_flops(env.device, cfg.log.peak_tflops)
        self.tokens_per_step = self.sampler.global_batch_size * cfg.data.seq_len  # chat data: at most this
        name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        self.devices = f"{env.world_size} x {name}" + (" (FSDP2)" if env.distributed else "")
        self.stop_signal: int | None = None

    def describe(self) -> str:
        """The start-up summary: what trains, how much per step, on what, in what precision, where it writes."""
        cfg, tc, mc = self.cfg, self.cfg.train, self.cfg.model
        source = (f"from {mc.init_from}" if mc.init_from else f"preset {mc.preset}" if mc.preset
                  else "XLSTMConfig defaults") + (f" + {dict(mc.overrides)}" if mc.overrides else "")
        precision = ("bf16 compute, fp32 master weights" + (" (FSDP2 mixed precision)" if self.env.distributed
                                                            else " (autocast)")) if self.bf16 else "fp32"
        every = cfg.checkpoint.every
        export_dir, merged = self.export_dirs()
        lora = (f" (LoRA r={mc.lora.r}: {self.n_trainable:,} trained, the base frozen)" if mc.lora.r else "")
        return "\n".join([
            f"train: {mc.arch} {source}: {self.n_params:,} parameters{lora}",
            f"train: {self.tokens_per_step:,} tokens per step ({tc.micro_batch_size} sequences x {cfg.data.seq_len} "
            f"tokens x {tc.grad_accum} accumulation x {self.env.world_size} process(es)), {tc.steps:,} steps = "
            f"{tc.steps * self.tokens_per_step:,} tokens",
            f"train: devices {self.devices}, precision {precision}, backend {mc.backend}",
            f"train: writes {self.out}/ (metrics.csv, eval.csv, checkpoints/ "
            + (f"every {every} steps" if every > 0 else "only on SIGTERM/Ctrl-C")
            + (f", export to {export_dir}" + (f" and merged to {merged}" if merged else "") if cfg.export.enabled
               else "") + ")",
        ])

    def export_dirs(self) -> tuple[Path, Path | None]:
        """Where the export goes (a LoRA run: the PEFT adapter) and, for a LoRA run with ``export.merged``,
        the merged HF directory."""
        cfg = self.cfg
        lora = cfg.model.lora.r > 0
        export_dir = Path(cfg.export.dir) if cfg.export.dir else self.out / ("adapter" if lora else "final")
        return export_dir, (self.out / "final" if lora and cfg.export.merged else None)

    @contextlib.contextmanager
    def _checkpoint_on_signals(self):
        """SIGTERM and SIGINT (Ctrl-C) let the current step finish, then write a checkpoint and exit with
        128 + the first signal's number; a Ctrl-C while stopping stops at once (KeyboardInterrupt). More
        SIGTERMs change nothing (torchrun's agent sends its workers two)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self.stop_signal = signum
            tqdm.write(f"{signal.Signals(signum).name}: writing a checkpoint after this step, then stopping "
                       "(Ctrl-C to stop at once)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_requested(self, done: int, is_log_step: bool) -> int:
        """The signal to stop on, agreed by all ranks (in a sharded run only at log steps, which sync anyway)."""
        if not self.env.distributed:
            return self.stop_signal or 0
        return all_reduce_max(self.stop_signal or 0, self.env.device) if is_log_step else 0

    def _warn_if_long(self, per_step: float, remaining: int) -> None:
        if per_step * remaining > LONG_RUN_S:
            tqdm.write(f"warning: at {per_step:.2f} s per step on {self.devices}, the remaining {remaining:,} steps "
                       f"take about {per_step * remaining / 3600:.1f} h (evaluation and checkpoints not counted)")

    def _sync_time(self) -> float:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.bf16 and not self.env.distributed:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over the labels that are trained (``IGNORE_INDEX`` ones are not)."""
        with self.autocast():
            logits, _ = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg, env = self.cfg, self.env
        self.model.eval()
        sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # summed loss, trained labels
        args = (cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.tokens, env.world_size, env.rank)
        batches = (eval_documents(load_documents(self.data, cfg.data.val_split), *args, pad_id=self.pad_id)
                   if self.chat else eval_batches(self.data.split(cfg.data.val_split), *args))
        try:
            for x, y in batches:
                y = y.to(env.device)
                sums[0] += self.micro_loss(x.to(env.device), y).double()
                sums[1] += (y != IGNORE_INDEX).sum()
        finally:
            self.model.train()
        sums = all_reduce_mean(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    def _save(self, step: int, tokens: int) -> None:
        checkpointing.save(self.out / "checkpoints", step, self.model, self.optimizer, self.env,
                           {"tokens": tokens, "world_size": self.env.world_size}, keep=self.cfg.checkpoint.keep,
                           checksums=self.cfg.checkpoint.checksums)

    # --------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        with self._checkpoint_on_signals():
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg, env, model = self.cfg, self.env, self.model
        oc, tc = cfg.optim, cfg.train
        start_step, tokens = 0, 0
        resume_from = checkpointing.find_resume_point(self.out / "checkpoints", env) if cfg.checkpoint.resume else None
        if resume_from is not None:
            state = checkpointing.load(resume_from, model, self.optimizer)
            start_step, tokens = int(state["step"]), int(state["tokens"])
        metrics = evals = tb = None
        if env.is_main:
            resume_step = start_step if resume_from is not None else None
            metrics = CSVLog(self.out / "metrics.csv", METRICS_FIELDS, resume_step)
            evals = CSVLog(self.out / "eval.csv", EVAL_FIELDS, resume_step)
            if cfg.log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    tb = SummaryWriter(str(self.out / "tensorboard"))
                except ImportError:
                    tqdm.write("tensorboard is not installed; logging to CSV only")
        bar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step",
                   disable=not (env.is_main and cfg.log.progress), dynamic_ncols=True)
        if env.is_main:
            tqdm.write(self.describe())
        if env.is_main and resume_from is not None:
            tqdm.write(f"resumed from {resume_from} (step {start_step})")
        pending: list[tuple[int, torch.Tensor, torch.Tensor, float, int]] = []
        rates: list[float] = []
        t_start = t_flush = time.perf_counter()
        tokens_at_flush = tokens
        last_val: float | None = None
        best: tuple[float, int] | None = None
        t_probe = 0.0
        model.train()

        def flush() -> None:
            nonlocal t_flush, tokens_at_flush
            if not pending:
                return
            losses = all_reduce_mean(torch.stack([p[1] for p in pending]))
            norms = torch.stack([p[2] for p in pending])
            values = torch.stack([losses, norms]).tolist()  # one device sync per flush
            now = time.perf_counter()
            rate = (tokens - tokens_at_flush) / max(now - t_flush, 1e-9)
            rates.append(rate)
            mfu = rate * self.flops_per_token / (self.peak * env.world_size) if self.peak else None
            rows = [
                {"step": s, "loss": f"{lv:.6f}", "grad_norm": f"{gv:.6f}", "lr": f"{lr:.6e}", "tokens": tok,
                 "tokens_per_s": f"{rate:.1f}", "mfu": "" if mfu is None else f"{mfu:.4f}",
                 "elapsed_s": f"{now - t_start:.2f}"}
                for (s, _, _, lr, tok), lv, gv in zip(pending, values[0], values[1])
            ]
            if metrics is not None:
                metrics.write(rows)
                if tb is not None:
                    for r in rows:
                        for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
                            tb.add_scalar(f"train/{key}", float(r[key]), r["step"])
                        if r["mfu"]:
                            tb.add_scalar("train/mfu", float(r["mfu"]), r["step"])
            last = rows[-1]
            bar.set_postfix(loss=last["loss"], lr=last["lr"], tok_s=f"{rate:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
            pending.clear()
            t_flush, tokens_at_flush = now, tokens

        for step in range(start_step, tc.steps):
            lr = lr_at(step, lr=oc.lr, total_steps=tc.steps, warmup_steps=oc.warmup_steps, schedule=oc.schedule,
                       min_lr_ratio=oc.min_lr_ratio, decay_fraction=oc.decay_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_acc = torch.zeros((), device=env.device)
            # mean over the step's trained labels on all ranks (FSDP averages gradients over ranks)
            denom = self.sampler.targets(step) / env.world_size
            for micro in range(tc.grad_accum):
                x, y = self.sampler.batch(step, micro)
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                if env.distributed:
                    model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
                if self.reseed:
                    seq = np.random.SeedSequence([tc.seed, step, micro, env.rank])
                    torch.manual_seed(int(seq.generate_state(1)[0]))
                loss = self.micro_loss(x, y) / denom
                loss.backward()
                loss_acc += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip if oc.grad_clip > 0 else math.inf)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += self.sampler.tokens(step)
            done = step + 1
            pending.append((done, loss_acc, norm.detach(), lr, tokens))
            bar.update(1)
            is_last = done == tc.steps
            if done % max(1, cfg.log.every) == 0 or is_last:
                flush()
            if cfg.eval.every > 0 and (done % cfg.eval.every == 0 or is_last):
                flush()
                last_val = self.evaluate()
                if evals is not None:
                    ppl = math.exp(min(last_val, 50))
                    evals.write([{"step": done, "tokens": tokens, "val_loss": f"{last_val:.6f}",
                                  "val_ppl": f"{ppl:.4f}"}])
                    if tb is not None:
                        tb.add_scalar("eval/loss", last_val, done)
                    tqdm.write(f"step {done}: held-out loss {last_val:.4f} (ppl {ppl:.2f})")
                if cfg.eval.keep_best and (best is None or last_val < best[0]):
                    best = (last_val, done)
                    export(model, env, self.out / "best", self.data.tokenizer_dir, cfg.export.dtype,
                           base_model=cfg.model.init_from)
                    if env.is_main:
                        (self.out / "best" / "best_step.json").write_text(
                            json.dumps({"step": done, "tokens": tokens, "val_loss": last_val}) + "\n")
                t_flush, tokens_at_flush = time.perf_counter(), tokens  # evaluation is not training throughput
            saved = cfg.checkpoint.every > 0 and (done % cfg.checkpoint.every == 0 or is_last)
            if saved:
                flush()
                self._save(done, tokens)
                t_flush, tokens_at_flush = time.perf_counter(), tokens
            if env.is_main and done - start_step == 1:  # step 1 warms up; steps 2-3 are timed
                t_probe = self._sync_time()
            elif env.is_main and done - start_step == 3:
                self._warn_if_long((self._sync_time() - t_probe) / 2, tc.steps - done)
            signum = self._stop_requested(done, done % max(1, cfg.log.every) == 0 or is_last)
            if signum:
                flush()
                if not saved:
                    self._save(done, tokens)
                if env.is_main:
                    tqdm.write(f"stopped by {signal.Signals(signum).name} after step {done}; checkpoint in "
                               f"{self.out / 'checkpoints'}; the same command resumes")
                bar.close()
                raise SystemExit(128 + signum)
            if tc.debug_kill_at_step is not None and done == tc.debug_kill_at_step:
                flush()
                os.kill(os.getpid(), signal.SIGKILL)
        flush()
        bar.close()
        wall = time.perf_counter() - t_start
        summary: dict[str, Any] = {
            "arch": cfg.model.arch, "parameters": self.n_params, "trainable_parameters": self.n_trainable,
            "steps": tc.steps, "tokens": tokens,
            "world_size": env.world_size, "device": torch.cuda.get_device_name(env.device)
            if env.device.type == "cuda" else "cpu",
            "final_val_loss": last_val, "final_val_ppl": math.exp(last_val) if last_val is not None else None,
            "tokens_per_s": _steady(rates), "wall_s": wall, "flops_per_token": self.flops_per_token,
        }
        if best is not None:
            summary.update(best_val_loss=best[0], best_step=best[1], best_dir=str(self.out / "best"))
        if self.peak and summary["tokens_per_s"]:
            summary["mfu"] = summary["tokens_per_s"] * self.flops_per_token / (self.peak * env.world_size)
        if cfg.export.enabled:
            export_dir, merged = self.export_dirs()
            export(model, env, export_dir, self.data.tokenizer_dir, cfg.export.dtype, merged, cfg.model.init_from)
            summary["export_dir"] = str(export_dir)
            if merged is not None:
                summary["merged_dir"] = str(merged)
        if env.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if tb is not None:
                tb.close()
        return summary


def _steady(rates: list[float]) -> float | None:
    """Median tokens/s over log intervals, the first (warm-up, compilation) left out when possible."""
    if not rates:
        return None
    r = sorted(rates[1:] if len(rates) > 2 else rates)
    return r[len(r) // 2]


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train with ``cfg`` in this process (one of ``torchrun``'s, or the only one)."""
    try:
        result = Trainer(cfg).train()
    except BaseException:
        cleanup(synchronize=False)
        raise
    cleanup()
    return result
