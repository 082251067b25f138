"""Pairwise evaluation of policies: per-user win rates of one run against a baseline under a pluggable judge.

- `evaluation.stats`: win / tie / loss tallies, bootstrap intervals, the length-controlled win rate (pure functions).
- `evaluation.verdicts`: strict parsing of "[[A]]" / "[[B]]" / "[[C]]" verdicts and the both-orders rule.
- `evaluation.templates`: the judge prompts (`psoups`, `prism`, `mtbench`, or a text file).
- `evaluation.judges`: the judge spec (`length:`, `rm:`, `openai:`, `hf:`) and the position-insensitive judges;
  `evaluation.openai_judge` (+ `evaluation.verdict_cache`) and `evaluation.hf_judge` the LLM judges.
- `evaluation.winrate`: `run_winrate`, the whole evaluation (generate, judge, aggregate, write); `evaluation.report`
  its report.md.
"""
