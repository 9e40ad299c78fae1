import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fvq_plugin.demo import DEMO_FEATURES
from fvq_plugin.errors import InputError
from fvq_plugin.features import FeatureConfig, FeatureExtractor
from fvq_plugin.features.spatial import SpatialFeatures
from fvq_plugin.model import FVQRater
from fvq_plugin.tiny import tiny_rater
from fvq_plugin.tower_pretraining import (CROP_SIZE, DEGRADATIONS, TOWER_FILE, TowerPretraining, degraded_crops,
                                          main, pretrain_tower, tiny_tower)

from conftest import TINY_FEATURES


@pytest.fixture(scope="module")
def demo_sized_extractor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SlowFast: said loudly, tested elsewhere
        return FeatureExtractor(FeatureConfig(**{**TINY_FEATURES, "image_size": DEMO_FEATURES.image_size}))


def test_degraded_crops_are_reproducible_and_each_degradation_is_off_in_about_half_of_them():
    crops, severities = degraded_crops(40, seed=3)
    again, same = degraded_crops(40, seed=3)
    assert crops.dtype == np.uint8 and crops.shape == (40, CROP_SIZE, CROP_SIZE, 3)
    assert severities.shape == (40, len(DEGRADATIONS))
    assert np.array_equal(crops, again) and np.array_equal(severities, same)
    assert ((severities >= 0) & (severities <= 1)).all()
    assert 0.25 < (severities == 0).mean() < 0.75
    assert not np.array_equal(crops, degraded_crops(40, seed=4)[0])


def test_pretraining_changes_every_tower_weight_and_reports_its_reading_of_each_degradation():
    tower = tiny_tower(seed=1)
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}

    reading = pretrain_tower(tower, SpatialFeatures(DEMO_FEATURES.image_size),
                             TowerPretraining(samples=80, epochs=2, batch_size=16), progress=False)

    assert list(reading) == list(DEGRADATIONS) and all(-1 <= value <= 1 for value in reading.values())
    assert all(not torch.equal(p, before[name]) for name, p in tower.named_parameters())


def test_the_shipped_tower_was_made_by_the_current_pretraining_and_reads_the_degradations():
    with safe_open(TOWER_FILE, "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["pretraining"]) == dataclasses.asdict(TowerPretraining())
    reading = json.loads(metadata["held_out_srcc"])
    assert set(reading) == set(DEGRADATIONS) and all(value > 0 for value in reading.values())
    assert set(load_file(TOWER_FILE)) == set(tiny_tower().state_dict())


def test_the_demo_rater_starts_from_the_shipped_tower_and_its_checkpoint_keeps_it(demo_sized_extractor, tmp_path):
    shipped = load_file(TOWER_FILE)
    model = tiny_rater(demo_sized_extractor, seed=2, vision_tower=TOWER_FILE)
    random = tiny_rater(demo_sized_extractor, seed=2)

    def tower(rater):
        return {name.replace(".base_layer", ""): p for name, p in rater.vlm.model.vision_tower.named_parameters()
                if "lora_" not in name}

    assert all(torch.equal(p, shipped[name]) for name, p in tower(model).items())
    # Everything else is what the seed draws, the LoRA adapters included.
    others = dict(random.named_parameters())
    assert all(torch.equal(p, others[name]) for name, p in model.named_parameters() if "vision_tower" not in name
               or "lora_" in name)
    model.save_pretrained(tmp_path / "rater")
    reloaded = FVQRater.from_pretrained(tmp_path / "rater", merge_lora=False)
    assert all(torch.equal(p, shipped[name]) for name, p in tower(reloaded).items())


def test_a_tower_of_another_shape_is_refused_with_the_file_named(extractor):
    with pytest.raises(InputError, match="tiny_vision_tower.safetensors"):
        tiny_rater(extractor, vision_tower=TOWER_FILE)  # 32-px frames: other position embeddings


def test_main_writes_a_tower_with_its_settings_and_reading(tmp_path, capsys):
    out = tmp_path / "tower.safetensors"
    assert main([str(out), "--samples", "80", "--epochs", "1", "--seed", "5"]) == 0
    with safe_open(out, "pt") as handle:
        assert json.loads(handle.metadata()["pretraining"])["samples"] == 80
    assert set(load_file(out)) == set(tiny_tower().state_dict())
    assert str(out) in capsys.readouterr().out
