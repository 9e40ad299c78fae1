"""lmms-eval task functions for FVQ-20K: a document is one video {name, path, mos}.

Answers become scores with fvq_plugin.answers (a number, a number on a stated scale, or a level
word); unparsed answers and videos the model could not read are counted, never scored.
The correlations are fvq_plugin.metrics' (PLCC after the 4-parameter logistic fit), over every
video with a score, so `lmms-eval --model fvq_rater --tasks fvq20k` reports what
`fvq-rater eval --split test` reports.
"""
from __future__ import annotations

import os

from lmms_eval.api.task import ConfigurableTask

from fvq_plugin.answers import FAILED, SCORED, UNPARSED, parse_answer
from fvq_plugin.common import DATA_ROOT_ENV


class FVQ20KTask(ConfigurableTask):
    """Reads the split from a local FVQ-20K root instead of the hub (FVQ20K_ROOT or dataset_kwargs.root)."""

    def __init__(self, config: dict):
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def download(self, dataset_kwargs=None) -> None:
        import datasets

        from fvq_plugin.data import DatasetError, read_split

        root = (dataset_kwargs or {}).get("root") or os.environ.get(DATA_ROOT_ENV)
        if not root:
            raise ValueError(f"{self.config.task}: no FVQ-20K root. Set {DATA_ROOT_ENV}=/path/to/FVQ-20K (the folder holding "
                             "train/ val/ test/, each with labels.txt and videos/) or give dataset_kwargs.root in a "
                             "task YAML that includes this task. `fvq-rater make-demo-data DIR` writes a small one.")
        split = self.config.test_split
        try:
            records = read_split(root, split)
        except DatasetError as error:
            raise ValueError(f"{self.config.task}: the FVQ-20K root {root} is not usable; check it with "
                             f"`fvq-rater validate {root}`. {error}") from None
        docs = [{"name": r.name, "path": os.path.abspath(r.path), "mos": r.mos} for r in records]
        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset


def doc_to_visual(doc) -> list[str]:
    return [doc["path"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{kwargs['prompt']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc) -> float:
    return doc["mos"]


def process_results(doc, results) -> dict:
    """Every correlation gets the video's (path, MOS, parsed score): lmms-eval's --log_samples shows them."""
    score, status = parse_answer(results[0] if results else None)
    pair = {"path": doc["path"], "mos": doc["mos"], "pred": score}
    return {"srcc": pair, "plcc": pair, "krcc": pair, "rmse": pair, "n_scored": int(status == SCORED),
            "n_unparsed": int(status == UNPARSED), "n_failed": int(status == FAILED)}


def _scored(pairs) -> tuple[list[float], list[float]]:
    pairs = [p for p in pairs if p["pred"] is not None]
    return [p["pred"] for p in pairs], [p["mos"] for p in pairs]


def aggregate_srcc(pairs) -> float:
    from fvq_plugin.metrics import srcc

    return srcc(*_scored(pairs))


def aggregate_plcc(pairs) -> float:
    from fvq_plugin.metrics import plcc

    return plcc(*_scored(pairs))


def aggregate_krcc(pairs) -> float:
    from fvq_plugin.metrics import krcc

    return krcc(*_scored(pairs))


def aggregate_rmse(pairs) -> float:
    from fvq_plugin.metrics import rmse

    return rmse(*_scored(pairs))


def aggregate_count(flags) -> int:
    return int(sum(flags))
