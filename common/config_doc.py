"""Print configs/README.md from the config schema: `python -m common.config_doc > configs/README.md`."""

from common.config import config_reference_markdown

HEADER = """# Config reference

Every training stage (`train_sft`, `train_rm`, `train_pdpo`, `train_ppo`) reads the same schema: a YAML file given
with `--config` plus dotted `key=value` overrides on the command line (`evaluate` reads the run's own config.yaml
plus overrides), e.g.

    python -m pipelines.train_rm --config configs/demo/rm.yaml train.max_steps=20 user_model.kind=cluster

Unknown keys, wrong types and out-of-range values fail before any model is loaded, naming the key (and the
nearest valid key for a typo). `python -m pipelines.train_rm --help` prints the same table.

Shipped configs:

| file | what |
|---|---|
| `demo/sft.yaml`, `demo/rm.yaml`, `demo/ppo.yaml`, `demo/pdpo.yaml` | the embedded demo (length-conflict task, `smollm2-135m`) |
| `tldr_length/*.yaml` | TL;DR length-conflict simulation on real posts (seed section 5.1) |
| `mtbench/*.yaml` | MT-Bench human judges as users |
| `summary_prefs/*.yaml` | MTurk summary preferences with demographics as user text |
| `psoups/pdpo.yaml`, `prism/pdpo.yaml` | P-SOUPS profiles and PRISM users (public files, not shipped here) |
| `deepspeed/zero{0,2,3}.json` | DeepSpeed engines (set `train.deepspeed=configs/deepspeed/zero2.json`) |

PPO's defaults follow the literature where it has one. `ppo.advantage_estimator=gae` (with `whiten_advantages`
null: whitened, as TRL's PPO) is PPO as in Ziegler et al. / InstructGPT with a value head; `rloo` (the demo's, with
`samples_per_prompt` >= 2) is RLOO as in Ahmadian et al. 2024, TRL's `RLOOTrainer` and OpenRLHF's `rloo`: the
sequence reward is the RM's raw score minus `kl_coef` x the sampled sequence KL, each sample's advantage is that
reward minus the mean of its siblings (here: the other samples of the same prompt *and user*), and nothing else
normalises it (`normalize_reward` false, `whiten_advantages` null = off for rloo; TRL's `normalize_advantage` and
`normalize_reward` default to false too). The per-user running normaliser (`normalize_reward=true`,
`reward_baseline=per_user`) stays available for GAE.

User tables (individual offsets, cluster logits) are optimised row by row by default
(`user_model.table_optimizer=lazy_adamw`): a user absent from a batch keeps its row, moments and step count.

This table is generated from `common/config.py` (`python -m common.config_doc > configs/README.md`); a test keeps
it in sync.

"""

if __name__ == "__main__":
    print(HEADER + config_reference_markdown())
