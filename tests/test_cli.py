"""CLI: convert official-format files, generate a PNG grid end to end on tiny models, errors without tracebacks."""
import json

import torch
from PIL import Image

from llamagen_core2.cli import main
from llamagen_core2.config import VQConfig
from llamagen_core2.decode.model import GPT
from llamagen_core2.encoders.vq import VQModel
from tiny_models import tiny_gpt

TINY_VQ = dict(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8, ch_mult=(1, 1, 1))


def _tiny_world(tmp_path):
    gpt = tiny_gpt(image_size=16, downsample=4)
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i_tiny_16.pt")
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ)).eval()
    torch.save({"model": vq.state_dict()}, tmp_path / "vq_tiny.pt")
    return gpt, vq


def test_convert_gpt_and_vq(tmp_path, capsys):
    gpt, vq = _tiny_world(tmp_path)
    assert main(["convert", str(tmp_path / "vq_tiny.pt"), str(tmp_path / "vq_out"), "--kind", "vq"]) == 2
    assert "preset" in capsys.readouterr().err  # tiny VQ is not VQ-16: a one-line error with a hint, no traceback
    gpt.save_pretrained(tmp_path / "gpt_dir")
    assert main(["convert", str(tmp_path / "gpt_dir"), str(tmp_path / "gpt_out"), "--max-shard-mb", "0.05"]) == 0
    assert (tmp_path / "gpt_out" / "model.safetensors.index.json").exists()
    again = GPT.from_pretrained(tmp_path / "gpt_out")
    for k, v in gpt.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_generate_writes_a_grid(tmp_path, capsys):
    gpt, vq = _tiny_world(tmp_path)
    gpt.save_pretrained(tmp_path / "gpt")
    vq.save_pretrained(tmp_path / "vq")
    out = tmp_path / "samples"
    rc = main(["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--classes", "0-2",
               "--per-class", "2", "--batch-size", "4", "--nrow", "3", "--top-k", "0", "--out", str(out),
               "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["num_images"] == 6 and summary["grid"] == str(out / "grid.png")
    assert captured.err == ""  # --quiet: no progress bar, no chatter
    with Image.open(out / "grid.png") as im:  # labelled sheet: a header, a row per class of 2 tiles, 16 px x 4
        width, height = im.size
        assert height == 14 + 3 * (16 * 4 + 2) + 2 and width - (2 * (16 * 4 + 2) + 2) > 0
    singles = sorted(p.name for p in (out / "images").iterdir())
    assert singles == ["00000_class0.png", "00001_class0.png", "00002_class1.png", "00003_class1.png",
                       "00004_class2.png", "00005_class2.png"]  # 2 per class, in 2 batches (4 + 2)
    with Image.open(out / "images" / singles[0]) as im:
        assert im.size == (16, 16)


def test_generate_errors_are_one_line(tmp_path, capsys):
    gpt, vq = _tiny_world(tmp_path)
    gpt.save_pretrained(tmp_path / "gpt")
    vq.save_pretrained(tmp_path / "vq")
    rc = main(["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--classes", "42",
               "--device", "cpu", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "class ids must be in [0, 9]" in err and "Traceback" not in err
    rc = main(["generate", "--gpt", str(tmp_path / "missing"), "--vq", str(tmp_path / "vq"), "--classes", "1"])
    assert rc == 2


def test_generate_with_weak_model_and_schedule(tmp_path, capsys):
    from llamagen_core2.core2.weak_model import WeakModel

    gpt, vq = _tiny_world(tmp_path)
    gpt.save_pretrained(tmp_path / "gpt")
    vq.save_pretrained(tmp_path / "vq")
    WeakModel.for_base(gpt, preset="W-1", cfg_scale=4.0).save_pretrained(tmp_path / "weak")
    rc = main(["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--classes", "1,2",
               "--weak", str(tmp_path / "weak"), "--slow-first", "0.5", "--out", str(tmp_path / "s"),
               "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["num_images"] == 2
    other = tiny_gpt(image_size=16, downsample=4, dim=96)
    WeakModel.for_base(other, preset="W-1").save_pretrained(tmp_path / "weak_other")
    rc = main(["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--classes", "1",
               "--weak", str(tmp_path / "weak_other"), "--mode", "fast", "--out", str(tmp_path / "t"),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "dim" in err and "Traceback" not in err


def test_llamagen_flag_names_on_the_shipped_mini_world(tmp_path, capsys):
    """`generate --gpt-ckpt ... --vq-ckpt ...` with LlamaGen's flags; image n is the same at any batch size."""
    from llamagen_core2.world.pipeline import default_checkpoint_dir

    root = default_checkpoint_dir()
    if not (root / "world_gpt" / "config.json").is_file():
        import pytest

        pytest.skip("mini-world checkpoints not built")
    outs = []
    for batch in ("4", "3"):
        out = tmp_path / f"b{batch}"
        rc = main(["generate", "--gpt-ckpt", str(root / "world_gpt"), "--vq-ckpt", str(root / "world_vq"),
                   "--precision", "none", "--global-seed", "5",
                   "--per-proc-batch-size", batch, "--classes", "0,3", "--per-class", "3", "--top-k", "0",
                   "--out", str(out), "--device", "cpu", "--quiet"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        summary = json.loads(captured.out.strip().splitlines()[-1])
        assert summary["num_images"] == 6 and summary["seed"] == 5 and summary["cfg_scale"] == 4.0
        outs.append(out)
    for name in sorted(p.name for p in (outs[0] / "images").iterdir()):
        assert (outs[0] / "images" / name).read_bytes() == (outs[1] / "images" / name).read_bytes()


def test_precision_alias_and_t2i_sampling_defaults(tmp_path):
    from llamagen_core2.cli import build_parser
    from llamagen_core2.cli.loading import load_gpt

    parser = build_parser()
    for model_type, expected in (("c2i", (4.0, 2000)), ("t2i", (7.5, 1000))):
        tiny_gpt(model_type).save_pretrained(tmp_path / model_type)
        args = parser.parse_args(["generate", "--gpt-ckpt", str(tmp_path / model_type), "--vq-ckpt", "x",
                                  "--precision", "bf16", "--device", "cpu"])
        assert args.dtype == "bfloat16"
        gpt = load_gpt(args)
        assert (args.cfg_scale, args.top_k) == expected and gpt.output.weight.dtype == torch.bfloat16
        args = parser.parse_args(["generate", "--gpt-ckpt", "g", "--vq-ckpt", "x", "--gpt-model", "GPT-XL",
                                  "--vq-model", "VQ-8"])
        assert (args.gpt, args.vq, args.gpt_preset, args.vq_preset) == ("g", "x", "GPT-XL", "VQ-8")
        args = parser.parse_args(["generate", "--gpt", str(tmp_path / model_type), "--vq", "x", "--cfg-scale", "2",
                                  "--top-k", "0", "--device", "cpu"])
        load_gpt(args)
        assert (args.cfg_scale, args.top_k, args.dtype) == (2.0, 0, "float32")  # explicit values win


def test_allow_other_base_weights_lets_a_same_shape_base_use_the_weak_model(tmp_path, capsys):
    from llamagen_core2.decode.model import GPT
    from llamagen_core2.world.pipeline import default_checkpoint_dir

    root = default_checkpoint_dir()
    if not (root / "world_weak" / "config.json").is_file():
        import pytest

        pytest.skip("mini-world checkpoints not built")
    other = GPT.from_pretrained(root / "world_gpt")
    with torch.no_grad():
        other.output.weight.mul_(1.01)  # same shapes, other weights: another fingerprint
    other.save_pretrained(tmp_path / "other_gpt")
    argv = ["generate", "--gpt", str(tmp_path / "other_gpt"), "--vq", str(root / "world_vq"), "--weak",
            str(root / "world_weak"), "--mode", "fast", "--classes", "1", "--top-k", "0", "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "weights fingerprint" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "allowed"), "--allow-other-base-weights"]) == 0
    assert (tmp_path / "allowed" / "grid.png").is_file()


def test_generate_grid_has_class_labels_and_a_scale(tmp_path, capsys):
    """Issue 19: grid.png was raw tiles; now a row per class, labelled (the demo's grid code), tiles upscaled."""
    import numpy as np

    gpt, vq = _tiny_world(tmp_path)
    gpt.save_pretrained(tmp_path / "gpt")
    vq.save_pretrained(tmp_path / "vq")
    out = tmp_path / "samples"
    rc = main(["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--classes", "0,3",
               "--per-class", "3", "--nrow", "2", "--scale", "2", "--top-k", "0", "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    singles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "images").iterdir())]
    cell, pad, header = 16 * 2 + 2, 2, 14
    # class 0: images 0, 1 | image 2 (wrapped after --nrow 2); class 3: images 3, 4 | image 5
    assert grid.shape[0] == header + 4 * cell + pad
    label_width = grid.shape[1] - 2 * cell - pad
    assert label_width >= 20  # room for "class 3"
    for n, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0)]):
        top, left = header + row * cell + pad, label_width + col * cell + pad
        tile = grid[top:top + 32, left:left + 32]
        assert (tile == singles[n].repeat(2, axis=0).repeat(2, axis=1)).all(), n  # nearest-neighbour x2
    labels = grid[header:, :label_width]
    for row in (0, 2):  # a class's first row carries its label, a wrapped row none
        band = labels[row * cell:(row + 1) * cell]
        assert (band < 128).any(), row
    assert not (labels[cell:2 * cell] < 128).any()
    assert (grid[:header] < 128).any()  # the header names the guidance


def test_generate_t2i_labels_rows_with_captions_and_records_them(tmp_path, capsys, monkeypatch):
    """The t2i path of generate (caption features stand in for T5, which tests/test_text.py covers)."""
    import numpy as np

    from llamagen_core2.cli import generate as generate_command
    from tiny_models import captions

    t2i = tiny_gpt("t2i", image_size=16, downsample=4)
    _, vq = _tiny_world(tmp_path)
    t2i.save_pretrained(tmp_path / "gpt")
    vq.save_pretrained(tmp_path / "vq")
    feats, mask = captions(t2i, 2, [3, 6])
    names = ["a red cat", "a dog on a very long road under the stars"]
    monkeypatch.setattr(generate_command, "load_conditions", lambda args, gpt: (feats, mask, names))
    out = tmp_path / "t2i"
    argv = ["generate", "--gpt", str(tmp_path / "gpt"), "--vq", str(tmp_path / "vq"), "--captions", "unused.txt",
            "--per-class", "2", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "settings.json").read_text())["conditions"] == names
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "00000_caption0.png", "00001_caption0.png", "00002_caption1.png", "00003_caption1.png"]
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape[0] == 14 + 2 * (16 * 4 + 2) + 2  # a row per caption
