"""The trials' side of the project: typed hyperparameters, the local/cluster runner,
checkpoint-side state, and ``python -m nas_trial candidates`` (several searches to one
retraining experiment)."""
