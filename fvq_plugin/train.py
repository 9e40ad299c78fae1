"""Two-stage FVQ-Rater training with accelerate (CPU, one GPU, or many: `accelerate launch`).

Stage I teaches the quality level: cross-entropy on the level word that follows the
teacher-forced answer prefix ("The video quality is"). Stage II trains the regression head with L1
on MOS/100 (optionally plus the stage-I loss), reading the hidden state where the recipe says (after
"<level>. The score is", with the true level teacher-forced). Min-max level bins take the training
set's MOS range, which is recorded in the checkpoint's recipe. Base weights stay frozen; LoRA, projectors and heads train.

Features are extracted once (main process first, the others then read the cache) and training
iterates over them. Every epoch ends with validation SRCC/PLCC/RMSE and checkpoints `last/` (with
the optimizer, scheduler and RNG state, for resuming) and `best/` (the epoch that scores highest on
the validation key metric, KEY_METRICS).
The shuffle order of epoch e depends only on (seed, e), so a resumed run repeats the same batches.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .common import KEY_METRICS
from .features import model_inputs
from .metrics import plcc, rmse, srcc
from .model import LEVELS, FVQRater, level_index

log = logging.getLogger(__name__)
STATE_DIR = "training_state"
PROGRESS_FILE = "progress.json"
PARTIAL, OLD = ".partial", ".old"  # suffixes of checkpoint folders being replaced


@dataclass
class TrainConfig:
    stage: int = 1
    epochs: int = 3
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"         # "no", "bf16", "fp16"
    gradient_checkpointing: bool = False
    ce_weight: float = 0.0              # stage II: weight of the level cross-entropy added to L1
    # What best/ keeps. SRCC alone cannot see scores that have not spread out yet: on the demo, stage II's first
    # epoch ranked the validation videos best but scored them within a few points of one value (sd 7 against the
    # MOS's 25). RMSE sees that, so the default, "srcc-rmse", charges SRCC with the RMSE in units of the
    # validation MOS's standard deviation (1 for a constant prediction at the mean MOS, 0 for exact scores).
    # "srcc" keeps SRCC alone.
    key_metric: str = KEY_METRICS[0]
    seed: int = 0

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.key_metric not in KEY_METRICS:
            raise ValueError(f"key_metric must be one of {KEY_METRICS}, got {self.key_metric!r}")


def stage_loss(output, levels: torch.Tensor, mos: torch.Tensor, model: FVQRater, config: TrainConfig) -> torch.Tensor:
    target = model.level_ids.to(output.logits.device)[levels.to(output.logits.device)]
    ce = F.cross_entropy(output.logits.float(), target)
    if config.stage == 1:
        return ce
    l1 = F.l1_loss(output.score.float() / 100, mos.to(output.score.device) / 100)
    return l1 + config.ce_weight * ce if config.ce_weight else l1


def fix_level_bins(model: FVQRater, mos: list[float]) -> None:
    """Min-max level bins take the training set's MOS range (FineVQ's rule), recorded in the recipe."""
    recipe = model.config.recipe
    if recipe.level_bins != "min-max" or recipe.mos_range is not None:
        return
    low, high = min(mos), max(mos)
    if not low < high:
        raise ValueError(f"min-max level bins need at least two different training MOS values, got {low} .. {high}")
    model.config.recipe = recipe.replace(mos_range=(low, high))


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, features: list[dict], mos: list[float]):
        self.features, self.mos = features, mos

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index], self.mos[index]


def _collate(spatial):
    def collate(items):
        features, mos = zip(*items)
        return model_inputs(list(features), spatial), torch.tensor(mos, dtype=torch.float32)
    return collate


def _loader(features, mos, spatial, batch_size, shuffle, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(_Labelled(features, mos), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=_collate(spatial))


def train(model: FVQRater, spatial, train_set: tuple[list[dict], list[float]],
          val_set: tuple[list[dict], list[float]] | None, config: TrainConfig, output_dir,
          resume: bool = False, progress: bool = True) -> dict:
    """Train `model` on (features, mos) pairs; returns the per-epoch history and `best`, the record of the epoch
    best/ holds (None when no epoch ran).

    `spatial` is the SpatialFeatures that normalises cached frames into pixel values.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    output_dir = Path(output_dir)
    fix_level_bins(model, list(train_set[1]))
    bounds = model.config.recipe.level_bounds()
    # Stage I never touches the regression head, so DDP must allow parameters without gradients.
    # Without CUDA, accelerate joins launched processes into one (gloo) group only when told cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(config.seed)
    if config.gradient_checkpointing:
        model.vlm.activation_checkpointing_enable()
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    # accelerate steps the schedule once per process for each optimizer step, so its length does not
    # depend on the number of processes.
    steps_per_epoch = math.ceil(len(train_set[0]) / (config.batch_size * config.grad_accum))
    total_steps = max(1, steps_per_epoch * config.epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    prepared_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    history, start_epoch, best_epoch = [], 0, None
    if accelerator.is_main_process:
        _recover(output_dir)
    accelerator.wait_for_everyone()
    if resume and (output_dir / "last" / STATE_DIR).is_dir():
        accelerator.load_state(output_dir / "last" / STATE_DIR)
        saved = json.loads((output_dir / "last" / PROGRESS_FILE).read_text())
        history, start_epoch, best_epoch = saved["history"], saved["epoch"] + 1, saved["best_epoch"]
        accelerator.print(f"resuming stage {config.stage} after epoch {saved['epoch'] + 1}")

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        loader = accelerator.prepare(_loader(*train_set, spatial, config.batch_size, True, config.seed + epoch))
        prepared_model.train()
        losses = []
        for batch, mos in tqdm(loader, desc=f"stage {config.stage} epoch {epoch + 1}/{config.epochs}",
                               # None: tqdm stays quiet when stderr is not a terminal (CI logs)
                               disable=None if progress and accelerator.is_local_main_process else True,
                               leave=False):
            with accelerator.accumulate(prepared_model):
                levels = level_index(mos, bounds)
                loss = stage_loss(prepared_model(**batch, levels=levels), levels, mos, model, config)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())
        record = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                  "seconds": time.perf_counter() - started}
        if val_set is not None:
            record.update(_validate(prepared_model, accelerator, val_set, spatial, config, bounds))
        history.append(record)
        accelerator.print(json.dumps(record))
        # Without validation the last epoch counts as best. A NaN key (constant predictions) never beats
        # a number, but the first epoch always writes best/, so a run always leaves one.
        improved = (val_set is None or best_epoch is None
                    or _beats(record["val_key"], history[best_epoch - 1]["val_key"]))
        if improved:
            best_epoch = epoch + 1
        _checkpoint(accelerator, model, output_dir, epoch, history, best_epoch, improved)
    accelerator.wait_for_everyone()
    return {"history": history, "best": history[best_epoch - 1] if history else None, "output_dir": str(output_dir)}


def _beats(key: float, best: float) -> bool:
    return not math.isnan(key) and (math.isnan(best) or key > best)


@torch.no_grad()
def _validate(prepared_model, accelerator, val_set, spatial, config, bounds) -> dict:
    prepared_model.eval()
    loader = accelerator.prepare(_loader(*val_set, spatial, config.batch_size, False))
    predicted, targets = [], []
    for batch, mos in loader:
        output = prepared_model(**batch)
        value = output.score if config.stage == 2 else _expected_level_score(output.level_logits, bounds)
        value, mos = accelerator.gather_for_metrics((value.float(), mos))
        predicted += value.tolist()
        targets += mos.tolist()
    prepared_model.train()
    return validation_record(predicted, targets, config.key_metric)


def validation_record(predicted: list[float], mos: list[float], key_metric: str) -> dict:
    """SRCC, PLCC and RMSE on the validation split, and `val_key`, the key metric best/ is chosen by."""
    record = {"val_srcc": srcc(predicted, mos), "val_plcc": plcc(predicted, mos), "val_rmse": rmse(predicted, mos),
              "val_n": len(mos)}
    key = record["val_srcc"]
    if key_metric == "srcc-rmse":
        key -= record["val_rmse"] / (float(torch.tensor(mos).std(correction=0)) or math.nan)
    return {**record, "val_key": key}


def _expected_level_score(level_logits: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Stage I has no trained head yet: score by the level distribution (the bins' centres)."""
    low, high = bounds
    centres = low + (torch.arange(len(LEVELS), device=level_logits.device) + 0.5) * (high - low) / len(LEVELS)
    return level_logits.float().softmax(-1) @ centres


def _checkpoint(accelerator, model, output_dir: Path, epoch: int, history: list, best_epoch: int, improved: bool):
    """last/ (and best/ when improved) replaced whole: written beside as NAME.partial, then renamed into
    place, so a run killed at any moment leaves the previous complete checkpoint or the new one, never a
    mix (new weights beside an old training state would resume from the wrong epoch)."""
    partial = output_dir / f"last{PARTIAL}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        (partial / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch, "history": history, "best_epoch": best_epoch}))
    accelerator.wait_for_everyone()
    accelerator.save_state(partial / STATE_DIR)  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if improved:
            best_partial = output_dir / f"best{PARTIAL}"
            shutil.rmtree(best_partial, ignore_errors=True)
            shutil.copytree(partial, best_partial, ignore=shutil.ignore_patterns(STATE_DIR))
            _move_into_place(best_partial, output_dir / "best")
        _move_into_place(partial, output_dir / "last")
    accelerator.wait_for_everyone()


def _move_into_place(new: Path, target: Path) -> None:
    old = target.with_name(target.name + OLD)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)  # between the two renames only NAME.old exists: _recover puts it back
    shutil.rmtree(old, ignore_errors=True)


def _recover(output_dir: Path) -> None:
    """Undo what a killed _checkpoint left: a half-written NAME.partial, or NAME.old not yet replaced."""
    for name in ("last", "best"):
        target, old = output_dir / name, output_dir / (name + OLD)
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(output_dir / (name + PARTIAL), ignore_errors=True)
