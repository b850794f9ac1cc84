"""Every loss as a pure function: tensors in, ``(loss, metrics)`` out, one file per family
(sft, preference pairs, the policy gradient of the group methods, PPO). They import nothing
but torch and the log-prob helpers of model/, so each can be tested on hand-made tensors."""
