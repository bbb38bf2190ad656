"""MLX-quantized folders: what `mlx_lm.convert --quantize` writes loads into kvzoo's
QuantizedLinear / QuantizedEmbedding layers and gives mlx-lm's logits on the same folder; what
`kvzoo convert` writes holds the same tensors as mlx-lm's own convert and mlx-lm reads it.

Oracles: transformers wrote the float checkpoint (save_pretrained), mlx-lm's convert quantized
it, and mlx-lm's loader and models run it. kvzoo wrote none of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.assets import require_module
from helpers.checkpoint_oracles import LOGIT_TOL, assert_greedy_agrees, exact_caches, greedy_cached, spread
from helpers.hf_folders import random_checkpoint

import zoo
from zoo.checkpoints import quantized
from zoo.cli import main as kvzoo

VOCAB = 320
BATCH = mx.array(np.random.RandomState(3).randint(0, VOCAB, (2, 16)))
PROMPT = [11, 200, 7, 45, 318, 2, 99]
LLAMA = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# case -> (HF model_type, config fields, bits, group size)
CASES = {
    "llama-4bit-g64": ("llama", LLAMA, 4, 64),
    "llama-tied-8bit-g128": ("llama", {**LLAMA, "tie_word_embeddings": True}, 8, 128),
    "qwen2-4bit-g32": ("qwen2", {**LLAMA, "tie_word_embeddings": True, "rope_theta": 1e6}, 4, 32),
    "gpt2-8bit-g64": ("gpt2", dict(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                     n_ctx=64, bos_token_id=0, eos_token_id=0), 8, 64),  # n_ctx: mlx-lm needs it
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> (float HF folder, folder mlx-lm's convert quantized)."""
    require_module("transformers")
    from mlx_lm.convert import convert

    made = {}

    def get(case):
        if case not in made:
            model_type, fields, bits, group_size = CASES[case]
            root = tmp_path_factory.mktemp(case)
            random_checkpoint(root / "hf", model_type, seed=len(made), **fields)
            if model_type == "gpt2":
                _unprefix(root / "hf")
            convert(str(root / "hf"), str(root / "mlx"), quantize=True, q_bits=bits, q_group_size=group_size)
            made[case] = (root / "hf", root / "mlx")
        return made[case]

    return get


def _unprefix(folder: Path) -> None:
    """Write GPT-2's tensors without transformers 5's `transformer.` prefix, as the hub's gpt2
    checkpoints store them: mlx-lm's GPT-2 loader reads only that layout."""
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"},
                        metadata={"format": "pt"})


def mlx_lm_logits(folder: Path, tokens: mx.array) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(str(folder))
    return np.array(model(tokens))


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_lm_quantized_folder_gives_mlx_lm_logits(folders, case):
    _, folder = folders(case)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == CASES[case][2]  # mlx-lm did quantize it
    model = zoo.load_model(folder)
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(m.bits == CASES[case][2] and m.group_size == CASES[case][3] for m in layers)
    assert any(isinstance(m, nn.QuantizedEmbedding) for _, m in model.named_modules())
    ours, theirs = np.array(model(BATCH)), mlx_lm_logits(folder, BATCH)
    assert spread(theirs) > 1.0
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-4bit-g64", "gpt2-8bit-g64"])
def test_quantized_folder_decodes_mlx_lm_tokens_with_every_exact_cache(folders, case):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    _, folder = folders(case)
    twin, _ = load(str(folder))
    steps = list(generate_step(mx.array(PROMPT), twin, max_tokens=12, sampler=lambda lp: mx.argmax(lp, axis=-1)))
    tokens = [int(t) for t, _ in steps]
    logprobs = np.stack([np.array(lp).reshape(-1) for _, lp in steps])
    model = zoo.load_model(folder)
    for cache in exact_caches():
        ours, _ = greedy_cached(model, PROMPT, 12, cache)
        assert_greedy_agrees(ours, tokens, logprobs)


@pytest.mark.parametrize("case", list(CASES))
def test_kvzoo_convert_writes_mlx_lm_tensors_and_mlx_lm_reads_them(folders, case, tmp_path, capsys):
    hf_folder, mlx_folder = folders(case)
    _, _, bits, group_size = CASES[case]
    dest = tmp_path / "out"
    assert kvzoo(["convert", str(hf_folder), str(dest), "--bits", str(bits), "--group-size", str(group_size)]) == 0
    assert "MiB" in capsys.readouterr().err
    ours = mx.load(str(dest / "model.safetensors"))
    theirs = {}
    for file in mlx_folder.glob("*.safetensors"):
        theirs.update(mx.load(str(file)))
    # mlx-lm also quantizes GPT-2's position table; kvzoo keeps it float (its positional module
    # has no quantized form). Every other tensor is the same, bit for bit.
    skipped = {k for k in theirs if k.startswith("model.wpe.")}
    assert set(ours) - {"model.wpe.weight"} == set(theirs) - skipped
    for name in set(ours) - skipped:
        assert ours[name].dtype == theirs[name].dtype, name
        assert mx.array_equal(ours[name], theirs[name]).item(), name
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert (dest / "tokenizer.json").is_file()
    np.testing.assert_allclose(np.array(zoo.load_model(dest)(BATCH)), mlx_lm_logits(dest, BATCH),
                               atol=LOGIT_TOL, rtol=0)


def test_quantized_weights_are_smaller_and_counted_as_the_file_stores_them(folders):
    hf_folder, mlx_folder = folders("llama-4bit-g64")
    full, small = zoo.load_model(hf_folder), zoo.load_model(mlx_folder)
    stored = sum(v.nbytes for file in mlx_folder.glob("*.safetensors") for v in mx.load(str(file)).values())
    assert quantized.weight_bytes(small) == stored  # packed weights, scales and biases, as mlx-lm wrote them
    # 4 bits per weight plus a float32 scale and bias per 64 weights: 5 bits of 32.
    assert quantized.weight_bytes(small) < 0.2 * quantized.weight_bytes(full)


def test_zoo_save_of_quantized_model_round_trips(folders, tmp_path):
    _, mlx_folder = folders("qwen2-4bit-g32")
    model = zoo.load_model(mlx_folder)
    zoo.save(model, tmp_path / "again")
    again = zoo.load_model(tmp_path / "again")
    assert mx.array_equal(model(BATCH), again(BATCH)).item()


def _with_config(folder: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, message", [
    (dict(quantization={"group_size": 64, "bits": 7}, quantization_config=None), "bits must be one of"),
    (dict(quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"}, quantization_config=None), "mode 'mxfp4'"),
    (dict(quantization={"bits": 4}, quantization_config=None), "missing 'group_size'"),
    (dict(quantization=None, quantization_config={"quant_method": "gptq", "bits": 4}), "'gptq'"),
])
def test_bad_quantization_configs_are_refused_by_name(folders, tmp_path, change, message):
    _, mlx_folder = folders("llama-4bit-g64")
    with pytest.raises(ValueError, match=message):
        zoo.load_model(_with_config(mlx_folder, tmp_path, **change))


def test_convert_refuses_bad_targets_and_settings(folders, tmp_path, capsys):
    hf_folder, mlx_folder = folders("llama-4bit-g64")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert kvzoo(["convert", str(hf_folder), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert kvzoo(["convert", str(mlx_folder), str(tmp_path / "q")]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kvzoo(["convert", str(hf_folder), str(tmp_path / "q"), "--bits", "7"])
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantized.quantize(zoo.load_model(hf_folder), bits=4, group_size=48)
