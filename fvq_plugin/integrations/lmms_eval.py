"""FVQ-Rater as the lmms-eval model `fvq_rater`, and the fvq20k task folder for lmms-eval.

    lmms-eval --model fvq_rater --model_args pretrained=/ckpt/FVQ-Rater --tasks fvq20k --batch_size 8

A thin adapter over the Scorer, which owns decoding, feature extraction, caching and batching:
every request is answered "The video quality is {level}. The score is {score:.2f}." from one
prefill (no autoregressive decoding). Found through lmms-eval's `lmms_eval.models` entry point
(`manifest`); the task folder is added to lmms-eval's TaskManager by `add_task_folder` (see
fvq_plugin.integrations.discovery for why that needs a hook). Under
`accelerate launch -m lmms_eval`, lmms-eval gives each rank its shard of the videos and gathers
the per-video results on rank 0; this class only scores the requests it is handed.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

from accelerate import Accelerator
from lmms_eval.api.model import lmms
from tqdm import tqdm

from ..answers import RatedAnswer, error_answer

log = logging.getLogger(__name__)
MODEL_NAME = "fvq_rater"
_MARK = "_fvq_plugin_task_folder"


def manifest():
    """Entry point (group `lmms_eval.models`): where lmms-eval finds the `fvq_rater` class."""
    from lmms_eval.models.registry_v2 import ModelManifest  # imported here: lmms_eval.models is loading us

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{FVQRaterLMM.__name__}")


def task_folder() -> str:
    """The installed `tasks` folder (fvq_plugin.tasks), wherever package_dir put it."""
    return importlib.util.find_spec("fvq_plugin.tasks").submodule_search_locations[0]


def add_task_folder(task_manager_class) -> None:
    """Index our tasks in every TaskManager, after lmms-eval's own and any --include_path."""
    original = task_manager_class.initialize_tasks
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        ours = task_folder()
        if not any(os.path.realpath(p) == os.path.realpath(ours) for p in paths):
            paths.append(ours)
        return original(self, include_path=paths, include_defaults=include_defaults)

    setattr(initialize_tasks, _MARK, True)
    task_manager_class.initialize_tasks = initialize_tasks


class FVQRaterLMM(lmms):
    """FVQ-Rater for lmms-eval.

    model_args:
        pretrained: FVQ-Rater checkpoint folder (default: env FVQ_RATER_WEIGHTS).
        device: cpu, cuda, cuda:1 (default: this process's accelerator device).
        dtype: auto, float32, bfloat16, float16.   device_map: e.g. auto (shard a large backbone).
        attn_implementation: sdpa, flash_attention_2, eager.
        batch_size: videos per forward.   workers: DataLoader processes decoding ahead.
        threads: threads decoding ahead in this process (instead of workers).
        cache_dir: feature cache folder (a second run skips decoding and feature extraction).
        timeout_per_video: seconds; a video still decoding after this long is answered as failed.
        merge_lora: fold LoRA into the base weights (default true).
        video_backend, face_backend, face_models, portrait_model, temporal_weights: feature settings
            overriding the checkpoint's.
    """

    def __init__(self, pretrained=None, device=None, dtype=None, device_map=None, attn_implementation=None,
                 batch_size=8, workers=0, threads=0, cache_dir=None, merge_lora=True, timeout_per_video=None,
                 max_batch_size=None,  # lmms-eval's, unused
                 **feature_settings):
        super().__init__()
        from ..checkpoint import checkpoint_path, parse_dtype
        from ..features.pipeline import FEATURE_OVERRIDES
        from ..scoring import Scorer

        unknown = sorted(set(feature_settings) - set(FEATURE_OVERRIDES))
        if unknown:
            raise ValueError(f"fvq_rater: unknown model_args {unknown}; see `help(FVQRaterLMM)`")

        self.accelerator = Accelerator()
        self._rank = self.accelerator.local_process_index
        self._world_size = self.accelerator.num_processes
        # One device per rank when lmms-eval runs under accelerate launch.
        self._device = str(self.accelerator.device) if self._world_size > 1 else device or str(self.accelerator.device)
        self.scorer = Scorer.from_pretrained(
            checkpoint_path(pretrained, "--model_args pretrained=DIR"), device=self._device,
            dtype=parse_dtype(dtype), device_map=device_map, attn_implementation=attn_implementation,
            feature_overrides=feature_settings, merge_lora=str(merge_lora).lower() not in ("false", "0", "no"),
            batch_size=int(batch_size), workers=int(workers), threads=int(threads), cache_dir=cache_dir,
            timeout_per_video=None if timeout_per_video is None else float(timeout_per_video))

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def device(self):
        return self._device

    def generate_until(self, requests) -> list[str]:
        paths = [self._video_path(request) for request in requests]
        with tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding") as bar:
            results = self.scorer.score(paths, progress=False, on_batch=bar.update)
        for result in results:
            if result.get("flags"):
                log.warning("%s: scored with flags %s", result["path"], ", ".join(result["flags"]))
        return [RatedAnswer(r["text"], r["score"]) if "score" in r else error_answer(f"{r['path']}: {r['error']}")
                for r in results]

    def _video_path(self, request) -> str:
        _context, _generation, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not (isinstance(visuals, list) and len(visuals) == 1 and isinstance(visuals[0], (str, os.PathLike))):
            raise ValueError(f"fvq_rater rates one video (or image) file per request; task {task!r} document {doc_id} "
                             f"gave {type(visuals).__name__} {visuals!r:.200}")
        return os.fspath(visuals[0])

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "fvq_rater does not score arbitrary continuations: it builds its own prompt from the video's four "
            "streams and ignores the task's text, so a log-likelihood of another task's context would be "
            "meaningless. Its level-word probabilities are in the Scorer's results (level_probs).")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("fvq_rater answers one rating per video; it has no multi-round dialogue")
