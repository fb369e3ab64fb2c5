"""Training the embedded default: the toy world's data, encoder alignment, the two stages, evaluation.

Kept import-light on purpose: ``ibllm.train.toyworld`` needs only numpy and PIL, and must not pull in torch.
"""
