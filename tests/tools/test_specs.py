"""dpo_lib.tools.specs: model shapes and parameter counts, LoRA counts, the GPU table, against hand counts.

The toy decoder below: vocabulary 99, hidden 32, 2 layers, MLP 64, 4 heads of 8, 2 K/V heads (the shape of
``dpo_lib.models.tiny_model``). Per layer: q, o 32*32 = 1,024 each, k, v 32*16 = 512 each, gate, up, down
32*64 = 2,048 each -> 9,216; 2 layers 18,432 (``P_lin``). Norms: 2 per layer + the final one, 5*32 = 160
(``N = 18,592``). Embedding 99*32 = 3,168, tied: ``P = 21,760``.
"""

import os

import pytest

from dpo_lib.models import tiny_model
from dpo_lib.tools.specs import (
    GPU,
    GPUS,
    MODELS,
    GiB,
    ModelSpec,
    cpu_device,
    gpu_spec,
    lora_trainable_params,
    model_spec,
    peak_flops,
    pick_precision,
)

TOY = ModelSpec("toy", vocab=99, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2)


def test_toy_shapes_and_counts_by_hand():
    assert (TOY.q_dim, TOY.kv_dim) == (32, 16)
    assert TOY.linear_shapes() == {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                                   "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    assert TOY.linear_params == 18_432
    assert TOY.non_embedding_params == 18_592
    assert TOY.params == 21_760 == tiny_model(99).num_parameters()
    # an untied LM head adds a second 99 x 32 matrix; Qwen2's q, k, v biases add 32 + 16 + 16 per layer
    assert ModelSpec("untied", 99, 32, 2, 64, 4, 2, tied=False).params == 21_760 + 3_168
    assert ModelSpec("bias", 99, 32, 2, 64, 4, 2, qkv_bias=True).linear_params == 18_432 + 2 * 64


def test_from_size_solves_for_the_mlp_width():
    # hidden 64, 2 layers, vocabulary 100, tied: embedding 6,400, norms 5*64 = 320; an MLP of 128 gives per layer
    # 4*64*64 + 3*64*128 = 16,384 + 24,576 = 40,960 -> P = 6,400 + 320 + 2*40,960 = 88,640. Back from P: 128.
    spec = ModelSpec.from_size(params=88_640, layers=2, hidden=64, vocab=100)
    assert (spec.intermediate, spec.heads, spec.head_dim) == (128, 1, 64)
    assert spec.params == 88_640
    with pytest.raises(ValueError, match="too few"):
        ModelSpec.from_size(params=6_000, layers=2, hidden=64, vocab=100)    # less than the embedding alone


def test_model_spec_reads_every_form():
    assert model_spec(TOY) is TOY
    assert model_spec("HuggingFaceTB/SmolLM2-360M-Instruct") is MODELS["SmolLM2-360M-Instruct"]   # hub ids work
    assert model_spec({"params": 88_640, "layers": 2, "hidden": 64, "vocab": 100}).intermediate == 128
    assert model_spec(tiny_model(99)).params == 21_760                    # a model: its config
    with pytest.raises(KeyError, match="presets"):
        model_spec("gpt-5")


def test_lora_count_by_hand():
    # r = 2 on q and k: q 2*(32 + 32) = 128, k 2*(32 + 16) = 96 -> 224 per layer, 448 for 2 layers
    assert lora_trainable_params(TOY, 2, ["q_proj", "k_proj"]) == 448
    # all 7 at r = 1: 64 + 48 + 48 + 64 + 96 + 96 + 96 = 512 per layer -> 1,024
    assert lora_trainable_params(TOY, 1) == 1_024
    with pytest.raises(ValueError, match="unknown target"):
        lora_trainable_params(TOY, 1, ["lm_head"])


def test_gpu_table_lookups():
    t4 = gpu_spec("t4")
    assert t4 is GPUS["T4"] and not t4.bf16 and t4.cuda
    assert t4.memory_bytes == 15 * GiB == 16_106_127_360
    assert gpu_spec("H100") is GPUS["H100-80GB"]                      # a unique prefix
    with pytest.raises(KeyError, match="A100-40GB"):
        gpu_spec("A100")                                              # two A100s: ambiguous
    mine = gpu_spec({"name": "V100", "memory_gib": 16, "bf16": False})
    assert mine == GPU("V100", 16.0, bf16=False, cuda=True)
    assert gpu_spec(mine) is mine
    with pytest.raises(TypeError):
        gpu_spec(16)


def test_peak_flops_by_torch_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12                   # the PCIe card's lower clocks
    assert peak_flops("Tesla T4") == 65e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("AMD Radeon") is None


def test_cpu_device_and_precision():
    cpu = cpu_device()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert (cpu.cuda, cpu.bf16) == (False, False) and cpu.memory_gib == round(ram / GiB, 1)
    assert gpu_spec("CPU") == cpu
    assert pick_precision("cpu")[0] == "fp32"
    assert pick_precision("T4")[0] == "fp16" and pick_precision("H100")[0] == "bf16"
