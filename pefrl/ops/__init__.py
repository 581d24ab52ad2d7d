"""Pure tensor math: advantages, losses, KL estimators, logprobs. No models, no Accelerator."""
