"""`model.attn_implementation`: the attention kernel a stage's LLM runs with."""

import torch

from common.config import load_config
from common.models import load_causal_lm
from common.run import load_start_lm


def _graph_ops(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `t`."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    return ids, mask


def test_eager_attention_is_the_same_function_without_the_fused_kernel():
    sdpa, _ = load_causal_lm("tiny-random")
    eager, _ = load_causal_lm("tiny-random", attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids, mask = _batch()
    out_sdpa = sdpa(input_ids=ids, attention_mask=mask).logits
    out_eager = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(out_sdpa[real], out_eager[real], atol=1e-4)
    # the backward of the fused kernel is what eager avoids (bench/RESULTS.md: a third of a bf16 step on AMX)
    assert any("ScaledDotProduct" in n for n in _graph_ops(out_sdpa.sum()))
    assert not any("ScaledDotProduct" in n for n in _graph_ops(out_eager.sum()))


def test_stage_config_selects_the_attention_kernel():
    default = load_config(None, ["train.dtype=float32"])
    assert default.model.attn_implementation == "auto"
    lm, _ = load_start_lm(default)
    assert lm.config._attn_implementation == "sdpa"
    lm, _ = load_start_lm(load_config(None, ["model.attn_implementation=eager"]))
    assert lm.config._attn_implementation == "eager"


def test_auto_attention_is_eager_for_bf16_on_cpu_only():
    from common.run import resolve_attn_implementation

    cfg = load_config(None, [])
    assert resolve_attn_implementation(cfg, torch.bfloat16) == "eager"
    assert resolve_attn_implementation(cfg, torch.float32) == "sdpa"
    assert resolve_attn_implementation(load_config(None, ["model.attn_implementation=sdpa"]), torch.bfloat16) == "sdpa"
    lm, _ = load_start_lm(load_config(None, ["train.dtype=bfloat16"]))
    assert lm.config._attn_implementation == "eager"
