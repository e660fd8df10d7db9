"""Hub ids, offline: GPT / VQ / T5 / weak model / pipeline / CLI resolve `org/repo` through a HF cache laid out by
the test (tests/hf_cache.py), HF_HUB_OFFLINE=1; local paths keep working; a miss is one clear error."""
import json

import pytest
import torch

from hf_cache import add_directory_to_hf_cache, add_to_hf_cache
from llamagen_core2 import GPT, LlamaGenPipeline, VQModel
from llamagen_core2.config import VQConfig
from llamagen_core2.errors import CheckpointError
from llamagen_core2.io.hub import hub_cache_dir, is_repo_id, resolve
from tiny_models import tiny_gpt

TINY_GPT_FILE = dict(n_head=4, multiple_of=32, downsample=4)  # what a .pt of the tiny GPT cannot say about itself
TINY_VQ = dict(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8, ch_mult=(1, 1, 1))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A LlamaGen-style single-file release: c2i_tiny_16.pt (GPT, {"model": ...}) and vq_tiny.pt."""
    root = tmp_path_factory.mktemp("release")
    gpt = tiny_gpt(image_size=16, downsample=4)
    torch.save({"model": gpt.state_dict()}, root / "c2i_tiny_16.pt")
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ)).eval()
    torch.save({"model": vq.state_dict()}, root / "vq_tiny.pt")
    vq.save_pretrained(root / "vq_dir")
    return root, gpt, vq


def test_single_file_release_loads_by_repo_id_and_filename(offline_cache, release):
    root, gpt, _ = release
    add_to_hf_cache(offline_cache, "FoundationVision/LlamaGen",
                    {"c2i_tiny_16.pt": root / "c2i_tiny_16.pt", "vq_tiny.pt": root / "vq_tiny.pt"})
    path = resolve("FoundationVision/LlamaGen", filename="c2i_tiny_16.pt")
    assert path.name == "c2i_tiny_16.pt" and offline_cache in path.parents  # the cache's snapshot, repo's name
    loaded = GPT.from_pretrained("FoundationVision/LlamaGen", filename="c2i_tiny_16.pt", **TINY_GPT_FILE)
    assert loaded.config.image_size == 16  # inferred from the file name's _16 suffix, as for a local file
    for k, v in gpt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_converted_directory_repo_and_pipeline_from_repo_ids(offline_cache, release):
    root, gpt, vq = release
    gpt_dir = root / "gpt_dir"
    gpt.save_pretrained(gpt_dir)
    add_directory_to_hf_cache(offline_cache, "someone/tiny-gpt", gpt_dir)
    add_directory_to_hf_cache(offline_cache, "someone/tiny-vq", root / "vq_dir")
    add_to_hf_cache(offline_cache, "FoundationVision/LlamaGen",
                    {"c2i_tiny_16.pt": root / "c2i_tiny_16.pt", "vq_tiny.pt": root / "vq_tiny.pt"})
    vq_hub = VQModel.from_pretrained("someone/tiny-vq")
    assert vq_hub.config == vq.config
    from_dirs = LlamaGenPipeline.from_pretrained("someone/tiny-gpt", "someone/tiny-vq")
    # LlamaGen's layout: both files in one repo; the VQ comes from the GPT's repo when only vq_filename is given.
    from_files = LlamaGenPipeline.from_pretrained("FoundationVision/LlamaGen", gpt_filename="c2i_tiny_16.pt",
                                                  vq_filename="vq_tiny.pt", gpt_kwargs=TINY_GPT_FILE,
                                                  vq_kwargs=TINY_VQ)
    local = LlamaGenPipeline.from_pretrained(gpt_dir, root / "vq_dir")  # local paths keep working
    outs = [p(class_labels=[1, 2], seed=3, output_type="np", progress=False) for p in (from_dirs, from_files, local)]
    for other in outs[1:]:
        assert torch.equal(outs[0].tokens, other.tokens) and (outs[0].images == other.images).all()


def test_missing_repo_offline_is_one_clear_error(offline_cache):
    with pytest.raises(CheckpointError) as err:
        GPT.from_pretrained("nobody/not-cached", filename="c2i_B_256.pt")
    message = str(err.value)
    assert "nobody/not-cached/c2i_B_256.pt" in message and "offline" in message and str(offline_cache) in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="not-cached"):
        VQModel.from_pretrained("nobody/not-cached")
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained("no/such/local/path.pt")  # three parts: a path, never a repo id
    assert not is_repo_id("no/such/local/path.pt") and is_repo_id("google/flan-t5-xl")


def test_a_missing_relative_path_names_what_was_tried_locally_and_on_the_hub(offline_cache, tmp_path, monkeypatch):
    """Issue 19: the README's relative checkpoint paths, run from another directory, were taken for Hub ids."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        GPT.from_pretrained("checkpoints/world_gpt")
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "world_gpt") in message  # the local path tried, from the working dir
    assert "Hub" in message and "offline" in message and str(offline_cache) in message  # and the Hub repo
    assert "shipped_paths()" in message and "\n" not in message  # the way to the shipped mini world


def test_cache_location_follows_hf_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    assert hub_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_explicit_cache_dir_and_local_files_only(tmp_path, release, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    root, gpt, _ = release
    cache = tmp_path / "elsewhere"
    add_to_hf_cache(cache, "org/release", {"c2i_tiny_16.pt": root / "c2i_tiny_16.pt"})
    loaded = GPT.from_pretrained("org/release", filename="c2i_tiny_16.pt", cache_dir=cache, local_files_only=True,
                                 **TINY_GPT_FILE)
    assert torch.equal(loaded.output.weight, gpt.output.weight)


def test_caption_encoder_from_repo_id(offline_cache, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from llamagen_core2 import CaptionEncoder

    directory = tmp_path / "t5"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "cat": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(directory)
    add_directory_to_hf_cache(offline_cache, "google/flan-t5-tiny", directory)
    hub = CaptionEncoder.from_pretrained("google/flan-t5-tiny", max_length=8)
    local = CaptionEncoder.from_pretrained(directory, max_length=8)
    (f1, m1), (f2, m2) = hub.encode(["a red cat"]), local.encode(["a red cat"])
    assert torch.equal(f1, f2) and torch.equal(m1, m2) and int(m1.sum()) == 4
    with pytest.raises(CheckpointError, match="offline"):
        CaptionEncoder.from_pretrained("google/flan-t5-xl")


def test_cli_generate_with_repo_ids(offline_cache, release, tmp_path, capsys):
    from llamagen_core2.cli import main

    root, gpt, _ = release
    gpt.save_pretrained(tmp_path / "gpt_dir")
    add_directory_to_hf_cache(offline_cache, "someone/tiny-gpt", tmp_path / "gpt_dir")
    add_directory_to_hf_cache(offline_cache, "someone/tiny-vq", root / "vq_dir")
    add_to_hf_cache(offline_cache, "FoundationVision/LlamaGen", {"c2i_tiny_16.pt": root / "c2i_tiny_16.pt"})
    common = ["--vq-ckpt", "someone/tiny-vq", "--classes", "1,2", "--device", "cpu", "--top-k", "0", "--quiet"]
    rc = main(["generate", "--gpt-ckpt", "someone/tiny-gpt", *common, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["num_images"] == 2
    # --gpt-filename reaches the cached file: the tiny .pt is read, and only its head count is unknowable.
    rc = main(["generate", "--gpt", "FoundationVision/LlamaGen", "--gpt-filename", "c2i_tiny_16.pt", *common,
               "--out", str(tmp_path / "o1")])
    assert rc == 2 and "n_head cannot be inferred" in capsys.readouterr().err
    rc = main(["generate", "--gpt", "nobody/absent", "--gpt-filename", "x.pt", *common, "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "nobody/absent/x.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
