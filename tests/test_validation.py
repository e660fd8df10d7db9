"""Validation at every public entry point, before any work or file: ids in range, integers are integers,
finite scales / loss weights / learning rates, typed config and manifest JSON that names the field and file."""
import dataclasses
import json
import math

import pytest
import torch

from llamagen_core2.config import GPTConfig, VQConfig
from llamagen_core2.core2.collect import COLLECT_GUIDANCE, collect, parse_class_ids
from llamagen_core2.core2.reflect import holdout_mask, reflect
from llamagen_core2.core2.sample import SAMPLE_GUIDANCE, sample_images
from llamagen_core2.core2.weak_model import WeakModel
from llamagen_core2.decode.generate import generate
from llamagen_core2.decode.model import GPT
from llamagen_core2.encoders.vq import VQModel
from llamagen_core2.errors import CheckpointError, InvalidArgument, check_int, check_number, check_token_ids
from llamagen_core2.guidance.config import GuidanceConfig, Schedule, make_schedule
from llamagen_core2.io.shards import ShardReader, ShardWriter
from tiny_models import TINY_VQ, tiny_gpt

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- shared checks
@pytest.mark.parametrize("value", [3.5, 3.0, "3", True, None, float("nan")])
def test_check_int_refuses_non_integers(value):
    with pytest.raises(InvalidArgument, match=r"n must be an integer >= 1"):
        check_int("n", value, minimum=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "1.0", None, True])
def test_check_number_refuses_non_finite(value):
    with pytest.raises(InvalidArgument, match="x must be a finite number"):
        check_number("x", value, minimum=0.0)


def test_check_number_bounds_are_named():
    assert check_number("x", 2, above=1.0) == 2.0
    with pytest.raises(InvalidArgument, match=r"x must be a finite number in \(0.0, 1.0\), got 1.0"):
        check_number("x", 1.0, above=0.0, below=1.0)


# ---------------------------------------------------------------------- ids in range
@pytest.mark.parametrize("bad", [torch.tensor([[0, 97]]), torch.tensor([[-1, 3]]), torch.tensor([[0.0, 1.0]]),
                                 torch.tensor([[True, False]])])
def test_gpt_logits_refuses_token_ids_outside_the_vocabulary(bad):
    gpt = tiny_gpt()
    with pytest.raises(InvalidArgument, match=r"tokens must (lie in|be an integer tensor of ids in) \[0, 96\]"):
        gpt.logits(torch.tensor([1]), bad)
    assert gpt.logits(torch.tensor([1]), torch.tensor([[0, 96]])).shape == (1, 2, 97)


def test_vq_decode_codes_refuses_codes_outside_the_codebook():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ)).eval()
    for bad in (torch.full((1, 16), 97), torch.full((1, 16), -1)):
        with pytest.raises(InvalidArgument, match=r"codes must lie in \[0, 96\]"):
            vq.decode_codes(bad)
    with pytest.raises(InvalidArgument, match="integer tensor"):
        vq.decode_codes(torch.zeros(1, 16))


def test_check_token_ids_names_the_range():
    with pytest.raises(InvalidArgument, match=r"got values in \[0, 10\]"):
        check_token_ids("ids", torch.tensor([0, 10]), 10)


@pytest.mark.parametrize("text,message", [("5-2", "empty"), ("0-99999999999", r"\[0, 9\]"), ("-3", "look like"),
                                          ("1,x", "look like"), (",", "no class ids")])
def test_class_id_lists_are_checked_before_expanding(text, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_class_ids(text, 10)


# ---------------------------------------------------------------------- integers are integers
@pytest.mark.parametrize("kwargs,message", [
    (dict(num_tokens=3.5), "num_tokens must be an integer"),
    (dict(num_tokens="3"), "num_tokens must be an integer"),
    (dict(num_tokens=0), "num_tokens must be an integer in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(cfg_interval=2.5), "cfg_interval must be an integer"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be"),
    (dict(w2s_scale=float("inf")), "w2s_scale must be"),
    (dict(generator=0), "generator must be a torch.Generator"),
])
def test_generate_refuses_bad_arguments_before_any_work(kwargs, message):
    from llamagen_core2.decode.engine import Engine

    gpt = tiny_gpt()
    engine = Engine(gpt)
    with pytest.raises(InvalidArgument, match=message):
        generate(gpt, torch.tensor([1, 2]), engine=engine, **kwargs)
    assert engine.cache is None  # refused before the KV cache was even allocated


def test_generate_refuses_a_float_caption_mask():
    gpt = tiny_gpt("t2i")
    feats = torch.randn(1, 6, 24)
    with pytest.raises(InvalidArgument, match="cond_mask must be bool"):
        generate(gpt, feats, cond_mask=torch.full((1, 6), 0.5), seed=0)


def test_schedules_take_integers_and_fractions_only():
    with pytest.raises(InvalidArgument, match="first_tokens must be an integer"):
        make_schedule(16, first_tokens=2.5)
    with pytest.raises(InvalidArgument, match="num_tokens must be an integer"):
        make_schedule(16.0, first_tokens=2)
    with pytest.raises(InvalidArgument, match="first_fraction must be in"):
        Schedule("slow", "fast", first_fraction=float("nan"))


@pytest.mark.parametrize("holdout,expected", [(0.05, 5), (0.2, 20), (0.5, 50), (0.9, 90), (0.3, 30), (1 / 3, 33)])
def test_holdout_is_the_exact_fraction_not_a_rounded_period(holdout, expected):
    mask = holdout_mask(torch.arange(100), holdout)
    assert int(mask.sum()) == expected == math.floor(100 * holdout + 1e-9)
    if holdout == 0.05:  # 1/n keeps the old rule: every n-th image
        assert torch.nonzero(mask).flatten().tolist() == [19, 39, 59, 79, 99]


@pytest.mark.parametrize("holdout", [0.0, 1.0, float("nan"), -0.1, "0.1"])
def test_holdout_outside_the_open_interval_is_refused(holdout):
    with pytest.raises(InvalidArgument, match="holdout must be a finite number in"):
        holdout_mask(torch.arange(10), holdout)


# ---------------------------------------------------------------------- collect / reflect / sample: nothing written
@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=2.0), "top_p"), (dict(top_k=1.5), "top_k"),
    (dict(num_tokens=3.5), "num_tokens"), (dict(num_tokens=17), "num_tokens"), (dict(seed=-3), "seed"),
    (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(batch_size=2.0), "batch_size"),
    (dict(per_condition=0), "per_condition"), (dict(conditions=[1.5]), "class ids"),
])
def test_collect_validates_everything_before_touching_the_directory(tmp_path, kwargs, message):
    args = dict(conditions=[1, 2], per_condition=1, batch_size=2, cfg_scale=3.0, progress=False)
    args.update(kwargs)
    guidance, args = split_guidance(args)
    out = tmp_path / "shards"
    with pytest.raises(InvalidArgument, match=message):
        collect(tiny_gpt(), args.pop("conditions"), out, guidance=COLLECT_GUIDANCE.replace(**guidance), **args)
    assert not out.exists()


def split_guidance(kwargs: dict) -> tuple[dict, dict]:
    """(the GuidanceConfig fields of kwargs, the rest): collect / reflect / sample take guidance settings as one
    GuidanceConfig, built in the test's pytest.raises block (a bad value is refused there, before any file)."""
    fields = {f.name for f in dataclasses.fields(GuidanceConfig)}
    return {k: v for k, v in kwargs.items() if k in fields}, {k: v for k, v in kwargs.items() if k not in fields}


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=float("nan")), "lr"), (dict(lr=0.0), "lr"), (dict(mse_weight=float("nan")), "mse_weight"),
    (dict(weight_decay=float("inf")), "weight_decay"), (dict(warmup=2.5), "warmup"), (dict(steps=3.5), "steps"),
    (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(cfg_scale=1.0), "cfg_scale"), (dict(holdout=0.0), "holdout"),
    (dict(preset="W-9"), "preset"), (dict(weak_overrides={"dim": "64"}), "dim"), (dict(seed=0.5), "seed"),
])
def test_reflect_validates_everything_before_reading_or_writing(tmp_path, kwargs, message):
    guidance, kwargs = split_guidance(kwargs)
    out = tmp_path / "weak"
    with pytest.raises(InvalidArgument, match=message):
        reflect(tiny_gpt(), tmp_path / "no_shards", out, progress=False,
                guidance=GuidanceConfig(**guidance) if guidance else None, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="fast"), "weak_model"), (dict(schedule=["slow"] * 16), "weak_model"),
    (dict(schedule=["cfg"] * 3), "one mode per token"), (dict(w2s_scale=float("nan")), "w2s_scale"),
    (dict(top_p=0.0), "top_p"), (dict(seed=2 ** 64), "seed"), (dict(batch_size=0), "batch_size"),
    (dict(mode="bogus"), "mode"),
])
def test_sample_validates_everything_before_writing(tmp_path, kwargs, message):
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**{**TINY_VQ, "ch_mult": (1, 1, 1, 1, 1)})).eval()
    guidance, kwargs = split_guidance(kwargs)
    out = tmp_path / "samples"
    with pytest.raises(InvalidArgument, match=message):
        sample_images(tiny_gpt(), vq, [1, 2], out, progress=False, guidance=SAMPLE_GUIDANCE.replace(**guidance),
                      **kwargs)
    assert not out.exists()


# ---------------------------------------------------------------------- config JSON: typed, field and file named
def _edit_config(directory, edit):
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["config"].update(dim="64"), r"GPTConfig field 'dim' must be an integer, got '64'"),
    (lambda s: s["config"].update(n_layer=2.5), r"GPTConfig field 'n_layer' must be an integer"),
    (lambda s: s["config"].update(norm_eps=None), r"GPTConfig field 'norm_eps' must be a finite number"),
    (lambda s: s["config"].update(model_type="x2i"), "model_type must be 'c2i' or 't2i'"),
    (lambda s: s["config"].update(vocab_size=-3), "vocab_size must be a positive integer"),
    (lambda s: s.update(config=[1, 2]), "is not a GPT config"),
])
def test_gpt_config_json_is_type_checked_naming_field_and_file(tmp_path, edit, message):
    tiny_gpt().save_pretrained(tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        GPT.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_config_json_that_is_not_json_or_not_an_object_names_the_file(tmp_path):
    tiny_gpt().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not a valid config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: a config.json must hold a JSON object, got list"):
        GPT.from_pretrained(tmp_path)


def test_vq_and_weak_configs_are_type_checked(tmp_path):
    torch.manual_seed(0)
    VQModel(VQConfig(**TINY_VQ)).save_pretrained(tmp_path / "vq")
    _edit_config(tmp_path / "vq", lambda s: s["config"].update(ch_mult=[1, "2"]))
    with pytest.raises(CheckpointError, match=r"vq/config.json: VQConfig field 'ch_mult' must be a list of integers"):
        VQModel.from_pretrained(tmp_path / "vq")
    gpt = tiny_gpt()
    WeakModel.for_base(gpt, "W-1", dim=32, n_head=4, multiple_of=32).save_pretrained(tmp_path / "weak")
    for edit, message in ((lambda s: s["config"].update(n_layer="1"), "WeakConfig field 'n_layer'"),
                          (lambda s: s["base"].update(dim=64.5), "base field 'dim'"),
                          (lambda s: s.update(cfg_scale="4"), "cfg_scale must be a finite number")):
        WeakModel.for_base(gpt, "W-1", dim=32, n_head=4, multiple_of=32).save_pretrained(tmp_path / "weak")
        _edit_config(tmp_path / "weak", edit)
        with pytest.raises(CheckpointError, match=message):
            WeakModel.from_pretrained(tmp_path / "weak")


def test_gpt_config_from_dict_refuses_wrong_types_by_name():
    with pytest.raises(InvalidArgument, match="GPTConfig field 'rope_base' must be a finite number"):
        GPTConfig.from_dict({"rope_base": float("inf")})
    with pytest.raises(InvalidArgument, match="GPTConfig field 'preset' must be a string or null"):
        GPTConfig.from_dict({"preset": 7})


def test_unknown_gpt_preset_is_refused_even_for_a_directory_checkpoint(tmp_path):
    tiny_gpt().save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match="unknown GPT preset 'GPT-ZZ'"):
        GPT.from_pretrained(tmp_path, preset="GPT-ZZ")
    with pytest.raises(CheckpointError, match=r"preset 'GPT-XL' does not match .*dim: 64 vs preset 1280"):
        GPT.from_pretrained(tmp_path, preset="GPT-XL")


def test_vq_preset_given_for_a_directory_must_match_it(tmp_path):
    torch.manual_seed(0)
    VQModel(VQConfig(**TINY_VQ)).save_pretrained(tmp_path)  # 3 levels: neither VQ-16 nor VQ-8
    assert VQModel.from_pretrained(tmp_path).config.ch_mult == (1, 1, 1)
    with pytest.raises(CheckpointError, match=r"preset 'VQ-8' does not match .*ch_mult \[1, 1, 1\]"):
        VQModel.from_pretrained(tmp_path, preset="VQ-8")
    with pytest.raises(InvalidArgument, match="unknown VQ preset 'VQ-32'"):
        VQModel.from_pretrained(tmp_path, preset="VQ-32")


# ---------------------------------------------------------------------- manifests: typed, file named
def _shard_dir(tmp_path):
    with ShardWriter(tmp_path, {"cfg": 4.0}, rank=0, world_size=1, samples_per_shard=1) as w:
        w.add("a", {"x": torch.zeros(2)})
        w.add("b", {"x": torch.ones(2)})
    return tmp_path


@pytest.mark.parametrize("manifest,message", [
    ("{oops", "not a valid shard manifest"), ("[]", "must hold a JSON object"),
    ('{"format": "other", "version": 1, "meta": {}}', "format must be"),
    ('{"format": "llamagen_core2.shards", "version": "1", "meta": {}}', "version must be 1"),
    ('{"format": "llamagen_core2.shards", "version": 1, "meta": "cfg=4"}', "meta must be a JSON object"),
    ('{"format": "llamagen_core2.shards", "version": 1}', "meta must be a JSON object"),
])
def test_a_manifest_edited_by_hand_is_refused_naming_the_file(tmp_path, manifest, message):
    _shard_dir(tmp_path)
    (tmp_path / "manifest.json").write_text(manifest)
    for open_it in (lambda: ShardReader(tmp_path), lambda: ShardWriter(tmp_path, {"cfg": 4.0})):
        with pytest.raises(CheckpointError, match=message) as info:
            open_it()
        assert "manifest.json" in str(info.value)


def test_a_truncated_or_foreign_shard_is_refused_naming_the_file(tmp_path):
    _shard_dir(tmp_path)
    shard = sorted(tmp_path.glob("rank*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable shard, truncated"):
        list(ShardReader(tmp_path))
    shard.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable shard"):
        ShardReader(tmp_path)


# ---------------------------------------------------------------------- collected shards edited by hand
def _edit_shard(directory, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shard = sorted(directory.glob("rank*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata=meta)
    return shard


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["0/labels"].fill_(10), r"labels must lie in \[0, 9\]"),
    (lambda t: t["0/tokens"].fill_(-1), r"tokens must lie in \[0, 96\]"),
    (lambda t: t.update({"0/hidden_cond": t["0/hidden_cond"][:, :3].contiguous()}),
     r"hidden_cond \[2, 3, 64\] \(expected \[2, 16, 64\]\)"),
    (lambda t: t.pop("0/hidden_uncond"), r"\['hidden_uncond'\] missing"),
])
def test_collected_shards_edited_by_hand_are_refused_naming_the_file(tmp_path, edit, message):
    from llamagen_core2.core2.collect import load_collected

    collect(tiny_gpt(), [1, 2], tmp_path, per_condition=1, batch_size=2,
            guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), progress=False)
    shard = _edit_shard(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_collected(tmp_path)
    assert shard.name in str(info.value)


def test_torchrun_environment_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InvalidArgument, match="environment variable RANK must be a non-negative integer"):
        collect(tiny_gpt(), [1], tmp_path, guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), progress=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidArgument, match=r"rank must be in \[0, world_size\)"):
        ShardWriter(tmp_path / "s", {})
    with pytest.raises(InvalidArgument, match="rank must be an integer"):
        ShardWriter(tmp_path / "s", {}, rank=0.5, world_size=1)


def test_weak_model_protocol_and_vq_inputs_are_checked():
    with pytest.raises(InvalidArgument, match="weak_model must have new_cache"):
        generate(tiny_gpt(), torch.tensor([1]), mode="fast", weak_model=object(), seed=0)
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ)).eval()
    with pytest.raises(InvalidArgument, match="NaN/inf"):
        vq.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(InvalidArgument, match=r"does not match the GPT \(vocab 16384"):
        vq.check_matches(GPTConfig())


def test_numpy_integers_are_integers_and_floats_are_not():
    import numpy as np

    from llamagen_core2.core2.collect import storage_per_image
    from llamagen_core2.diffusion.moe_lora import expert_index
    from llamagen_core2.world.dataset import make_dataset

    tokens = generate(tiny_gpt(), torch.tensor([1]), num_tokens=np.int64(2), seed=np.int64(3), top_k=0)
    assert tokens.shape == (1, 2)
    for call in (lambda: storage_per_image(tiny_gpt().config, num_tokens=3.5), lambda: make_dataset(2.5, seed=0),
                 lambda: expert_index(1.5, 3, 4), lambda: generate(tiny_gpt(), torch.tensor([1]), seed=3.0)):
        with pytest.raises(InvalidArgument, match="must be an integer"):
            call()
