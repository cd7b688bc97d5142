"""What a run shows and keeps: metrics and their sinks, progress, health alerts, the run log, the HTML report."""
