"""Sources: image folders, TFDS array_record (mocked; a real imagenet2012 build where the
[prepare] extra is installed), digits; and their errors."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import small_data
import tensorflow_datasets as tfds

from vgg_jax.data import decode, digits, pipeline, sources, testing, transforms


def test_folder_source_labels_repr_and_pickle(tmp_path):
    testing.write_folder(str(tmp_path), {"train": 3, "val": 2}, classes=("zebra", "ant", "cat"))
    config = small_data.data_config(source="folder", data_dir=str(tmp_path))
    source = sources.make_source(config, "train")
    assert len(source) == 9
    assert source.class_names == ("ant", "cat", "zebra")
    assert [source[i]["label"] for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert source[0]["name"].endswith(os.path.join("train", "ant", "000.jpg"))
    assert isinstance(source[0]["image"], bytes)
    clone = pickle.loads(pickle.dumps(source))
    assert repr(clone) == repr(source) == repr(sources.make_source(config, "train"))
    assert clone[4]["image"] == source[4]["image"]
    # "validation" (TFDS's name, the config default) finds the "val" folder.
    assert len(sources.make_source(config, "validation")) == 6
    assert sources.num_classes(config) == 3
    assert pipeline.num_examples(config, "val") == 6
    sources.validate_source(config)


def test_eval_split_uses_the_training_class_indices(tmp_path):
    testing.write_folder(str(tmp_path), {"train": 1}, classes=("a", "b", "c"))
    testing.write_folder(str(tmp_path), {"val": 2}, classes=("c",))
    config = small_data.data_config(source="folder", data_dir=str(tmp_path), eval_split="val")
    source = sources.make_source(config, "val")
    assert [source[i]["label"] for i in range(len(source))] == [2, 2]
    sources.validate_source(config)


@pytest.mark.parametrize(
    "layout,match",
    [
        ("missing", "does not exist"),
        ("unset", "data_dir is not set"),
        ("empty", "no split directory 'train'"),
        ("flat", "no class folders \\(images directly in it\\)"),
        # The README's layout names it val/: the message asks for that one.
        ("no_val", r"no split directory 'validation' or 'val' \(found \['train'\]\); expected "
                   r"\S+/val/<class>/<image>"),
        ("empty_class", "holds no image file"),
        ("extra_val_class", "that the training split"),
    ],
)
def test_clear_errors_for_bad_folders(tmp_path, layout, match):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        (root / "train").mkdir()
        (root / "train" / "x.jpg").write_bytes(b"")
    if layout in ("no_val", "empty_class", "extra_val_class"):
        testing.write_folder(str(root), {"train": 1})
    if layout == "empty_class":
        testing.write_folder(str(root), {"val": 1})
        (root / "val" / "cat" / "000.jpg").unlink()
    if layout == "extra_val_class":
        testing.write_folder(str(root), {"val": 1}, classes=("cat", "dog", "emu"))
    config = small_data.data_config(
        source="folder", data_dir=None if layout == "unset" else str(root)
    )
    with pytest.raises(ValueError, match=match) as error:
        sources.validate_source(config)
    message = str(error.value)
    assert "\n" not in message
    if layout != "unset":
        assert str(root) in message


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="config.data.source='webdataset' is unknown"):
        sources.check_config(small_data.data_config(source="webdataset"))


def test_digits_written_once_atomically_and_reused(tmp_path, monkeypatch):
    config = small_data.data_config(source="digits", cache_dir=str(tmp_path), eval_split="val")
    # A first run killed half-way leaves no digits folder behind.
    real_write = digits._write_digits

    def killed(out_dir, settings):
        os.makedirs(os.path.join(out_dir, "train", "0"))
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "_write_digits", killed)
    with pytest.raises(KeyboardInterrupt):
        sources.validate_source(config)
    assert os.listdir(tmp_path) == []

    calls = []

    def counting(out_dir, settings):
        calls.append(out_dir)
        real_write(out_dir, settings)

    monkeypatch.setattr(digits, "_write_digits", counting)
    sources.validate_source(config)
    train, val = sources.make_source(config, "train"), sources.make_source(config, "val")
    assert len(calls) == 1 and sorted(os.listdir(tmp_path)) == ["digits"]
    assert len(train) + len(val) == 1797
    assert abs(len(val) / 1797 - config.val_fraction) < 0.01
    # Stratified: every class keeps its share in the validation split.
    val_counts = np.bincount([val[i]["label"] for i in range(len(val))], minlength=10)
    assert val_counts.min() >= 33 and val_counts.max() <= 38
    image = decode.decode_image(train[0]["image"])
    assert image.shape == (config.digits_image_size, config.digits_image_size, 3)
    assert train[0]["name"].endswith(".jpg")
    # Reused, and rebuilt only when its settings change.
    pipeline.num_examples(config, "train")
    assert len(calls) == 1
    config.digits_image_size = 24
    sources.validate_source(config)
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["digits"]
    assert decode.decode_image(sources.make_source(config, "train")[0]["image"]).shape == (24, 24, 3)


def _fake_tfds_records(split, num, grey):
    rng = np.random.default_rng(0 if split == "train" else 1)
    records = []
    for i in range(num):
        pixels = testing.smooth_image(rng, 28, 28) if not grey else rng.integers(0, 256, (28, 28), dtype=np.uint8)
        fmt = "PNG" if grey else "JPEG"
        records.append({"image": testing.encode(pixels, fmt), "label": i % 10, "id": f"{split}_{i}"})
    return records


@pytest.mark.parametrize("name,grey", [("cifar10", False), ("mnist", True)])
def test_tfds_source_through_mock_data(name, grey):
    def as_data_source(builder, split, decoders=None, **kwargs):
        # Our source asks for undecoded images: the mock must serve encoded bytes.
        assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
        return _fake_tfds_records(split, 11 if split == "train" else 5, grey)

    config = small_data.data_config(
        source="tfds", name=name, eval_split="test", image_size=24, train_scale_min=24,
        train_scale_max=32,
    )
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        sources.validate_source(config)
        source = sources.make_source(config, "train")
        assert len(source) == 11 and pipeline.num_examples(config, "test") == 5
        assert repr(source) == repr(pickle.loads(pickle.dumps(source)))
        assert source[3]["label"] == 3 and source[3]["name"] == f"{name}/train[3]"
        batch = next(iter(pipeline.train_dataset(config, global_batch_size=4, seed=0)))
        test = sources.make_source(config, "test")
        evals = [transforms.image_views(test[i]["image"], "single_crop", 28, 24)
                 for i in range(len(test))]
        assert sources.num_classes(config) == 10
    assert batch["image"].shape == (4, 24, 24, 3) and batch["mask"].all()
    assert len(evals) == 5 and all(v.shape == (1, 24, 24, 3) for v in evals)
    if grey:
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])


def test_tfds_not_prepared_names_the_preparation_command(tmp_path):
    config = small_data.data_config(source="tfds", name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared") as error:
        sources.validate_source(config)
    message = str(error.value)
    assert str(tmp_path) in message and "python -m vgg_jax.data.prepare_tfds" in message
    assert "--manual_dir" in message and "pip install tensorflow-cpu importlib-resources" in message
    with pytest.raises(ValueError, match="has no data set named"):
        sources.validate_source(small_data.data_config(source="tfds", name="no_such_set_xyz"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reads a prepared imagenet2012 back with TensorFlow unfindable, as if not installed (etils
# probes find_spec("tensorflow") and TFDS sys.modules, so a None entry in sys.modules would
# mislead them), through our source and pipelines; prints a JSON summary.
_READ_BACK_WITHOUT_TENSORFLOW = """
import importlib.machinery, json, sys

class HideTensorflow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [HideTensorflow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from vgg_jax.data import pipeline, sources, transforms

sys.path.insert(0, sys.argv[2])
import small_data

config = small_data.data_config(source="tfds", name="imagenet2012", data_dir=sys.argv[1])
sources.validate_source(config)
splits = {s: sources.make_source(config, s) for s in ("train", "validation")}
records = {s: sorted((src[i]["name"], src[i]["label"]) for i in range(len(src))) for s, src in splits.items()}
train = next(iter(pipeline.train_dataset(config, global_batch_size=4, seed=0)))
evals = [transforms.image_views(r["image"], "single_crop", 40, 32)
         for r in (splits["validation"][i] for i in range(len(splits["validation"])))]
print(json.dumps({
    "records": records,
    "num_classes": sources.num_classes(config),
    "train_batch": [list(train["image"].shape), bool(train["mask"].all())],
    "eval_images": len(evals),
    "tensorflow_imported": [m for m in sys.modules if m.partition(".")[0] == "tensorflow"],
}))
"""


def test_prepare_names_the_missing_packages(monkeypatch):
    from vgg_jax.data import prepare_tfds

    monkeypatch.setattr(prepare_tfds, "REQUIREMENTS", (("no_such_module_xyz", "no-such-pkg"),))
    with pytest.raises(prepare_tfds.MissingRequirementsError, match="pip install no-such-pkg"):
        prepare_tfds.prepare("imagenet2012", None, None)


def test_real_imagenet2012_build_from_fake_ilsvrc_tars(tmp_path):
    """The documented preparation command on tiny fake tars, then our reader without TF."""
    from vgg_jax.data import prepare_tfds

    missing = prepare_tfds.missing_requirements()
    if missing:
        pytest.skip(f"preparing imagenet2012 needs {' and '.join(missing)} (the [prepare] extra)")
    manual, data_dir = str(tmp_path / "ilsvrc"), str(tmp_path / "tfds")
    testing.write_fake_ilsvrc_tars(manual, synsets=("n01440764", "n01443537"), num_val=3)
    prepare = [
        sys.executable, "-m", "vgg_jax.data.prepare_tfds", "--name=imagenet2012",
        f"--data_dir={data_dir}", f"--manual_dir={manual}",
    ]
    result = subprocess.run(prepare, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'train': 4, 'validation': 3}" in result.stdout
    read = [sys.executable, "-c", _READ_BACK_WITHOUT_TENSORFLOW, data_dir,
            os.path.join(ROOT, "tests")]
    result = subprocess.run(read, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tensorflow_imported"] == []
    assert summary["num_classes"] == 1000
    # Training labels are the synsets' positions in ImageNet's sorted class list.
    assert summary["records"]["train"] == [
        ["n01440764_0.JPEG", 0], ["n01440764_1.JPEG", 0],
        ["n01443537_0.JPEG", 1], ["n01443537_1.JPEG", 1],
    ]
    # Validation labels come from TFDS's list of the real ILSVRC2012 validation images.
    assert summary["records"]["validation"] == [
        ["ILSVRC2012_val_00000001.JPEG", 65], ["ILSVRC2012_val_00000002.JPEG", 970],
        ["ILSVRC2012_val_00000003.JPEG", 230],
    ]
    assert summary["train_batch"] == [[4, 32, 32, 3], True]
    assert summary["eval_images"] == 3
