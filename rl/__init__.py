"""What the RL scripts (PPO, GPO, GRPO) share: their flags, sampling from the policy, rewards, the
set-up of a run, the group step and PPO's step."""
