"""The rank side of Roundhouse: `python -m trainers` trains one rank of a job.

Modules, one concern each: env (the environment contract), data (byte tokens, corpus, sampler), model (the
GPT), optim (AdamW), schedule (the learning rate), reporting (heartbeats and metrics to the control plane),
main (the training loop)."""
