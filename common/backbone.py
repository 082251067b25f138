"""The LLM decoder with LoRA and a user model in front: the shared body of the reward model, the policy and the
critic. It owns the only call of `prepend_prefix` on a forward pass."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from user_models import UserModel, prepend_prefix
from user_models.prefix import PrefixedInputs


@contextlib.contextmanager
def quiet_peft_wrap():
    """PEFT (0.21) reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a model, which
    prints a FutureWarning into every stage's output that no user of this code can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_finetune(causal_lm, model_cfg):
    """Wrap the causal LM per `model.finetune`: LoRA adapters (PEFT), full fine-tune, or frozen."""
    if model_cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                          target_modules=list(model_cfg.lora_target_modules), bias="none")
        with quiet_peft_wrap():
            return get_peft_model(causal_lm, lora)
    for p in causal_lm.parameters():
        p.requires_grad_(model_cfg.finetune == "full")
    return causal_lm


def init_prefix_from_vocab(embed: nn.Embedding, n_tokens: int, seed: int) -> torch.Tensor:
    """Soft prompts start as embeddings of random real tokens: in-distribution inputs for the LLM (Lester et al.)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embed.num_embeddings, (n_tokens,), generator=g)
    return embed.weight.detach()[ids].float().clone()


class PersonalizedBackbone(nn.Module):
    """`hidden_states(batch, ...)`: the decoder's last hidden states of [user prefix, tokens].

    `causal_lm` is either a PEFT model (LoRA) or a plain causal LM. The reference policy pi_SFT(y|x) is this model
    with adapters disabled and the user-agnostic `reference_prefix` (seed eq. P-DPO): the soft prompt `train_sft`
    trained for its generic user, or no prefix at all when the stage did not start from such an SFT run.
    `reference()` gives the reference's LM; `hidden_states(..., reference=True)` its inputs.

    A policy stage starts its generic embedding e_0 at `reference_prefix` and its adapters at zero, so that before
    its first update it *is* pi_SFT (KL 0 on PPO's first rollout, zero DPO margins on the first step).
    """

    def __init__(self, causal_lm, user_model: UserModel, reference_prefix: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.compute_dtype = compute_dtype  # see common.precision
        self.lm = causal_lm
        self.user_model = user_model
        self.is_peft = hasattr(causal_lm, "disable_adapter")
        self._frozen_reference = None
        # [T_u, d], frozen; not in state_dict: it is rebuilt from model.sft_run or read from the run's checkpoint/
        self.register_buffer("reference_prefix", None if reference_prefix is None else reference_prefix.detach().clone(),
                             persistent=False)

    # -- parts of the wrapped model
    @property
    def base_lm(self):
        return self.lm.get_base_model() if self.is_peft else self.lm

    @property
    def decoder(self):
        return self.base_lm.model

    @property
    def lm_head(self):
        return self.base_lm.lm_head

    @property
    def embed_tokens(self):
        return self.base_lm.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.base_lm.config.hidden_size

    def llm_trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.lm.parameters() if p.requires_grad]

    def keep_frozen_reference(self) -> None:
        """Full fine-tuning changes the base weights, so the reference needs its own frozen copy."""
        if not self.is_peft and any(p.requires_grad for p in self.lm.parameters()):
            ref = copy.deepcopy(self.base_lm).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._frozen_reference = [ref]  # a list hides it from state_dict() and parameters()

    @contextlib.contextmanager
    def reference(self):
        """Inside this context `decoder`/`lm_head` compute pi_SFT (adapters off)."""
        if self.is_peft:
            with self.lm.disable_adapter():
                yield self.base_lm
        elif self._frozen_reference is not None:
            yield self._frozen_reference[0]
        else:
            yield self.base_lm

    def autocast(self):
        """Autocast to the compute dtype on the LLM's device (nothing in float32)."""
        from common.precision import autocast

        return autocast(next(self.lm.parameters()).device, self.compute_dtype)

    # -- forward
    def prefixed_inputs(self, input_ids, attention_mask, user_idx, text_ids=None, text_mask=None, labels=None,
                        padding_side: str = "right", use_prefix: bool = True, lm=None,
                        reference: bool = False) -> PrefixedInputs:
        """[prefix, tokens] inputs: each row's user prefix, or with `reference=True` the reference prefix (the same
        for every row; none if the backbone has none), or with `use_prefix=False` none."""
        lm = lm if lm is not None else self.base_lm
        embed = lm.get_input_embeddings()
        token_embeds = embed(input_ids)
        if reference and self.reference_prefix is not None:
            prefix = self.reference_prefix.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            return prepend_prefix(prefix, mask, token_embeds, attention_mask, labels, padding_side)
        if reference or not use_prefix:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            return PrefixedInputs(token_embeds, attention_mask, position_ids, labels, 0)
        prefix = self.user_model(user_idx, text_ids, text_mask, embed_tokens=embed)
        return prepend_prefix(prefix.embeds, prefix.mask, token_embeds, attention_mask, labels, padding_side)

    def hidden_states(self, batch: dict, use_prefix: bool = True, lm=None,
                      reference: bool = False) -> tuple[torch.Tensor, PrefixedInputs]:
        """Last hidden states of the batch. `reference=True` lays out the reference's inputs; call it with the LM
        of `reference()` (adapters off) to run pi_SFT."""
        lm = lm if lm is not None else self.base_lm
        with self.autocast():
            inputs = self.prefixed_inputs(batch["input_ids"], batch["attention_mask"], batch["user_idx"],
                                          batch.get("text_ids"), batch.get("text_mask"), batch.get("labels"),
                                          use_prefix=use_prefix, lm=lm, reference=reference)
            out = lm.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids, use_cache=False)
        return out.last_hidden_state, inputs

    # -- save / load of the trainable LLM part
    def save_llm(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            self.lm.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        elif any(p.requires_grad for p in self.lm.parameters()):
            self.lm.save_pretrained(str(folder / "model"), safe_serialization=True)

    def load_llm(self, folder: Path) -> None:
        from safetensors.torch import load_file

        adapter = folder / "adapter" / "adapter_model.safetensors"
        if self.is_peft:
            if not adapter.exists():
                raise FileNotFoundError(f"{adapter}: the run has no LoRA adapter")
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, load_file(str(adapter)))
        elif (folder / "model").exists():
            from transformers import AutoModelForCausalLM

            full = AutoModelForCausalLM.from_pretrained(str(folder / "model"), use_safetensors=True,
                                                        dtype=next(self.lm.parameters()).dtype)
            self.lm.load_state_dict(full.state_dict())
