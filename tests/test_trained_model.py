"""The memorizing model of trained_model.py: it reproduces its text, it is cheap, and its export is Apple's format."""

import json

import numpy as np
from mlx.utils import tree_flatten
from safetensors import safe_open
from trained_model import MIN_MARGIN, NAME, greedy, load_checkpoint, margins

from mlx_openelm import stream_generate
from mlx_openelm.config import layer_wise_scaling
from mlx_openelm.tokenizer import Tokenizer


def test_greedy_decoding_reproduces_the_text(trained_checkpoint):
    t = trained_checkpoint
    model = load_checkpoint(t.path)
    tok = Tokenizer.from_file(t.path / "tokenizer.model")
    for prompt_ids, _ in t.sequences():
        generated = greedy(model, prompt_ids, tok.eos_id, max_tokens=2 * len(t.continuation_ids))
        assert generated[-1] == tok.eos_id, "the model must end the text with EOS"
        assert tok.decode(generated) == t.continuation


def test_library_generation_reproduces_the_text(trained_checkpoint):
    # The project's KV-cached generator (prefill once, one token per step) agrees with the full forward passes.
    t = trained_checkpoint
    model = load_checkpoint(t.path)
    tok = Tokenizer.from_file(t.path / "tokenizer.model")
    for prompt_ids, continuation_ids in t.sequences():
        responses = list(stream_generate(model, tok, prompt_ids, max_tokens=2 * len(continuation_ids)))
        assert [r.token for r in responses] == continuation_ids
        assert "".join(r.text for r in responses) == t.continuation
        assert responses[-1].finish_reason == "stop"


def test_exported_weights_keep_the_trained_margin(trained_checkpoint):
    # Recomputed from the file: the export is the trained model, and every token clears the stopping margin.
    t = trained_checkpoint
    model = load_checkpoint(t.path)
    least = min(margins(model, p, c).min() for p, c in t.sequences())
    assert least >= MIN_MARGIN
    assert np.isclose(least, t.min_margin, atol=1e-4)


def test_training_and_export_take_under_a_minute(trained_checkpoint):
    # The budget: tokenizer training, model training and export together, on this 2-core CPU.
    assert trained_checkpoint.seconds < 60
    assert trained_checkpoint.steps > 0


def test_checkpoint_is_laid_out_like_apples(trained_checkpoint):
    path = trained_checkpoint.path
    assert path.name == NAME and trained_checkpoint.instruct_path.name == f"{NAME}-Instruct"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "openelm" and config["architectures"] == ["OpenELMForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["share_input_output_layers"] and config["normalize_qk_projections"] and config["ffn_with_glu"]
    for key in ("ffn_dim_divisor", "max_context_length", "rope_freq_constant", "rope_max_length", "bos_token_id",
                "eos_token_id", "transformers_version", "vocab_size"):
        assert key in config, key
    n = config["num_transformer_layers"]
    assert len(config["num_query_heads"]) == len(config["num_kv_heads"]) == len(config["ffn_multipliers"]) == n
    # Self-consistent like Apple's: the per-layer lists follow from the multipliers and the GQA group size.
    rule = layer_wise_scaling(n, config["model_dim"], config["head_dim"], config["num_gqa_groups"],
                              tuple(config["qkv_multipliers"]),
                              (config["ffn_multipliers"][0], config["ffn_multipliers"][-1]))
    assert {k: config[k] for k in rule} == rule
    assert Tokenizer.from_file(path / "tokenizer.model").vocab_size == config["vocab_size"]

    with safe_open(str(path / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert all(v.dtype == np.float32 for v in tensors.values())
    model = load_checkpoint(path)
    assert set(tensors) == {k for k, _ in tree_flatten(model.parameters())}
    assert not any("lm_head" in name for name in tensors)  # tied output head


def test_model_exercises_every_architectural_feature(trained_checkpoint):
    args = load_checkpoint(trained_checkpoint.path).args
    assert len(set(args.num_query_heads)) > 1 and len(set(args.num_kv_heads)) > 1, "uneven per-layer heads"
    assert len(set(args.ffn_dims)) == args.num_transformer_layers, "uneven per-layer FFN widths"
    assert all(q > kv for q, kv in zip(args.num_query_heads, args.num_kv_heads)), "grouped-query attention"
    assert args.share_input_output_layers and args.normalize_qk_projections


def test_chat_framing_renders_the_instruct_template(trained_checkpoint):
    # The Instruct sequence is the template's rendering: BOS, role markers as text, and "</s>" as the EOS id.
    t = trained_checkpoint
    tok = Tokenizer.from_file(t.path / "tokenizer.model")
    ids = t.chat_prompt_ids
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    end_of_user = ids.index(tok.eos_id)
    assert tok.decode(ids[:end_of_user]) == f"<|user|>\n{t.prompt}"
    assert tok.decode(ids[end_of_user:]).strip() == "<|assistant|>"
