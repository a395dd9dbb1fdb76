"""LoRA and QLoRA wiring for DPO: peft adapters, a 4-bit base, the right dtype, merging.

LoRA (Hu et al. 2021) freezes a weight ``W`` (``d_out × d_in``) and learns a low-rank
update: the layer computes ``W x + (alpha / r) · B A x`` with ``A`` (``r × d_in``) and ``B``
(``d_out × r``). ``B`` starts at zero, so the adapted model starts *exactly* at the base
model. That is what makes LoRA and DPO fit together: the reference policy is the base,
i.e. the same model with its adapter switched off
(:class:`dpo_lib.reference.AdapterDisabledReference`), and no second copy is needed.

QLoRA (Dettmers et al. 2023) stores the frozen base in 4-bit NormalFloat (NF4), with
double-quantised block constants, and computes in bf16/fp16; only the adapters are in
full precision. It needs bitsandbytes and a CUDA GPU (the ``gpu`` extra:
``pip install 'dpo_lib[gpu]'``).

* :func:`pick_dtype` — bf16 where the GPU supports it, else fp16 on CUDA, fp32 on a CPU
  (the rule of :mod:`dpo_lib.precision`, imported from there).
* :data:`LINEAR_MODULES` / :data:`ALL_LINEAR` — the decoder's linear layers, which LoRA adapts
  (the VRAM planner counts its parameters from the same names).
* :func:`make_lora_model` — wrap a model with peft LoRA adapters (dropout 0 by default:
  DPO wants deterministic policy and reference).
* :func:`load_4bit_model` — the QLoRA base (GPU only; a clear error otherwise).
* :func:`merge_and_save` — fold ``(alpha / r) · B A`` into ``W`` and save plain safetensors.
* :func:`merged_copy` — the same fold on a copy, for sampling: generation from a peft model pays
  the adapters' extra matmuls and Python hooks at every new token, a merged copy does not.

The rest of the course works on a LoRA model unchanged: :class:`dpo_lib.trainer.DPOTrainer`
moves its batches to the model's device, :func:`dpo_lib.logprobs.concatenated_forward` sums
fp32 log-probs from a bf16/fp16 model, and :func:`dpo_lib.evaluation.implicit_reward_accuracy`
and :func:`dpo_lib.evaluation.sequence_kl` take ``AdapterDisabledReference(peft_model)`` as
the reference.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch

from dpo_lib.models import disable_dropout, load_tokenizer, resolve_model
from dpo_lib.precision import pick_dtype  # re-exported: notebooks call lora.pick_dtype

# the linear layers of a Llama-style decoder block; "all-linear" is peft's name for all of them (LM head excluded)
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


class QLoRAUnavailable(RuntimeError):
    """4-bit loading needs a CUDA GPU and bitsandbytes; the message says which one is missing."""


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def make_lora_model(model: torch.nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    target_modules: str | list[str] = ALL_LINEAR, gradient_checkpointing: bool = False,
                    **lora_kwargs):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on ``target_modules``.

    ``"all-linear"`` adapts every linear layer of the decoder (not the LM head). Only the
    adapters train; peft keeps them in fp32 even when the base is bf16/fp16/4-bit. With
    ``gradient_checkpointing=True`` the base recomputes each layer's activations in the
    backward pass (non-reentrant checkpointing, so the frozen embeddings need no grad).

    We do not call peft's ``prepare_model_for_kbit_training``: it upcasts every weight that
    is not 4-bit (the embedding matrix too) from bf16 to fp32, which on SmolLM2-135M costs 57 MB
    of the 158 MB that NF4 saves (a fifth of the saving on the 360M and 8B models), and turns
    gradient checkpointing on by default. What the upcast buys the course already has: RMSNorm
    computes in fp32 inside transformers, and the log-probs are summed from fp32 logits.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.config.use_cache = False
    return peft_model


def check_qlora_available() -> None:
    """Raise :class:`QLoRAUnavailable` naming what is missing for 4-bit loading."""
    if not torch.cuda.is_available():
        raise QLoRAUnavailable(
            "4-bit QLoRA needs a CUDA GPU: bitsandbytes' NF4 kernels do not run on this machine "
            "(torch.cuda.is_available() is False). Use make_lora_model on a bf16/fp32 model instead, "
            "or run on a GPU (e.g. Colab: Runtime > Change runtime type > T4 GPU).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QLoRAUnavailable(
            "4-bit QLoRA needs the bitsandbytes package, which is not installed. Install the course's "
            "GPU extra:  pip install 'dpo_lib[gpu]'   (or: pip install bitsandbytes)")


def load_4bit_model(name_or_path: str | os.PathLike | None = None, compute_dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False):
    """``(model, tokenizer)`` with the decoder's linear layers in 4-bit NF4, double-quantised.

    ``compute_dtype`` is the dtype of the matmuls (the weights are dequantised block by block
    on the fly): :func:`pick_dtype` by default. Embeddings, norms and the LM head stay in
    ``compute_dtype``. GPU only: raises :class:`QLoRAUnavailable` with the fix otherwise.
    """
    check_qlora_available()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = compute_dtype or pick_dtype("cuda")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype)
    source = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=compute_dtype,
                                                 device_map={"": torch.cuda.current_device()},
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model, load_tokenizer(source, trust_remote_code=trust_remote_code)


def is_4bit(model: torch.nn.Module) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False))


def merge_and_save(peft_model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Merge the LoRA update into the base weights and save a plain model (safetensors).

    After this the folder loads with ``AutoModelForCausalLM.from_pretrained`` alone, no peft.
    ``merge_and_unload`` rewrites the wrapped model in place: call this last, or use the
    returned folder afterwards. A 4-bit base is refused: merging into NF4 weights rounds
    the update away. For QLoRA, save the adapter (``peft_model.save_pretrained``), reload
    the base in bf16, attach the adapter with ``PeftModel.from_pretrained`` and merge that.
    """
    if is_4bit(peft_model):
        raise ValueError("refusing to merge into a 4-bit base (the update would be quantised away): save the "
                         "adapter, reload the base in bf16/fp16, attach the adapter with "
                         "PeftModel.from_pretrained(base, adapter_dir), then call merge_and_save on that")
    out = Path(out_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def merged_copy(peft_model) -> torch.nn.Module:
    """A plain model equal to ``peft_model`` with its adapter folded in; ``peft_model`` is untouched.

    For sampling: a merged model generates at the base model's speed (no adapter matmuls or peft
    hooks per token), and gives the adapter model's logits up to float rounding. Costs one copy
    of the weights while it lives. A 4-bit base is refused, as in :func:`merge_and_save`.
    """
    if is_4bit(peft_model):
        raise ValueError("refusing to merge into a 4-bit base (the update would be quantised away); "
                         "sample from the peft model itself")
    return copy.deepcopy(peft_model).merge_and_unload().eval()


__all__ = ["ALL_LINEAR", "LINEAR_MODULES", "QLoRAUnavailable", "check_qlora_available", "is_4bit", "load_4bit_model",
           "make_lora_model", "merge_and_save", "merged_copy", "trainable_parameters"]
