"""RL fine-tuning of language models on verifiable-reward tasks: VAPO and its PPO and GRPO baselines, and the
supervised warm start (sft). One module per method; actor_critic.py is the loop they share, objectives.py the
formulas, policy.py the policies and generation, tasks.py the problems, tokenizers and verifiers."""
