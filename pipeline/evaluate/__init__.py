"""Held-out evaluation: implicit rewards, win rate, Kendall's tau, the margin histogram."""
