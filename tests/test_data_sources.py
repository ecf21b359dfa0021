"""Sources: image folders, TFDS array_record (mocked), digits; and their errors."""

import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vgg_jax.data import pipeline, sources, testing, transforms


def test_folder_source_labels_repr_and_pickle(tmp_path):
    testing.write_folder(str(tmp_path), {"train": 3, "val": 2}, classes=("zebra", "ant", "cat"))
    config = testing.data_config(source="folder", data_dir=str(tmp_path))
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
    config = testing.data_config(source="folder", data_dir=str(tmp_path), eval_split="val")
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
        ("no_val", "no split directory 'validation'"),
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
    config = testing.data_config(
        source="folder", data_dir=None if layout == "unset" else str(root)
    )
    with pytest.raises(ValueError, match=match) as error:
        sources.validate_source(config)
    message = str(error.value)
    assert "\n" not in message
    if layout != "unset":
        assert str(root) in message


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="Unknown config.data.source"):
        sources.validate_source(testing.data_config(source="webdataset"))


def test_digits_written_once_atomically_and_reused(tmp_path, monkeypatch):
    config = testing.data_config(source="digits", cache_dir=str(tmp_path), eval_split="val")
    # A first run killed half-way leaves no digits folder behind.
    real_write = sources._write_digits

    def killed(out_dir, settings):
        os.makedirs(os.path.join(out_dir, "train", "0"))
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_write_digits", killed)
    with pytest.raises(KeyboardInterrupt):
        sources.validate_source(config)
    assert os.listdir(tmp_path) == []

    calls = []

    def counting(out_dir, settings):
        calls.append(out_dir)
        real_write(out_dir, settings)

    monkeypatch.setattr(sources, "_write_digits", counting)
    sources.validate_source(config)
    train, val = sources.make_source(config, "train"), sources.make_source(config, "val")
    assert len(calls) == 1 and sorted(os.listdir(tmp_path)) == ["digits"]
    assert len(train) + len(val) == 1797
    assert abs(len(val) / 1797 - config.val_fraction) < 0.01
    # Stratified: every class keeps its share in the validation split.
    val_counts = np.bincount([val[i]["label"] for i in range(len(val))], minlength=10)
    assert val_counts.min() >= 33 and val_counts.max() <= 38
    image = transforms.decode_image(train[0]["image"])
    assert image.shape == (config.digits_image_size, config.digits_image_size, 3)
    assert train[0]["name"].endswith(".jpg")
    # Reused, and rebuilt only when its settings change.
    pipeline.num_examples(config, "train")
    assert len(calls) == 1
    config.digits_image_size = 24
    sources.validate_source(config)
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["digits"]
    assert transforms.decode_image(sources.make_source(config, "train")[0]["image"]).shape == (24, 24, 3)


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

    config = testing.data_config(
        source="tfds", name=name, eval_split="test", image_size=24, train_scale_min=24,
        train_scale_max=32, eval_scale=28,
    )
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        sources.validate_source(config)
        source = sources.make_source(config, "train")
        assert len(source) == 11 and pipeline.num_examples(config, "test") == 5
        assert repr(source) == repr(pickle.loads(pickle.dumps(source)))
        assert source[3]["label"] == 3 and source[3]["name"] == f"{name}/train[3]"
        batch = next(iter(pipeline.train_dataset(config, global_batch_size=4, seed=0)))
        evals = list(pipeline.eval_dataset(config, batch_size=4, scale=28))
        assert sources.num_classes(config) == 10
    assert batch["image"].shape == (4, 24, 24, 3) and batch["mask"].all()
    assert sum(int(b["mask"].sum()) for b in evals) == 5
    if grey:
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])


def test_tfds_not_prepared_names_the_preparation_command(tmp_path):
    config = testing.data_config(source="tfds", name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared") as error:
        sources.validate_source(config)
    message = str(error.value)
    assert str(tmp_path) in message and "python -m vgg_jax.data.prepare_tfds" in message
    assert "--manual_dir" in message
    with pytest.raises(ValueError, match="has no data set named"):
        sources.validate_source(testing.data_config(source="tfds", name="no_such_set_xyz"))


def _write_tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_real_imagenet2012_build_from_fake_ilsvrc_tars(tmp_path):
    """The documented preparation command, then our TF-free reader, on tiny fake tars."""
    pytest.importorskip("tensorflow", reason="preparing imagenet2012 needs TensorFlow")
    from vgg_jax.data import prepare_tfds

    rng = np.random.default_rng(0)
    manual = tmp_path / "manual"
    manual.mkdir()
    jpeg = lambda: testing.encode(testing.smooth_image(rng, 48, 64), "JPEG")  # noqa: E731
    class_tars = {}
    for synset in ("n01440764", "n01443537"):
        buffer = tmp_path / f"{synset}.tar"
        _write_tar(buffer, {f"{synset}_{i}.JPEG": jpeg() for i in range(2)})
        class_tars[f"{synset}.tar"] = buffer.read_bytes()
    _write_tar(manual / "ILSVRC2012_img_train.tar", class_tars)
    _write_tar(
        manual / "ILSVRC2012_img_val.tar",
        {f"ILSVRC2012_val_{i:08d}.JPEG": jpeg() for i in range(1, 4)},
    )
    data_dir = str(tmp_path / "tfds")
    prepare_tfds.prepare("imagenet2012", data_dir, str(manual))
    config = testing.data_config(source="tfds", name="imagenet2012", data_dir=data_dir)
    sources.validate_source(config)
    assert pipeline.num_examples(config, "train") == 4
    assert pipeline.num_examples(config, "validation") == 3
    batch = next(iter(pipeline.train_dataset(config, global_batch_size=4, seed=0)))
    assert batch["mask"].all() and batch["image"].shape == (4, 32, 32, 3)
