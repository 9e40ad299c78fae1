"""Run by tests/test_train.py under `accelerate launch --multi_gpu --num_processes 2` on CPU."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_FEATURES  # noqa: E402

from accelerate import PartialState  # noqa: E402

from fvq_plugin.features import FeatureConfig, FeatureExtractor  # noqa: E402
from fvq_plugin.scoring import split_features  # noqa: E402
from fvq_plugin.tiny import tiny_rater  # noqa: E402
from fvq_plugin.train import TrainConfig, train  # noqa: E402

data, cache, out = sys.argv[1:4]
extractor = FeatureExtractor(FeatureConfig(**TINY_FEATURES))
train_set = split_features(data, "train", extractor, cache, progress=False)[:2]
val_set = split_features(data, "val", extractor, cache, progress=False)[:2]
result = train(tiny_rater(extractor), extractor.preparer.spatial, train_set, val_set,
               TrainConfig(stage=2, epochs=1, batch_size=4), out, progress=False)
state = PartialState()
last = result["history"][-1]
# A file per rank: two processes printing to one pipe can interleave their lines.
Path(out, f"rank{state.process_index}.json").write_text(
    json.dumps({"rank": state.process_index, "world": state.num_processes, "val_n": last["val_n"], "lr": last["lr"]}))
