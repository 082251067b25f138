"""An LLM judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, `pipelines.serve`, ...).

One chat request per query (temperature 0), the reply parsed strictly for "[[A]]" / "[[B]]" / "[[C]]". Transient
failures (HTTP 5xx, 429, timeouts, refused connections) are retried with exponential backoff, a bounded number of
times; any other error (a wrong model name, a bad key) stops at once. Replies go to a `VerdictCache` as they
arrive, so a rerun asks only for what is missing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from evaluation.judges import JudgeError, Judgment, Query
from evaluation.templates import Template
from evaluation.verdict_cache import VerdictCache, cache_key
from evaluation.verdicts import parse_verdict

log = logging.getLogger(__name__)


class OpenAIJudge:
    position_sensitive = True

    def __init__(self, base_url: str, model: str, template: Template, *, cache_dir: str | Path | None = None,
                 max_tokens: int = 512, timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0):
        import openai

        self.base_url, self.model, self.template = base_url.rstrip("/"), model, template
        self.name = f"openai:{self.base_url}"
        self.max_tokens, self.max_retries = int(max_tokens), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        # A local endpoint needs no key, but the client refuses to start without one.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "no-key",
                                    timeout=timeout_s, max_retries=0)  # retries are ours: counted and logged
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache: VerdictCache | None = None  # opened on first use: a refused run leaves no folder behind
        self.n_requests = 0  # requests sent (retries included)
        self.n_cached = 0  # replies read from the cache

    def _key(self, system: str, user: str, q: Query) -> str:
        return cache_key(judge=f"{self.base_url}|{self.model}", max_tokens=self.max_tokens, temperature=0.0,
                         template=self.template.digest, prompt=q.prompt, answer_a=q.answer_a, answer_b=q.answer_b,
                         user_text=q.user_text if self.template.needs_user_text else None,
                         messages=[system, user])

    @property
    def cache(self) -> VerdictCache | None:
        if self._cache is None and self.cache_dir is not None:
            self._cache = VerdictCache(self.cache_dir)
        return self._cache

    def judge(self, queries: list[Query]) -> list[Judgment]:
        out = []
        cache = self.cache
        for q in queries:
            system, user = self.template.render(q.prompt, q.answer_a, q.answer_b, q.user_text)
            key = self._key(system, user, q)
            reply = cache.get(key) if cache is not None else None
            cached = reply is not None
            if cached:
                self.n_cached += 1
            else:
                reply = self._ask(system, user)
                if cache is not None:
                    cache.put(key, f"{self.base_url}|{self.model}", reply)
            out.append(Judgment(parse_verdict(reply), {"reply": reply, "cached": cached}))
        return out

    def _ask(self, system: str, user: str) -> str:
        import openai

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        for attempt in range(self.max_retries + 1):
            self.n_requests += 1
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                               max_tokens=self.max_tokens)
                return response.choices[0].message.content or ""
            # APITimeoutError is an APIConnectionError; InternalServerError is any status >= 500
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                if attempt == self.max_retries:
                    raise JudgeError(f"judge {self.base_url} (model {self.model}): still failing after "
                                     f"{attempt + 1} attempts: {exc}") from None
                delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
                log.warning("judge %s: %s; retry %d/%d in %.1f s", self.base_url, exc, attempt + 1,
                            self.max_retries, delay)
                time.sleep(delay)
            except openai.APIError as exc:  # 4xx and malformed replies: retrying gives the same answer
                raise JudgeError(f"judge {self.base_url} (model {self.model}): {exc}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None
