"""Evaluation and the commands around it: held-out evaluation, pass@k statistics, inference, pre-flight, plan."""
