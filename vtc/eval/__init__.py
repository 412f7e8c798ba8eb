"""MME and Video-MME evaluation: loaders for the official layouts, lmms-eval prompts and scoring, a runner."""
