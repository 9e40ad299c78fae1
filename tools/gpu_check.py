"""Prepared GPU check of the FVQ-Rater model path (run by tools/gpu_check.sh; see the comment there).

Per configuration (random weights at InternVL2-1B / InternVL2-8B shapes, bf16, one GPU):
  throughput  fvq_plugin.bench.bench_model: prefill videos/s and peak GPU memory at batch 1 and 8
  build       FVQRater.random (on the GPU, in the target dtype), score head given random weights
  save        FVQRater.save_pretrained to a temporary folder on local disk
  load        FVQRater.from_pretrained(dir, dtype=..., device_map=..., attn_implementation="sdpa"), timed
  attention   the attention implementation in the loaded config and the SDPA kernels one forward ran
  batch       the same 8 random videos scored as one batch of 8 and as 8 batches of 1: max |diff| of scores

Imports only the model path (fvq_plugin.model, .tiny, .bench and torch/transformers/peft/safetensors):
no video decoding, face or pyiqa/lmms-eval libraries. `--smoke` runs the same steps for the tiny
configuration in float32 on the CPU in a few seconds (tests/test_gpu_check.py).

A global budget (--budget-s) is checked before each step: a step that would not finish in the time
left is skipped with a SKIP line. The JSON report is rewritten after every step, so a run killed
from outside still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python tools/gpu_check.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GPU_SIZES = ("internvl2-1b", "internvl2-8b")
BATCHES = (1, 8)
EQUALITY_VIDEOS = 8
FACE_DIM = 512
# Max |score(batch of 8) - score(batch of 1)| on the 0-100 scale.
TOLERANCE_POINTS = {"low": 0.5, "float32": 1e-3}
# Max |level logit difference| under which a video that picks another level word in the two passes
# (a near tie) is accepted: bf16 logits of magnitude ~10 are rounded in steps of 0.03-0.06.
LOGIT_TOLERANCE = {"low": 0.25, "float32": 1e-3}
TOLERANCE_WHY = {
    "low": ("bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%). Batch 1 and batch 8 run different GEMM and "
            "attention kernels that sum in different orders, so activations may differ by about one bf16 step per "
            "layer; through ~30 layers the final hidden state differs by well under 1%, and the check's random score "
            "head (about 25 points per unit relative change of the hidden state) turns that into a few tenths of a "
            "point. 0.5 points is 1/40 of a level bin (20 points), below what a MOS label distinguishes; a real "
            "batching bug (padding, a mixed-up video, a wrong position) moves scores by whole points."),
    "float32": "float32 differs between batch sizes only by summation order (~1e-6 relative): 1e-3 points.",
}
# Rough seconds per step on one H100/H200 (the smoke run takes a fraction of a second per step);
# a step starts only if the time left covers it and the steps after it in its chain.
ESTIMATES_S = {
    "tiny": {"throughput": 5, "build": 5, "save": 5, "load": 5, "attention": 5, "batch": 5},
    "internvl2-1b": {"throughput": 45, "build": 20, "save": 25, "load": 20, "attention": 10, "batch": 15},
    "internvl2-8b": {"throughput": 90, "build": 45, "save": 120, "load": 60, "attention": 20, "batch": 30},
}
CHAIN = ("build", "save", "load", "attention", "batch")  # each needs the one before it
SDPA_OP = re.compile(r"^aten::_scaled_dot_product_\w+|^aten::scaled_dot_product_attention$")
KERNEL_HINT = re.compile(r"flash|fmha|cudnn.*(attn|attention)|efficient_attention", re.IGNORECASE)


# ----- helpers -------------------------------------------------------------------------------------

def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    """Peak GPU memory allocated since the last reset; on the CPU the process's peak RSS so far."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free(device: str) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
           "peft": _version("peft"), "accelerate": _version("accelerate"), "safetensors": _version("safetensors"),
           "device": device,
           "flash_attn_package": importlib.util.find_spec("flash_attn") is not None}
    if _is_cuda(device):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=torch.cuda.get_device_name(index), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   sdpa_backends_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                          "math": torch.backends.cuda.math_sdp_enabled()})
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def random_videos(model, count: int, seed: int = 0) -> dict:
    """`count` random videos for every stream (float32, CPU; the model casts), some frames without a face."""
    generator = torch.Generator().manual_seed(seed)
    frames, (height, width) = model.config.num_frames, model.image_size
    cpu = {"generator": generator, "device": "cpu", "dtype": torch.float32}
    return {"pixel_values": torch.randn(count, frames, 3, height, width, **cpu),
            "portrait_values": torch.randn(count, frames, 3, height, width, **cpu),
            "face_embeds": torch.randn(count, frames, model.config.face_dim, **cpu),
            "face_mask": torch.rand(count, frames, **cpu) > 0.25,
            "temporal": torch.randn(count, model.config.temporal_dim, **cpu)}


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----- the steps -----------------------------------------------------------------------------------

def step_throughput(size, device, dtype, repeats) -> dict:
    from fvq_plugin.bench import bench_model

    result = bench_model(size, device, dtype, BATCHES, repeats=repeats)
    return {"prompt_tokens": result["prompt_tokens"],
            "batches": {str(b): {k: round(v, 4) for k, v in r.items()} for b, r in result["batches"].items()},
            "b8_over_b1": round(next(v for k, v in result.items() if k.startswith("throughput_")), 3)}


def backbone_config(size, tokenizer):
    from fvq_plugin.bench import real_size_backbone
    from fvq_plugin.tiny import tiny_backbone_config

    return tiny_backbone_config(tokenizer) if size == "tiny" else real_size_backbone(size, tokenizer)


def step_build(size, device, dtype):
    """A random FVQ-Rater built in place on `device` in `dtype` (as bench_model builds it)."""
    from fvq_plugin.model import FVQRater, FVQRaterConfig
    from fvq_plugin.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    with torch.device(device), _default_dtype(dtype):
        model = FVQRater.random(FVQRaterConfig(face_dim=FACE_DIM), backbone_config(size, tokenizer), tokenizer)
        randomise_score_head(model.score_head)
    model = model.to(dtype).eval()
    return model, {"parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                   "prompt_tokens": int(model.prompt_ids.numel())}


def randomise_score_head(head, seed: int = 1) -> None:
    """A score that depends on the video: the untrained head's output layer is zero (every video scores
    50), which would make batch 1 vs 8 agree trivially. Every Linear layer gets N(0, 1/fan_in) weights
    (the signal keeps its scale through the layers), zero biases, and the output layer bias 0.5 (mid-scale)."""
    layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    output = head.output
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            weight = torch.randn(layer.weight.shape, generator=generator, device="cpu", dtype=torch.float32)
            layer.weight.copy_(weight / layer.weight.shape[1] ** 0.5)
            if layer.bias is not None:
                layer.bias.fill_(0.5 if layer is output else 0.0)


def step_save(model, device, dtype, directory: Path) -> dict:
    # save_pretrained rebuilds a plain copy of the random backbone to write it: build it on the GPU
    # in the target dtype, so the checkpoint is bf16 (as released InternVL checkpoints are).
    with torch.device(device), _default_dtype(dtype):
        model.save_pretrained(directory)
    return {"checkpoint_gb": round(_folder_gb(directory), 3)}


def step_load(directory, device, dtype):
    from fvq_plugin.model import FVQRater

    return FVQRater.from_pretrained(directory, dtype=dtype, device_map=device, attn_implementation="sdpa")


def step_attention(model, device) -> dict:
    """Which attention implementation the loaded model is configured with, and what one forward ran."""
    config = model.vlm.config
    configured = {"model": getattr(config, "_attn_implementation", None),
                  "vision": getattr(config.vision_config, "_attn_implementation", None),
                  "text": getattr(config.text_config, "_attn_implementation", None)}
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _is_cuda(device) else [])
    if not _is_cuda(device):  # kineto logs an ERROR line for the GPU it looks for and does not find
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    batch = _to(random_videos(model, 1, seed=99), device)
    try:
        with torch.no_grad(), profile(activities=activities) as profiler:
            model(**batch)
            _sync(device)
        names = {event.key for event in profiler.key_averages()}
    except Exception as error:  # no profiler (CUPTI) here: the configured implementation is still worth reporting
        return {"configured": configured, "sdpa_ops": [], "sdpa_backends_run": [], "attention_kernels": [],
                "sdpa_used": None, "flash_used": None, "profiler_error": f"{type(error).__name__}: {error}"}
    sdpa_ops = sorted(n for n in names if SDPA_OP.search(n))
    kernels = sorted({n[:90] for n in names if KERNEL_HINT.search(n) and not n.startswith("aten::")})
    backends = sorted({backend for op in sdpa_ops for backend in ("flash", "efficient", "cudnn", "math")
                       if backend in op})
    return {"configured": configured, "sdpa_ops": sdpa_ops, "sdpa_backends_run": backends,
            "attention_kernels": kernels[:8], "sdpa_used": bool(sdpa_ops),
            "flash_used": any("flash" in n.lower() for n in sdpa_ops + kernels)}


def step_batch_equality(model, device, tolerance: float, logit_tolerance: float) -> dict:
    """Score the same videos as one batch of 8 and as 8 batches of 1 (unclamped 0-100 scores).

    Where the recipe reads the score after the LM's own level word, a video whose top two level
    logits are nearly tied may pick another level word in one of the passes, and so score another
    continuation: such a flip is reported and its score left out of the comparison; it is accepted
    only while the two passes' level logits agree within `logit_tolerance` (a tie, not a bug)."""
    videos = random_videos(model, EQUALITY_VIDEOS, seed=0)
    hidden = []
    hook = model.score_head.register_forward_pre_hook(lambda module, args: hidden.append(args[0].float().cpu()))
    try:
        with torch.no_grad():
            together = model(**_to(videos, device))
            alone = [model(**_to({k: v[i:i + 1] for k, v in videos.items()}, device)) for i in range(EQUALITY_VIDEOS)]
    finally:
        hook.remove()
    _sync(device)
    score_8 = together.score.float().cpu()
    score_1 = torch.cat([o.score.float().cpu() for o in alone])
    logits_8 = together.level_logits.float().cpu()
    logits_1 = torch.cat([o.level_logits.float().cpu() for o in alone])
    level_8, level_1 = logits_8.argmax(-1), logits_1.argmax(-1)
    logit_difference = (logits_8 - logits_1).abs().max().item()
    top2 = logits_8.topk(2, -1).values
    flips = [{"video": i, "level_batch8": int(level_8[i]), "level_batch1": int(level_1[i]),
              "top2_gap": round((top2[i, 0] - top2[i, 1]).item(), 5)}
             for i in range(EQUALITY_VIDEOS) if level_8[i] != level_1[i]]
    same = level_8 == level_1
    difference = (score_8 - score_1).abs()[same].max().item() if same.any() else float("nan")
    hidden_8, hidden_1 = hidden[0][same], torch.cat(hidden[1:])[same]
    return {"videos": EQUALITY_VIDEOS, "max_abs_score_diff": difference, "tolerance_points": tolerance,
            "logit_tolerance": logit_tolerance,
            "passed": bool(same.any() and difference <= tolerance
                           and (not flips or logit_difference <= logit_tolerance)),
            "scores_batch8": [round(s, 3) for s in score_8.tolist()],
            "scores_batch1": [round(s, 3) for s in score_1.tolist()],
            "score_spread_std": score_8.std().item(),
            "level_flips": flips, "compared_videos": int(same.sum()),
            "max_abs_level_logit_diff": logit_difference,
            "max_abs_level_prob_diff": (logits_8.softmax(-1) - logits_1.softmax(-1)).abs().max().item(),
            "hidden_max_rel_diff": ((hidden_8 - hidden_1).abs().max() / hidden_8.pow(2).mean().sqrt()).item()
            if len(hidden_8) else float("nan")}


# ----- the run -------------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.deadline = self.started + args.budget_s
        self.report = {"mode": "smoke" if args.smoke else "gpu",
                       "started": datetime.datetime.now().isoformat(timespec="seconds"),
                       "budget_s": args.budget_s, "dtype": str(args.dtype).replace("torch.", ""),
                       "attn_implementation_requested": "sdpa", "configs": {}, "skipped": [], "errors": []}
        self.json_path = Path(args.json)
        self.current = ("-", "start")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.json_path.with_name(self.json_path.name + ".partial")
        partial.write_text(json.dumps(self.report, indent=2, default=str))
        partial.replace(self.json_path)

    def run_step(self, size, name, needs_s, function):
        """(ok, value): runs `function` unless the time left is under `needs_s`; records a SKIP or ERROR."""
        left = self.left()
        if left < needs_s:
            self.report["skipped"].append({"config": size, "step": name, "left_s": round(left, 1), "needs_s": needs_s})
            self.say(f"  SKIP {name}: {max(left, 0):.0f} s left of the {self.args.budget_s:.0f} s budget, "
                     f"needs ~{needs_s:.0f} s")
            self.save()
            return False, None
        started = time.perf_counter()
        self.current = (size, name)
        try:
            value = function()
        except Exception as error:  # one failing step (an OOM at 8B, say) must not lose the rest
            self.report["errors"].append({"config": size, "step": name, "error": f"{type(error).__name__}: {error}",
                                          "traceback": traceback.format_exc(limit=6)[-3000:]})
            self.say(f"  ERROR {name}: {type(error).__name__}: {str(error)[:300]}")
            self.save()
            return False, None
        finally:
            _free(self.args.device)
        self.report["configs"][size].setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 2)
        return True, value

    def config(self, size: str) -> None:
        args, device, dtype = self.args, self.args.device, self.args.dtype
        estimates = ESTIMATES_S.get(size, ESTIMATES_S["internvl2-8b"])
        result = self.report["configs"][size] = {}
        self.say(f"\n== {size} ({self.report['dtype']} on {device}) ==")

        _reset_peak(device)
        ok, throughput = self.run_step(size, "throughput", estimates["throughput"],
                                       lambda: step_throughput(size, device, dtype, args.repeats))
        if ok:
            result["throughput"] = throughput
            self.say(f"  prefill ({throughput['prompt_tokens']} prompt tokens per video)")
            self.say("    batch  s/forward  videos/s  peak MB")
            for batch, row in throughput["batches"].items():
                self.say(f"    {batch:>5}  {row['seconds']:9.4f}  {row['videos_per_s']:8.2f}  "
                         f"{row['peak_memory_mb']:7.0f}")
            self.say(f"    throughput b8 / b1: {throughput['b8_over_b1']:.2f}")
        self.save()

        def needs(step):  # this step and the rest of its chain
            return sum(estimates[s] for s in CHAIN[CHAIN.index(step):])

        scratch = Path(tempfile.mkdtemp(prefix=f"fvq-gpu-check-{size}-", dir=args.tmp))
        model = loaded = None
        try:
            _reset_peak(device)
            ok, built = self.run_step(size, "build", needs("build"), lambda: step_build(size, device, dtype))
            if not ok:
                return
            (model, result["build"]), built = built, None
            result["build"]["seconds"] = result["step_seconds"]["build"]
            result["build"]["peak_memory_mb"] = round(_peak_mb(device))
            self.say(f"  build: {result['build']['parameters_b']} B parameters in {result['build']['seconds']:.1f} s")

            free_gb = shutil.disk_usage(scratch).free / 1e9
            wanted_gb = 1.2 * result["build"]["parameters_b"] * torch.finfo(dtype).bits / 8 + 0.1
            if free_gb < wanted_gb:
                self.report["errors"].append({"config": size, "step": "save",
                                              "error": f"{scratch}: {free_gb:.1f} GB free, needs ~{wanted_gb:.1f} GB"})
                self.say(f"  ERROR save: {scratch} has {free_gb:.1f} GB free, needs ~{wanted_gb:.1f} GB "
                         "(pass --tmp DIR on a larger disk)")
                return
            ok, saved = self.run_step(size, "save", needs("save"), lambda: step_save(model, device, dtype, scratch))
            model = None  # the built model is not needed after saving: free its memory before loading
            _free(device)
            if not ok:
                return
            result["save"] = {**saved, "seconds": result["step_seconds"]["save"]}
            self.say(f"  save_pretrained: {saved['checkpoint_gb']:.2f} GB in {result['save']['seconds']:.1f} s")

            _reset_peak(device)
            _sync(device)
            ok, loaded = self.run_step(size, "load", needs("load"), lambda: step_load(scratch, device, dtype))
            _sync(device)
            if not ok:
                return
            result["load"] = {"seconds": result["step_seconds"]["load"], "peak_memory_mb": round(_peak_mb(device)),
                              "dtype": str(dtype).replace("torch.", ""), "device_map": device,
                              "attn_implementation": "sdpa", "page_cache": "warm (written just before)"}
            self.say(f"  from_pretrained(dtype={result['load']['dtype']}, device_map={device!r}, "
                     f"attn_implementation='sdpa'): {result['load']['seconds']:.2f} s, "
                     f"peak {result['load']['peak_memory_mb']} MB")

            ok, attention = self.run_step(size, "attention", needs("attention"), lambda: step_attention(loaded, device))
            if ok:
                result["attention"] = attention
                configured = ", ".join(f"{k}={v}" for k, v in attention["configured"].items())
                if attention.get("profiler_error"):
                    self.say(f"  attention: configured {configured}; kernels unknown (profiler failed: "
                             f"{attention['profiler_error'][:200]})")
                else:
                    self.say(f"  attention: configured {configured}; ran "
                             f"{', '.join(attention['sdpa_ops']) or 'no SDPA op'}"
                             f" -> sdpa {'used' if attention['sdpa_used'] else 'NOT used'}, flash "
                             f"{'used' if attention['flash_used'] else 'not used'}")
                if attention["attention_kernels"]:
                    self.say(f"    kernels: {'; '.join(attention['attention_kernels'][:3])}")

            precision = "float32" if dtype == torch.float32 else "low"
            tolerance = TOLERANCE_POINTS[precision]
            _reset_peak(device)
            ok, equality = self.run_step(size, "batch", needs("batch"),
                                         lambda: step_batch_equality(loaded, device, tolerance,
                                                                     LOGIT_TOLERANCE[precision]))
            if ok:
                equality["peak_memory_mb"] = round(_peak_mb(device))
                result["batch_equality"] = equality
                verdict = "PASS" if equality["passed"] else "FAIL"
                self.say(f"  batch 8 vs 8 x batch 1 ({EQUALITY_VIDEOS} videos): max |score diff| = "
                         f"{equality['max_abs_score_diff']:.4g} points (tolerance {tolerance:g}) -> {verdict}")
                self.say(f"    scores spread (std) {equality['score_spread_std']:.2f} points; level-logit max diff "
                         f"{equality['max_abs_level_logit_diff']:.2e}; hidden max rel diff "
                         f"{equality['hidden_max_rel_diff']:.2e}; peak {equality['peak_memory_mb']} MB")
                for flip in equality["level_flips"]:
                    self.say(f"    level flip, video {flip['video']}: {flip['level_batch8']} (batch 8) vs "
                             f"{flip['level_batch1']} (batch 1), top-2 gap {flip['top2_gap']:.3g}: a near tie "
                             f"(score left out) if level logits agree within {equality['logit_tolerance']:g}")
        finally:
            model = loaded = None
            _free(device)
            shutil.rmtree(scratch, ignore_errors=True)
            self.save()

    def run(self) -> int:
        args = self.args
        env = self.report["environment"] = environment(args.device)
        self.say(f"FVQ-Rater GPU check ({self.report['mode']}), budget {args.budget_s:.0f} s, report -> {self.json_path}")
        self.say(f"python {env['python']}  torch {env['torch']}  transformers {env['transformers']}  "
                 f"peft {env['peft']}  accelerate {env['accelerate']}  safetensors {env['safetensors']}")
        if env.get("gpu"):
            self.say(f"GPU: {env['gpu']} ({env['gpu_memory_gb']} GiB, sm {env['compute_capability']}), "
                     f"CUDA {env['cuda']}, cuDNN {env['cudnn']}")
            self.say("SDPA backends enabled: " + ", ".join(f"{k}={v}" for k, v in env["sdpa_backends_enabled"].items()))
        else:
            self.say(f"CPU: {env['cpu']}, {env['threads']} threads (no GPU)")
        self.say(f"flash_attn package: {'installed' if env['flash_attn_package'] else 'not installed'} "
                 "(attn_implementation='sdpa' uses torch's own flash kernel where it applies)")
        tolerance = TOLERANCE_POINTS["float32" if args.dtype == torch.float32 else "low"]
        self.report["tolerance"] = {"points": tolerance,
                                    "why": TOLERANCE_WHY["float32" if args.dtype == torch.float32 else "low"]}
        self.say(f"batch-equality tolerance {tolerance:g} points: {self.report['tolerance']['why']}")
        self.save()
        try:
            for size in args.sizes:
                self.config(size)
        except KeyboardInterrupt:  # tools/gpu_check.sh's time limit sends SIGINT: still write the summary
            size, step = self.current
            self.report["interrupted"] = {"config": size, "step": step, "after_s": round(time.perf_counter() -
                                                                                         self.started, 1)}
            self.say(f"\nINTERRUPTED during {size} {step} (time limit or Ctrl-C): summarising what was measured")
        return self.summary()

    def summary(self) -> int:
        report = self.report
        checks = [c["batch_equality"]["passed"] for c in report["configs"].values() if "batch_equality" in c]
        if report["errors"] or not all(checks):
            verdict = "FAIL"
        elif report.get("interrupted"):
            verdict = "INCOMPLETE (interrupted)"
        elif not checks:
            verdict = "INCOMPLETE"
        else:
            verdict = "PASS" + (" (some steps skipped)" if report["skipped"] else "")
        report["verdict"] = verdict
        self.save()
        self.say("\n== summary ==")
        self.say("config         load s  b1 videos/s  b8 videos/s  b8 peak MB  max|diff|  batch check")
        for size, c in report["configs"].items():
            t = c.get("throughput", {}).get("batches", {})
            eq = c.get("batch_equality")

            def cell(value, spec):
                return format(value, spec) if value is not None else "-"
            self.say(f"{size:<13} {cell(c.get('load', {}).get('seconds'), '7.2f'):>7}  "
                     f"{cell(t.get('1', {}).get('videos_per_s'), '11.2f'):>11}  "
                     f"{cell(t.get('8', {}).get('videos_per_s'), '11.2f'):>11}  "
                     f"{cell(t.get('8', {}).get('peak_memory_mb'), '10.0f'):>10}  "
                     f"{cell(eq and eq['max_abs_score_diff'], '9.3g'):>9}  "
                     f"{('PASS' if eq['passed'] else 'FAIL') if eq else '-'}")
        for skip in report["skipped"]:
            self.say(f"skipped: {skip['config']} {skip['step']} ({skip['left_s']} s left, needs ~{skip['needs_s']} s)")
        if report.get("interrupted"):
            stop = report["interrupted"]
            self.say(f"interrupted: during {stop['config']} {stop['step']} after {stop['after_s']} s")
        for error in report["errors"]:
            self.say(f"error: {error['config']} {error['step']}: {error['error'][:300]}")
        self.say(f"VERDICT: {verdict}  ({report['elapsed_s']:.1f} s; JSON: {self.json_path})")
        return 1 if verdict == "FAIL" else 3 if report.get("interrupted") else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, float32, CPU, a few seconds")
    parser.add_argument("--sizes", help=f"comma-separated; default {','.join(GPU_SIZES)} (tiny with --smoke)")
    parser.add_argument("--device", help="default cuda (cpu with --smoke)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default bfloat16 (float32 with --smoke)")
    parser.add_argument("--budget-s", type=float, help="start no step past this many seconds (default 420; 120 "
                                                       "with --smoke)")
    parser.add_argument("--repeats", type=int, help="timed forwards per batch size (default 3; 1 with --smoke)")
    parser.add_argument("--tmp", default=os.environ.get("FVQ_GPU_CHECK_TMP"),
                        help="where to write the temporary checkpoints (default: the system temp dir)")
    parser.add_argument("--json", help="report path (default $OUT/gpu_check.json if $OUT is set, else "
                                       "./gpu_check.json)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",") if args.sizes else (["tiny"] if args.smoke else list(GPU_SIZES))
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    args.budget_s = args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 420.0)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if not args.json:
        args.json = str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    if _is_cuda(args.device) and not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__}: run with --smoke for the CPU check",
              file=sys.stderr)
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # tools/gpu_check.sh's time limit: SIGINT (also when started with SIGINT ignored) or SIGTERM.
        previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return Check(args).run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
