"""dpo_lib.config: loss fields read from the registry, and the checks of settings that depend on each other."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from types import SimpleNamespace

import pytest

from dpo_lib.config import (
    BenchConfig,
    JobConfig,
    LengthsConfig,
    PairsConfig,
    SamplingConfig,
    TrainConfig,
    with_loss_params,
)
from dpo_lib.losses import LOSSES, Param, loss_params, needs_reference, register
from dpo_lib.settings import Checked, ConfigError, add_arguments, from_args, positive, setting

# ----------------------------------------------------------------------------- TrainConfig and the loss registry


def test_loss_fields_are_the_registry_params():
    """The three losses with their own knobs declare dpop_lambda 50, rdpo_alpha 0.05, simpo_gamma 0.5;
    TrainConfig has exactly those extra fields with those defaults and help lines."""
    declared = {name: p for loss in LOSSES.values() for name, p in loss.params.items()}
    assert {k: p.default for k, p in declared.items()} == {"dpop_lambda": 50.0, "rdpo_alpha": 0.05,
                                                            "simpo_gamma": 0.5}
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name, p in declared.items():
        assert by_name[name].default == p.default
        assert by_name[name].metadata["help"] == p.help
    assert by_name["loss_type"].metadata["choices"] == tuple(LOSSES) == (
        "sigmoid", "ipo", "hinge", "robust", "dpop", "rdpo", "simpo", "orpo")


def test_loss_params_check_and_reach_the_loss():
    """Param's default check is at_least(0.0); loss_params hands each loss only its own knobs."""
    with pytest.raises(ConfigError, match=r"^--simpo-gamma: must be >= 0.0 \(got -1.0\)$"):
        TrainConfig(simpo_gamma=-1.0)
    assert loss_params(TrainConfig(loss_type="dpop", dpop_lambda=7.0, rdpo_alpha=0.3)) == {"dpop_lambda": 7.0}
    assert loss_params(TrainConfig(loss_type="rdpo", rdpo_alpha=0.3)) == {"rdpo_alpha": 0.3}
    assert loss_params(TrainConfig(loss_type="sigmoid", simpo_gamma=2.0)) == {}


def test_loss_flags_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    c = from_args(TrainConfig, parser.parse_args(["--loss-type", "simpo", "--simpo-gamma", "1.5", "--beta", "2"]))
    assert (c.loss_type, c.simpo_gamma, c.beta) == ("simpo", 1.5, 2.0)


def test_a_registered_loss_becomes_a_config_field_and_a_flag():
    """Register a temporary loss 'toy' with one Param (default 0.25, check > 0): a config class built by
    with_loss_params then has a ``toy_eta`` field with that default and check, and a ``--toy-eta`` flag;
    loss_params and needs_reference read it. The registry is module state: it is restored afterwards."""
    before = dict(LOSSES)
    try:
        @register("toy", "a toy loss", needs_reference=False, toy_eta=Param(0.25, "toy: η", positive))
        def toy(x, beta, eps, toy_eta):  # pragma: no cover - never called
            raise AssertionError

        assert list(LOSSES)[-1] == "toy" and LOSSES["toy"].fn is toy

        @dataclass
        @with_loss_params
        class Fresh(Checked):
            beta: float = setting(0.1, "β", positive)

        assert {f.name: f.default for f in fields(Fresh)} == {"beta": 0.1, "dpop_lambda": 50.0, "rdpo_alpha": 0.05,
                                                              "simpo_gamma": 0.5, "toy_eta": 0.25}
        with pytest.raises(ConfigError, match=r"^--toy-eta: must be > 0 \(got 0\)$"):
            Fresh(toy_eta=0)
        parser = argparse.ArgumentParser()
        add_arguments(parser, Fresh)
        assert from_args(Fresh, parser.parse_args(["--toy-eta", "0.75"])).toy_eta == 0.75
        assert loss_params(SimpleNamespace(loss_type="toy", toy_eta=0.75, simpo_gamma=9.0)) == {"toy_eta": 0.75}
        assert needs_reference("toy") is False and needs_reference("sigmoid") is True
    finally:
        LOSSES.clear()
        LOSSES.update(before)
    assert "toy" not in LOSSES and list(LOSSES) == list(before)
    assert "toy_eta" not in {f.name for f in fields(TrainConfig)}


def test_orpo_refuses_nll_weight_and_label_smoothing():
    """ORPO holds its NLL and takes no ε; SimPO takes ε (smoothing=True in its registry entry)."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(loss_type="orpo", nll_weight=0.5)
    assert str(e.value) == ("--nll-weight: must be 0 with --loss-type orpo, whose loss holds the NLL already "
                            "(got 0.5)")
    with pytest.raises(ConfigError) as e:
        TrainConfig(loss_type="orpo", label_smoothing=0.1)
    assert str(e.value) == "--label-smoothing: does not apply to --loss-type orpo (got 0.1)"
    TrainConfig(loss_type="simpo", label_smoothing=0.1)
    TrainConfig(loss_type="sigmoid", nll_weight=0.5)


def test_grad_accum_must_divide_batch_size():
    """8 % 3 = 2: refused; 6 % 3 = 0 and 8 % 4 = 0: fine."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(batch_size=8, grad_accum=3)
    assert e.value.name == "grad_accum" and str(e.value) == "--grad-accum: must divide --batch-size 8 (got 3)"
    TrainConfig(batch_size=6, grad_accum=3)
    TrainConfig(batch_size=8, grad_accum=4)


# ----------------------------------------------------------------------------- sampling commands


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "hi"}\n')
    return p


def test_pairs_refuses_out_equal_to_prompts(prompts, tmp_path):
    """The same file, even written another way (through ``sub/..``), would be overwritten."""
    with pytest.raises(ConfigError) as e:
        PairsConfig(prompts=prompts, out=prompts)
    assert e.value.name == "out" and "overwrite the prompts" in str(e.value)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="^--out: is the --prompts file"):
        PairsConfig(prompts=prompts, out=tmp_path / "sub" / ".." / "prompts.jsonl")
    assert PairsConfig(prompts=prompts, out=tmp_path / "pairs.jsonl").num_samples == 4


def test_pairs_needs_two_samples_and_a_temperature(prompts, tmp_path):
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(ConfigError) as e:
        PairsConfig(prompts=prompts, out=out, num_samples=1)
    assert str(e.value) == "--num-samples: must be >= 2 to compare answers (got 1)"
    with pytest.raises(ConfigError) as e:
        PairsConfig(prompts=prompts, out=out, temperature=0.0)
    assert e.value.name == "temperature" and "greedy" in e.value.message
    with pytest.raises(ConfigError, match=r"^--prompts: is required \(got nothing\)$"):
        PairsConfig(out=out)
    # the sampling command alone allows 1 sample and greedy decoding
    SamplingConfig(num_samples=1, temperature=0.0)


def test_top_p_zero_is_refused():
    """top_p's range is [0, 1] but 0 keeps no token: refused by the combination check, in every sampling config."""
    for cls in (SamplingConfig, LengthsConfig):
        with pytest.raises(ConfigError) as e:
            cls(top_p=0.0)
        assert str(e.value) == "--top-p: must be > 0"
    with pytest.raises(ConfigError, match=r"^--top-p: must be in \[0.0, 1.0\] \(got 1.5\)$"):
        LengthsConfig(top_p=1.5)
    assert LengthsConfig(top_p=1.0).num_samples == 2  # lengths' own default, not SamplingConfig's 4


def test_bench_micro_batch_must_divide_batch():
    with pytest.raises(ConfigError) as e:
        BenchConfig(batch_size=4, micro_batch_size=3)
    assert str(e.value) == "--micro-batch-size: must divide --batch-size 4 (got 3)"
    assert BenchConfig(batch_size=4, micro_batch_size=2).micro_batch_size == 2
    assert BenchConfig(batch_size=4).micro_batch_size is None


# ----------------------------------------------------------------------------- the main job


def test_job_dataset_takes_a_hub_name_but_not_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local file called "ultrafeedback" here
    assert str(JobConfig(dataset="ultrafeedback").dataset) == "ultrafeedback"
    assert str(JobConfig(dataset="HuggingFaceH4/ultrafeedback_binarized").dataset) == \
        "HuggingFaceH4/ultrafeedback_binarized"
    with pytest.raises(ConfigError) as e:
        JobConfig(dataset=tmp_path / "missing.jsonl")
    assert str(e.value) == f"--dataset: no such file: {tmp_path / 'missing.jsonl'}"
    with pytest.raises(ConfigError, match="^--dataset: no such file: ultrafeedbak$"):
        JobConfig(dataset="ultrafeedbak")  # a typo is a missing file, not a hub dataset


def test_job_combinations(tmp_path):
    with pytest.raises(ConfigError, match=r"^--max-prompt-length: must be < --max-length 64 \(got 64\)$"):
        JobConfig(max_length=64, max_prompt_length=64)
    with pytest.raises(ConfigError, match="^--resume: needs the --out folder"):
        JobConfig(resume=True)
    assert JobConfig(resume=True, out=tmp_path).resume
