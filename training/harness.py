"""The training harness: what RAHF training (:mod:`rahf.train`) and LoRA finetuning (:mod:`finetune.lora`) share.

A caller builds its model and its loss; the harness owns everything around them:

* **Config dump.** The resolved config (file + flags merged) is written as JSON beside the checkpoints
  (``train_config.json`` / ``finetune_config.json``: ``dataclasses.asdict``, readable back by the config's
  ``from_json``), and into every checkpoint's ``trainer_state.json`` under ``"config"``.
* **Logging.** One JSON object a line in ``log.jsonl`` (``{"step": N, "loss": ..., ...}``), and a tqdm progress
  bar on stderr showing step / total and the loss. The bar is shown only when asked (``progress=True``) and the
  stream is a terminal, and only by the main process. When a run resumes from step N, log rows of steps after N
  (written by the killed run after its last checkpoint) are dropped, so the log of a resumed run is the log of an
  uninterrupted one.
* **Checkpoints.** A checkpoint is a folder ``checkpoints/step-N``: the caller's weights (safetensors), the
  optimizer state and the torch RNG (``optimizer.safetensors``), the step and scalars (``trainer_state.json``).
  It is written into a temporary folder named by :func:`common.atomic.temp_name` (files by
  :mod:`common.atomic`) and renamed into place, so a folder ``step-N`` is always whole; temporary folders of a
  killed save are removed at the next start. ``keep_last`` keeps the newest k step checkpoints (None: all).
* **Exact resume.** The optimizer state (no pickle), the torch RNG and the step are restored, and the data order
  is a function of the step, so a run killed after any step and resumed ends with bit-identical weights to an
  uninterrupted run on CPU.
* **Batch order.** One rule for every loop (:func:`epoch_batch_index`): an epoch is a permutation of the n
  examples seeded by (seed, epoch), cut into ``n // batch_size`` full batches; the ``n mod batch_size`` examples
  at the end of each permutation sit that epoch out (full batches only, the last partial batch is dropped). When
  n < batch_size an epoch is one batch of all n examples.
* **Optimizer.** :func:`adamw` builds AdamW from the trainable parameters in one or two groups: with weight decay,
  and (when a ``no_decay`` rule is given) without.
* **Weight average.** :class:`WeightAverage` keeps an exponential moving average of the trainable parameters,
  updated after every optimizer step; the caller evaluates and saves with it swapped in, and a checkpoint carries it
  (``weight_average.safetensors``) so a resumed run continues the same average.
* **Accelerate.** :func:`make_accelerator` (device, mixed precision, gradient accumulation) and
  :func:`accumulate_step` (one micro-batch: forward under autocast, backward, step). Each optimizer step measures
  the gradients' global norm, which the loops log as ``grad_norm``, and can clip it (``max_grad_norm``).
* **Prefetch.** :class:`Prefetcher` makes the next batch in a background thread while the accelerator runs the
  current one (batches are functions of their index, so the order and the bits are those of a plain loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from common.atomic import atomic_write_bytes, atomic_write_text, is_temp_name, temp_name

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
OPTIMIZER_FILE = "optimizer.safetensors"
AVERAGE_FILE = "weight_average.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_PREFIX = "step-"
_EPOCH_SEED_STRIDE = 100_003  # epoch e of seed s is permuted by torch.Generator().manual_seed(s * stride + e)


# ---------------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches of an epoch: ``n // batch_size`` (at least 1: one batch of all n when n < batch_size)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 examples and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return max(1, n // batch_size)


def epoch_batch_index(k: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices (int64, ``batch_size`` of them, or n when n < batch_size) of batch ``k`` of a seeded run.

    Batch k is batch ``k mod E`` of epoch ``k // E`` (E = :func:`batches_per_epoch`): consecutive slices of a
    permutation of range(n) fixed by (seed, epoch). A function of k alone, so a resumed run draws what an
    uninterrupted one would.
    """
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, j = divmod(k, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch))
    return order[j * batch_size : (j + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------
# Accelerate and the optimizer
# ---------------------------------------------------------------------------------------------------------


def make_accelerator(device: str, mixed_precision: str, grad_accum: int) -> Accelerator:
    """An Accelerator for ``device`` (auto | cpu | cuda; auto is cuda when available), ``mixed_precision``
    (no | bf16 | fp16) and ``grad_accum`` micro-batches per optimizer step."""
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)


def accumulate_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    compute: Callable[[], tuple[torch.Tensor, Any]],
    max_grad_norm: float = 0.0,
) -> tuple[torch.Tensor, Any, float | None]:
    """One micro-batch: ``compute()`` -> (loss, anything) under autocast, backward, and the optimizer's step (which
    the accelerator applies only on the last micro-batch of an optimizer step).

    On that last micro-batch the global L2 norm of the gradients is measured (unscaled under fp16) and, when
    ``max_grad_norm`` > 0, the gradients are scaled down to that norm before the step; 0 measures only and leaves
    the gradients' bits as they are. Returns (loss, what ``compute`` returned, the norm before clipping — None on a
    micro-batch that does not step)."""
    check_grad_norm(max_grad_norm)
    norm = None
    with accelerator.accumulate(model), accelerator.autocast():
        loss, extra = compute()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            params = [p for p in model.parameters() if p.grad is not None]
            if max_grad_norm > 0:
                total = accelerator.clip_grad_norm_(params, max_grad_norm)
            else:  # measure only: the gradients are read, never written (a non-finite norm changes nothing)
                accelerator.unscale_gradients()  # fp16: the true gradients (a no-op otherwise)
                # the norm of the per-tensor norms, as clipping computes it (torch >= 2.4; no get_total_norm)
                norms = [torch.linalg.vector_norm(p.grad) for p in params]
                total = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
            norm = float(total) if total is not None else None  # None: no gradients, or a backend without a norm
        optimizer.step()
        optimizer.zero_grad()
    return loss, extra, norm


def check_grad_norm(max_grad_norm: float) -> None:
    """Refuse a clipping threshold that is negative or not finite (0 means: no clipping)."""
    if not (max_grad_norm >= 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {max_grad_norm}")


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(k)`` returns ``make(k)`` and starts ``make(k + 1)`` in one background thread, so reading and decoding
    the next batch overlaps the accelerator's work on this one. ``make`` must depend on k only; calls never
    overlap (a prefetched item that is not asked for is waited for and dropped). ``enabled=False`` makes every
    item on the caller's thread (on a CPU the thread would only take cores from the math)."""

    def __init__(self, make: Callable[[int], T], enabled: bool = True) -> None:
        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._next: tuple[int, Future[T]] | None = None

    def get(self, k: int) -> T:
        pending, self._next = self._next, None
        if pending is not None and pending[0] == k:
            item = pending[1].result()
        else:
            if pending is not None:
                pending[1].exception()  # wait: make() calls never run side by side
            item = self._make(k)
        if self._pool is not None:
            self._next = (k + 1, self._pool.submit(self._make, k + 1))
        return item

    def wait(self) -> None:
        """Wait until the item being made is done: call it before the caller itself uses what ``make`` uses (a
        tokenizer is not safe to share between threads)."""
        if self._next is not None:
            self._next[1].exception()

    def close(self) -> None:
        """Wait for a running ``make`` and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_decay: Callable[[str, torch.nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` (in ``named_parameters`` order) as optimizer groups: one group with
    ``weight_decay``; with a ``no_decay(name, param)`` rule, the parameters it picks form a second group with no
    decay. Empty groups are left out; no trainable parameter at all raises ``ValueError``."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay is not None and no_decay(name, p) else decay).append(p)
    if not decay and not plain:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def biases_and_norms(name: str, p: torch.nn.Parameter) -> bool:
    """A ``no_decay`` rule: parameters of fewer than 2 dimensions (biases, norm scales)."""
    return p.ndim < 2


def adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    no_decay: Callable[[str, torch.nn.Parameter], bool] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``lr`` for every group)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay), lr=lr)


class WeightAverage:
    """An exponential moving average of a model's trainable parameters (Polyak averaging).

    After the n-th :meth:`update` each average is ``a ← d·a + (1 − d)·p`` with ``d = min(decay, (1 + n) / (10 + n))``,
    so the first updates are not dominated by the starting weights; the average spans about ``1 / (1 − decay)``
    steps at the end. :meth:`applied` swaps the averages into the model (for a dev evaluation or a save) and puts
    the live weights back after, so training never sees them. Parameters are matched by name.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.average = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current parameters into the average (once per optimizer step)."""
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.average:
                self.average[name].lerp_(p.detach(), 1.0 - keep)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with the averaged parameters in place; the live ones come back on exit (error or not)."""
        params = dict(model.named_parameters())
        live = {n: params[n].detach().clone() for n in self.average}
        with torch.no_grad():
            for n, a in self.average.items():
                params[n].copy_(a)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in live.items():
                    params[n].copy_(p)

    def save(self, folder: str | Path) -> Path:
        """Write the averages and the update count to ``folder/weight_average.safetensors`` (atomically)."""
        meta = {"updates": str(self.updates), "decay": repr(self.decay)}
        data = safetensors_bytes({n: a.detach().cpu().contiguous() for n, a in self.average.items()}, metadata=meta)
        return atomic_write_bytes(Path(folder) / AVERAGE_FILE, data)

    def load(self, folder: str | Path) -> None:
        """Restore what :meth:`save` wrote; a missing file or a different set of parameters raises ValueError."""
        path = Path(folder) / AVERAGE_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no {AVERAGE_FILE}: it was saved by a run without a weight average")
        with safe_open(str(path), framework="pt") as f:  # one read: the tensors and the update count
            names = f.keys()
            tensors, meta = {k: f.get_tensor(k) for k in names}, f.metadata() or {}
        if set(tensors) != set(self.average):
            odd = sorted(set(tensors) ^ set(self.average))
            raise ValueError(f"{path}: its parameters are not this model's ({len(odd)} names differ, e.g. {odd[0]})")
        for n, t in tensors.items():
            self.average[n].copy_(t)
        self.updates = int(meta.get("updates", "0"))


def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state and the torch RNG (CPU, and CUDA when present) as (tensors for safetensors, JSON-able
    scalars); no pickle."""
    state = optimizer.state_dict()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state/{pid}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = val
    return tensors, scalars


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Inverse of :func:`pack_optimizer`: restores the optimizer state and the torch RNG."""
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("state/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    for pid, extra in scalars["state"].items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------------
# Files: config dump, checkpoints
# ---------------------------------------------------------------------------------------------------------


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def write_config(path: str | Path, config: Any) -> Path:
    """The resolved ``config`` (a dataclass) as indented JSON at ``path``, atomically."""
    return atomic_write_text(path, json.dumps(dataclasses.asdict(config), indent=2))


def save_checkpoint(
    path: str | Path,
    write_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """A whole checkpoint folder at ``path`` or none: ``write_weights(folder)`` writes the weights (safetensors),
    then ``optimizer.safetensors`` (:func:`pack_optimizer`) and ``trainer_state.json`` (``state`` + the optimizer's
    scalars). Written in a temporary folder and renamed over ``path`` (an older folder there is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(path))
    tmp.mkdir()
    try:
        write_weights(tmp)
        tensors, scalars = pack_optimizer(optimizer)
        atomic_write_bytes(tmp / OPTIMIZER_FILE, safetensors_bytes(tensors))
        atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "optimizer": scalars}))
        if path.exists():  # move the old folder aside, the new one in, then drop the old one
            old = Path(temp_name(path))
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_trainer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the torch RNG from checkpoint ``path``; returns its trainer state (``step`` and
    the caller's scalars, without the optimizer's)."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    unpack_optimizer(optimizer, load_file(str(path / OPTIMIZER_FILE)), meta.pop("optimizer"))
    return meta


def checkpoint_steps(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished step checkpoints under ``out_dir/checkpoints`` as (step, folder), by step; temporary folders of
    an interrupted save are not checkpoints."""
    folder = Path(out_dir) / CHECKPOINTS_DIR
    found = []
    for p in folder.glob(f"{_STEP_PREFIX}*"):
        tail = p.name[len(_STEP_PREFIX) :]
        if tail.isdigit() and p.is_dir():
            found.append((int(tail), p))
    return sorted(found)


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """The finished checkpoint of the highest step, or None."""
    found = checkpoint_steps(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Remove all but the newest ``keep_last`` step checkpoints (None: keep all); returns the removed folders."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    removed = [p for _, p in checkpoint_steps(out_dir)[:-keep_last]]
    for p in removed:
        shutil.rmtree(p)
    return removed


def sweep_checkpoint_temps(out_dir: str | Path) -> list[Path]:
    """Remove the temporary folders of interrupted checkpoint saves in ``out_dir`` and its ``checkpoints``
    (``common.atomic`` temp names, and the ``<name>.tmp`` folders of earlier versions); returns them."""
    out_dir = Path(out_dir)
    removed = []
    for folder in (out_dir, out_dir / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            legacy = p.name.endswith(".tmp") and (p.name.startswith(_STEP_PREFIX) or p.name == "best.tmp")
            if p.is_dir() and (is_temp_name(p.name) or legacy):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, evaluation, checkpoint) runs after ``step`` steps: every ``every`` steps and
    after the last one."""
    return step % every == 0 or step == total


def show_progress(enabled: bool, stream: IO[str]) -> bool:
    """Whether to draw a progress bar on ``stream``: asked for, and the stream is a terminal."""
    isatty = getattr(stream, "isatty", None)
    return bool(enabled and isatty is not None and isatty())


# ---------------------------------------------------------------------------------------------------------
# A run: its folder, log, progress bar, checkpoints and loop
# ---------------------------------------------------------------------------------------------------------


class TrainingRun:
    """The output folder of one training run and the loop around a caller's optimizer step.

    Args:
        out_dir: the run's folder (config dump, ``log.jsonl``, ``checkpoints/``, named checkpoints like ``best``).
        config: the resolved config dataclass (dumped to ``config_file`` and into every checkpoint).
        config_file: the dump's file name in ``out_dir``.
        main: whether this process writes files and draws the bar (the main process of a multi-process run).
        keep_last: step checkpoints to keep (the newest; None keeps all).
        progress: draw a progress bar when ``stream`` is a terminal.
        stream: where the bar goes (default: ``sys.stderr`` at the time of the call).
        desc: the bar's label.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: Any,
        *,
        config_file: str,
        main: bool = True,
        keep_last: int | None = None,
        progress: bool = True,
        stream: IO[str] | None = None,
        desc: str = "train",
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.out_dir = Path(out_dir)
        self.config = config
        self.config_file = config_file
        self.main = main
        self.keep_last = keep_last
        self.progress = progress
        self.stream = stream
        self.desc = desc
        self._log: IO[str] | None = None

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def start(self) -> None:
        """Create the folder, dump the config, remove temporary folders of a killed save (main process only)."""
        if not self.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.out_dir / self.config_file, self.config)
        sweep_checkpoint_temps(self.out_dir)

    def resume(self, optimizer: torch.optim.Optimizer) -> tuple[Path, dict[str, Any]] | None:
        """The last step checkpoint and its trainer state, with the optimizer and the torch RNG restored from it;
        None when there is none. The caller loads its weights from the returned folder."""
        path = last_checkpoint(self.out_dir)
        if path is None:
            return None
        return path, load_trainer_state(path, optimizer)

    def save(
        self,
        step: int,
        write_weights: Callable[[Path], None],
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Path | None:
        """Checkpoint ``checkpoints/step-<step>`` (then keep the newest ``keep_last``), or ``out_dir/<name>`` when
        ``name`` is given (not pruned). Main process only; returns the folder (None elsewhere)."""
        if not self.main:
            return None
        path = self.out_dir / name if name else self.out_dir / CHECKPOINTS_DIR / f"{_STEP_PREFIX}{step}"
        full = {"step": step, **(state or {}), "config": config_dict(self.config)}
        save_checkpoint(path, write_weights, optimizer, full)
        if name is None:
            prune_checkpoints(self.out_dir, self.keep_last)
        return path

    def log(self, entry: dict[str, Any]) -> None:
        """Append one JSON row to ``log.jsonl`` (main process only)."""
        if not self.main:
            return
        line = json.dumps(entry) + "\n"
        if self._log is not None:
            self._log.write(line)
            self._log.flush()
        else:
            with open(self.log_path, "a") as f:
                f.write(line)

    def _drop_log_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (and a torn last line) from ``log.jsonl``."""
        if not self.log_path.is_file():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step):
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            atomic_write_text(self.log_path, "".join(kept))

    def loop(
        self,
        start: int,
        steps: int,
        train_step: Callable[[int], dict[str, Any]],
        *,
        log_every: int,
        checkpoint_every: int,
        checkpoint: Callable[[int], None],
        after_step: Callable[[int], None] | None = None,
        stop_after: int | None = None,
    ) -> int:
        """Run optimizer steps ``start`` .. ``steps - 1``; returns the step reached.

        After each ``train_step(i)`` (one optimizer step; returns the log row, with ``"loss"``): the bar advances,
        the row is logged as ``{"step": i + 1, **row}`` every ``log_every`` steps, ``after_step(i + 1)`` runs (an
        evaluation), and ``checkpoint(i + 1)`` every ``checkpoint_every`` steps; the last step always logs and
        checkpoints. ``stop_after`` ends the loop after that many steps (a simulated kill, for tests of resume).
        """
        from tqdm.auto import tqdm

        stream = self.stream if self.stream is not None else sys.stderr
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._drop_log_after(start)
            self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in finally
        bar = tqdm(
            total=steps,
            initial=start,
            desc=self.desc,
            unit="step",
            file=stream,
            disable=not show_progress(self.progress and self.main, stream),
        )
        step, done = start, 0
        try:
            while step < steps and (stop_after is None or done < stop_after):
                row = train_step(step)
                step += 1
                done += 1
                if "loss" in row:
                    bar.set_postfix(loss=f"{float(row['loss']):.4f}", refresh=False)
                bar.update(1)
                if due(step, log_every, steps):
                    self.log({"step": step, **row})
                if after_step is not None:
                    after_step(step)
                if due(step, checkpoint_every, steps):
                    checkpoint(step)
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
                self._log = None
        return step


def tensors_of(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of named tensors (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in items}
