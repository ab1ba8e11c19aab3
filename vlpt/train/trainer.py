"""The training loop on Accelerate.

Accelerate owns devices, processes, mixed precision and the gradient scaler. The
data loaders are *not* passed to ``accelerator.prepare``: each rank's stream is
already split inside the pipeline (``vlpt.data.stream``), and preparing a
webdataset loader would either read everything on rank 0 or split twice.

Runs survive: a checkpoint holds everything an uninterrupted run would still
have in memory (weights, optimizer, schedule, scaler, every RNG of every rank,
the position of every data reader, bad-sample counts), so a resumed run continues
bit for bit (:mod:`vlpt.train.data_feed`). SIGTERM or SIGUSR1 makes every rank stop at the next step
boundary, checkpoint and exit 0 (a cluster requeue then resumes).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

from ..build import Built, build_model, decode_settings, eval_collator, note, stop_workers, validate
from ..data.collate import move_to
from ..data.sources import probe_sources, resolve_sources
from ..errors import UserError
from ..eval import EvalData, evaluate, load_samples
from ..recipe import Recipe, to_dict
from .closing import say_done
from ..model.packing import real_count_known
from ..run_dir import RunDir
from . import rng
from .checkpoint import (check_same_kind, load_model_weights, load_rank_state, load_trainer_state, rank_file,
                         read_state, readable, save_checkpoint, staging_dir, weights_fingerprint, write_or_stop)
from .accel import make_accelerator
from .data_feed import DataFeed
from .flops import device_peak_flops, train_step_flops
from .logbook import Logbook, MetricsLog, batch_stats, flatten
from .mixing import TaskMixer
from .optim import build_optimizer, build_scheduler, clipped_step, fused_supported
from .sharded import gathered_root, load_sharded_state, save_sharded_state, sharding


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = True, force: bool = False):
        self.recipe = recipe
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.out = Path(recipe.output_dir)
        self.run = RunDir(self.out)
        tasks = validate(recipe)  # cheap checks before anything heavy
        self._check_output_dir(resume, force)
        self.accelerator = make_accelerator(recipe)
        acc = self.accelerator
        self.sharding = sharding(acc)  # "fsdp2": no rank holds every weight (vlpt.train.sharded)
        from accelerate.utils import set_seed

        set_seed(recipe.seed)  # same initial weights on every rank
        progress = recipe.log.progress and acc.is_main_process
        with acc.main_process_first():
            self.sources, self.val_source = resolve_sources(recipe, progress=progress, quiet=not acc.is_main_process)
        self.built: Built = build_model(recipe, tasks)
        model = self.built.model
        for line in filter(None, (self.built.init_report, self.built.tokenizer.note(recipe.data.max_text_len))):
            note(line)
        self.feeding = probe_sources(tasks, self.sources, decode_settings(recipe, model), self.built.tokenizer)
        model.vl.unpad = recipe.train.unpad
        # FSDP gathers a layer's weights in its forward; the partial last layer reads them outside it
        model.vl.partial_last_layer = not self.sharding
        if recipe.train.compile:
            model.vl.trunk.compile_layers()
        self.optimizer = build_optimizer(model, recipe.train, fused=fused_supported(model, self.accelerator.device))
        self.scheduler = build_scheduler(self.optimizer, recipe.train)
        self.start_step = 0
        self.resumed_from = None
        self.consumed: Counter = Counter()  # batches trained on per task (the data cursor: self.feed)
        self.bad_updates = 0
        self.wall_before = 0.0  # training seconds of the attempts before a resume
        self.skipped: Counter = Counter()
        self.read = 0
        rank_state = None
        ckpt = self._pick_checkpoint() if resume else None
        if ckpt is not None:
            rank_state = self._resume(ckpt)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        if ckpt is not None and self.sharding:
            load_sharded_state(ckpt, self.model, self.optimizer)  # into the sharded parameters
        # skip non-finite updates on the device: fused AdamW, no grad scaler, gradients not sharded
        self.skip_on_device = (bool(self.optimizer.defaults.get("fused")) and acc.scaler is None
                               and acc.distributed_type.name not in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"))
        self.mixer = TaskMixer([t.name for t in tasks], [t.weight for t in tasks], recipe.mixing, recipe.seed)
        self.feed = DataFeed(self.built, self.sources, self.feeding, acc.process_index, acc.num_processes,
                             recipe.data.num_workers, recipe.seed, share=recipe.mixing == "sum",
                             pin_memory=acc.device.type == "cuda")
        if ckpt is not None:
            self._resume_data(ckpt, rank_state)
        self.loaders, self.iters = self.feed.loaders, self.feed.iters
        self.metrics = MetricsLog(self.run.metrics, acc.is_main_process)
        self.vl_config = model.vl.config
        self.peak_flops, self.peak_source = device_peak_flops(acc.device, recipe.train.precision)
        self._eval_data = None
        self.bad_in_row = 0
        self.stop_signal: int | None = None
        self._ctl_group = None
        if rank_state is not None:
            rng.restore(rank_state["rng"])  # last: nothing above may draw after this

    # -- set-up ------------------------------------------------------------------------
    def _check_output_dir(self, resume: bool, force: bool) -> None:
        has_ckpt = bool(self.run.checkpoints())
        if not resume and has_ckpt and not force:
            raise UserError(f"output_dir '{self.out}' already holds checkpoints; use --force to start over there "
                            "(or drop --no-resume to continue the run)")
        if not resume and force and self.out.exists() and int(os.environ.get("RANK", "0")) == 0:
            self.run.clear_outputs()

    def _pick_checkpoint(self) -> Path | None:
        """The newest checkpoint every rank can read; an unreadable one is skipped with a warning."""
        acc = self.accelerator
        found = self.run.checkpoints()
        chosen = -1
        for i in range(len(found) - 1, -1, -1):
            why = readable(found[i], acc.process_index)
            if why is None:
                chosen = i
                break
            if acc.is_main_process:
                print(f"vlpt: warning: checkpoint {found[i]} cannot be read ({why}); trying the one before it",
                      file=sys.stderr)
        if acc.num_processes > 1:  # the newest one that every rank can read
            chosen = int(acc.gather(torch.tensor([chosen], device=acc.device)).min())
        if chosen < 0:
            if found:
                raise UserError(f"no checkpoint in {self.out / 'checkpoints'} can be read; "
                                "use --no-resume --force to start over")
            return None
        return found[chosen]

    def _resume(self, ckpt: Path) -> dict | None:
        check_same_kind(ckpt, self.sharding)
        if not self.sharding:  # a sharded run loads weights and optimizer after prepare
            load_model_weights(self.built.model, ckpt)
        state = load_trainer_state(ckpt)
        if state is not None:
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(state["scaler"])
        info = read_state(ckpt)
        self.start_step = info["step"]
        self.consumed = Counter(info.get("consumed", {}))
        self.bad_updates = int(info.get("bad_updates", 0))
        self.wall_before = float(info.get("wall_s", 0.0))
        self.resumed_from, self.resumed_info = ckpt, info
        readers = {"processes": self.accelerator.num_processes, "num_workers": self.recipe.data.num_workers}
        rank_state = load_rank_state(ckpt, self.accelerator.process_index)
        if rank_state is not None:
            self.skipped = Counter(rank_state.get("skipped", {}))
            self.read = int(rank_state.get("read", 0))
        elif info.get("consumed") and info.get("readers", readers) == readers:
            print(f"vlpt: warning: {ckpt} has no state for rank {self.accelerator.process_index}: RNG states "
                  "start fresh, so the run will not repeat an uninterrupted one exactly", file=sys.stderr)
        if self.accelerator.is_main_process:
            self.run.truncate_metrics(self.start_step)  # the resumed run logs the steps after it again
        return rank_state

    def _resume_data(self, ckpt: Path, rank_state: dict | None) -> None:
        """Where the data streams go on (see :meth:`DataFeed.resume`); another layout also takes over
        the bad-sample counts of the old ranks."""
        counts = self.feed.resume(ckpt, self.resumed_info, rank_state)
        if counts is not None:
            self.skipped, self.read = counts

    def _next_batch(self, task: str) -> tuple[dict, tuple[int, int, int]]:
        """The task's next batch on the device, and its (samples, real tokens, padded tokens)."""
        batch, skipped, read = self.feed.next(task)
        self.consumed[task] += 1
        self.skipped.update(skipped)
        self.read += read
        return move_to(batch, self.accelerator.device), batch_stats(batch)

    # -- one update --------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer update, with no device sync: losses and metrics stay tensors (see
        ``as_floats``), real-token counts are read on the CPU, and a non-finite update is skipped
        on the device (the skips are read on logging steps, :meth:`_bad_update`).

        The micro-batches' gradients are averaged, so an update is the same however its tokens are
        split into micro-batches, and ``train.clip`` bounds the norm of that mean. (UNITER sums
        its micro-batches' gradients and clips the sum: the UNITER recipes give clip and eps
        divided by UNITER's accumulation steps, the same updates; see recipes/uniter-base.yaml.)"""
        acc, model, cfg = self.accelerator, self.model, self.recipe.train
        record: dict[str, Any] = {}
        samples = real_tokens = padded_tokens = 0
        flops = 0.0
        tasks = self.mixer.tasks_for(step)
        n_micro = len(tasks) * cfg.accumulate
        micro = 0
        total_loss = 0.0
        for task in tasks:
            task_loss = 0.0
            for _ in range(cfg.accumulate):
                batch, (size, real, padded) = self._next_batch(task)
                micro += 1
                sync = contextlib.nullcontext() if micro == n_micro else acc.no_sync(model)
                with sync, acc.autocast(), real_count_known(batch, real):
                    loss, metrics = model(task, batch)
                    scaled = loss * (self.mixer.loss_scale(task) / cfg.accumulate)  # the mean over micro-batches
                acc.backward(scaled)
                task_loss += loss.detach() / cfg.accumulate
                for k, v in metrics.items():
                    record[k] = record.get(k, 0.0) + v / cfg.accumulate
                samples += size
                real_tokens += real
                padded_tokens += padded
                flops += train_step_flops(self.vl_config, size, padded // max(size, 1),
                                          tokens=real if cfg.unpad else None)
            record[f"loss/{task}"] = task_loss
            total_loss += task_loss * self.mixer.loss_scale(task)
        record["grad_norm"] = self._update(step, tasks)
        self.scheduler.step()  # a skipped update still advances the schedule: lr stays a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % self.recipe.log.every == 0 or done == cfg.steps:
            self._bad_update(done)
        record.update(task=tasks[0] if len(tasks) == 1 else "+".join(tasks), loss=total_loss,
                      samples=samples, tokens=real_tokens, padded_tokens=padded_tokens, flops=flops)
        return record

    def _update(self, step: int, tasks: list[str]) -> torch.Tensor:
        """Clip and step; returns the gradient norm (before clipping; a device tensor).

        Fused AdamW (plain or DDP runs): the clip factor is the kernel's ``grad_scale`` (no pass of
        its own over the gradients) and a non-finite norm sets its ``found_inf``, which leaves
        weights and Adam state as they were, all on the device. Otherwise (FSDP / DeepSpeed, no
        fused kernel) the norm is read on the host to decide; with fp16 the grad scaler skips
        overflowing updates itself. The norm is of the synchronized gradients, the same on every
        rank, so all ranks skip together."""
        acc, clip = self.accelerator, self.recipe.train.clip
        where = (step + 1, "+".join(tasks))
        if self.skip_on_device:
            norm, found_inf = clipped_step(self.optimizer, self.model.parameters(), clip)
            self.skip_flags.append((where, found_inf))
            return norm
        norm = acc.clip_grad_norm_(self.model.parameters(), clip or float("inf"))
        if acc.scaler is None and not bool(torch.isfinite(norm)):  # one host read per update
            self.skip_flags.append((where, torch.ones(())))
        else:
            self.skip_flags.append((where, torch.zeros(())))
            self.optimizer.step()
        return norm

    @property
    def bad_updates(self) -> int:
        """Updates skipped so far for a non-finite loss or gradient. Reading it reads the pending skip
        flags from the device (one sync): the loop does so on logging and checkpoint steps."""
        self._read_skip_flags()
        return self._bad_updates

    @bad_updates.setter
    def bad_updates(self, value: int) -> None:
        self._bad_updates = int(value)
        self.skip_flags: list = []  # ((step, tasks), 0-d flag on the device) per update not yet read
        self.skipped_unreported: list = []  # (step, tasks, in a row) of skips not yet warned about
        self.bad_run_limit_at = None  # (step, tasks, in a row) where max_bad_steps was reached

    def _read_skip_flags(self) -> None:
        if not self.skip_flags:
            return
        flags = torch.stack([f.to(torch.float32).cpu() for _, f in self.skip_flags]).tolist()
        for ((done, tasks), _), bad in zip(self.skip_flags, flags):
            if not bad:
                self.bad_in_row = 0
                continue
            self.bad_in_row += 1
            self._bad_updates += 1
            if self.bad_in_row >= self.recipe.train.max_bad_steps and self.bad_run_limit_at is None:
                self.bad_run_limit_at = (done, tasks, self.bad_in_row)
            elif self.bad_run_limit_at is None:
                self.skipped_unreported.append((done, tasks, self.bad_in_row))
        self.skip_flags = []

    def _bad_update(self, done: int) -> None:
        """Read the skip flags (a logging step): warn about each skipped update, and stop when
        ``train.max_bad_steps`` updates in a row were skipped."""
        self._read_skip_flags()
        limit = self.recipe.train.max_bad_steps
        if self.accelerator.is_main_process:
            for at, tasks, row in self.skipped_unreported:
                print(f"vlpt: warning: non-finite loss or gradients at step {at}, task {tasks}: update skipped "
                      f"({row} in a row, stop at {limit})", file=sys.stderr)
        self.skipped_unreported = []
        if self.bad_run_limit_at is not None:
            at, tasks, row = self.bad_run_limit_at
            seen = f" (seen at step {done})" if done != at else ""
            raise UserError(f"stopping at step {at}, task {tasks}{seen}: the loss or gradients were not finite in "
                            f"{row} updates in a row (train.max_bad_steps = {limit}); lower train.lr, check the data, "
                            "or resume from an earlier checkpoint")

    def check_bad_fraction(self, step: int) -> None:
        """Stop (on every rank at once) when too many samples were skipped as bad."""
        acc = self.accelerator
        bad = sum(v for k, v in self.skipped.items() if not k.startswith("lacks_"))  # broken, not unsuited, data
        counts = torch.tensor([float(bad), float(self.read)], device=acc.device)
        skipped, read = (float(v) for v in acc.reduce(counts, reduction="sum"))
        limit = self.recipe.data.max_bad_fraction
        if read >= 100 and skipped / read > limit:
            reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common())
            raise UserError(f"stopping at step {step}: {skipped / read:.1%} of the samples read were bad "
                            f"({int(skipped)} of {int(read)}; {reasons}), more than data.max_bad_fraction = {limit}")

    # -- evaluation ---------------------------------------------------------------------
    def eval_data(self) -> EvalData | None:
        if self.val_source is None:
            return None
        if self._eval_data is None:
            e = self.recipe.eval
            samples = load_samples(self.val_source.urls, self.built.tokenizer,
                                   decode_settings(self.recipe, self.built.model), e.samples)
            self._eval_data = EvalData(samples, eval_collator(self.built), self.accelerator.device, e.batch_size,
                                       e.retrieval_candidates, self.accelerator.autocast)
        return self._eval_data

    def run_eval(self, step: int) -> dict[str, float] | None:
        acc = self.accelerator
        result = None
        if (acc.is_main_process or self.sharding) and self.eval_data() is not None:
            with gathered_root(self.model):  # sharded: every rank evaluates, each forward gathers from all
                result = {"step": step, **evaluate(acc.unwrap_model(self.model), self.eval_data())}
        if acc.is_main_process and result is not None:
            self.run.write_eval(result)
            self.metrics.write({"step": step, "time": time.time(), **{f"eval/{k}": v for k, v in result.items() if k != "step"}})
        acc.wait_for_everyone()
        return result

    def save(self, step: int) -> None:
        """Every rank stages its RNG states and counts (sharded: and its slices of weights and optimizer),
        then the main process writes the rest and renames; a full disk on any rank stops every rank."""
        acc, ck = self.accelerator, self.recipe.checkpoint
        acc.wait_for_everyone()
        if acc.is_main_process:
            staging_dir(self.out, step)
        acc.wait_for_everyone()
        staged = staging_dir(self.out, step, fresh=False)
        write_or_stop(acc, self.out, step, lambda: torch.save(
            {"rng": rng.capture(), "skipped": dict(self.skipped), "read": self.read,
             "consumed": dict(self.consumed), "data": self.feed.state(),
             "fingerprint": weights_fingerprint(self.model.parameters())},
            rank_file(staged, acc.process_index)))
        if self.sharding:
            write_or_stop(acc, self.out, step, lambda: save_sharded_state(staged, self.model, self.optimizer))
        write_or_stop(acc, self.out, step, acc.is_main_process and (lambda: save_checkpoint(
            self.out, step, None if self.sharding else acc.unwrap_model(self.model),
            None if self.sharding else self.optimizer, self.scheduler,
            extra={"consumed": dict(self.consumed), "bad_updates": self.bad_updates,
                   "wall_s": round(self.wall_before + time.time() - self.t_fit, 1),
                   "readers": {"processes": acc.num_processes, "num_workers": self.recipe.data.num_workers}},
            keep=ck.keep, keep_every=ck.keep_every, staged=True, scaler=acc.scaler)))
        acc.wait_for_everyone()

    # -- preemption ---------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        """Catch SIGTERM/SIGUSR1 (returns the previous handlers, restored by :meth:`_close`)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        def handler(signum, frame):
            self.stop_signal = signum
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        if self.accelerator.num_processes > 1:  # a CPU side channel: agreeing on a stop never waits for the GPU
            import torch.distributed as dist

            self._ctl_group = dist.new_group(backend="gloo")
        return previous

    def _close(self, previous_handlers: dict) -> None:
        """Stop the data workers now (they ignore stop signals, so they must be asked) and
        give the signals back."""
        for it in self.iters.values():
            stop_workers(it)
        self.iters.clear()
        for sig, h in previous_handlers.items():
            signal.signal(sig, h)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1."""
        flag = self.stop_signal is not None
        if self._ctl_group is not None:
            import torch.distributed as dist

            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctl_group)
            flag = bool(t.item())
        return flag

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict[str, float] | None:
        previous = self._install_signal_handlers()
        try:
            return self._fit()
        finally:
            self._close(previous)

    def _start(self) -> Logbook:
        """The run's first lines: recipe and tokenizer into the run folder, trackers, the bar."""
        r, acc = self.recipe, self.accelerator
        self.t_fit = time.time()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.run.clear_done()  # done again only when this attempt reaches train.steps
            with open(self.run.recipe, "w") as f:
                yaml.safe_dump(to_dict(r), f, sort_keys=False)
            self.built.tokenizer.save(self.run.tokenizer)
            where = f"resuming from {self.resumed_from}" if self.resumed_from else "starting"
            n = acc.unwrap_model(self.model).vl.num_parameters()
            print(f"vlpt: {where}: {r.train.steps} steps, tasks {', '.join(r.tasks)} ({r.mixing}), "
                  f"{n / 1e6:.1f}M parameters, {acc.num_processes} process(es) on {acc.device}, output in {self.out}",
                  file=sys.stderr)
        if acc.log_with:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(r)).items()}
            acc.init_trackers(r.log.project or self.out.name, config=flat)
        bar = None
        if r.log.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=r.train.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        return Logbook(self.metrics, acc, self.peak_flops, bar)

    def _fit(self) -> dict[str, float] | None:
        r, acc = self.recipe, self.accelerator
        steps = r.train.steps
        log = self._start()
        self.model.train()
        last_saved = self.start_step if self.resumed_from else None
        for step in range(self.start_step, steps):
            rec = self.train_step(step)
            log.step(rec)
            done = step + 1
            if done % r.log.every == 0 or done == steps:
                extra = {f"data/skipped/{k}": v for k, v in self.skipped.items()}
                if self.bad_updates:
                    extra["bad_updates"] = self.bad_updates
                log.write(rec, done, self.scheduler.get_last_lr()[0], extra)
                self.check_bad_fraction(done)
            if r.eval.every and done % r.eval.every == 0 and done != steps:
                self.run_eval(done)
                self.model.train()
            if r.checkpoint.every and done % r.checkpoint.every == 0 and done != steps:
                self.save(done)
                last_saved = done
            if done != steps and self._stop_requested():
                log.close()
                if last_saved != done:
                    self.save(done)
                if acc.is_main_process:
                    name = signal.Signals(self.stop_signal).name if self.stop_signal else "a stop signal on another rank"
                    print(f"vlpt: {name} received: stopped at step {done} of {steps} with a checkpoint; "
                          f"run the same command to resume", file=sys.stderr)
                acc.end_training()
                return None
        log.close()
        if r.checkpoint.at_end and last_saved != steps:
            self.save(steps)
        result = self.run_eval(steps) if r.eval.at_end else None
        if acc.is_main_process:
            self.run.mark_done(steps, wall_s=self.wall_before + time.time() - self.t_fit)
            say_done(self.recipe, self.run, result)
        acc.end_training()
        return result


def train(recipe: Recipe, resume: bool = True, force: bool = False) -> dict[str, float] | None:
    return Trainer(recipe, resume=resume, force=force).fit()
