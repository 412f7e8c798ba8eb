"""MME and Video-MME evaluation: loaders, prompts and scoring as lmms-eval does them, resumable runners."""

#: the lmms-eval release whose prompts, answer extraction and scoring vtc reproduces (MME and Video-MME)
LMMS_EVAL_VERSION = "0.7.3"
