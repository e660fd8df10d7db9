"""Mini world: dataset determinism, Fréchet distance vs scipy, shipped checkpoints, demo PNG, evaluator accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.world.dataset import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, make_dataset, render
from llamagen_core2.world.evaluator import Evaluator, class_accuracy, frechet_distance
from llamagen_core2.world.pipeline import default_checkpoint_dir, load_world


def test_dataset_is_deterministic_balanced_and_in_range():
    a_img, a_lab = make_dataset(3, seed=5)
    b_img, b_lab = make_dataset(3, seed=5)
    c_img, _ = make_dataset(3, seed=6)
    assert NUM_CLASSES >= 10 and len(set(CLASS_NAMES)) == NUM_CLASSES
    assert a_img.shape == (3 * NUM_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img)
    assert torch.bincount(a_lab, minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    assert a_img.min() >= -1 and a_img.max() <= 1


def test_classes_share_attributes_so_guidance_matters():
    # Every shape and every colour must appear in at least two classes (see dataset docstring).
    shapes = [name.split()[1] for name in CLASS_NAMES]
    colours = [name.split()[0] for name in CLASS_NAMES]
    assert all(shapes.count(s) >= 2 for s in shapes) and all(colours.count(c) >= 2 for c in colours)


def test_render_rejects_bad_labels():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(InvalidArgument, match="labels must be in"):
        render(torch.tensor([NUM_CLASSES]), g)
    with pytest.raises(InvalidArgument, match="1-D"):
        render(torch.zeros(2, 2, dtype=torch.long), g)


def test_frechet_distance_matches_scipy_reference():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    reference = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


# ------------------------------------------------------------------ shipped checkpoints
needs_checkpoints = pytest.mark.skipif(not (default_checkpoint_dir() / "world_gpt" / "config.json").is_file(),
                                       reason="mini-world checkpoints not built")


@needs_checkpoints
def test_shipped_checkpoints_load_and_fit_together():
    world = load_world(with_evaluator=True)
    assert world.gpt.config.vocab_size == world.vq.config.codebook_size
    assert world.gpt.config.num_classes == NUM_CLASSES
    assert world.gpt.config.grid_size == IMAGE_SIZE // world.vq.config.downsample
    assert isinstance(world.evaluator, Evaluator)
    total = sum(f.stat().st_size for f in default_checkpoint_dir().rglob("*") if f.is_file())
    assert total <= 30 * 1024 * 1024


@needs_checkpoints
def test_demo_writes_png_of_expected_size(tmp_path):
    from llamagen_core2.world.demo import run_demo

    torch.set_num_threads(2)
    out = tmp_path / "demo.png"
    info = run_demo(out, classes=[0, 4], modes=("cond", "cfg"), samples_per_mode=1, scale=1, seed=3)
    # label column 84 + 2 columns of (24 + 2) + 2;  header 14 + 2 rows of (24 + 2) + 2
    assert Image.open(out).size == (84 + 2 * 26 + 2, 14 + 2 * 26 + 2) == info["size"]
    assert info["modes"] == ["cond", "cfg"]
    assert info["base_rows"]["cfg"] == 2 * info["base_rows"]["cond"]


@needs_checkpoints
def test_demo_skips_core2_columns_only_without_weak_model(tmp_path):
    from llamagen_core2.world.demo import run_demo

    info = run_demo(tmp_path / "d.png", classes=[1], modes=("cfg", "fast"), samples_per_mode=1, scale=1)
    world = load_world()
    if world.weak is None:
        assert info["skipped"] == ["fast"] and info["modes"] == ["cfg"] and info["notes"]
    else:
        assert info["skipped"] == [] and info["modes"] == ["cfg", "fast"]


@needs_checkpoints
def test_evaluator_accuracy_on_fresh_heldout_sample():
    torch.set_num_threads(2)
    evaluator = load_world(with_evaluator=True).evaluator
    images, labels = make_dataset(15, seed=424242)  # a seed no training script uses
    assert class_accuracy(evaluator, images, labels) >= 0.95


@needs_checkpoints
def test_cli_demo_subcommand(tmp_path, capsys):
    from llamagen_core2.cli import main

    out = tmp_path / "cli_demo.png"
    status = main(["demo", "--out", str(out), "--classes", "2", "--modes", "cfg", "--samples", "1", "--scale", "1"])
    assert status == 0
    assert Image.open(out).size == (84 + 26 + 2, 14 + 26 + 2)
    assert "wrote" in capsys.readouterr().out
    # A bad class id is a one-line error naming the allowed range, exit status 2, no traceback.
    assert main(["demo", "--out", str(out), "--classes", str(NUM_CLASSES)]) == 2
    assert f"[0, {NUM_CLASSES - 1}]" in capsys.readouterr().err
