"""memoir_eval: the paper's sequential-editing protocol, calibration, retention checks and the lm-eval model type."""
