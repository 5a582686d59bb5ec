"""Calibration runs: the loop over token windows, queries from hidden states, several processes."""
