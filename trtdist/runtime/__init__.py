"""Per-rank execution and the leader's control loop."""
