"""The DPO objective: loss variants, their settings, token counts and step metrics."""
