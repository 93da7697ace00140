from memoir_eval.lm_eval_tasks import *  # noqa: F401,F403  (one implementation for every memoir task)
