"""A local causal LM as the judge, read through its next-token log-probabilities instead of generated text.

The template is rendered as for the openai judge (it asks for "[[A]]", "[[B]]" or "[[C]]"), the judge's answer is
started with "[[", and the verdict is whichever of the letters "A" and "B" the model gives the higher
log-probability as the next token (equal: a tie). A forced choice, so never invalid; the detail keeps both
log-probabilities and their probability mass, which shows when a small model does not follow the format at all.
"""

from __future__ import annotations

import math

import torch

from evaluation.judges import JudgeSpecError, Judgment, Query
from evaluation.templates import Template

ANSWER_START = "[["
LETTERS = ("A", "B")


class HFJudge:
    position_sensitive = True

    def __init__(self, model_name: str, template: Template, device, batch_size: int = 8):
        from common.models import load_causal_lm

        self.name = f"hf:{model_name}"
        self.template = template
        self.device = torch.device(device)
        try:
            lm, self.tokenizer = load_causal_lm(model_name)
        except OSError as exc:  # a missing folder, an offline hub
            raise JudgeSpecError(f"--judge hf:{model_name}: cannot load the model ({exc})") from None
        self.lm = lm.to(self.device).eval()
        self.batch_size = batch_size
        self.letter_ids = []
        for letter in LETTERS:
            ids = self.tokenizer(letter, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise JudgeSpecError(f"--judge hf:{model_name}: the verdict letter {letter!r} is {len(ids)} tokens "
                                     "for this tokenizer; the hf judge reads a single next token")
            self.letter_ids.append(ids[0])

    def _prompt_ids(self, q: Query) -> list[int]:
        system, user = self.template.render(q.prompt, q.answer_a, q.answer_b, q.user_text)
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            text += ANSWER_START  # the judge's own reply, begun for it
        else:
            text = (system + "\n\n" if system else "") + user + "\n\nFinal verdict: " + ANSWER_START
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def judge(self, queries: list[Query]) -> list[Judgment]:
        out = []
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(queries), self.batch_size):
            rows = [self._prompt_ids(q) for q in queries[s:s + self.batch_size]]
            width = max(len(r) for r in rows)
            # left padding: every row's next-token logits sit at the last position
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1 whatever the padding
            logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            logps = torch.log_softmax(logits, dim=-1)[:, self.letter_ids].tolist()
            for lp_a, lp_b in logps:
                verdict = "A" if lp_a > lp_b else "B" if lp_b > lp_a else "tie"
                mass = math.exp(lp_a) + math.exp(lp_b)
                out.append(Judgment(verdict, {"logp_a": lp_a, "logp_b": lp_b, "p_letters": mass}))
        return out

    def close(self) -> None:
        pass
