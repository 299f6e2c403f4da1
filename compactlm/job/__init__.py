"""compactlm.job, the main job (`compactlm run RECIPE`): the recipe (recipe.py), its stages on the run mechanism
(pipeline.py), its report (report.py); and the one-shot pruning demo (`compactlm demo`, demo.py)."""
