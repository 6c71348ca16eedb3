"""umT5 encoder and tokenizer: against transformers' UMT5EncoderModel with the same random weights (fp32,
relative error <= 1e-4), loading from Wan's key names with errors naming file and key, and the prompt
cleaning, truncation, EOS and padding of the tokenizer."""

import json
import re

import pytest
import torch

from dit8 import CheckpointError, InputError
from dit8.t5 import T5Encoder, relative_position_buckets
from dit8.testing_encoders import random_t5_weights, tiny_t5_config, write_tiny_t5, write_tiny_tokenizer
from dit8.tokenizer import Tokenizer, clean_prompt

pytestmark = pytest.mark.cpu_only  # the encoder's tests run it on the CPU

CONFIG = tiny_t5_config()
TOLERANCE = 1e-4


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def weights():
    return random_t5_weights(CONFIG, seed=3)


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5") / "models_t5_umt5-xxl-enc-bf16.pth", CONFIG, seed=3)


@pytest.fixture(scope="module")
def model(t5_path):
    return T5Encoder.from_pth(t5_path, device="cpu", dtype=torch.float32)


def random_batch(lengths, total, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CONFIG.vocab, (len(lengths), total), generator=gen)
    mask = (torch.arange(total) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # padding id 0, as the tokenizer writes


# -- key names and loading -------------------------------------------------------------------------------


def test_state_dict_keys_are_wans():
    # Wan's wan/modules/t5.py T5Encoder(shared_pos=False): per block, in this order.
    block = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
             "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight"]
    expected = {"token_embedding.weight", "norm.weight"}
    expected |= {f"blocks.{i}.{name}" for i in range(CONFIG.num_layers) for name in block}
    assert set(T5Encoder(CONFIG, device="meta").state_dict()) == expected


def test_config_read_from_shapes(model):
    assert model.config == CONFIG


def test_loads_bf16_file_into_bf16(tmp_path, model):
    path = write_tiny_t5(tmp_path / "t5_bf16.pth", CONFIG, seed=3, dtype=torch.bfloat16)
    low = T5Encoder.from_pth(path, device="cpu", dtype=torch.bfloat16)
    assert low.blocks[0].attn.q.weight.dtype == torch.bfloat16 and low.norm.weight.dtype == torch.float32
    ids, mask = random_batch([9, 5], 12)
    out = low(ids, mask)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 12, CONFIG.dim)
    assert rel_error(out[0, :9], model(ids, mask)[0, :9]) < 5e-2


def save(weights, path):
    torch.save(weights, path)
    return path


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        T5Encoder.from_pth(path, device="cpu", dtype=torch.float32)
    return str(info.value)


def test_missing_tensor_named(tmp_path, weights):
    w = dict(weights)
    del w["blocks.1.ffn.gate.0.weight"]
    path = save(w, tmp_path / "t5.pth")
    msg = load_error(path)
    assert str(path) in msg and "blocks.1.ffn.gate.0.weight" in msg and "missing" in msg


def test_unexpected_tensor_named(tmp_path, weights):
    path = save({**weights, "blocks.0.attn.q.weight_scale": torch.ones(CONFIG.dim_attn, 1)}, tmp_path / "t5.pth")
    msg = load_error(path)
    assert str(path) in msg and "blocks.0.attn.q.weight_scale" in msg and "unexpected" in msg


def test_misshaped_tensor_named(tmp_path, weights):
    bad = torch.zeros(CONFIG.dim, CONFIG.dim_attn + 1)
    path = save({**weights, "blocks.1.attn.o.weight": bad}, tmp_path / "t5.pth")
    msg = load_error(path)
    assert str(path) in msg and "blocks.1.attn.o.weight" in msg and "shape" in msg


def test_quantized_tensor_refused(tmp_path, weights):
    path = save({**weights, "blocks.0.attn.k.weight": torch.zeros(CONFIG.dim_attn, CONFIG.dim, dtype=torch.int8)},
                tmp_path / "t5.pth")
    assert "blocks.0.attn.k.weight" in load_error(path)


def test_a_model_folder_is_not_a_t5_file(tmp_path):
    # An official model folder holds DiT shards: they must not be read as the encoder.
    assert "a folder; give the T5 encoder file itself (models_t5_umt5-xxl-enc-bf16.pth)" in load_error(tmp_path)


def test_not_a_t5_file(tmp_path, weights):
    assert "umT5" in load_error(save({"something.weight": torch.zeros(2, 2)}, tmp_path / "other.pth"))
    w = {k: v for k, v in weights.items() if k != "token_embedding.weight"}
    assert "token_embedding.weight" in load_error(save(w, tmp_path / "t5.pth"))


# -- behaviour ----------------------------------------------------------------------------------------


def test_real_rows_do_not_depend_on_padding(model):
    ids, mask = random_batch([13, 6], 40, seed=5)
    full = model(ids, mask)
    cut = model(ids[:, :13], mask[:, :13])
    assert torch.allclose(full[0, :13], cut[0, :13], atol=1e-5, rtol=1e-5)
    assert torch.allclose(full[1, :6], cut[1, :6], atol=1e-5, rtol=1e-5)


def test_bad_inputs(model):
    ids, mask = random_batch([4], 6)
    with pytest.raises(InputError):
        model(ids.float(), mask)
    with pytest.raises(InputError):
        model(ids, mask[:, :5])
    with pytest.raises(InputError, match="token ids"):
        model(ids + CONFIG.vocab, mask)
    for shape in ((1, 0), (0, 6)):
        with pytest.raises(InputError, match=re.escape(f"at least one token of one prompt, got shape {shape}")):
            model(torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64))


def test_token_ids_range_and_int32(model):
    ids, mask = random_batch([5, 3], 6)
    torch.testing.assert_close(model(ids.int(), mask), model(ids, mask), rtol=0, atol=0)
    for bad in (-1, CONFIG.vocab):  # the first id past the vocabulary too
        with pytest.raises(InputError, match=re.escape(f"token ids must lie in [0, {CONFIG.vocab}); got ")) as info:
            model(torch.where(mask.bool(), ids, bad), mask)
        assert str(bad) in str(info.value).split("got ")[1].split("..")


def test_a_row_with_every_key_masked_is_the_references(model, weights):
    # Padding keys get the lowest finite score, not -inf: such a row attends evenly to its keys, as in the
    # reference, rather than to none (what torch's attention gives for a row of -inf).
    ids, mask = random_batch([4, 3], 5)
    mask[1] = 0
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    hf = hf_umt5(weights)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_error(out[1], ref[1]) <= TOLERANCE


def test_a_layout_that_does_not_fit_is_a_checkpoint_error(tmp_path, weights):
    # 3 heads do not divide dim_attn 64; a token embedding of rank 3 cannot be unpacked.
    w = {k: (v[:, :3] if k.endswith("pos_embedding.embedding.weight") else v) for k, v in weights.items()}
    assert "not a umT5 encoder of the expected layout: dim_attn 64 is not a multiple of num_heads 3" in load_error(
        save(w, tmp_path / "heads.pth"))
    w = {**weights, "token_embedding.weight": weights["token_embedding.weight"][None]}
    assert "not a umT5 encoder of the expected layout" in load_error(save(w, tmp_path / "rank.pth"))
    w = {k: v for k, v in weights.items() if not k.startswith("blocks.")}
    assert "no encoder blocks (blocks.N.*)" in load_error(save(w, tmp_path / "blockless.pth"))
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        tiny_t5_config(num_heads=3)


# -- against transformers' UMT5EncoderModel ------------------------------------------------------------


def hf_umt5(weights, config=CONFIG):
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    hf_config = transformers.UMT5Config(
        vocab_size=config.vocab, d_model=config.dim, d_kv=config.dim_attn // config.num_heads, d_ff=config.dim_ffn,
        num_layers=config.num_layers, num_heads=config.num_heads, relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=config.eps, dropout_rate=0.0, attn_implementation="eager")
    hf = transformers.UMT5EncoderModel(hf_config).eval()
    assert hf_config.dense_act_fn == "gelu_new"  # the tanh GELU, as Wan's T5 uses
    mapped = {"shared.weight": weights["token_embedding.weight"],
              "encoder.embed_tokens.weight": weights["token_embedding.weight"],
              "encoder.final_layer_norm.weight": weights["norm.weight"]}
    names = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight",
             "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # the linear branch
             "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    for i in range(config.num_layers):
        for ours, theirs in names.items():
            mapped[f"encoder.block.{i}.{theirs}"] = weights[f"blocks.{i}.{ours}"]
    hf.load_state_dict(mapped, strict=True)
    return hf


def test_what_the_file_does_not_record_is_umt5s(model):
    # eps and max_distance are not in the weights: the loaded model takes umT5's (1e-6, 128), which the
    # parity test below cannot catch, as it builds its reference from our config.
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    umt5 = transformers.UMT5Config()
    assert model.config.eps == umt5.layer_norm_epsilon
    assert model.config.max_distance == umt5.relative_attention_max_distance
    assert model.config.num_buckets == umt5.relative_attention_num_buckets


@pytest.mark.parametrize("lengths,total", [([17, 5, 1], 24), ([300, 41], 300)])
def test_matches_transformers(model, weights, lengths, total):
    """Short rows exercise the exact buckets, 300 tokens the logarithmic ones and max_distance."""
    hf = hf_umt5(weights)
    ids, mask = random_batch(lengths, total, seed=len(lengths))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = model(ids, mask)
    for row, n in enumerate(lengths):  # the rows the pipeline keeps
        assert rel_error(out[row, :n], ref[row, :n]) <= TOLERANCE
    assert rel_error(out, ref) <= TOLERANCE  # padding rows follow the same arithmetic


def test_buckets_match_transformers(weights):
    hf = hf_umt5(weights)
    attn = hf.encoder.block[0].layer[0].SelfAttention
    L = 400
    offsets = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    assert torch.equal(relative_position_buckets(L, CONFIG.num_buckets, CONFIG.max_distance, torch.device("cpu")),
                       attn._relative_position_bucket(offsets))


# -- tokenizer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("model") / "google" / "umt5-xxl")


def vocab(folder):
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def test_clean_prompt():
    assert clean_prompt("  A cat &amp;amp; a\tdog\n\n on  the&nbsp;beach  ") == "A cat & a dog on the beach"
    assert clean_prompt("&lt;b&gt;x&lt;/b&gt;") == "<b>x</b>"
    assert clean_prompt(" \n ") == ""


def test_tokenize_pad_truncate_eos(tok_folder):
    v = vocab(tok_folder)
    tok = Tokenizer.from_folder(tok_folder, text_len=8)
    ids, mask, lengths = tok(["A cat  walks\n", "", "dog " * 20, "a zebra"])
    assert ids.dtype == mask.dtype == lengths.dtype == torch.int64 and ids.shape == mask.shape == (4, 8)
    assert ids[0].tolist() == [v["a"], v["cat"], v["walks"], v["</s>"]] + [v["<pad>"]] * 4
    assert ids[1].tolist() == [v["</s>"]] + [v["<pad>"]] * 7
    assert ids[2].tolist() == [v["dog"]] * 7 + [v["</s>"]]  # cut to text_len - 1, EOS kept last
    assert ids[3].tolist()[:3] == [v["a"], v["<unk>"], v["</s>"]]
    assert lengths.tolist() == [4, 1, 8, 3]
    assert torch.equal(mask, (torch.arange(8) < lengths[:, None]).long())
    assert (ids == v["</s>"]).sum(1).tolist() == [1, 1, 1, 1]  # the file's post-processor adds no second EOS


def test_tokenizer_default_length_and_model_folder(tok_folder):
    tok = Tokenizer.from_folder(tok_folder.parent.parent)  # the model folder holding google/umt5-xxl
    ids, mask, lengths = tok("a dog")
    assert ids.shape == (1, 512) and lengths.tolist() == [3] and int(mask.sum()) == 3


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_tokenizer_matches_transformers(tok_folder):
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_folder / "tokenizer.json"),
                                              eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    prompts = ["a cat walks on the beach", "", "dog " * 20, "the &amp; sea"]
    ref = hf([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=8,
             add_special_tokens=True, return_tensors="pt")
    ids, mask, _ = Tokenizer.from_folder(tok_folder, text_len=8)(prompts)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)


def test_tokenizer_special_tokens_from_the_config_files(tmp_path, tok_folder):
    """Without special_tokens_map.json the tokens come from tokenizer_config.json (given as a string or as
    {"content": ...}); with neither file, umT5's </s> and <pad>."""
    v = vocab(tok_folder)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tok_folder / "tokenizer.json").read_text())
    tok = Tokenizer.from_folder(folder)
    assert (tok.eos_id, tok.pad_id) == (v["</s>"], v["<pad>"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}, "pad_token": "</s>"}))
    tok = Tokenizer.from_folder(folder)
    assert (tok.eos_id, tok.pad_id) == (v["<unk>"], v["</s>"])


def test_tokenizer_bad_special_tokens_named(tmp_path, tok_folder):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tok_folder / "tokenizer.json").read_text())
    (folder / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'special_tokens_map.json'}: cannot read")):
        Tokenizer.from_folder(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'tokenizer.json'}: has no token '<eos>'")):
        Tokenizer.from_folder(folder)


def test_tokenizer_ignores_padding_and_truncation_stored_in_the_file(tmp_path, tok_folder):
    from tokenizers import Tokenizer as HFTokenizer

    stored = HFTokenizer.from_file(str(tok_folder / "tokenizer.json"))
    stored.enable_truncation(max_length=2)
    stored.enable_padding(length=5, pad_id=2, pad_token="<unk>")
    folder = tmp_path / "tok"
    folder.mkdir()
    stored.save(str(folder / "tokenizer.json"))
    prompts = ["a cat walks on the beach", "dog"]
    plain = Tokenizer.from_folder(tok_folder, text_len=8)
    for got, want in zip(Tokenizer.from_folder(folder, text_len=8)(prompts), plain(prompts)):
        assert torch.equal(got, want)


def test_tokenizer_refuses_a_non_string_prompt_and_an_empty_length(tok_folder):
    tok = Tokenizer.from_folder(tok_folder, text_len=8)
    with pytest.raises(InputError, match=r"prompts must be strings, got \['str', 'NoneType'\]"):
        tok(["a cat", None])
    with pytest.raises(ValueError, match="text_len must be at least 1"):
        Tokenizer(tok.tokenizer, eos_id=tok.eos_id, pad_id=tok.pad_id, text_len=0)


def test_count_tokens_counts_the_cleaned_prompt(tok_folder):
    # count_tokens is what the prompt check compares with text_len - 1: it must count what __call__ encodes.
    tok = Tokenizer.from_folder(tok_folder)
    for prompt in ["a cat", "the &amp;amp; sea", "  dog\n\ndog  "]:
        assert tok.count_tokens(prompt) + 1 == int(tok(prompt)[2])
