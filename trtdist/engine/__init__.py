"""Engines: build (shard + write per-rank files), load (one rank's file), checkpoints."""
