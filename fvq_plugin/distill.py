"""`fvq-rater distill`: FVQ-Rater teaches the fvq_rater_lite student, as Efficient-FIQA did for face images.

1. The teacher pseudo-labels the unlabeled videos through the Scorer: features cached (--cache), labels appended
   to OUT/pseudo-labels-0.jsonl as they come, so an interrupted run resumes.
2. With --rounds R (self-training), the teacher is fine-tuned (stage II) on the training labels plus its
   pseudo-labels, then labels the pool again (OUT/teacher-round1, OUT/pseudo-labels-1.jsonl, ...).
3. The student trains on the training labels plus the last pseudo-labels: L1 plus a fidelity (pairwise
   ranking) loss, horizontal flips, AdamW with a one-cycle schedule; the epoch with the best validation
   SRCC is kept in OUT/student. Its inputs are cached in OUT/student-inputs.
A rerun with the same --out reuses the pseudo-labels, the finished teacher rounds and the cached inputs.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .lite import LiteConfig, LiteExtractor, LiteRater, float_inputs, load_student, save_student, stack_inputs

log = logging.getLogger(__name__)
STUDENT_DIR, INPUTS_DIR, TEACHER_FEATURES_DIR = "student", "student-inputs", "teacher-features"


@dataclass
class DistillConfig:
    rounds: int = 0                 # self-training rounds of the teacher
    teacher_epochs: int = 3         # stage-II epochs per self-training round
    teacher_lr: float = 5e-4
    epochs: int = 40                # student epochs
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    rank_weight: float = 1.0        # fidelity loss, added to L1 on score/100
    rank_scale: float = 10.0        # MOS points over which a pair's order goes from a coin flip to sure
    pseudo_weight: float = 1.0      # weight of a pseudo-labelled video against a labelled one
    seed: int = 0
    lite: LiteConfig = field(default_factory=LiteConfig)

    def __post_init__(self):
        if self.rounds < 0 or self.epochs < 1 or self.batch_size < 2 or not self.pseudo_weight >= 0:
            raise InputError(f"distill settings out of range: rounds {self.rounds} >= 0, epochs {self.epochs} >= 1, "
                             f"batch size {self.batch_size} >= 2, pseudo weight {self.pseudo_weight} >= 0")


def unlabeled_videos(given) -> list[str]:
    """The videos of a folder (recursively, sorted), or of a list file (one path per line, relative to the file)."""
    from .video import VIDEO_EXTENSIONS

    path = Path(given)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    elif path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [str(path.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise InputError(f"--unlabeled {given}: no such folder or list file")
    if not found:
        raise InputError(f"--unlabeled {given}: no videos in it")
    return found


def fidelity_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """The fidelity loss between the predicted and the target probability that video i beats video j,
    over all pairs of the batch; a pair of near-equal targets asks for little (soft targets)."""
    p = torch.sigmoid((pred[:, None] - pred[None, :]) / scale)
    q = torch.sigmoid((target[:, None] - target[None, :]) / scale)
    loss = 1 - (p * q + 1e-8).sqrt() - ((1 - p) * (1 - q) + 1e-8).sqrt()
    pair_weight = (weight[:, None] * weight[None, :]) * (1 - torch.eye(len(pred), device=pred.device))
    return (loss * pair_weight).sum() / pair_weight.sum().clamp_min(1e-8)


def _batch(stacked: dict, index: torch.Tensor) -> dict:
    """The videos at `index` of the stacked inputs, as the network takes them."""
    return float_inputs({name: values[index] for name, values in stacked.items()})


@torch.no_grad()
def predict(model: LiteRater, stacked: dict, batch_size: int = 64) -> list[float]:
    model.eval()
    count = len(stacked["frames"])
    return [score for start in range(0, count, batch_size)
            for score in model(**_batch(stacked, torch.arange(start, min(count, start + batch_size)))).tolist()]


def train_student(model: LiteRater, train: tuple[list[dict], list[float], list[float]],
                  val: tuple[list[dict], list[float]] | None, config: DistillConfig, progress: bool = True) -> dict:
    """Train on (inputs, targets, weights); keep the epoch of best validation SRCC (the last without validation)."""
    from tqdm.auto import tqdm

    from .metrics import srcc

    generator = torch.Generator().manual_seed(config.seed)
    inputs, targets, weights = stack_inputs(train[0]), torch.tensor(train[1]), torch.tensor(train[2])
    val_inputs = stack_inputs(val[0]) if val else None
    steps = math.ceil(len(targets) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps * config.epochs)
    history, best, best_state = [], -math.inf, None
    for epoch in tqdm(range(config.epochs), desc="student", unit="epoch", disable=None if progress else True):
        model.train()
        losses = []
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            if len(index) < 2:
                continue  # no pair to rank; the next epoch's order differs
            batch = _batch(inputs, index)
            flip = torch.rand(len(index), generator=generator) < 0.5  # a mirrored face video is as good
            for name in ("frames", "faces"):
                batch[name][flip] = batch[name][flip].flip(-1)
            pred, target, weight = model(**batch), targets[index], weights[index]
            l1 = ((pred - target).abs() / 100 * weight).sum() / weight.sum().clamp_min(1e-8)
            loss = l1 + config.rank_weight * fidelity_loss(pred, target, weight, config.rank_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses))}
        if val_inputs is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a constant early student has no SRCC yet
                record["val_srcc"] = srcc(predict(model, val_inputs), val[1])
        history.append(record)
        current = record.get("val_srcc", math.nan)
        current = -math.inf if math.isnan(current) else current  # an undefined SRCC never beats a number
        if val_inputs is None or best_state is None or current > best:
            best, best_state = current, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"history": history, "best_val_srcc": None if best == -math.inf else best}


def _extract(paths, extractor, cache_dir, progress, what) -> tuple[list, list[int], list[dict]]:
    """Inputs of the readable videos, their positions in `paths`, and the failures."""
    from .scoring import extract_features

    prepared, kept, failures = [], [], []
    batches = extract_features(paths, extractor, cache_dir, batch_size=16, progress=progress)
    for position, item in enumerate(item for batch in batches for item in batch):
        if item.features is None:
            failures.append({"path": item.path, "error": item.error})
            log.warning("%s: skipped %s: %s", what, item.path, item.error)
        else:
            prepared.append(item.features)
            kept.append(position)
    return prepared, kept, failures


def pseudo_label(teacher, paths: list[str], output: Path, cache_dir, batch_size: int, progress: bool):
    """Teacher score per readable video (a failed one is left out and reported), resumed from `output`;
    and the teacher's Scorer."""
    from .scoring import Scorer

    scorer = Scorer.from_pretrained(teacher, batch_size=batch_size, cache_dir=cache_dir)
    results = scorer.score(paths, output=output, progress=progress)
    for failed in (r for r in results if "error" in r):
        log.warning("not pseudo-labelled: %s: %s", failed["path"], failed["error"])
    return {r["path"]: r["score"] for r in results if "score" in r}, scorer


def self_train(teacher, extractor, data, pseudo: dict, config: DistillConfig, out: Path, cache_dir,
               progress: bool) -> Path:
    """One self-training round: the teacher's stage II goes on over labels plus pseudo-labels (resumable)."""
    from .model import FVQRater
    from .scoring import extract_features, split_features
    from .train import TrainConfig, train

    features, mos, _ = split_features(data, "train", extractor, cache_dir, progress=progress)
    paths = list(pseudo)
    for item in (item for batch in extract_features(paths, extractor, cache_dir, progress=progress) for item in batch):
        if item.features is not None:
            features.append(item.features)
            mos.append(pseudo[item.path])
    val_set = split_features(data, "val", extractor, cache_dir, progress=progress)[:2]
    model = FVQRater.from_pretrained(teacher, trainable=True)
    train(model, extractor.preparer.spatial, (features, mos), val_set,
          TrainConfig(stage=2, epochs=config.teacher_epochs, lr=config.teacher_lr, seed=config.seed), out,
          resume=True, progress=progress)
    return out / "best"


def distill(teacher, data, out, unlabeled=None, config: DistillConfig | None = None, student_init=None,
            cache_dir=None, progress: bool = True, log_line=print) -> dict:
    """Teacher -> pseudo-labels (-> self-training rounds) -> student in OUT/student; returns what each step gave.

    `cache_dir` is the teacher's feature cache (default OUT/teacher-features), e.g. the one `train` used.
    """
    from .data import read_split

    config = config or DistillConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or out / TEACHER_FEATURES_DIR
    train_records, val_records = read_split(data, "train"), read_split(data, "val")
    pool = unlabeled_videos(unlabeled) if unlabeled else []
    if config.rounds and not pool:
        raise InputError("--rounds needs --unlabeled videos: self-training fine-tunes the teacher on its pseudo-labels")
    report = {"teacher": str(teacher), "unlabeled": len(pool), "rounds": [], "settings": asdict(config)}

    pseudo = {}
    for round_ in range(config.rounds + 1 if pool else 0):
        pseudo, scorer = pseudo_label(teacher, pool, out / f"pseudo-labels-{round_}.jsonl", cache_dir,
                                      config.batch_size, progress)
        log_line(f"round {round_}: teacher {teacher} pseudo-labelled {len(pseudo)} of {len(pool)} unlabeled videos")
        report["rounds"].append({"teacher": str(teacher), "pseudo_labelled": len(pseudo), "failed": len(pool) - len(pseudo)})
        if round_ < config.rounds:
            teacher = self_train(teacher, scorer.extractor, data, pseudo, config, out / f"teacher-round{round_ + 1}",
                                 cache_dir, progress)
        del scorer

    torch.manual_seed(config.seed)  # the student's initial weights depend on the seed alone
    model = load_student(student_init) if student_init else LiteRater(config.lite)
    if student_init and model.config.input_key() != config.lite.input_key():
        log_line(f"--student-init {student_init}: its own input settings are used ({model.config.input_key()})")
    extractor = LiteExtractor(model.config)
    cache = out / INPUTS_DIR
    labelled, kept, train_failed = _extract([r.path for r in train_records], extractor, cache, progress, "train")
    targets = [train_records[i].mos for i in kept]
    pseudo_paths = list(pseudo)
    pseudo_inputs, pseudo_kept, pseudo_failed = _extract(pseudo_paths, extractor, cache, progress, "unlabeled")
    val_inputs, val_kept, _ = _extract([r.path for r in val_records], extractor, cache, progress, "val")
    train_set = (labelled + pseudo_inputs, targets + [pseudo[pseudo_paths[i]] for i in pseudo_kept],
                 [1.0] * len(labelled) + [config.pseudo_weight] * len(pseudo_inputs))
    val_set = (val_inputs, [val_records[i].mos for i in val_kept]) if len(val_kept) >= 3 else None
    result = train_student(model, train_set, val_set, config, progress)
    trained = {"teacher": str(teacher), "labelled": len(labelled), "pseudo_labelled": len(pseudo_inputs),
               "best_val_srcc": result["best_val_srcc"], "init": str(student_init) if student_init else None,
               "settings": {k: v for k, v in asdict(config).items() if k != "lite"}}
    save_student(model, out / STUDENT_DIR, trained)
    report.update(student=str(out / STUDENT_DIR), final_teacher=str(teacher), history=result["history"],
                  student_val_srcc=result["best_val_srcc"], labelled=len(labelled),
                  pseudo_labelled=len(pseudo_inputs), failed=train_failed + pseudo_failed)
    return report
