"""LlamaGenPipeline on the shipped mini world and tiny models: the seed rule (image i is the same at any batch size,
for generator lists and seeds), output types, return_dict, defaults by model type, errors, top-level imports, and
the README's Python block executed as written."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llamagen_core2 import GuidanceConfig, LlamaGenPipeline, LlamaGenPipelineOutput, generate
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.seeding import image_key, row_keys
from llamagen_core2.io.images import to_uint8
from llamagen_core2.world.pipeline import WORLD_GUIDANCE, default_checkpoint_dir, load_world
from tiny_models import captions, tiny_gpt

REPO = Path(__file__).resolve().parents[1]
needs_world = pytest.mark.skipif(not (default_checkpoint_dir() / "world_gpt" / "config.json").is_file(),
                                 reason="mini-world checkpoints not built")


@pytest.fixture(scope="module")
def world(single_thread):
    return load_world()


@pytest.fixture(scope="module")
def pipe(world):
    return world.pipeline()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _tiny_vq():
    from llamagen_core2.config import VQConfig
    from llamagen_core2.encoders.vq import VQModel

    torch.manual_seed(0)
    return VQModel(VQConfig(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8,
                            ch_mult=(1, 1, 1))).eval()


@needs_world
def test_generator_list_gives_the_same_image_i_at_any_batch_size(pipe):
    labels = [0, 5, 9]
    runs = [pipe(class_labels=labels, num_images_per_prompt=2, generator=gens(range(10, 16)), batch_size=b,
                 output_type="np", progress=False) for b in (6, 4, 1)]
    for other in runs[1:]:
        assert torch.equal(runs[0].tokens, other.tokens)
        assert np.array_equal(runs[0].images, other.images)  # pixels, not only tokens
    # image i depends on generator i alone: alone in a call of its own it is the same image
    alone = pipe(class_labels=[9], generator=gens([15]), output_type="np", progress=False)
    assert torch.equal(alone.tokens[0], runs[0].tokens[5]) and np.array_equal(alone.images[0], runs[0].images[5])
    # and other generators give other images
    shuffled = pipe(class_labels=labels, num_images_per_prompt=2, generator=gens(range(20, 26)), output_type="np",
                    progress=False)
    assert not torch.equal(shuffled.tokens, runs[0].tokens)


@needs_world
def test_seed_rule_image_n_uses_image_key_whatever_the_split(pipe):
    whole = pipe(class_labels=[1, 2, 3, 4], seed=7, batch_size=3, output_type="tokens", progress=False)
    part = pipe(class_labels=[3, 4], seed=7, first_image_index=2, output_type="tokens", progress=False)
    assert torch.equal(whole.tokens[2:], part.tokens)
    # the rule itself: generate() with the keys image_key(7, n) reproduces the pipeline's tokens
    direct = generate(pipe.gpt, torch.tensor([1, 2, 3, 4]), guidance=pipe.guidance,
                      seeds=torch.tensor([image_key(7, n) for n in range(4)]))
    assert torch.equal(direct, whole.tokens)
    assert torch.equal(row_keys(4, seed=7), torch.tensor([image_key(7, n) for n in range(4)]))


@needs_world
def test_output_types_and_return_dict(pipe, monkeypatch):
    kwargs = dict(class_labels=[2, 3], seed=1, progress=False)
    pt = pipe(**kwargs, output_type="pt")
    assert isinstance(pt, LlamaGenPipelineOutput)
    assert pt.images.dtype == torch.float32 and pt.images.shape == (2, 3, 24, 24)
    assert pt.tokens.shape == (2, pipe.gpt.config.num_image_tokens)
    np_out = pipe(**kwargs, output_type="np")
    assert np_out.images.dtype == np.uint8 and np_out.images.shape == (2, 24, 24, 3)
    assert np.array_equal(np_out.images, to_uint8(pt.images))  # "np" = LlamaGen's pixel rule of "pt"
    pil = pipe(**kwargs, output_type="pil")
    assert all(isinstance(im, Image.Image) and im.size == (24, 24) for im in pil.images)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil.images]), np_out.images)
    decodes = []
    with monkeypatch.context() as m:
        m.setattr(pipe.vq, "decode_codes", lambda *a, **k: decodes.append(a))
        tokens = pipe(**kwargs, output_type="tokens")
    assert tokens.images is None and torch.equal(tokens.tokens, pt.tokens) and decodes == []  # no VQ decode
    (images,) = pipe(**kwargs, output_type="np", return_dict=False)
    assert np.array_equal(images, np_out.images)
    (only_tokens,) = pipe(**kwargs, output_type="tokens", return_dict=False)
    assert torch.equal(only_tokens, pt.tokens)


@needs_world
def test_guidance_modes_and_base_rows(pipe):
    n = pipe.gpt.config.num_image_tokens
    cfg = pipe(class_labels=[0, 1], seed=0, output_type="tokens", progress=False)
    cond = pipe(class_labels=[0, 1], seed=0, output_type="tokens", progress=False,
                guidance=WORLD_GUIDANCE.replace(mode="cond"))
    assert cfg.stats["base_rows"] == 2 * cond.stats["base_rows"] == 2 * 2 * n
    if pipe.weak_model is not None:
        fast = pipe(class_labels=[0, 1], seed=0, output_type="tokens", progress=False,
                    guidance=WORLD_GUIDANCE.replace(mode="fast"))
        assert fast.stats["base_rows"] == 2 * n and fast.stats["weak_steps_per_image"] == n


def test_defaults_by_model_type_and_errors():
    c2i = tiny_gpt(image_size=16, downsample=4)
    t2i = tiny_gpt("t2i", image_size=16, downsample=4)
    from llamagen_core2.config import VQConfig
    from llamagen_core2.encoders.vq import VQModel

    vq = VQModel(VQConfig(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8,
                          ch_mult=(1, 1, 1))).eval()
    p_c2i, p_t2i = LlamaGenPipeline(c2i, vq), LlamaGenPipeline(t2i, vq)
    assert (p_c2i.guidance.cfg_scale, p_c2i.guidance.top_k) == (4.0, 2000)  # LlamaGen c2i demo
    assert (p_t2i.guidance.cfg_scale, p_t2i.guidance.top_k) == (7.5, 1000)  # LlamaGen sample_t2i.py
    feats, mask = captions(t2i, 2, [3, 6])
    out = p_t2i(prompt_embeds=feats, prompt_attention_mask=mask, num_images_per_prompt=2, seed=0,
                output_type="np", progress=False)
    assert out.images.shape == (4, 16, 16, 3)
    one = p_t2i(prompt_embeds=feats[1:], prompt_attention_mask=mask[1:], seed=0, first_image_index=2,
                output_type="tokens", progress=False)
    assert torch.equal(one.tokens[0], out.tokens[2])  # condition-major: images 2, 3 are caption 1's
    with pytest.raises(InvalidArgument, match="weak model"):
        p_c2i(class_labels=[1], guidance=GuidanceConfig(mode="fast"), progress=False)
    with pytest.raises(InvalidArgument, match="class-conditional"):
        p_c2i(prompt="a cat", progress=False)
    with pytest.raises(InvalidArgument, match="caption_encoder"):
        p_t2i(prompt="a cat", progress=False)
    with pytest.raises(InvalidArgument, match="one per image"):
        p_c2i(class_labels=[1, 2], generator=gens([0]), progress=False)
    with pytest.raises(InvalidArgument, match="output_type"):
        p_c2i(class_labels=[1], output_type="latent", progress=False)
    with pytest.raises(InvalidArgument, match=r"class ids must be in \[0, 9\]"):
        p_c2i(class_labels=[10], progress=False)
    with pytest.raises(InvalidArgument, match="seed or generator"):
        p_c2i(class_labels=[1], seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(InvalidArgument, match="does not match the GPT"):
        LlamaGenPipeline(tiny_gpt(vocab_size=50), vq)


def test_t2i_prompts_go_through_the_caption_encoder():
    t2i = tiny_gpt("t2i", image_size=16, downsample=4)
    from llamagen_core2.config import VQConfig
    from llamagen_core2.encoders.vq import VQModel

    vq = VQModel(VQConfig(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8,
                          ch_mult=(1, 1, 1))).eval()
    feats, mask = captions(t2i, 2, [2, 5])

    class Encoder:  # stands in for CaptionEncoder (tests/test_text.py covers the real one)
        def encode(self, prompts):
            table = {"a red cat": 0, "a dog": 1}
            rows = [table[p] for p in prompts]
            return feats[rows], mask[rows]

    pipe = LlamaGenPipeline(t2i, vq, caption_encoder=Encoder())
    by_prompt = pipe(prompt=["a red cat", "a dog"], seed=4, output_type="tokens", progress=False)
    by_embeds = pipe(prompt_embeds=feats, prompt_attention_mask=mask, seed=4, output_type="tokens", progress=False)
    assert torch.equal(by_prompt.tokens, by_embeds.tokens)


def test_generate_seeds_make_rows_independent_of_the_batch():
    gpt = tiny_gpt()
    labels = torch.tensor([1, 2, 3])
    keys = torch.tensor([11, 22, 33])
    whole = generate(gpt, labels, seeds=keys, top_k=0)
    for r in range(3):
        assert torch.equal(generate(gpt, labels[r:r + 1], seeds=keys[r:r + 1], top_k=0)[0], whole[r])
    with pytest.raises(InvalidArgument, match="seeds must be a LongTensor"):
        generate(gpt, labels, seeds=keys[:2])
    with pytest.raises(InvalidArgument, match="not both"):
        generate(gpt, labels, seeds=keys, seed=0)


def test_top_level_imports_are_lazy_and_generate_is_the_function():
    code = ("import sys, llamagen_core2 as lc; assert 'torch' not in sys.modules; "
            "from llamagen_core2 import GPT, VQModel, WeakModel, CaptionEncoder, generate, LlamaGenPipeline, "
            "GuidanceConfig; import llamagen_core2.pipeline; "
            "assert callable(lc.generate) and lc.generate is generate and not hasattr(generate, '__path__'); "
            "assert lc.GPT.__name__ == 'GPT' and 'LlamaGenPipeline' in dir(lc); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_world
def test_readme_python_block_runs_as_written_from_any_directory(tmp_path, monkeypatch, single_thread):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "LlamaGenPipeline" in b and "shipped_paths()" in b)
    monkeypatch.chdir(tmp_path)  # not the repository root: the shipped models are found from the package
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and never looked for on the Hub
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written, "the README example should write an image"
    assert all(Image.open(tmp_path / name).size == (24, 24) for name in written)


@needs_world
def test_shipped_paths_from_any_directory_and_a_clear_error_without_them(tmp_path, monkeypatch):
    from llamagen_core2.errors import CheckpointError
    from llamagen_core2.world import shipped_paths

    monkeypatch.chdir(tmp_path)
    paths = shipped_paths()
    assert paths.root == default_checkpoint_dir() and paths.root.is_absolute()
    for part in (paths.gpt, paths.vq, paths.weak, paths.evaluator):
        assert (part / "config.json").is_file()
    monkeypatch.setenv("LLAMAGEN_CORE2_CHECKPOINTS", str(tmp_path / "empty"))  # as after a wheel install
    with pytest.raises(CheckpointError, match="LLAMAGEN_CORE2_CHECKPOINTS") as err:
        shipped_paths()
    assert str(tmp_path / "empty" / "world_gpt") in str(err.value) and "wheel" in str(err.value)


@needs_world
def test_pipeline_keeps_one_engine_across_calls(pipe):
    pipe(class_labels=[1, 2], seed=0, output_type="tokens", progress=False)
    cache, binding = pipe.engine.cache, pipe.engine.binding
    pipe(class_labels=[3, 4], seed=1, output_type="tokens", progress=False)
    assert pipe.engine.cache is cache and pipe.engine.binding == binding  # buffers (and, on a GPU, graphs) reused


def test_pipeline_shows_one_tokens_bar_over_all_batches_that_reaches_its_total(capsys):
    gpt = tiny_gpt(image_size=16, downsample=4)
    vq = _tiny_vq()
    N = gpt.config.num_image_tokens
    capsys.readouterr()
    LlamaGenPipeline(gpt, vq)(class_labels=[1, 2, 3], batch_size=1, seed=0, output_type="tokens")
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("tokens: 100%") and f"{3 * N}/{3 * N}" in lines[-1], lines
    assert all(line.startswith("tokens:") for line in lines)  # one bar, not one per batch plus a batch bar


def test_diffusers_habits_guidance_scale_and_progress_bar_config(capsys):
    """diffusers users type `pipe(..., guidance_scale=3.0)` and `pipe.set_progress_bar_config(disable=True)`."""
    import io

    pipe = LlamaGenPipeline(tiny_gpt(image_size=16, downsample=4), _tiny_vq())
    call = dict(class_labels=[1, 2, 3], seed=0, output_type="tokens", progress=False)
    by_name = pipe(**call, guidance_scale=1.5)
    by_config = pipe(**call, guidance=pipe.guidance.replace(cfg_scale=1.5))
    assert torch.equal(by_name.tokens, by_config.tokens)
    assert not torch.equal(by_name.tokens, pipe(**call).tokens)  # not ignored: the default is cfg 4.0
    assert torch.equal(pipe(**call, guidance=GuidanceConfig(cfg_scale=1.5), guidance_scale=1.5).tokens,
                       by_name.tokens)  # both given and equal: fine
    with pytest.raises(InvalidArgument, match=r"guidance_scale=3.0 .*guidance.cfg_scale=1.5"):
        pipe(**call, guidance=GuidanceConfig(cfg_scale=1.5), guidance_scale=3.0)
    with pytest.raises(InvalidArgument, match="guidance_scale"):
        pipe(**call, guidance_scale=float("nan"))

    call.pop("progress")  # the default: a bar
    pipe.set_progress_bar_config(disable=True)
    capsys.readouterr()
    pipe(**call)
    assert capsys.readouterr().err == ""
    buf = io.StringIO()
    pipe.set_progress_bar_config(file=buf, desc="drawing")  # replaces the whole configuration, as in diffusers
    pipe(**call)
    assert "drawing: 100%" in buf.getvalue() and capsys.readouterr().err == ""
    pipe(**call, progress=False)  # the call's progress=False still wins
    assert buf.getvalue().count("drawing: 100%") == 1
    with pytest.raises(InvalidArgument, match="bogus"):
        pipe.set_progress_bar_config(bogus=1)


def test_pipeline_refuses_meta_conditions_clearly():
    pipe = LlamaGenPipeline(tiny_gpt(image_size=16, downsample=4), _tiny_vq())
    with pytest.raises(InvalidArgument, match="class_labels .*meta"):
        pipe(class_labels=torch.tensor([1, 2], device="meta"), progress=False)
