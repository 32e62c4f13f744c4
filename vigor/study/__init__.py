"""The small reward study: does an intrinsic reward train a policy that can already do a task sometimes?

diagnose   within-group AUROC of each intrinsic score for correct vs incorrect completions (before any RL)
"""
