"""The domain-free training loop shared by molecular assembly and image generation.

``Trainer`` runs AdamW with linear warm-up + cosine decay, gradient clipping, an EMA of the weights, a guard that
skips non-finite steps, JSONL/CSV (and TensorBoard, if installed) logs, and atomic, resumable checkpoints.
Launched with ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPU): ``batch_size`` is
per process, the global batch is ``batch_size × world_size``.

Determinism: the data order is a permutation seeded by (seed, epoch), and the global RNG is re-seeded from
(seed, step) before every step, so a W-process run sees the same global batches (and, with ``sample_batch_times``,
the same flow times) as one process with the global batch. Bit-identical weights across runs and across an
interruption + resume need ``deterministic=True`` on CPU: multi-threaded reductions (scatter sums, matrix
products) add in an order that depends on thread scheduling, so two uninterrupted runs with several threads
already differ in the last bits (~1e-7). ``deterministic=True`` trains on one thread with torch's deterministic
algorithms. The LR schedule is a function of ``max_steps``; resuming with another ``max_steps`` changes the curve
from then on, which the trainer says in a warning.

Safety: checkpoints are read with ``torch.load(weights_only=True)``, so a crafted file cannot run code; they hold
only tensors and plain Python values (the RNG states included).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from kflow.core import distributed as dist_utils
from kflow.core.training.checkpoints import (CHECKPOINT_KIND, RUN_LOCK, ConfigMismatchError, Resume, atomic_copy,
                                            check_fresh_run_folder, data_identity, load_weights, numpy_rng_state,
                                            read_checkpoint, set_numpy_rng_state, unwrap_model)
from kflow.core.training.optim import (STEP_SEED_STRIDE, EpochBatchSampler, ExponentialMovingAverage,
                                      cosine_with_warmup)
from kflow.utils.io import FolderLock, atomic_save, atomic_write_text, check_writable_folder, loads_json, name_the_file


__all__ = ["Trainer", "NON_STRUCTURAL_KEYS"]


PROGRESS_REFRESH_S = 0.5  # progress-bar redraw interval on a terminal ...
PROGRESS_REFRESH_S_LOG_FILE = 15.0  # ... and when stderr goes to a log file
NON_STRUCTURAL_KEYS = {"max_steps", "steps", "epochs", "out_dir", "out", "checkpoint_every", "log_every",
                       "progress", "resume", "num_workers", "eval_every", "keep_checkpoints", "device",
                       "accepted_changes"}


def _check_positive(**values):
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


class _determinism:
    """Context: one torch thread and deterministic algorithms while active (``enabled``), restored after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            self.threads = torch.get_num_threads()
            self.algorithms = torch.are_deterministic_algorithms_enabled()
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_num_threads(self.threads)
            torch.use_deterministic_algorithms(self.algorithms)


def _structural(config: dict, keys: Sequence[str] | None) -> dict:
    if keys is not None:
        return {k: config.get(k) for k in keys}
    return {k: v for k, v in config.items() if k not in NON_STRUCTURAL_KEYS}


class Trainer:
    """Train ``model`` by minimising ``loss_fn(model, batch) -> (loss, metrics)`` over ``dataset``.

    Args:
        model: the network (moved to the device; wrapped in DDP when distributed).
        loss_fn: returns a scalar loss and a dict of floats to log.
        dataset: indexable dataset; ``collate_fn`` turns a list of items into a batch (a batch with a ``to``
            method, or a tensor / dict of tensors, is moved to the device).
        batch_size: per process. lr, weight_decay, betas: AdamW. warmup_steps, min_lr_ratio: LR schedule.
        max_steps: total optimizer steps. grad_clip: max global grad norm (None: no clipping).
        ema_decay: EMA decay (None: no EMA).
        out_dir: run folder (checkpoints/, metrics.jsonl, metrics.csv, config.json).
        checkpoint_every, keep_checkpoints, log_every: cadence; the final step is always checkpointed.
        config: the run configuration saved in checkpoints; resuming with a different structural config
            (all keys but ``NON_STRUCTURAL_KEYS``, or only ``structural_keys``) raises ``ConfigMismatchError``.
        max_bad_steps: abort after this many consecutive non-finite steps.
        eval_fn: optional ``eval_fn(ema_or_model, step) -> dict`` run every ``eval_every`` steps on rank 0.
        overwrite: start a fresh run in a folder that holds another run's checkpoints (they are deleted);
            without it, ``fit()`` without ``resume`` refuses such a folder (``RunExistsError``).
        deterministic: bit-identical results across runs and resumes on CPU (one thread, deterministic
            algorithms, for the duration of ``fit``).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, *, collate_fn: Callable | None = None,
                 batch_size: int, lr: float, max_steps: int, out_dir: str | os.PathLike, config: dict | None = None,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), warmup_steps: int = 0, min_lr_ratio: float = 0.05,
                 grad_clip: float | None = 1.0, ema_decay: float | None = 0.999, checkpoint_every: int = 500,
                 keep_checkpoints: int = 3, log_every: int = 10, seed: int = 0,
                 structural_keys: Sequence[str] | None = None, num_workers: int = 0, device=None,
                 progress: bool = True, max_bad_steps: int = 20, eval_fn: Callable | None = None,
                 eval_every: int | None = None, overwrite: bool = False, deterministic: bool = False,
                 normalize_config: Callable[[dict], dict] | None = None):
        _check_positive(batch_size=batch_size, max_steps=max_steps, checkpoint_every=checkpoint_every,
                        keep_checkpoints=keep_checkpoints, log_every=log_every, lr=lr, max_bad_steps=max_bad_steps)
        if eval_every is not None:
            _check_positive(eval_every=eval_every)
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty (check the split and the data path)")
        check_writable_folder(out_dir)  # a file or a read-only place: one line now, not an OSError mid-run
        default_device = dist_utils.setup_distributed()  # joins the torchrun group even when device is given
        self.device = torch.device(device) if device is not None else default_device
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        self.model = model.to(self.device)
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss_fn, self.dataset, self.collate_fn = loss_fn, dataset, collate_fn
        self.batch_size, self.max_steps, self.seed = batch_size, max_steps, seed
        self.out_dir = Path(out_dir)
        self.config = dict(config or {})
        self.structural_keys = structural_keys
        # Maps a recorded configuration onto its canonical form before a resume compares it (e.g. filling fields
        # added since it was written with the defaults they had), so equal configurations compare equal.
        self.normalize_config = normalize_config or (lambda c: c)
        self.grad_clip, self.max_bad_steps = grad_clip, max_bad_steps
        self.checkpoint_every, self.keep_checkpoints, self.log_every = checkpoint_every, keep_checkpoints, log_every
        self.num_workers, self.progress = num_workers, progress
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.overwrite, self.deterministic, self.min_lr_ratio = overwrite, deterministic, min_lr_ratio
        self.optimizer = torch.optim.AdamW(unwrap_model(self.model).parameters(), lr=lr, betas=betas,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, max_steps, warmup_steps, min_lr_ratio))
        self.ema = ExponentialMovingAverage(unwrap_model(self.model), ema_decay) if ema_decay else None
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, self.rank, self.world_size)
        self.step, self.skipped_steps, self.bad_in_a_row = 0, 0, 0
        self.resumed_from: int | None = None
        self.data_identity = data_identity(dataset)
        self.accepted_changes: list[dict] = []  # changes a resume was told to accept (``Resume.accept_changes``)
        self._tb, self._csv_keys = None, None

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def state_dict(self) -> dict:
        import kflow

        return {"kind": CHECKPOINT_KIND, "kflow_version": kflow.__version__, "step": self.step,
                "model": unwrap_model(self.model).state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped_steps, "config": self.config, "seed": self.seed,
                "data_identity": self.data_identity, "accepted_changes": self.accepted_changes,
                "world_size": self.world_size, "batch_size": self.batch_size,
                # Data position (derivable from step; stored so a checkpoint can be inspected on its own).
                "epoch": self.step // self.sampler.steps_per_epoch,
                "batch_in_epoch": self.step % self.sampler.steps_per_epoch,
                "max_steps": self.max_steps,
                "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate()}}

    def save_checkpoint(self) -> Path | None:
        if not dist_utils.is_main_process():
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        state = self.state_dict()
        path = self.checkpoint_dir / f"step_{self.step:07d}.pt"
        atomic_save(state, path)
        atomic_copy(path, self.checkpoint_dir / "last.pt")
        old = sorted(self.checkpoint_dir.glob("step_*.pt"))[:-self.keep_checkpoints]
        for p in old:
            p.unlink(missing_ok=True)
        return path

    def _remove_stale_temporaries(self) -> None:
        """Temporary checkpoint files (``.step_*.pt.tmp-*``, ``.last.pt.tmp-*``) that a killed run left: this
        process holds the run lock, so no other writer can own them."""
        for tmp in self.checkpoint_dir.glob(".*.pt.tmp-*"):
            tmp.unlink(missing_ok=True)

    def latest_checkpoint(self) -> Path | None:
        last = self.checkpoint_dir / "last.pt"
        return last if last.exists() else None

    def _identity_changes(self, state: dict) -> list[str]:
        """What a resume would change besides the model configuration: the seed (initialisation and data order)
        and the data set's identity (content key, start preset). A checkpoint that predates a record counts as
        unchanged for it."""
        changes = []
        if state.get("seed") is not None and state["seed"] != self.seed:
            changes.append(f"seed: checkpoint {state['seed']!r} vs now {self.seed!r}")
        saved, now = state.get("data_identity"), self.data_identity
        if isinstance(saved, dict) and now is not None:
            changes += [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                        if saved.get(k) != now.get(k)]
        return changes

    def load_state(self, path: str | os.PathLike, accept_changes: bool = False):
        state = read_checkpoint(path, map_location=self.device)
        saved = _structural(self.normalize_config(dict(state.get("config", {}))), self.structural_keys)
        current = _structural(self.normalize_config(dict(self.config)), self.structural_keys)
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff[:6])
            raise ConfigMismatchError(f"{path}: cannot resume with a different configuration ({details})")
        self.accepted_changes = list(state.get("accepted_changes") or [])
        changes = self._identity_changes(state)
        if changes and not accept_changes:
            raise ConfigMismatchError(f"{path}: cannot resume with another seed or data set ({'; '.join(changes)}): "
                                      "it would train on other data than the checkpoint did; use the same "
                                      "settings, or --accept-changes to continue anyway (recorded in the run)")
        if changes:
            self.accepted_changes.append({"step": state["step"], "changes": changes})
            warnings.warn(f"{path}: resuming with {'; '.join(changes)} (accepted, recorded in config.json)",
                          stacklevel=2)
        if state.get("world_size", 1) * state.get("batch_size", self.batch_size) != self.world_size * self.batch_size:
            raise ConfigMismatchError(f"{path}: global batch was {state.get('world_size')}×{state.get('batch_size')}, "
                                      f"now {self.world_size}×{self.batch_size}; the data order would change")
        load_weights(unwrap_model(self.model), state["model"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.resumed_from = self.step
        torch.set_rng_state(state["rng"]["torch"].cpu())
        set_numpy_rng_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        planned = state.get("max_steps")
        # (a constant LR after the warm-up does not depend on the planned length: nothing changes then)
        if planned is not None and planned != self.max_steps and self.step < self.max_steps and \
                self.min_lr_ratio != 1.0:
            warnings.warn(f"{path}: the learning-rate schedule was planned for {planned} steps and now runs to "
                          f"{self.max_steps}; from step {self.step} on it follows another curve than an "
                          f"uninterrupted run of either length", stacklevel=2)
        self._truncate_logs(self.step)

    # ------------------------------------------------------------------------------------------ logging
    def _truncate_logs(self, step: int):
        """After a resume, drop log lines written after the checkpoint (a crash may have left some)."""
        if not dist_utils.is_main_process():
            return
        jsonl = self.out_dir / "metrics.jsonl"
        if jsonl.exists():
            records = []
            for ln in jsonl.read_text().splitlines():
                try:
                    records.append(loads_json(ln))
                except json.JSONDecodeError:  # a line torn by the crash that made us resume (or damaged)
                    continue
            kept = [r for r in records if isinstance(r, dict) and r.get("step", step + 1) <= step]
            atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in kept))
            self._rewrite_csv([r for r in kept if "loss" in r])
            self._csv_keys = None

    def _rewrite_csv(self, records: list[dict]):
        if not records:
            (self.out_dir / "metrics.csv").unlink(missing_ok=True)
            return
        keys = list(records[0])
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in records]
        atomic_write_text(self.out_dir / "metrics.csv", "\n".join(lines) + "\n")

    def _log(self, record: dict):
        if not dist_utils.is_main_process():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.out_dir / "metrics.jsonl"
        try:
            with open(jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk found at write or close: say which log
            raise name_the_file(err, jsonl)
        csv_path = self.out_dir / "metrics.csv"
        if self._csv_keys is None:  # columns fixed by the first record (or the existing file after a resume)
            if csv_path.exists():
                with open(csv_path, newline="") as f:
                    self._csv_keys = next(csv.reader(f), None)
            if not self._csv_keys:
                self._csv_keys = list(record)
                atomic_write_text(csv_path, ",".join(self._csv_keys) + "\n")
        if all(k in self._csv_keys for k in record):  # evaluation records go to the JSONL log only
            try:
                with open(csv_path, "a") as f:
                    f.write(",".join(str(record.get(k, "")) for k in self._csv_keys) + "\n")
            except OSError as err:
                raise name_the_file(err, csv_path)
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # TensorBoard is optional
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    # ------------------------------------------------------------------------------------------ training
    def _batches(self):
        """Yield this rank's batches from the current step on, across epochs, in deterministic order."""
        from torch.utils.data import DataLoader

        while True:
            epoch, position = divmod(self.step, self.sampler.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):  # e.g. training starts redrawn every epoch, seeded by epoch
                self.dataset.set_epoch(epoch)
            remaining = self.sampler.batches(epoch)[position:]
            loader = DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn or (lambda x: x),
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(epoch))
            yield from loader

    def _to_device(self, batch):
        if hasattr(batch, "to") and not isinstance(batch, (list, tuple)):
            return batch.to(self.device)
        if isinstance(batch, dict):
            return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(v.to(self.device) if torch.is_tensor(v) else v for v in batch)
        return batch

    def fit(self, resume: "bool | str | os.PathLike | Resume" = False) -> dict:
        """Train until ``max_steps``; ``resume=True`` continues from ``out_dir/checkpoints/last.pt`` if present,
        ``resume=path`` from that file, ``resume=Resume(...)`` also accepts a changed seed or data set. Returns a
        summary dict. While it runs the run folder holds ``RUN_LOCK``: a second training of the same folder is
        refused (``RunBusyError``) instead of interleaving its logs and overwriting the checkpoints."""
        with _determinism(self.deterministic), self._run_lock():
            return self._fit(resume)

    @contextlib.contextmanager
    def _run_lock(self):
        if not dist_utils.is_main_process():  # rank 0 writes the folder for all ranks
            yield
            return
        with FolderLock(self.out_dir, RUN_LOCK, "training run"):
            yield

    def _fit(self, resume) -> dict:
        self._begin(resume)
        started_at = self.step
        bar = self._progress_bar()
        speed = _Throughput()
        batches = self._batches()
        last_loss = float("nan")
        self.model.train()
        while self.step < self.max_steps:
            result = self._train_step(self._to_device(next(batches)))
            speed.add(self.batch_size * self.world_size)
            last_loss = last_loss if result.skipped else result.loss
            self._report(result, bar, speed)
            self._evaluate_if_due()
            self._checkpoint_if_due()
        if bar is not None:
            bar.close()
        return {"step": self.step, "steps_run": self.step - started_at, "resumed_from": self.resumed_from,
                "loss": last_loss, "skipped_steps": self.skipped_steps, "wall_time_s": speed.elapsed(),
                "samples_per_s": speed.overall_rate()}

    def _begin(self, resume):
        """Restore the checkpoint to resume from (if any) and record the run configuration."""
        request = resume if isinstance(resume, Resume) else Resume(resume)
        if request.checkpoint:
            path = self.latest_checkpoint() if request.checkpoint is True else Path(request.checkpoint)
            if path is not None:
                self.load_state(path, accept_changes=request.accept_changes)
        elif self.step == 0:
            self._refuse_or_clear_previous_run()
        if dist_utils.is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            record = {**self.config, **({"accepted_changes": self.accepted_changes} if self.accepted_changes else {})}
            atomic_write_text(self.out_dir / "config.json", json.dumps(record, indent=2, default=str))

    def _refuse_or_clear_previous_run(self):
        """A fresh run must not silently overwrite another run's checkpoints and logs in the same folder."""
        previous = check_fresh_run_folder(self.out_dir, self.overwrite)
        if not previous:
            return
        if dist_utils.is_main_process():
            for p in previous:
                p.unlink()
            for log in ("metrics.jsonl", "metrics.csv"):
                (self.out_dir / log).unlink(missing_ok=True)
        dist_utils.barrier()

    def _progress_bar(self):
        if not (self.progress and dist_utils.is_main_process()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step, desc="training", unit="step",
                    mininterval=PROGRESS_REFRESH_S if sys.stderr.isatty() else PROGRESS_REFRESH_S_LOG_FILE)

    def _train_step(self, batch) -> "_StepResult":
        """One optimizer step on ``batch``; skipped (weights untouched) when the loss or the gradient is not finite.
        The LR schedule advances either way."""
        torch.manual_seed(self.seed * STEP_SEED_STRIDE + self.step)  # same randomness on every rank and on resume
        loss, metrics = self.loss_fn(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = float("nan")
        # Every rank must agree before backward: under DDP a rank that skipped backward would hang the others.
        finite = self._finite_on_all_ranks(float(loss.detach()))
        if finite:
            loss.backward()
            grad_norm = self._clip_gradients()
            finite = self._finite_on_all_ranks(grad_norm)
        if finite:
            self._apply_update()
        else:
            self._skip_update()
        with warnings.catch_warnings():  # a skipped step still advances the schedule, by design
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*optimizer.step.*", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        return _StepResult(float(loss.detach()), metrics, grad_norm, skipped=not finite)

    def _finite_on_all_ranks(self, value: float) -> bool:
        """The NaN guard: True when ``value`` is finite on every rank."""
        return dist_utils.all_reduce_max(0.0 if math.isfinite(value) else 1.0, self.device) == 0

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``grad_clip`` (if set); returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        return float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0

    def _apply_update(self):
        self.optimizer.step()
        self.bad_in_a_row = 0
        if self.ema:
            self.ema.update(unwrap_model(self.model))

    def _skip_update(self):
        """Drop the gradients of a non-finite step; abort after ``max_bad_steps`` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise FloatingPointError(f"{self.bad_in_a_row} consecutive non-finite steps at step {self.step}; "
                                     "lower the learning rate or check the data")

    def _report(self, result: "_StepResult", bar, speed: "_Throughput"):
        """Progress bar every step; a log record every ``log_every`` steps, at the end and after a skipped step."""
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4g}", skipped=self.skipped_steps)
        if self.step % self.log_every == 0 or self.step == self.max_steps or result.skipped:
            self._log({"step": self.step, "loss": result.loss, "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": result.grad_norm, "samples_per_s": speed.window_rate(),
                       "skipped": self.skipped_steps, **{k: float(v) for k, v in result.metrics.items()}})

    def _evaluate_if_due(self):
        if self.eval_fn and self.eval_every and self.step % self.eval_every == 0 and dist_utils.is_main_process():
            self._log({"step": self.step, **self.evaluate()})

    def _checkpoint_if_due(self):
        if self.step % self.checkpoint_every == 0 or self.step == self.max_steps:
            self.save_checkpoint()
            dist_utils.barrier()

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.ema_model() if self.ema else unwrap_model(self.model)
        return {f"eval_{k}": float(v) for k, v in self.eval_fn(model, self.step).items()}

    def ema_model(self) -> nn.Module:
        """A copy of the model carrying the EMA weights (or the raw weights without EMA)."""
        import copy

        model = copy.deepcopy(unwrap_model(self.model))
        if self.ema:
            self.ema.copy_to(model)
        return model.eval()


class _StepResult(NamedTuple):
    loss: float
    metrics: dict
    grad_norm: float
    skipped: bool


class _Throughput:
    """Samples per second over the whole run and over the window since the last log record."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.samples = self.window_samples = 0

    def add(self, samples: int):
        self.samples += samples
        self.window_samples += samples

    def window_rate(self) -> float:
        """Rate since the previous call (or the start); starts a new window."""
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_start, 1e-9)
        self.window_start, self.window_samples = now, 0
        return rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def overall_rate(self) -> float:
        return self.samples / max(self.elapsed(), 1e-9)
