"""Benchmarks: the online serving client (`trtdist bench serve`), its metrics, plots and the
side-by-side comparison of result files; the offline bench lives in `trtdist.bench`."""
