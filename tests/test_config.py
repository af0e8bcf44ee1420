import pytest

from mlx_openelm import ModelArgs, preset
from mlx_openelm.config import layer_wise_scaling, make_divisible


def _expand(runs):
    return [v for v, n in runs for _ in range(n)]


def test_270m_lists_match_apple_config():
    a = preset("OpenELM-270M")
    assert a.num_query_heads == _expand([(12, 5), (16, 7), (20, 4)])
    assert a.num_kv_heads == _expand([(3, 5), (4, 7), (5, 4)])
    assert a.ffn_multipliers == [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53,
                                 3.77, 4.0]
    assert a.ffn_dims == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608,
                          4864, 5120]


def test_1_1b_lists_match_apple_config():
    a = preset("OpenELM-1_1B")
    assert a.num_query_heads == _expand([(16, 3), (20, 7), (24, 8), (28, 6), (32, 4)])
    assert a.num_kv_heads == [q // 4 for q in a.num_query_heads]
    assert a.ffn_dims == [1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608,
                          4608, 5120, 5376, 5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192]


@pytest.mark.parametrize(
    "name, runs",
    [
        ("OpenELM-450M", [(12, 3), (16, 7), (20, 6), (24, 4)]),
        ("OpenELM-3B", [(12, 4), (16, 14), (20, 12), (24, 6)]),
    ],
)
def test_head_lists_450m_3b(name, runs):
    a = preset(name)
    assert a.num_query_heads == _expand(runs)
    assert a.num_kv_heads == [q // 4 for q in _expand(runs)]


def test_instruct_and_repo_names_resolve_to_presets():
    assert preset("apple/OpenELM-3B-Instruct") == preset("OpenELM-3B")
    assert preset("OpenELM-3B").head_dim == 128


def test_make_divisible_never_drops_more_than_ten_percent():
    assert make_divisible(1.43 * 1280, 256) == 1792
    assert make_divisible(100, 256) == 256
    assert make_divisible(4.0 * 1280, 256) == 5120


def test_from_dict_ignores_unknown_keys():
    cfg = {"model_type": "openelm", "architectures": ["OpenELMForCausalLM"], "torch_dtype": "float32",
           "num_transformer_layers": 2, "model_dim": 64, "head_dim": 16, **layer_wise_scaling(2, 64, 16)}
    args = ModelArgs.from_dict(cfg)
    assert args.num_transformer_layers == 2 and args.vocab_size == 32000


def _base():
    return {"model_type": "openelm", "num_transformer_layers": 2, "model_dim": 64, "head_dim": 16,
            "num_query_heads": [4, 8], "num_kv_heads": [1, 2], "ffn_multipliers": [1.0, 2.0]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type is 'llama', expected 'openelm'"),
        ({"num_query_heads": [4]}, "num_query_heads has 1 entries but num_transformer_layers is 2"),
        ({"ffn_multipliers": [1.0, 2.0, 3.0]}, "ffn_multipliers has 3 entries"),
        ({"num_query_heads": [4, 7]}, "layer 1: 7 query heads is not a multiple of 2 KV heads"),
    ],
)
def test_validation_names_the_problem(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelArgs.from_dict({**_base(), **change})


def test_missing_keys_are_named():
    cfg = _base()
    del cfg["head_dim"], cfg["num_kv_heads"]
    with pytest.raises(ValueError, match="missing required key\\(s\\): head_dim, num_kv_heads"):
        ModelArgs.from_dict(cfg)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'OpenELM-7B'"):
        preset("OpenELM-7B")
