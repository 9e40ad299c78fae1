"""Run by tests/test_train.py: a 3-epoch training run; `kill-at-save-N` SIGKILLs the process as the N-th
training-state save begins (the epoch's weights and progress already written), `resume` continues."""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_FEATURES  # noqa: E402

from accelerate import Accelerator  # noqa: E402

from fvq_plugin.features import FeatureConfig, FeatureExtractor  # noqa: E402
from fvq_plugin.scoring import split_features  # noqa: E402
from fvq_plugin.tiny import tiny_rater  # noqa: E402
from fvq_plugin.train import TrainConfig, train  # noqa: E402

data, cache, out, mode = sys.argv[1:5]
if mode.startswith("kill-at-save-"):
    kill_at, saves, save_state = int(mode.rsplit("-", 1)[1]), [], Accelerator.save_state

    def killed_save_state(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_state(self, *args, **kwargs)

    Accelerator.save_state = killed_save_state
extractor = FeatureExtractor(FeatureConfig(**TINY_FEATURES))
train_set = split_features(data, "train", extractor, cache, progress=False)[:2]
val_set = split_features(data, "val", extractor, cache, progress=False)[:2]
result = train(tiny_rater(extractor), extractor.preparer.spatial, train_set, val_set,
               TrainConfig(stage=2, epochs=3, batch_size=8, lr=1e-3), out, resume=mode == "resume", progress=False)
Path(out, "history.json").write_text(json.dumps([[r["epoch"], r["loss"], r["val_srcc"]] for r in result["history"]]))
