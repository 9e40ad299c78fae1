"""Where models load: straight onto the requested device, a dispatched backbone left in place."""
import pytest
import torch

from fvq_plugin.model import FVQRater
from fvq_plugin.tiny import tiny_rater


@pytest.fixture(scope="module")
def saved(tmp_path_factory, extractor):
    directory = tmp_path_factory.mktemp("placement") / "ckpt"
    tiny_rater(extractor).save_pretrained(directory)
    return directory


def test_a_dispatched_backbone_is_never_moved_and_the_heads_follow_its_embeddings(saved, monkeypatch):
    from transformers import InternVLForConditionalGeneration

    moved = []
    original = InternVLForConditionalGeneration.to
    monkeypatch.setattr(InternVLForConditionalGeneration, "to",
                        lambda self, *a, **k: moved.append((a, k)) or original(self, *a, **k))
    model = FVQRater.from_pretrained(saved, device_map={"": "cpu"})
    assert not moved
    embeddings = model.vlm.get_input_embeddings().weight.device
    assert all(p.device == embeddings for n, p in model.named_parameters() if not n.startswith("backbone."))


def test_the_scorer_loads_straight_onto_its_device(saved, monkeypatch):
    from fvq_plugin import checkpoint
    from fvq_plugin.scoring import Scorer

    calls = []
    load = checkpoint.load_backbone
    monkeypatch.setattr(checkpoint, "load_backbone", lambda path, **options: calls.append(options) or load(path, **options))
    Scorer.from_pretrained(saved, device="cpu")
    assert calls[0]["device_map"] == {"": "cpu"}
    Scorer.from_pretrained(saved, device="cpu", device_map="auto")
    assert calls[1]["device_map"] == "auto"


def test_pyiqa_loads_on_the_metrics_device_in_bfloat16_on_a_gpu(saved, monkeypatch):
    import pyiqa

    from fvq_plugin.integrations import pyiqa as adapter
    from fvq_plugin.scoring import Scorer

    loads = []

    class Loaded:
        def __init__(self, path, device, **options):
            loads.append({"device": torch.device(device), **options})
            self.model, self.extractor = torch.nn.Linear(1, 1), type("E", (), {"temporal": None})()

    monkeypatch.setattr(Scorer, "from_pretrained", Loaded)
    metric = pyiqa.create_metric("fvq_rater", device="cpu", pretrained_model_path=str(saved), face_backend="yunet-sface")
    assert len(loads) == 1 and loads[0]["device"].type == "cpu" and loads[0]["dtype"] is None
    assert loads[0]["feature_overrides"] == {"face_backend": "yunet-sface"} and loads[0]["merge_lora"] is True
    # On a GPU the backbone is read from disk straight onto it, in bfloat16; never built on the CPU first.
    arch = adapter.FVQRaterArch(pretrained_model_path=str(saved))
    assert arch.scorer is None
    with pytest.raises((RuntimeError, AssertionError)):  # pyiqa's .to(device) right after building the network
        arch.to("cuda")  # no GPU here: moving the stub fails, after the load was asked for
    assert loads[-1]["device"] == torch.device("cuda") and loads[-1]["dtype"] == torch.bfloat16
    # With a device_map nothing moves the dispatched backbone, not even a parent module's .to().
    dispatched = adapter.FVQRaterArch(pretrained_model_path=str(saved), device_map="auto")
    torch.nn.Sequential(dispatched).to(torch.float64)
    assert loads[-1]["device_map"] == "auto" and dispatched.rater.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="unknown options \\['colour'\\]"):
        adapter.FVQRaterArch(pretrained_model_path=str(saved), colour="red")
    assert metric.net.scorer is not None


def test_insightface_runs_on_the_extractors_device(monkeypatch):
    from fvq_plugin.features import FeatureConfig, pipeline
    from fvq_plugin.features import face as face_module

    devices = []

    class Recorded:
        dim = 512

        def __init__(self, backend, model_dir, det_threshold, device, embedding):
            devices.append((backend, device))

    monkeypatch.setattr(face_module, "FaceFeatures", Recorded)
    for backend in ("insightface", "yunet-sface"):
        pipeline.FramePreparer(FeatureConfig(streams=("spatial", "face"), face_backend=backend), device="cuda:1")
    assert devices == [("insightface", "cuda:1"), ("yunet-sface", "cpu")]
